"""The bench scripts that the next device run starts from (bench/run_pending.sh), exercised on the CPU so a device
call is not spent on an import error or a broken harness.

- bench/prefill_attention_gemm.py: its GEMM prefill attention and the product's fused SDPA path against float64
  attention computed here (causal with L == T and with a cached prefix, an explicit mask), and its main() at tiny
  sizes;
- bench/serve_host_ceiling.py: the real app and engine over its sleeping stand-in answer a completion whose tokens
  follow the stand-in's rule, and /metrics carries the engine's time counters;
- bench/small_m_gemm.py, bench/awq_export_gap.py: import (their work needs a GPU / a calibration);
- the prototype kernels (bench/kernels/attn_tc.cuh, gemm_mma_small.cuh), assembled as their benches compile them,
  compile with nvcc for sm_90a and sm_100a, and gemm_mma_small's index logic, emulated lane by lane on the CPU,
  gives an exact integer matmul.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "scripts"))


def _float64(qb, k, v, mask):
    G = qb.shape[1] // k.shape[1]
    q64, k64, v64 = qb.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    T, L = q64.shape[2], k64.shape[2]
    s = q64 @ k64.transpose(2, 3) / math.sqrt(q64.shape[-1])
    if mask is None:
        mask = (torch.arange(L)[None, :] <= (L - T + torch.arange(T))[:, None])[None, None]
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v64


@pytest.mark.parametrize("case", ["fresh", "prefix", "mask"])
def test_prefill_attention_variants_equal_float64(case, monkeypatch):
    import prefill_attention_gemm as pag
    from qtool.kernels import prefill_attention
    g = torch.Generator().manual_seed(len(case))
    T, L = (24, 24) if case == "fresh" else (9, 30)
    qb, k, v = torch.randn(1, 8, T, 64, generator=g), torch.randn(1, 2, L, 64, generator=g), \
        torch.randn(1, 2, L, 64, generator=g)
    mask = None
    if case == "mask":
        pos = torch.tensor([3, 4, 5, 6, 7, 8, 0, 0, 0])
        mask = (torch.arange(L)[None, :] <= pos[:, None])[None, None]
    want = _float64(qb, k, v, mask)
    monkeypatch.setattr(pag, "SCORE_ELEMENTS", 2 * 8 * L)          # query tiles of 2 rows in the GEMM variant
    for got in (pag.gemm_attend(qb, k, v, mask), prefill_attention._sdpa(qb, k, v, mask)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-5


def test_prefill_attention_bench_runs(tmp_path, capsys):
    import prefill_attention_gemm as pag
    out = tmp_path / "p.json"
    sys_argv = sys.argv
    sys.argv = ["x", "--device", "cpu", "--lengths", "16", "--heads", "4", "2", "32", "--layers", "2", "--json", str(out)]
    try:
        pag.main()
    finally:
        sys.argv = sys_argv
    row = json.loads(out.read_text())["rows"][0]
    assert row["T"] == 16 and row["err_sdpa"] < 1e-5 and row["err_gemm"] < 1e-5 and row["gemm_ms"] > 0


def test_serve_host_ceiling_answers(tiny_models):
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "serve_host_ceiling.py"), str(tiny_models("llama")),
                             "--port", str(port), "--max-num-seqs", "4", "--max-model-len", "128",
                             "--decode-ms", "0.5", "0.1", "--prefill-ms", "1", "1"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "fake", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}).json()
        # the stand-in's logits: position p's next token is (7 p + 300) % 1024; the prompt fills positions 0..2
        assert r["choices"][0]["token_ids"] == [(7 * p + 300) % 1024 for p in (2, 3, 4, 5)]
        m = httpx.get(url + "/metrics", timeout=10).text
        assert "qtool_engine_decode_seconds_total" in m and "qtool_decode_steps_total" in m
    finally:
        proc.terminate()
        proc.wait(30)


def test_gemm_mma_small_index_logic_emulated():
    """bench/gemm_mma_small_emulate.py runs the prototype's loads, mma fragments (PTX m16n8k32 8-bit layout) and
    stores lane by lane over qtool's mma-tiled weights: integer operands give x w^T exactly, for partial row tiles
    (O 33, 40), M below a tile multiple (9, 19), every NT and 1-3 K slices."""
    import numpy as np
    import gemm_mma_small_emulate as emu
    rng = np.random.default_rng(1)
    for O, K, M, NT, S in emu.CASES:
        w = rng.integers(-7, 8, size=(O, K)).astype(np.float64)
        x = rng.integers(-7, 8, size=(M, K)).astype(np.float64)
        assert np.array_equal(emu.emulate(w, x, NT, S), x @ w.T), (O, K, M, NT, S)


def test_gpu_benches_import():
    import awq_export_gap  # noqa: F401
    import small_m_gemm
    assert set(small_m_gemm.LLAMA_LINEARS) == {"qkv", "o", "gate_up", "down"}


NVCC = __import__("shutil").which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("bench", ["attention_tc", "gemm_mma_small"])
def test_prototype_kernels_compile(bench, tmp_path):
    """The prototypes a device run times (bench/kernels/*.cuh, assembled as their bench compiles them) compile with
    nvcc for sm_90a and sm_100a; gemm_mma_small spills nothing (attn_tc's head_dim 256 bf16 instance spills a few
    bytes, noted in docs/dev)."""
    import importlib
    import re
    src = importlib.import_module(bench).source()
    cu = tmp_path / f"{bench}.cu"
    cu.write_text(src)
    for arch in ("90a", "100a"):
        r = subprocess.run([NVCC, "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-Xptxas",
                            "-v", "-o", str(tmp_path / f"{bench}.{arch}.cubin"), str(cu)], capture_output=True, text=True)
        assert r.returncode == 0, f"{bench} sm_{arch}:\n{r.stderr[-3000:]}"
        name = "attn_tc_paged" if bench == "attention_tc" else "gemm_mma_small"
        entries = re.findall(r"Compiling entry function '(\w+)'", r.stderr + r.stdout)
        assert sum(name in e for e in entries) == (9 if bench == "attention_tc" else 3), entries
        if bench == "gemm_mma_small":
            assert not re.findall(r"[1-9]\d* bytes spill stores", r.stderr + r.stdout)
