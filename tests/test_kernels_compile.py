"""Every kernels_cuda/*.cu compiles with nvcc for sm_90a and sm_100a, through qtool's own #include inliner.

Runs on the CPU (CI): needs only nvcc. Compiling the inlined source (what NVRTC gets at run time) also checks
that the loader's preprocessing is complete, and that every template named in loader.TEMPLATES exists
(they are explicitly instantiated in the .cu files; a missing one would fail to link by name on the GPU).
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from qtool.kernels import loader

NVCC = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))
SOURCES = sorted(loader.kernel_dir().glob("*.cu"))
ARCHS = ("90a", "100a")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


def test_kernel_sources_exist():
    names = {p.stem for p in SOURCES}
    assert {"elementwise", "rope_kv", "attention", "act_quant", "linear", "sampling"} <= names
    for name in loader.TEMPLATES:
        assert name in names


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles(src, tmp_path):
    text = loader.preprocess(src)
    assert "#include \"" not in text
    cu = tmp_path / src.name
    cu.write_text(text)
    entries = set()
    for arch in ARCHS:
        out = tmp_path / f"{src.stem}.{arch}.cubin"
        r = subprocess.run([NVCC, "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin",
                            "-Xptxas", "-v", "-o", str(out), str(cu)], capture_output=True, text=True)
        assert r.returncode == 0, f"{src.name} sm_{arch}:\n{r.stderr[-3000:]}"
        assert out.stat().st_size > 0
        entries |= set(re.findall(r"Compiling entry function '(\w+)'", r.stderr + r.stdout))
        # no kernel may spill registers to local memory (a silent slowdown on every launch), except the f32 / f16
        # fallback GEMVs known to spill a few words with nvcc 13.0 (gemv<4, 1>, gemv_h<F, 4|8>: docs/dev/cuda-notes.md)
        spills = re.findall(r"Function properties for (\w+)\n\s+\d+ bytes stack frame, (\d+) bytes spill stores",
                            r.stderr + r.stdout)
        bad = [(f, n) for f, n in spills if int(n) > (32 if f.startswith(("_Z4gemvI", "_Z6gemv_hI")) else 0)]
        assert not bad, f"{src.name} sm_{arch} spills: {bad}"
    for expr in loader.TEMPLATES.get(src.stem, []):
        # the explicit instantiation exists (NVRTC name_expressions would otherwise not resolve): its
        # Itanium-mangled entry name, e.g. gemm<5> -> _Z4gemmILi5EE...
        fname, targs = re.match(r"(\w+)<(.*)>", expr).groups()
        prefix = f"_Z{len(fname)}{fname}I" + "".join(f"Li{int(a)}E" for a in targs.split(",")) + "E"
        assert any(e.startswith(prefix) for e in entries), f"{expr}: no instantiation ({prefix}...) in {src.name}"


def test_compile_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.cu"
    (tmp_path / "h.cuh").write_text("#pragma once\n__device__ int ok() { return 1; }\n")
    bad.write_text('#include "h.cuh"\n\nextern "C" __global__ void k() { int x = undefined_name; }\n')
    cu = tmp_path / "pp.cu"
    cu.write_text(loader.preprocess(bad))
    r = subprocess.run([NVCC, "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-o", str(tmp_path / "o"),
                        str(cu)], capture_output=True, text=True)
    assert r.returncode != 0
    assert re.search(r"bad\.cu\(3\)", r.stderr), r.stderr
