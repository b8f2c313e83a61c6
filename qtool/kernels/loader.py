"""Compile and cache the CUDA kernels of ``kernels_cuda/`` with NVRTC through ``cupy.RawModule``.

Contract: ``module(name)`` returns the compiled module of ``kernels_cuda/<name>.cu`` for the current GPU;
``function(name, expr)`` one kernel of it (``expr`` a plain name or a template instantiation such as
``"gemv<1, 4>"``, which must be listed in ``TEMPLATES``). ``#include "x.cuh"`` lines are inlined here (with
``#line`` markers), so compile errors name the original file and line. Compiled modules are kept on disk under
``<qtool cache dir>/kernels/`` (sources.cache_dir()), keyed by the inlined source, the options, the template
names, the GPU architecture and the NVRTC and CuPy versions, with the template names' mangled forms beside them:
a later process loads the binary instead of compiling (CuPy's own cache recompiles any module with template
name expressions). CuPy chooses the arch from the device (sm_90 on Hopper; the kernels need sm_89+ for the e4m3
cvt and use no sm_90a-only instruction).
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
              + [f"gemm_tc<{f}, 0>" for f in range(6)] + [f"gemm_tc<{f}, 1>" for f in (1, 5)],
    "attention": [f"{k}<{d}, {pu}, {gm}, {kf}>" for d, pu, gm in ((64, 8, 4), (64, 8, 8), (128, 8, 4), (128, 8, 8),
                                                                 (256, 4, 8))
                  for kf in range(3) for k in ("attn_partial", "attn_partial_paged")],
    "dequant": [f"dequant_bf16<{f}>" for f in range(1, 6)],
    "gemv_4bit": [f"gemv_q4<{f}, {pa}, {xs}>" for f, pa, xs in ((2, 16, 0), (3, 2, 0), (3, 2, 1), (4, 2, 0), (4, 4, 0),
                                                                 (4, 8, 0))],
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


def module(name: str):
    return _module(name, OPTIONS)


@functools.lru_cache(maxsize=None)
def _module(name: str, options: tuple):
    src = preprocess(kernel_dir() / f"{name}.cu")
    exprs = tuple(TEMPLATES.get(name) or ())
    try:
        return _cached_module(name, src, options, exprs)
    except Failure:
        raise
    except Exception:  # noqa: BLE001 - a CuPy without these internals, an unwritable cache: compile in memory
        pass
    import cupy
    try:
        mod = cupy.RawModule(code=src, options=options, name_expressions=exprs or None)
        mod.compile()
    except Exception as exc:  # cupy.cuda.compiler.CompileException and friends
        raise _compile_error(name, exc) from exc
    return mod


class _Cached:
    """A module loaded from the on-disk cache: get_function takes the template names (mapped to their mangled
    forms); everything else is the underlying cupy.RawModule's."""

    def __init__(self, mod, mapping: dict):
        self._mod, self._mapping = mod, mapping

    def get_function(self, expr: str):
        return self._mod.get_function(self._mapping.get(expr, expr))

    def __getattr__(self, attr):
        return getattr(self._mod, attr)


def _cached_module(name: str, src: str, options: tuple, exprs: tuple) -> _Cached:
    """The module from <cache dir>/kernels/, compiled with NVRTC (as cupy.RawModule does) and stored on a miss."""
    import hashlib
    import json

    import cupy
    from cupy.cuda import compiler

    from qtool.sources import cache_dir
    arch = compiler._get_arch()
    opts = tuple(options) + ("-ftz=true",)           # what cupy.RawModule adds
    key = hashlib.sha256(repr((src, opts, exprs, arch, compiler._get_nvrtc_version(), cupy.__version__))
                         .encode()).hexdigest()[:32]
    folder = cache_dir() / "kernels"
    binf, mapf = folder / f"{name}-{key}.cubin", folder / f"{name}-{key}.json"
    if not (binf.is_file() and mapf.is_file()):
        try:
            binary, mapping = compiler.compile_using_nvrtc(src, opts, arch, f"{name}.cu", list(exprs) or None)
        except compiler.CompileException as exc:
            raise _compile_error(name, exc) from exc
        folder.mkdir(parents=True, exist_ok=True)
        for path, data in ((binf, binary), (mapf, json.dumps(mapping or {}).encode())):
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)                    # atomic: concurrent processes see whole files only
    mod = cupy.RawModule(path=str(binf))
    return _Cached(mod, json.loads(mapf.read_text()))


@functools.lru_cache(maxsize=None)
def function(name: str, expr: str):
    return module(name).get_function(expr)
