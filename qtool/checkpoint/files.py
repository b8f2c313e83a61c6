"""Index of a Hugging Face checkpoint folder (or hub id): JSON files and safetensors headers only.

Contract: `open_checkpoint(path_or_hub_id)` returns a CheckpointFiles with config.json,
hf_quant_config.json, generation_config.json, quantize_config.json (GPTQ), the tokenizer files
present, and a TensorInfo (dtype, shape, absolute byte offset, byte length) for every tensor of
every shard (`model.safetensors.index.json` honoured). No tensor data is read and torch is not
imported. A missing local path raises UsageError; a malformed checkpoint (no config, config not
JSON, no safetensors, corrupt or truncated header, data past the end of a file, unknown dtype,
index naming a missing shard or tensor) raises CheckpointError with one line naming the file and
tensor. `.pin` identifies the version of a local folder that was read (qtool.checkpoint.snapshot: a loader
verifies it after its last read). With `strict=False` the per-tensor problems are collected in `.problems` instead, so
`inspect` can list all of them. A string that is not a local path but looks like `org/name` is
opened from the Hugging Face hub (qtool.sources' hub rules and timeout): a complete copy in the local
hub cache is used as is; otherwise the JSON files are downloaded (cached) and each shard's header is
read with HTTP range requests (the first 100 kB, then the rest of the header if longer), no tensor
data. Offline, unknown or gated repositories end in one-line Failures.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from qtool.errors import CheckpointError, Failure, UsageError

# safetensors dtype string -> bits per element
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
MAX_HEADER = 100 * 1024 * 1024      # the safetensors library refuses headers above 100 MB too

TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.txt",
                   "added_tokens.json")
JSON_NAMES = ("config.json", "hf_quant_config.json", "generation_config.json", "quantize_config.json",
              "model.safetensors.index.json", "tokenizer_config.json", "chat_template.json")
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class TensorInfo:
    name: str
    dtype: str                  # safetensors dtype string: 'BF16', 'F8_E4M3', 'U8', 'I32', ...
    shape: tuple[int, ...]
    file: Path
    offset: int                 # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class CheckpointFiles:
    root: Path
    source: str                             # local path or hub id
    config: dict                            # config.json
    hf_quant_config: dict | None            # hf_quant_config.json
    generation_config: dict | None
    tensors: dict[str, TensorInfo]          # all shards
    shard_files: list[Path]
    tokenizer_files: list[str]
    has_chat_template: bool
    quantize_config: dict | None = None     # quantize_config.json (GPTQ tools)
    tokenizer_config: dict | None = None    # tokenizer_config.json
    file_sizes: dict[Path, int] = field(default_factory=dict)   # shard -> bytes on disk
    remote: bool = False                    # headers came from the hub (no local tensor data)
    problems: list[str] = field(default_factory=list)           # strict=False: what would have raised
    pin: tuple | None = None                # qtool.checkpoint.snapshot.pin(root), taken before any file was read

    @property
    def bytes_on_disk(self) -> int:
        return sum(self.file_sizes.values())


def _tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8


def parse_header(header: bytes, file: Path, file_size: int, problems: list[str] | None = None
                 ) -> dict[str, TensorInfo]:
    """Parse the JSON header bytes of a safetensors file (the part after the 8-byte length).

    Raises CheckpointError at the first problem, or appends it to `problems` when given (then
    the tensors with a sound entry are returned, including those whose data lies past the end
    of a truncated file).
    """
    def bad(msg: str):
        if problems is None:
            raise CheckpointError(msg, hint="the file is corrupt or was not fully downloaded")
        problems.append(msg)

    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file.name}: corrupt safetensors header (not JSON: {exc})",
                              hint="the file is corrupt or is not a safetensors file")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file.name}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + len(header)
    out: dict[str, TensorInfo] = {}
    for name, ent in meta.items():
        if name == "__metadata__":
            continue
        if not (isinstance(ent, dict) and isinstance(ent.get("dtype"), str) and isinstance(ent.get("shape"), list)
                and isinstance(ent.get("data_offsets"), list) and len(ent["data_offsets"]) == 2
                and all(isinstance(x, int) and x >= 0 for x in ent["shape"] + ent["data_offsets"])):
            bad(f"{file.name}: tensor {name}: malformed header entry {json.dumps(ent)[:80]}")
            continue
        dtype, shape = ent["dtype"], tuple(ent["shape"])
        begin, end = ent["data_offsets"]
        if dtype not in DTYPE_BITS:
            bad(f"{file.name}: tensor {name}: unknown dtype {dtype!r}")
            continue
        if end < begin or end - begin != _tensor_nbytes(dtype, shape):
            bad(f"{file.name}: tensor {name}: data_offsets {begin}..{end} do not match "
                f"{dtype} {list(shape)} ({_tensor_nbytes(dtype, shape)} bytes)")
            continue
        if data_start + end > file_size:     # kept (the header is sound) so the layer is still described
            bad(f"{file.name}: tensor {name}: data ends at byte {data_start + end} but the file has "
                f"{file_size} bytes (truncated)")
        out[name] = TensorInfo(name, dtype, shape, file, data_start + begin, end - begin)
    return out


def header_length(prefix: bytes, file: Path, file_size: int) -> int:
    """The header length stored in the first 8 bytes, validated against the file size."""
    if len(prefix) < 8:
        raise CheckpointError(f"{file.name}: truncated safetensors file ({file_size} bytes, no header)",
                              hint="the file is corrupt or was not fully downloaded")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER or 8 + n > file_size:
        raise CheckpointError(f"{file.name}: corrupt safetensors header (length {n} for a {file_size}-byte file)",
                              hint="the file is corrupt, truncated or not a safetensors file")
    return n


def _read_header(path: Path, problems: list[str] | None) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), path, size)
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read ({exc.strerror or exc})")
    if len(raw) < n:
        raise CheckpointError(f"{path.name}: truncated safetensors header")
    return parse_header(raw, path, size, problems)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """All tensors of one safetensors file; CheckpointError on anything malformed."""
    return _read_header(Path(path), None)


def read_json(path: Path, required: bool = False) -> dict | None:
    """A JSON object file, None when absent (CheckpointError when required, not JSON or not an object)."""
    if not path.exists():
        if required:
            raise CheckpointError(f"{path.parent}: no {path.name}",
                                  hint="a Hugging Face checkpoint folder has config.json and *.safetensors files")
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise CheckpointError(f"{path.name} is not valid JSON{where}: {path}")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} is not a JSON object: {path}")
    return obj


def shard_names(root: Path, index: dict | None, listing: list[str]) -> tuple[list[str], dict[str, str]]:
    """Shard file names and the index's tensor -> file map (empty without an index)."""
    if index is not None:
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{INDEX_NAME}: no usable weight_map")
        return sorted(set(wm.values())), wm
    names = sorted(n for n in listing if n.endswith(".safetensors"))
    if "model.safetensors" in names:          # ignore side files such as Mistral's consolidated.safetensors
        names = ["model.safetensors"]
    elif any(not n.startswith("consolidated") for n in names):
        names = [n for n in names if not n.startswith("consolidated")]
    if not names:
        bins = [n for n in listing if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
        hint = ("only PyTorch/GGUF weights found (" + ", ".join(bins[:3]) + "); qtool reads safetensors"
                if bins else "export the model with save_pretrained(..., safe_serialization=True)")
        raise CheckpointError(f"{root}: no *.safetensors files", hint=hint)
    return names, {}


def assemble(root: Path, source: str, jsons: dict[str, dict | None], listing: list[str], sizes: dict[str, int],
             strict: bool, remote: bool, header_reader) -> CheckpointFiles:
    """Shared by the local and the hub path: shards, tensors, tokenizer facts.

    `header_reader(shard_name, problems_or_None)` returns that shard's tensors.
    """
    problems: list[str] = []
    index = jsons.get(INDEX_NAME)
    names, weight_map = shard_names(root, index, listing)
    tensors: dict[str, TensorInfo] = {}
    for name in names:
        if name not in sizes:
            raise CheckpointError(f"{INDEX_NAME} names shard {name}, which is missing from {source}")
        found = header_reader(name, None if strict else problems)
        for tname, info in found.items():
            if tname in tensors:
                raise CheckpointError(f"tensor {tname} is stored twice ({tensors[tname].file.name} and {name})")
            tensors[tname] = info
    for tname, fname in weight_map.items():
        if tname not in tensors:
            msg = f"{INDEX_NAME}: tensor {tname} should be in {fname} but is not"
            if strict:
                raise CheckpointError(msg)
            problems.append(msg)
    tok_cfg = jsons.get("tokenizer_config.json") or {}
    tok_files = [n for n in TOKENIZER_NAMES if n in listing]
    has_template = bool(tok_cfg.get("chat_template")) or "chat_template.jinja" in listing \
        or "chat_template.json" in listing
    shard_paths = [root / n for n in names]
    return CheckpointFiles(
        root=root, source=source, config=jsons["config.json"], hf_quant_config=jsons.get("hf_quant_config.json"),
        generation_config=jsons.get("generation_config.json"), tensors=tensors, shard_files=shard_paths,
        tokenizer_files=tok_files, has_chat_template=has_template,
        quantize_config=jsons.get("quantize_config.json"), tokenizer_config=jsons.get("tokenizer_config.json"),
        file_sizes={root / n: sizes[n] for n in names}, remote=remote, problems=problems)


def open_local(root: Path, source: str | None = None, strict: bool = True) -> CheckpointFiles:
    from qtool.checkpoint import snapshot
    pin = snapshot.pin(root)          # first: a reader verifies it after its last read (one version of the folder)
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file, not a checkpoint folder",
                              hint="give the folder that holds config.json and the *.safetensors files")
    try:
        listing = sorted(p.name for p in root.iterdir())
    except OSError as exc:
        raise CheckpointError(f"{root}: cannot list the folder ({exc.strerror or exc})")
    if not listing:
        raise CheckpointError(f"{root} is empty", hint="expected config.json and *.safetensors files")
    jsons = {n: read_json(root / n, required=(n == "config.json")) for n in JSON_NAMES}
    sizes = {}
    for n in listing:
        if n.endswith(".safetensors"):
            sizes[n] = (root / n).stat().st_size
    files = assemble(root, source or str(root), jsons, listing, sizes, strict, False,
                     lambda name, problems: _read_header(root / name, problems))
    files.pin = pin
    return files


def open_checkpoint(path_or_hub_id: str, strict: bool = True) -> CheckpointFiles:
    """Index a local checkpoint folder or a hub repository (headers and JSON only)."""
    text = str(path_or_hub_id)
    p = Path(text).expanduser()
    if p.exists():
        return open_local(p, text, strict)
    from qtool.sources import looks_like_hub_id
    if looks_like_hub_id(text):
        return _open_hub(text, strict)
    raise UsageError(f"checkpoint not found: {text}",
                     hint="give a local folder with config.json and *.safetensors, or a hub id such as org/name")


# ---------------------------------------------------------------- hub ids: JSON + ranged header reads

FIRST_RANGE = 100_000


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local cache snapshot when it holds config.json and every safetensors shard."""
    from huggingface_hub import snapshot_download
    try:
        snap = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and friends)
        return None
    if not (snap / "config.json").exists():
        return None
    index = snap / INDEX_NAME
    if index.exists():
        try:
            names = set(read_json(index)["weight_map"].values())
        except Exception:  # noqa: BLE001
            return None
    else:
        names = {p.name for p in snap.glob("*.safetensors")}
    return snap if names and all((snap / n).exists() for n in names) else None


def _offline(repo_id: str, exc: Exception) -> Failure:
    why = type(exc).__name__
    return Failure(f"cannot reach the Hugging Face hub to inspect {repo_id} ({why}) and it is not in the local cache",
                   hint="connect to the network, or download it first (huggingface-cli download) and pass the folder")


def _fetch_header(repo_id: str, filename: str, timeout: float) -> tuple[bytes, int]:
    """(header JSON bytes, file size) of one remote safetensors file via range requests."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(repo_id, filename)
    headers = build_hf_headers()
    r = get_session().get(url, headers={**headers, "range": f"bytes=0-{FIRST_RANGE - 1}"}, timeout=timeout,
                          follow_redirects=True)
    hf_raise_for_status(r)
    body = r.content
    m = re.search(r"/(\d+)$", r.headers.get("content-range", ""))
    size = int(m.group(1)) if m else len(body)
    path = Path(filename)
    n = header_length(body[:8], path, size)
    if 8 + n <= len(body):
        return body[8:8 + n], size
    r = get_session().get(url, headers={**headers, "range": f"bytes=8-{n + 7}"}, timeout=timeout,
                          follow_redirects=True)
    hf_raise_for_status(r)
    return r.content, size


def _open_hub(repo_id: str, strict: bool = True) -> CheckpointFiles:
    from qtool.sources import hub_env, hub_timeout
    hub_env(hub_timeout())
    snap = _cached_snapshot(repo_id)
    if snap is not None:
        return open_local(snap, repo_id, strict)
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    timeout = hub_timeout()
    try:
        info = HfApi().model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        raise Failure(f"hub repository {repo_id} is gated", hint="accept its licence on huggingface.co and log in "
                      "(huggingface-cli login)")
    except RepositoryNotFoundError:
        raise Failure(f"no local folder and no hub repository named {repo_id}",
                      hint="check the spelling, or log in if it is private")
    except Exception as exc:  # noqa: BLE001 - any network failure: offline
        raise _offline(repo_id, exc)
    listing = sorted(s.rfilename for s in (info.siblings or []) if "/" not in s.rfilename)
    root: Path | None = None
    jsons: dict[str, dict | None] = {}
    try:
        for name in JSON_NAMES:
            if name in listing:
                local = Path(hf_hub_download(repo_id, name, etag_timeout=timeout))
                root = local.parent
                jsons[name] = read_json(local)
            else:
                jsons[name] = None
    except Failure:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _offline(repo_id, exc)
    if jsons.get("config.json") is None:
        raise CheckpointError(f"hub repository {repo_id} has no config.json")
    names, _ = shard_names(root, jsons.get(INDEX_NAME), listing)
    fetched: dict[str, tuple[bytes, int]] = {}
    try:
        for name in names:
            if name in listing:
                fetched[name] = _fetch_header(repo_id, name, timeout)
    except Failure:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _offline(repo_id, exc)

    def reader(name: str, problems):
        raw, size = fetched[name]
        return parse_header(raw, root / name, size, problems)

    return assemble(root, repo_id, jsons, listing, {n: s for n, (_, s) in fetched.items()}, strict, True, reader)
