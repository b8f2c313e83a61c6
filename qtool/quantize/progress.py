"""Rich progress on stderr for `qtool quantize`: named stages and a calibration bar.

Contract: `Stages(enabled)` is a context manager; `stage(text)` shows the current step (loading,
export, …) with elapsed time; `calibration(total)` returns a callback `advance(n)` for a bar with
samples/s and ETA (a new pass, e.g. GPTQ's second sweep, restarts the bar with `new_pass()`).
With enabled=False every method is a no-op (used for --json).
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    """samples/s of a task (blank for stage rows)."""

    def render(self, task) -> Text:
        if not task.fields.get("rate") or not task.speed:
            return Text("")
        return Text(f"{task.speed:,.1f} samples/s", style="progress.data.speed")


class Stages:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.p = None
        self._stage = None
        self._calib = None
        self._passes = 0

    def __enter__(self):
        if self.enabled:
            self.p = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
                              TextColumn("ETA"), TimeRemainingColumn(),
                              console=Console(stderr=True), transient=False)
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        self._finish_stage()
        if self.p is not None:
            self.p.__exit__(*exc)
        return False

    def _finish_stage(self):
        if self.p is not None and self._stage is not None:
            self.p.update(self._stage, total=1, completed=1)
            self._stage = None

    def stage(self, text: str) -> None:
        if self.p is None:
            return
        self._finish_stage()
        self._stage = self.p.add_task(text, total=None)

    def calibration(self, total: int, label: str = "calibrating"):
        self._calib_total, self._calib_label = total, label
        self.new_pass()
        return self.advance

    def new_pass(self) -> None:
        if self.p is None:
            return
        self._finish_stage()
        self._passes += 1
        if self._calib is not None:
            self.p.update(self._calib, completed=self.p.tasks[self._calib].total)
        label = self._calib_label if self._passes == 1 else f"{self._calib_label} (pass {self._passes})"
        self._calib = self.p.add_task(label, total=self._calib_total, rate=True)

    def advance(self, n: int) -> None:
        if self.p is not None and self._calib is not None:
            self.p.advance(self._calib, n)
