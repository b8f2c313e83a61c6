"""`qtool run MODEL "prompt"`: generate text with qtool's own runtime (CUDA kernels or the CPU reference).

Contract: resolves MODEL (local folder, built-in name, or hub id via qtool.sources), describes the
checkpoint once from its JSON and tensor headers (qtool.checkpoint.scheme.describe, what `inspect`
reports) to find the family rows and the recipes, picks the KV-cache dtype, and runs the support check (model matrix + recipe rules: refused → exit 3 unless
--force; hardware matrix for the local GPU: a warning, refused with --strict) BEFORE any weight is
loaded. Then hands the files and that description to the loader (weights kept in their quantized form), builds the backend (auto = cuda when a GPU
and CuPy are usable, else the float32 CPU reference), and generates: streamed text on stdout, one
stats line on stderr, or one JSON document with --json. torch/transformers/cupy are imported
inside the command only.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from qtool.commands._common import guarded, info, print_json, stdout, warn
from qtool.commands._options import EXIT_CODES_HELP
from qtool.errors import Unsupported, UsageError

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


def _kv_choice(asked: str, ckpt_kv: str | None, source: str) -> str:
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


def resolve_and_check(model: str, backend: str, kv_cache_dtype: str, strict: bool, force: bool, note,
                      progress: bool = True):
    """Resolve MODEL, describe it and run the support check (model matrix, recipe rules, hardware matrix)
    before any weight is read (`qtool run` and `qtool serve`). Raises Unsupported (exit 3); `note(msg)`
    gets the warnings. Returns folder, files, config, scheme, recipes, kv, be_name."""
    from types import SimpleNamespace
    from qtool.checkpoint.files import open_checkpoint
    from qtool.checkpoint.scheme import describe
    from qtool.sources import resolve_model_source
    from qtool.support.check import check_request, enforce
    from qtool.support.families import rows_for_config
    from qtool.runtime.backends import cuda_usable, make_backend, resolve_backend_name
    src = resolve_model_source(model, progress=progress)
    folder = src.path
    files = open_checkpoint(str(folder))
    if src.kind == "hub":
        files.source = model
    config = files.config
    rows = rows_for_config(config)
    scheme = describe(files)             # the description inspect prints; the loader gets it as is
    recipes = scheme.checked_recipes()
    kv = _kv_choice(kv_cache_dtype, scheme.kv_recipe, model)
    be_name = resolve_backend_name(backend)
    if be_name == "cuda" and not cuda_usable()[0]:
        make_backend("cuda")      # raises the one-line Failure
    arch = None
    if be_name == "cuda":
        from qtool.support.gpus import local_gpu
        arch = local_gpu()
    kv_recipe = None if kv == "bf16" else kv
    for weight_recipe in recipes or [None]:
        msg = enforce(check_request(rows, weight_recipe, kv_recipe, None), force)
        if msg:
            note(msg)
        if arch is not None:
            hw = check_request(None, weight_recipe, kv_recipe, arch)
            if not hw.supported:
                if strict:
                    raise Unsupported(hw.message(), hint="drop --strict to run it on qtool's kernels anyway")
                note("hardware matrix: " + hw.message() + " (running on qtool's own kernels anyway; --strict refuses)")
    if strict and arch is None and be_name == "torch":
        note("--strict: no GPU in use, so the hardware matrix does not apply to the CPU reference backend")
    from qtool.runtime.families import family_class
    family_class(SimpleNamespace(family=config.get("model_type", "?")))     # model code exists (else exit 3)
    return SimpleNamespace(folder=folder, files=files, config=config, scheme=scheme, recipes=recipes, kv=kv,
                           be_name=be_name)


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

    # 1. resolve, describe (config + tensor headers) and check, before any weight is read
    c = resolve_and_check(model, backend.value, kv_cache_dtype.value, strict, force, note, progress=not json_output)
    folder, files, scheme, recipes, kv, be_name = c.folder, c.files, c.scheme, c.recipes, c.kv, c.be_name
    from qtool.runtime.backends import make_backend
    from qtool.runtime.chat import eos_ids, load_tokenizer, prompt_ids
    tok = load_tokenizer(folder)
    ids = [prompt_ids(tok, t, system, raw) for t in texts]

    # 2. load, build, generate
    from qtool.runtime.loader import load_weights
    weights = load_weights(files, scheme, progress=not json_output)
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
        print_json({"ok": True, "model": str(folder), "checkpoint": scheme.summary(), "weight_recipe": scheme.recipe or "bf16",
                    "recipes": recipes,
                    "backend": be.name, "kv_cache_dtype": kv, "warnings": warnings,
                    "completions": [{"prompt": t, "text": r.text, "prompt_tokens": r.prompt_tokens,
                                     "generated_tokens": len(r.token_ids), "finish_reason": r.finish_reason}
                                    for t, r in zip(texts, results)],
                    "stats": stats.as_dict()})
