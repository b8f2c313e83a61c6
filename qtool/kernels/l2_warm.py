"""L2 warming of a decode layer's weights from a branch of the decode graph (kernels_cuda/l2_prefetch.cu).

Contract: ``Warmer(spec)`` holds which weights to warm (``QTOOL_L2PF``, default ``DEFAULT_SPEC`` = off, an
experiment: docs/cuda-notes.md v10; ``"0"`` or "" off): ``part:fraction`` items separated by commas or slashes with part in ``PARTS`` (this layer's o projection, gate|up, down) and
the fraction of every weight row warmed from its start (>= 1: the whole tensor as one range), optionally
``mode:1`` for bulk prefetches, ``blocks:N`` for the prefetch grid (default 2 per SM). ``fork(linears)`` launches the prefetches of one layer on a side stream that waits
for the work queued so far on torch's current stream (a full dependency on the qkv GEMV: the branch then runs
beside rope + attention, which move ~2 MB of DRAM per layer in ~17 us at ctx 512); ``join()`` makes the current
stream wait for the side stream (before a captured graph ends: every branch must rejoin). Warming changes no
result: the kernel only issues L2 prefetches.
"""
from __future__ import annotations

import os

import torch

from qtool.kernels.launch import i32, i64, launch, ptr

PARTS = ("o", "gu", "down")
DEFAULT_SPEC = "0"   # off: run 34-35 measured every setting within noise of, or slower than, no warming


def parse(spec: str) -> tuple[dict[str, float], int, int]:
    """({part: fraction}, mode, blocks (0: default)) from a QTOOL_L2PF string; ValueError on a malformed one."""
    parts: dict[str, float] = {}
    mode = blocks = 0
    for item in (s.strip() for s in spec.replace("/", ",").split(",") if s.strip() and s.strip() != "0"):
        name, _, val = item.partition(":")
        if name == "mode":
            mode = int(val)
        elif name == "blocks":
            blocks = int(val)
        elif name in PARTS:
            parts[name] = float(val or 1)
        else:
            raise ValueError(f"QTOOL_L2PF: unknown part {name!r} (parts: {', '.join(PARTS)}, mode)")
    return parts, mode, blocks


def _rows(kl) -> int:
    """The storage rows of kl's weights whose first fraction is "the first fraction of k": weight rows, or for
    mma-tiled fp8 (fp8_bulk.mma_tile_fp8: each 16-row tile contiguous, ordered by 64-k block) the tiles."""
    return -(-kl.out_features // 16) if kl.tiled else kl.out_features


def _range(w: torch.Tensor, rows: int, frac: float) -> tuple[int, int, int]:
    """(stride, rows, row_bytes) covering the first ``frac`` of each of ``rows`` rows of w (frac >= 1: all of w)."""
    total = w.numel() * w.element_size()
    if frac >= 1 or rows <= 1 or total % rows:
        return 0, 1, total // 16 * 16
    row = total // rows
    n = max(128, int(row * frac) // 128 * 128)
    return row, rows, min(n, row)


class Warmer:
    def __init__(self, spec: str | None = None):
        spec = os.environ.get("QTOOL_L2PF", DEFAULT_SPEC) if spec is None else spec
        self.parts, self.mode, self._grid = parse(spec)
        self._side: torch.cuda.Stream | None = None
        self._pending = False
        self._blocks = 0

    def __bool__(self) -> bool:
        return bool(self.parts)

    def fork(self, linears: dict) -> None:
        """Warm {part: KLinear} (parts without an entry or a tensor are skipped) on the side stream."""
        todo = [(linears[p], f) for p, f in self.parts.items() if getattr(linears.get(p), "w", None) is not None]
        if not todo:
            return
        main = torch.cuda.current_stream()
        if self._side is None:
            self._side = torch.cuda.Stream(device=main.device)
            sms = torch.cuda.get_device_properties(main.device).multi_processor_count
            self._blocks = self._grid or 2 * sms
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            for kl, frac in todo:
                stride, rows, nbytes = _range(kl.w, _rows(kl), frac)
                launch("l2_prefetch", "l2_prefetch", (self._blocks,), (256,),
                       (ptr(kl.w), i64(stride), i32(rows), i64(nbytes), i32(self.mode)), plain=True)
        self._pending = True

    def join(self) -> None:
        if self._pending and self._side is not None:
            torch.cuda.current_stream().wait_stream(self._side)
            self._pending = False

