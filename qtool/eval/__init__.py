"""`qtool eval`: teacher-forced perplexity with confidence intervals, baseline comparison and a noise floor.

Contract: ``text`` turns an evaluation text into token windows (the default text is
``qtool/data/eval_stdlib_docs.txt``, held out from the calibration corpus; docs/eval.md), ``stats`` turns
per-window sums into estimates with 95 % bootstrap intervals (pure Python), ``score`` runs models on the
runtime (``qtool.runtime``: ``Model.forward(all_logits=True)`` over each window) and returns the per-window
sums of every run and pair. Importing this package imports nothing heavy; torch is imported by ``score``.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "eval_stdlib_docs.txt"
