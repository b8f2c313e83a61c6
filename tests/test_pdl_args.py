"""qtool/kernels/pdl.py's argument marshalling (no GPU needed): the parameter array handed to cuLaunchKernelEx
points at each argument's value in its C type, read back here through ctypes, and the launch configuration
holds the grid, block, shared memory and stream."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from qtool.kernels import pdl


def test_params_point_at_each_value(monkeypatch):
    seen = {}

    def fake(cfg, kernel, params, extra):
        c = ctypes.cast(cfg, ctypes.POINTER(pdl._Config)).contents if not isinstance(cfg, pdl._Config) else cfg
        seen["cfg"] = (c.gx, c.gy, c.gz, c.bx, c.by, c.bz, c.smem, c.stream)
        seen["kernel"] = kernel
        arr = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        types = (ctypes.c_uint64, ctypes.c_int32, ctypes.c_float, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint64)
        seen["values"] = [ctypes.cast(arr[i], ctypes.POINTER(t)).contents.value for i, t in enumerate(types)]
        return 0

    monkeypatch.setitem(pdl._STATE, "fn", lambda *a: fake(*a))
    monkeypatch.setitem(pdl._STATE, "attr", pdl._Attr())

    class K:
        class kernel:
            ptr = 0xdead0

    args = (np.uint64(2 ** 40 + 3), np.int32(-7), np.float32(0.15625), np.int64(-(2 ** 33)), np.int32(2 ** 31 - 1),
            np.uint64(0))
    pdl.launch(K, (5, 3), (128,), 0x1234, args, 4096)
    assert seen["cfg"] == (5, 3, 1, 128, 1, 1, 4096, 0x1234)
    assert seen["kernel"] == 0xdead0
    assert seen["values"] == [2 ** 40 + 3, -7, 0.15625, -(2 ** 33), 2 ** 31 - 1, 0]


def test_unsupported_argument_type():
    with pytest.raises(TypeError, match="unsupported kernel argument type float"):
        pdl._layout((float,))
