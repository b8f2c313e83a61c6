"""Kernel launches with programmatic dependent launch (PDL, sm_90+) through the driver's ``cuLaunchKernelEx``.

Contract: ``launch(kernel, grid, block, stream_handle, args, smem=0)`` launches a CuPy ``RawKernel`` with the attribute
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, so the kernel may be scheduled while the previous kernel in
the stream is still running; every qtool kernel calls ``pdl_wait()`` (kernels_cuda/common.cuh) before touching
data of earlier kernels, so results are those of plain launches. Stream capture turns the attribute into a
programmatic edge of the CUDA graph. ``available()`` is False (and callers launch through CuPy) below sm_90,
inside ``plain_launches()`` (tests and the benchmark compare against plain launches), or when the driver lacks
the entry point; a failing launch raises ``RuntimeError``.
Arguments are numpy scalars as CuPy takes them (np.uint64 pointers, np.int32, np.int64, np.float32).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import struct

import numpy as np

_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _Attr(ctypes.Structure):        # CUlaunchAttribute: id, pad to 8, 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _Config(ctypes.Structure):      # CUlaunchConfig
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint),
                ("bx", ctypes.c_uint), ("by", ctypes.c_uint), ("bz", ctypes.c_uint),
                ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("nattrs", ctypes.c_uint)]


_STATE: dict = {}


def _entry():
    fn = _STATE.get("fn")
    if fn is None and "fn" not in _STATE:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuLaunchKernelEx
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        except (OSError, AttributeError):
            fn = None
        _STATE["fn"] = fn
        attr = _Attr()
        attr.id = _ATTR_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value[0] = 1
        _STATE["attr"] = attr
    return fn


def available() -> bool:
    """PDL launches are possible here and not switched off (plain_launches, or after a failed launch)."""
    if _STATE.get("plain"):
        return False
    ok = _STATE.get("ok")
    if ok is None:
        import torch
        ok = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 and _entry() is not None)
        _STATE["ok"] = ok
    return ok


@contextlib.contextmanager
def plain_launches():
    """Launch without the PDL attribute inside (a comparison for tests and bench/, not a product setting)."""
    old = _STATE.get("plain", False)
    _STATE["plain"] = True
    try:
        yield
    finally:
        _STATE["plain"] = old


def disable() -> None:
    """No PDL launches for the rest of the process (after a failed launch)."""
    _STATE["ok"] = False


_SLOT = {np.uint64: "Q", np.int64: "q", np.int32: "i4x", np.float32: "f4x"}   # one 8-byte slot per argument


@functools.lru_cache(maxsize=None)
def _layout(types: tuple) -> tuple[struct.Struct, struct.Struct, int]:
    """(values packer, pointer-array packer, count) for a kernel's argument types: each value in its own 8-byte
    slot of one buffer, the parameter array pointing at the slots (about 5 us a launch instead of 50 for a ctypes
    object per argument, 2026-12-08 on the CPU machine: eager prefill makes hundreds of launches)."""
    try:
        codes = "".join(_SLOT[t] for t in types)
    except KeyError as exc:
        raise TypeError(f"unsupported kernel argument type {exc.args[0].__name__}") from None
    n = len(types)
    return struct.Struct("=" + codes), struct.Struct(f"={max(1, n)}Q"), n


def launch(kernel, grid, block, stream_handle: int, args, smem: int = 0) -> None:
    fn = _entry()
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    values, pointers, n = _layout(tuple(map(type, args)))
    buf = ctypes.create_string_buffer(8 * max(1, n))
    values.pack_into(buf, 0, *args)
    base = ctypes.addressof(buf)
    params = ctypes.create_string_buffer(8 * max(1, n))
    pointers.pack_into(params, 0, *(range(base, base + 8 * n, 8) if n else (0,)))
    cfg = _Config(grid[0], grid[1], grid[2], block[0], block[1], block[2], int(smem), stream_handle,
                  ctypes.pointer(_STATE["attr"]), 1)
    rc = fn(ctypes.byref(cfg), kernel.kernel.ptr, ctypes.addressof(params), None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc}")
