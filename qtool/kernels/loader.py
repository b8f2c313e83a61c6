"""Compile and cache the CUDA kernels of ``kernels_cuda/`` with NVRTC through ``cupy.RawModule``.

Contract: ``module(name)`` returns the compiled ``cupy.RawModule`` of ``kernels_cuda/<name>.cu`` for the current
GPU; ``function(name, expr)`` one kernel of it (``expr`` a plain name or a template instantiation such as
``"gemv<1, 4>"``, which must be listed in ``TEMPLATES``). ``#include "x.cuh"`` lines are inlined here (with
``#line`` markers), so the source string that CuPy hashes for its on-disk cache (~/.cupy/kernel_cache) covers
every header, and compile errors name the original file and line. CuPy chooses the arch from the device
(sm_90 on Hopper; the kernels need sm_89+ for the e4m3 cvt and use no sm_90a-only instruction).
A compile failure raises ``Failure`` with the first error lines.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from qtool.errors import Failure

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels_cuda"
OPTIONS = ("-std=c++17",)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')

# template instantiations fetched by name (NVRTC needs them up front to give mangled names back)
TEMPLATES = {
    "linear": [f"gemv<{f}, {m}>" for f in range(5) for m in (1, 2, 4, 8)] + [f"gemm<{f}>" for f in range(6)]
              + [f"gemv_h<{f}, {m}>" for f in range(1, 5) for m in (1, 2, 4, 8)]
              + [f"gemv_mma_bulk<{x}>" for x in (0, 1)]
              + [f"gemm_tc<{f}, 0>" for f in range(6)] + [f"gemm_tc<{f}, 1>" for f in (1, 5)],
    "attention": [f"attn_partial<{d}, {pu}, {gm}, {kf}>" for d, pu, gm in ((64, 8, 4), (64, 8, 8), (128, 8, 4),
                                                                          (128, 8, 8), (256, 4, 8))
                  for kf in range(3)],
    "dequant": [f"dequant_bf16<{f}>" for f in range(1, 6)],
}


def kernel_dir() -> Path:
    if KERNEL_DIR.is_dir():
        return KERNEL_DIR
    import kernels_cuda  # installed wheel: the package data directory
    return Path(kernels_cuda.__file__).parent


def preprocess(path: Path, seen: set[str] | None = None) -> str:
    """The source of ``path`` with its quoted includes inlined once each, with #line markers."""
    seen = set() if seen is None else seen
    out = [f'#line 1 "{path.name}"']
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = _INCLUDE.match(line)
        if m:
            inc = path.parent / m.group(1)
            if inc.name not in seen:
                seen.add(inc.name)
                out.append(preprocess(inc, seen))
            out.append(f'#line {lineno + 1} "{path.name}"')
        elif line.strip() == "#pragma once":
            out.append("")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _compile_error(name: str, exc: Exception) -> Failure:
    log = str(exc)
    errs = [ln.strip() for ln in log.splitlines() if "error" in ln]
    first = "; ".join(errs[:3]) or log.strip().splitlines()[0] if log.strip() else repr(exc)
    return Failure(f"CUDA kernel {name}.cu failed to compile: {first}",
                   hint="this is a bug in qtool's kernels; please report it with the GPU model")


def _options() -> tuple:
    """OPTIONS plus QTOOL_NVRTC_DEFINES (space-separated -D flags for experiments, e.g. -DQT_PROBE)."""
    return OPTIONS + tuple(os.environ.get("QTOOL_NVRTC_DEFINES", "").split())


def module(name: str):
    return _module(name, _options())


@functools.lru_cache(maxsize=None)
def _module(name: str, options: tuple):
    import cupy
    src = preprocess(kernel_dir() / f"{name}.cu")
    try:
        mod = cupy.RawModule(code=src, options=options, name_expressions=TEMPLATES.get(name) or None)
        mod.compile()
    except Exception as exc:  # cupy.cuda.compiler.CompileException and friends
        raise _compile_error(name, exc) from exc
    return mod


def function(name: str, expr: str):
    return _function(name, expr, _options())


@functools.lru_cache(maxsize=None)
def _function(name: str, expr: str, options: tuple):
    return _module(name, options).get_function(expr)
