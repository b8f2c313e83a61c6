"""`qtool quantize`: NVIDIA ModelOpt 0.47 post-training quantization → a Hugging Face checkpoint.

Contract: every check that can refuse the request runs before any weight is loaded or any file
written — the support matrices (`check_request` + `enforce`; exit 3 unless --force), the output
folder (exit 2 when non-empty without --force), the INT4 block size against the model's
in_features, the calibration source, CUDA needs. Then: resolve the model source, load, calibrate
with `mtq.quantize`, export with `export_hf_checkpoint` (+ tokenizer, chat template), rewrite
GPTQ recipes in the GPTQ layout, write `qtool.json`, all inside a temporary folder renamed into
place at the end. Progress on stderr (off with --json); --json prints one result object on stdout.
Heavy imports happen inside the function body only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qtool.formats.registry import load_toml
from qtool.commands._common import debug_enabled, guarded, print_json, stdout, warn
from qtool.commands._options import EXIT_CODES_HELP, GPU_HELP, KvRecipe, WeightRecipe, kv_value, value

ALGORITHMS = ", ".join(load_toml("algorithms.toml"))
EPILOG = ("Examples:  qtool quantize --quant fp8 --kv-cache-quant nvfp4 -o smollm2-fp8  |  "
          "qtool quantize --model ./Llama-3.1-8B --quant nvfp4 --gpu b200 -o llama-nvfp4  |  "
          "qtool quantize --model ./Qwen3-8B --quant w4a16-awq --calib-data my.jsonl -o qwen3-awq  |  "
          "qtool quantize --quant w4a16-awq --awq-block-size 64 -o smollm2-awq (SmolLM2's 576 needs 64)  |  "
          "qtool quantize --quant w4a16-awq --awq-block-size 64 --for vllm -o smollm2-awq-vllm (AutoAWQ layout).  "
          + EXIT_CODES_HELP)


@guarded
def quantize(
    model: str = typer.Option("smollm2-135m", "--model", "-m",
                              help="Hugging Face folder, .gguf file, hub id (org/name), or the built-in 'smollm2-135m'."),
    quant: WeightRecipe = typer.Option(..., "--quant", "-q", help="Weight/activation recipe."),
    kv_cache_quant: KvRecipe = typer.Option("none", "--kv-cache-quant", help="KV-cache recipe."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the checkpoint (must be new or empty unless --force)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help=GPU_HELP + " Default: the local GPU; with none, any architecture."),
    family: Optional[str] = typer.Option(None, "--family", help="Model-matrix row to check against instead of detecting it from config.json."),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data", help=".txt, .jsonl (text or chat messages) or a folder of them. Default: qtool's embedded corpus."),
    calib_size: int = typer.Option(512, "--calib-size", min=1, help="Number of calibration samples."),
    calib_seq_len: int = typer.Option(512, "--calib-seq-len", min=8, help="Tokens per calibration sample (longer ones are truncated)."),
    batch_size: int = typer.Option(0, "--batch-size", min=0, help="Calibration batch size (0 = auto: 16 on CUDA, 4 on CPU)."),
    awq_block_size: int = typer.Option(128, "--awq-block-size", min=8, help="INT4 block (group) size for the AWQ and GPTQ recipes."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Passed to from_pretrained, e.g. 'auto' to offload layers that do not fit on the GPU to CPU RAM."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="With --device-map: memory per device, e.g. '0=70GiB,cpu=32GiB'; what does not fit is offloaded (to disk last)."),
    for_target: Optional[str] = typer.Option(None, "--for", help="Where the checkpoint must load: trtllm, vllm, qtool, all, or a comma list (e.g. vllm,qtool). Picks the export layout (w4a16-awq: ModelOpt's for TensorRT-LLM, AutoAWQ's for vLLM) and refuses (exit 3) a recipe a target cannot load. Default: a layout that loads in all three where one exists, else the one that loads in most, said in the summary."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help="Calibration algorithm (recipes/algorithms.toml): " + ALGORITHMS + ". Default: the recipe's own (max for FP8/NVFP4/MXFP4, awq_lite for AWQ, gptq for GPTQ)."),
    eval_: bool = typer.Option(False, "--eval", help="Evaluate the result against its source with `qtool eval` (held-out text, --eval-tokens tokens) and record it in qtool.json."),
    eval_tokens: int = typer.Option(2048, "--eval-tokens", min=16, help="Held-out tokens scored by --eval (windows of 256)."),
    force: bool = typer.Option(False, "--force", help="Run a request the support matrices refuse (recorded in qtool.json), and replace a non-empty --output."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON result on stdout; no progress display."),
):
    """Quantize a model with NVIDIA ModelOpt and write a Hugging Face checkpoint (TensorRT-LLM / vLLM / qtool run)."""
    from qtool.quantize import pipeline
    from qtool.quantize.ptq import parse_device_map, parse_max_memory
    parse_device_map(device_map)             # usage errors before anything is resolved or loaded
    parse_max_memory(max_memory)

    req = pipeline.Request(model=model, quant=value(quant), kv=kv_value(kv_cache_quant), output=output, gpu=gpu,
                           family=family, calib_data=calib_data, calib_size=calib_size,
                           calib_seq_len=calib_seq_len, batch_size=batch_size, block_size=awq_block_size,
                           device_map=device_map, max_memory=max_memory, force=force, targets=for_target,
                           algorithm=algorithm, eval_tokens=eval_tokens if eval_ else 0, evaluator=_evaluate,
                           progress=not json_output, debug=debug_enabled())
    plan = pipeline.prepare(req)               # every refusal happens here, before loading
    if plan.force_warning:
        warn(plan.force_warning)
    if plan.choice is not None and plan.choice.note:
        from rich.markup import escape
        warn(escape(plan.choice.note))
    result = pipeline.run(plan)
    if json_output:
        print_json({"ok": True, **result})
        return
    _print_summary(result)


def _evaluate(checkpoint, source, tokens: int) -> dict:
    """quantize --eval's scoring (qtool.eval: the quantize layer may not import it, so the command hands it over)."""
    from qtool.eval.evaluate import evaluate_checkpoint
    return evaluate_checkpoint(checkpoint, source, tokens)


def _print_summary(r: dict) -> None:
    what = r["recipe"] + (f" + kv {r['kv_cache']}" if r["kv_cache"] != "none" else "")
    mem = r["peak_memory"]
    mem_s = f"peak RSS {mem['rss_mib']:.0f} MiB" + (f", peak GPU {mem['cuda_max_allocated_mib']:.0f} MiB"
                                                     if mem.get("cuda_max_allocated_mib") is not None else "")
    stdout.print(f"[green]done:[/green] {what} → {r['output']} ({r['format']}, {r['size_mib']:.1f} MiB) "
                 f"in {r['wall_time_s']:.1f} s; {mem_s}.")
    stdout.print(f"calibration: {r['calibration']['source']}; {r['calibration']['samples']} samples × ≤"
                 f"{r['calibration']['seq_len']} tokens; algorithm {r['calibration']['algorithm']}.")
    if r.get("eval"):
        from qtool.checkpoint.report import eval_line
        stdout.print("eval: " + eval_line(r["eval"]))
    if r.get("consumers"):
        from qtool.quantize.targets import summary
        from rich.markup import escape
        stdout.print(escape(summary(r["consumers"])))
    if r.get("architectures_supported"):
        stdout.print("runs on (hardware matrix): " + ", ".join(r["architectures_supported"]))
    elif r.get("target"):
        stdout.print(f"target: {r['target']}")
