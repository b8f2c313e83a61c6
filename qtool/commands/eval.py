"""`qtool eval MODEL`: teacher-forced perplexity with a 95 % interval, a baseline comparison and a noise floor.

Contract: scores MODEL on a text (default: qtool's held-out qtool/data/eval_stdlib_docs.txt; docs/eval.md) in
non-overlapping windows on the chosen backend (torch = float32 CPU reference, cuda); with --baseline compares it
window by window with another model (ppl ratio, top-1 agreement, mean KL, each with its interval); with
--noise-floor N runs the reference N more times with ulp-level input perturbation (and, on the torch backend, once
with its linears summed in float64) and prints the worst self-pair beside the gap. Progress bar on stderr; --json prints one result object on stdout. The work is
qtool.eval.evaluate; torch and the runtime are imported inside the command body only.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from qtool.commands._common import guarded, print_json, stdout
from qtool.commands._options import EXIT_CODES_HELP

EPILOG = ("Examples:  qtool eval smollm2-135m  |  qtool eval ./smollm2-fp8 --baseline smollm2-135m --noise-floor 2  |  "
          "qtool eval ./ckpt --backend cuda --baseline ./ckpt --baseline-backend torch --noise-floor 3 --json  |  "
          "qtool eval ./ckpt --text my.txt --window 1024 --max-tokens 0.  " + EXIT_CODES_HELP)


class EvalBackend(str, Enum):
    torch = "torch"
    cuda = "cuda"
    auto = "auto"


@guarded
def eval(  # noqa: A001 - the command's name
    models: List[str] = typer.Argument(..., help="Model folder(s), .gguf, hub id (org/name) or built-in name (smollm2-135m); several are scored on the same windows."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file to score. Default: qtool's held-out evaluation text (~51 K tokens)."),
    window: int = typer.Option(512, "--window", min=2, help="Tokens per window (each scored from an empty cache)."),
    max_tokens: int = typer.Option(16384, "--max-tokens", min=0, help="Score at most this many tokens of the text (0 = all)."),
    backend: EvalBackend = typer.Option(EvalBackend.torch, "--backend", help="torch (CPU float32 reference), cuda (CuPy kernels), auto."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Compare with this model on the same windows (e.g. the bf16 source)."),
    baseline_backend: Optional[EvalBackend] = typer.Option(None, "--baseline-backend", help="Backend of the baseline (default: --backend)."),
    noise_floor: int = typer.Option(0, "--noise-floor", min=0, help="Run the baseline (else the model) N more times with embeddings × (1 + 2^-20·randn), plus once with its linears summed in float64 (torch backend), and report the worst self-pair."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document; no progress bar."),
):
    """Perplexity of a model on a text, with a 95 % interval; optionally against a baseline and its noise floor."""
    from qtool.eval.evaluate import EvalRequest, evaluate
    req = EvalRequest(models=list(models), text=text, window=window, max_tokens=max_tokens, backend=backend.value,
                      baseline=baseline, baseline_backend=baseline_backend.value if baseline_backend else None,
                      noise_floor=noise_floor, show_progress=not json_output)
    with _Bar(not json_output) as bar:
        result = evaluate(req, progress=bar.start)
    if json_output:
        print_json(result)
        return
    print_result(result)


class _Bar:
    """A rich bar on stderr over window × run forwards; start(total) returns advance()."""

    def __init__(self, enabled: bool):
        self.enabled, self.p = enabled, None

    def __enter__(self):
        return self

    def start(self, total: int):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.p = Progress(TextColumn("scoring windows"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
        self.p.__enter__()
        task = self.p.add_task("eval", total=total)
        return lambda: self.p.advance(task)

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.__exit__(*exc)
        return False


def _ci(d: dict, fmt: str) -> str:
    lo, hi = d["ci95"]
    return f"{d['value']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _model_line(m: dict) -> str:
    return f"{m['ref']} ({m['recipe']}, KV {m['kv_cache']}) on {m['backend']}: perplexity {_ci(m['perplexity'], '.3f')}"


def print_result(r: dict) -> None:
    t = r["text"]
    stdout.print(f"text: {t['source']}: {t['tokens_scored']:,} scored tokens in {t['windows']} windows "
                 f"of ≤{t['window']} (of {t['tokens_available']:,}); {r['interval']}")
    if "baseline" in r:
        stdout.print("baseline: " + _model_line(r["baseline"]))
    if "noise_floor" in r:
        f = r["noise_floor"]
        w = f["worst"]
        extra = " + float64 sums" if "floor_sum64" in f["perturbation"] else ""
        stdout.print(f"noise floor ({f['runs']} perturbed runs{extra} of {f['reference']} on {f['backend']}, worst of "
                     f"{len(f['pairs'])} self-pairs): ppl ratio {w['ppl_ratio']:.4f}  top-1 agreement "
                     f"{w['top1_agreement']:.4f}  mean KL {w['mean_kl']:.5f}")
    for m in r["results"]:
        stdout.print(_model_line(m))
        if "gap" in m:
            g = m["gap"]
            stdout.print(f"  vs baseline: ppl ratio {_ci(g['ppl_ratio'], '.4f')}  top-1 agreement "
                         f"{_ci(g['top1_agreement'], '.4f')}  mean KL {_ci(g['mean_kl'], '.5f')}")
        if "within_floor" in m:
            inside = [k for k, v in m["within_floor"].items() if v]
            outside = [k for k, v in m["within_floor"].items() if not v]
            parts = ([f"within the noise floor on {', '.join(inside)}"] if inside else []) + \
                    ([f"beyond it on {', '.join(outside)}"] if outside else [])
            stdout.print("  " + "; ".join(parts))
    stdout.print(f"[dim]{r['seconds']:.1f} s[/dim]")
