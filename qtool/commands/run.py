"""`qtool run MODEL "prompt"`: generate text with qtool's own runtime (CUDA kernels or the CPU reference).

Contract: resolves MODEL (local folder, built-in name, or hub id via qtool.sources), reads only
config.json / hf_quant_config.json to find the family rows and the checkpoint's recipe, picks the
KV-cache dtype, and runs the support check (model matrix + recipe rules: refused → exit 3 unless
--force; hardware matrix for the local GPU: a warning, refused with --strict) BEFORE any weight is
loaded. Then loads the weights in their quantized form, builds the backend (auto = cuda when a GPU
and CuPy are usable, else the float32 CPU reference), and generates: streamed text on stdout, one
stats line on stderr, or one JSON document with --json. torch/transformers/cupy are imported
inside the command only.
"""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from qtool.commands._common import guarded, info, print_json, stdout, warn
from qtool.commands._options import EXIT_CODES_HELP
from qtool.errors import CheckpointError, Unsupported, UsageError

EPILOG = ('Examples:  qtool run ./SmolLM2-fp8-nvfp4kv "What is the capital of France?"  |  '
          'qtool run smollm2-135m "Hello" --kv-cache-dtype fp8  |  '
          'qtool run ./model "Once upon a time" --raw --temperature 0.8 --top-p 0.9 --seed 1  |  '
          'qtool run ./model --prompts prompts.jsonl --json.  ' + EXIT_CODES_HELP)


class BackendChoice(str, Enum):
    auto = "auto"
    cuda = "cuda"
    torch = "torch"


class KvDtype(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp8 = "fp8"
    nvfp4 = "nvfp4"


# hf_quant_config quant_algo (upper-cased) -> CLI recipe name
_QUANT_ALGO_RECIPE = {"FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8-rowwise", "FP8_PB_WO": "fp8-block",
                      "NVFP4": "nvfp4", "MXFP4": "mxfp4", "W4A16_AWQ": "w4a16-awq", "W4A8_AWQ": "w4a8-awq"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})")
    return obj if isinstance(obj, dict) else {}


def checkpoint_recipes(folder: Path, config: dict) -> tuple[str | None, str | None, str]:
    """(weight recipe name or None for bf16/unknown, checkpoint KV algo 'fp8'|'nvfp4'|None, description)."""
    hq = _read_json(folder / "hf_quant_config.json").get("quantization", {}) or {}
    qc = config.get("quantization_config") or {}
    kv = hq.get("kv_cache_quant_algo")
    if kv is None and isinstance(qc, dict):
        scheme = qc.get("kv_cache_scheme")
        kv = scheme if isinstance(scheme, str) else ("FP8" if isinstance(scheme, dict) and scheme.get("num_bits") == 8
                                                      else None)
    kv = str(kv).lower() if kv else None
    algo = hq.get("quant_algo") or (qc.get("quant_algo") if isinstance(qc, dict) else None)
    if algo:
        name = _QUANT_ALGO_RECIPE.get(str(algo).upper())
        return name, kv, f"ModelOpt {algo}"
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if method == "gptq":
        act8 = bool(qc.get("fp8_activations") or qc.get("activation_bits") == 8)
        return ("w4a8-gptq" if act8 else "w4a16-gptq"), kv, "GPTQ"
    if method == "awq":
        return "w4a16-awq", kv, "AutoAWQ"
    if method == "fp8" and qc.get("weight_block_size"):
        return "fp8-block", kv, "FP8 block (DeepSeek)"
    if method:
        return None, kv, f"quant_method {method}"
    return None, kv, "unquantized"


def _kv_choice(asked: str, ckpt_kv: str | None, weight_recipe: str | None, source: str) -> str:
    if asked == "auto":
        return ckpt_kv if ckpt_kv in ("fp8", "nvfp4") else "bf16"
    if asked == "nvfp4" and ckpt_kv != "nvfp4":
        raise Unsupported(
            "--kv-cache-dtype nvfp4 needs a checkpoint calibrated for an NVFP4 KV cache; this one "
            + (f"has a {ckpt_kv} KV cache" if ckpt_kv else "has no KV-cache quantization"),
            hint=f"produce one with: qtool quantize --model {source} --quant fp8 --kv-cache-quant nvfp4 --output OUT_DIR")
    return asked


def _backend_label(name: str) -> str:
    return "torch (PyTorch reference, float32 on CPU)" if name == "torch" else name


@guarded
def run(
    model: str = typer.Argument(..., help="Model folder, hub id (org/name) or built-in name (smollm2-135m)."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt (omit with --prompts)."),
    backend: BackendChoice = typer.Option(BackendChoice.auto, "--backend",
                                          help="cuda (CuPy kernels), torch (CPU float32 reference), auto = cuda when a GPU and CuPy are present."),
    kv_cache_dtype: KvDtype = typer.Option(KvDtype.auto, "--kv-cache-dtype",
                                           help="KV cache storage: auto = the checkpoint's; fp8 works for any checkpoint; nvfp4 needs a checkpoint quantized for it."),
    strict: bool = typer.Option(False, "--strict", help="Refuse anything the hardware matrix does not mark Y for the local GPU."),
    force: bool = typer.Option(False, "--force", help="Run a request the model matrix refuses (with a warning)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1 = all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop when this text appears (repeatable)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is (no chat template)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for the chat template."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="File of prompts: one per line, or JSON lines with a 'prompt' field."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document (completions + stats)."),
):
    """Generate text from a (quantized) checkpoint on qtool's runtime."""
    if (prompt is None) == (prompts is None):
        raise UsageError("give exactly one of a PROMPT argument or --prompts FILE")
    from qtool.runtime.chat import read_prompts
    texts = read_prompts(prompts) if prompts else [prompt]
    warnings: list[str] = []

    def note(msg: str) -> None:
        warnings.append(msg)
        warn(msg)

    # 1. resolve and check, reading only JSON
    from qtool.sources import resolve_model_source
    from qtool.support.check import check_request, enforce
    from qtool.support.families import read_config, rows_for_config
    from qtool.runtime.backends import cuda_usable, make_backend, resolve_backend_name
    src = resolve_model_source(model, progress=not json_output)
    folder = src.path
    config = read_config(folder)
    rows = rows_for_config(config)
    weight_recipe, ckpt_kv, described = checkpoint_recipes(folder, config)
    kv = _kv_choice(kv_cache_dtype.value, ckpt_kv, weight_recipe, model)
    be_name = resolve_backend_name(backend.value)
    if be_name == "cuda" and not cuda_usable()[0]:
        make_backend("cuda")      # raises the one-line Failure
    arch = None
    if be_name == "cuda":
        from qtool.support.gpus import local_gpu
        arch = local_gpu()
    kv_recipe = None if kv == "bf16" else kv
    verdict = check_request(rows, weight_recipe, kv_recipe, None)
    msg = enforce(verdict, force)
    if msg:
        note(msg)
    if arch is not None:
        hw = check_request(None, weight_recipe, kv_recipe, arch)
        if not hw.supported:
            if strict:
                raise Unsupported(hw.message(), hint="drop --strict to run it on qtool's kernels anyway")
            note("hardware matrix: " + hw.message() + " (running on qtool's own kernels anyway; --strict refuses)")
    elif strict and be_name == "torch":
        note("--strict: no GPU in use, so the hardware matrix does not apply to the CPU reference backend")
    from types import SimpleNamespace
    from qtool.runtime.families import family_class
    family_class(SimpleNamespace(family=config.get("model_type", "?")))     # model code exists (else exit 3)
    from qtool.runtime.chat import eos_ids, load_tokenizer, prompt_ids
    tok = load_tokenizer(folder)
    ids = [prompt_ids(tok, t, system, raw) for t in texts]

    # 2. load, build, generate
    from qtool.runtime.loader import load_model_weights
    weights = load_model_weights(str(folder), progress=not json_output)
    if kv in ("fp8", "nvfp4") and any(L.k_scale is None or L.v_scale is None for L in weights.layers):
        note(f"the checkpoint has no calibrated k_scale/v_scale: the {kv} KV cache uses scale 1.0 "
             "(quantize with --kv-cache-quant for calibrated scales)")
    be = make_backend(be_name)
    if be.name == "torch":
        info("backend: torch — the PyTorch reference (float32 on CPU); it defines the numerics and is slow")
    from qtool.runtime.generate import GenerateOptions, generate, stats_line
    from qtool.runtime.model import Model
    net = Model(weights, be)
    opts = GenerateOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop=list(stop or []))
    stream = not json_output and len(texts) == 1

    def on_text(row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    results, stats = generate(net, tok, ids, opts, kv, eos_ids(tok, weights.config.eos_token_ids),
                              on_text if stream else None)
    if stream:
        sys.stdout.write("\n")
    elif not json_output:
        for i, (t, r) in enumerate(zip(texts, results)):
            stdout.print(f"[bold]--- [{i}] {t}[/bold]", markup=True)
            sys.stdout.write(r.text + "\n")
    info(stats_line(stats, _backend_label(be.name)))
    if json_output:
        print_json({"ok": True, "model": str(folder), "checkpoint": described, "weight_recipe": weight_recipe or "bf16",
                    "backend": be.name, "kv_cache_dtype": kv, "warnings": warnings,
                    "completions": [{"prompt": t, "text": r.text, "prompt_tokens": r.prompt_tokens,
                                     "generated_tokens": len(r.token_ids), "finish_reason": r.finish_reason}
                                    for t, r in zip(texts, results)],
                    "stats": stats.as_dict()})
