"""The README's main job, end to end on CPU, as CI runs it: the embedded SmolLM2-135M-Instruct quantized
to FP8 with an NVFP4 KV cache, inspected, and asked "What is the capital of France?" on the reference
backend (the answer must name Paris); plus the KV-cache options of `qtool run` on the bf16 SmolLM2.

Each command runs as its own `python -m qtool` process, exactly as a user types it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_qtool


def qtool(*args, timeout=900):
    return run_qtool(*args, env={"OMP_NUM_THREADS": "2"}, timeout=timeout)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("main") / "smollm2-fp8-kvnvfp4"
    q = qtool("quantize", "--model", "smollm2-135m", "--quant", "fp8", "--kv-cache-quant", "nvfp4",
              "--calib-size", "16", "--calib-seq-len", "128", "--output", str(out))
    assert q.returncode == 0, q.stderr[-2000:]
    return out


def test_main_job_inspects_clean(main_job):
    r = qtool("inspect", str(main_job), "--json")
    assert r.returncode == 0, r.stderr[-1000:]
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["problems"] == []
    assert doc["recipe"]["name"] == "fp8" and doc["recipe"]["kv_cache"] == "nvfp4"
    assert doc["recipe"]["kv_scales"] == "calibrated"
    assert doc["model"]["family_rows"] == ["LLaMA", "LLaMA-v2"]


def test_main_job_answers_paris(main_job):
    r = qtool("run", str(main_job), "What is the capital of France?", "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr[-1000:]
    assert "Paris" in r.stdout, r.stdout
    assert "kv nvfp4" in r.stderr and "backend torch" in r.stderr


def test_bf16_smollm2_kv_cache_options(main_job):
    bf16 = Path(json.loads((main_job / "qtool.json").read_text())["source"]["path"])
    assert (bf16 / "config.json").is_file()
    r = qtool("run", str(bf16), "Hello", "--kv-cache-dtype", "fp8", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr[-1000:]
    assert "kv fp8" in r.stderr
    r = qtool("run", str(bf16), "Hello", "--kv-cache-dtype", "nvfp4", "--max-new-tokens", "2")
    assert r.returncode == 3
    assert "qtool quantize" in r.stderr and "--kv-cache-quant nvfp4" in r.stderr
    assert "Traceback" not in r.stderr
