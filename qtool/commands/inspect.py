"""`qtool inspect PATH`: what a checkpoint is, whether it is sound, and where it can run.

Contract: by default reads only JSON files and safetensors headers (no torch import), local or
from the hub; `--deep` also reads every tensor (NaN/Inf, bad scales, all-zero blocks, min/max).
Prints a compact rich report, or the JSON document of docs/inspect.md with --json. Exit 0 when
sound, 1 when any problem is found (each printed as one line naming the tensor) or the
checkpoint cannot be read at all (empty folder, corrupt or truncated file, bad
config JSON, hub unreachable); 2 when the path does not exist: one line, never a traceback.
"""
from __future__ import annotations

import typer

from qtool.commands._common import guarded, print_json, stdout
from qtool.commands._options import EXIT_CODES_HELP
from qtool.errors import UsageError

EPILOG = ("Examples:  qtool inspect ./Llama-3.1-8B-fp8  |  qtool inspect nvidia/Llama-3.1-8B-Instruct-FP8  |  "
          "qtool inspect ./ckpt --context 32768 --batch 8  |  qtool inspect ./ckpt --deep --json.  "
          "Any problem found exits 1.  " + EXIT_CODES_HELP)


def _positive(name: str, v: int) -> int:
    if v < 1:
        raise UsageError(f"{name} must be at least 1 (got {v})")
    return v


@guarded
def inspect(
    path: str = typer.Argument(..., help="Checkpoint folder, or a Hugging Face hub id such as nvidia/Llama-3.1-8B-Instruct-FP8."),
    deep: bool = typer.Option(False, "--deep", help="Also read every tensor: NaN/Inf, zero or negative scales, all-zero blocks, min/max."),
    context: int = typer.Option(4096, "--context", help="Context length for the KV-cache memory estimate."),
    batch: int = typer.Option(1, "--batch", help="Batch size for the KV-cache memory estimate."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable report (schema in docs/inspect.md)."),
):
    """Say what a checkpoint is (format per layer, sizes), whether it is sound, and where it can run."""
    from qtool.checkpoint import report, soundness
    from qtool.checkpoint.files import open_checkpoint
    from qtool.checkpoint.scheme import describe
    from qtool.checkpoint.sizes import sizes

    _positive("--context", context)
    _positive("--batch", batch)
    files = open_checkpoint(path, strict=False)     # a missing path is a usage error (exit 2), as everywhere
    scheme = describe(files, strict=False)
    problems, notes = soundness.check(files, scheme)
    deep_doc = None
    if deep:
        from qtool.checkpoint.deep import deep_check
        deep_problems, stats = deep_check(files, scheme)
        problems += deep_problems
        deep_doc = {"tensors_read": len(stats), "problems": deep_problems, "stats": stats}
    rep = report.build(files, scheme, sizes(files, scheme, context, batch), problems, notes, deep_doc)
    if json_output:
        print_json(rep)
    else:
        report.render(rep, stdout)
    if problems:
        raise typer.Exit(1)
