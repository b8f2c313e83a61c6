"""`qtool run` end to end on tiny checkpoints: KV-dtype rules, refusals, JSON, batches, one-line errors.

The generated text is checked against the runtime API driven directly (greedy is deterministic), and
the KV-cache choices against the checkpoint's hf_quant_config.json; refusals must exit 3 before any
weights are loaded, bad input must give one line and the right exit code.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qtool.cli import app
from test_runtime_vs_hf import build_checkpoint, exports_root  # noqa: F401 (fixture)

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["run", *map(str, args)])


def _json(result):
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def test_bf16_json_and_stats(tiny_models):
    path = tiny_models("llama")
    r = _run(path, "Hello", "--max-new-tokens", 5, "--json")
    doc = _json(r)
    assert doc["ok"] and doc["backend"] == "torch" and doc["kv_cache_dtype"] == "bf16"
    (c,) = doc["completions"]
    assert c["generated_tokens"] <= 5 and c["prompt_tokens"] > 3
    s = doc["stats"]
    assert s["prompt_tokens"] == c["prompt_tokens"] and s["weight_bytes"] > 0 and s["peak_memory_bytes"] > 0
    assert "reference" in r.stderr and "prefill" in r.stderr and "decode" in r.stderr


def test_streamed_text_equals_api_greedy(tiny_models):
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import load_tokenizer, prompt_ids
    from qtool.runtime.generate import GenerateOptions, generate
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    path = tiny_models("qwen2")
    r = _run(path, "Water boils at", "--max-new-tokens", 8, "--system", "Be brief.")
    assert r.exit_code == 0, r.stderr
    tok = load_tokenizer(path)
    w = load_model_weights(str(path), progress=False)
    (ref,), _ = generate(Model(w, TorchRefBackend()), tok, [prompt_ids(tok, "Water boils at", "Be brief.")],
                         GenerateOptions(max_new_tokens=8), "bf16", {tok.eos_token_id})
    assert r.stdout == ref.text + "\n"


def test_fp8_kv_on_bf16_model_warns_and_runs(tiny_models):
    r = _run(tiny_models("llama"), "Hello", "--max-new-tokens", 3, "--kv-cache-dtype", "fp8", "--json")
    doc = _json(r)
    assert doc["kv_cache_dtype"] == "fp8"
    assert any("scale 1.0" in w for w in doc["warnings"])


def test_nvfp4_kv_on_bf16_model_refused_exit_3(tiny_models):
    r = _run(tiny_models("llama"), "Hello", "--kv-cache-dtype", "nvfp4")
    assert r.exit_code == 3
    assert "qtool quantize" in r.stderr and "--quant fp8 --kv-cache-quant nvfp4" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_fp8_nvfp4kv_export_runs_with_its_kv(tiny_models, exports_root):  # noqa: F811
    ckpt = build_checkpoint(tiny_models, "llama", "fp8-kvnvfp4", exports_root)
    doc = _json(_run(ckpt, "What is the capital of France?", "--max-new-tokens", 4, "--json"))
    assert doc["kv_cache_dtype"] == "nvfp4" and doc["weight_recipe"] == "fp8" and doc["warnings"] == []
    doc = _json(_run(ckpt, "Hi", "--max-new-tokens", 2, "--kv-cache-dtype", "bf16", "--json"))
    assert doc["kv_cache_dtype"] == "bf16"


def test_model_matrix_refusal_exit_3_before_loading(tiny_models, exports_root):  # noqa: F811
    # Mistral has no Y for NVFP4 weights in the seed's model matrix
    ckpt = build_checkpoint(tiny_models, "mistral", "nvfp4", exports_root)
    r = _run(ckpt, "Hi", "--max-new-tokens", 2)
    assert r.exit_code == 3 and "NVFP4" in r.stderr and "Mistral" in r.stderr
    r = _run(ckpt, "Hi", "--max-new-tokens", 2, "--force", "--json")
    assert _json(r)["warnings"]


def test_prompts_file_batch(tiny_models, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hello"}\n{"prompt": "The capital of Spain is"}\n')
    doc = _json(_run(tiny_models("qwen3"), "--prompts", f, "--max-new-tokens", 3, "--json"))
    assert [c["prompt"] for c in doc["completions"]] == ["Hello", "The capital of Spain is"]
    lines = tmp_path / "p.txt"
    lines.write_text("one\n\ntwo\n")
    r = _run(tiny_models("qwen3"), "--prompts", lines, "--max-new-tokens", 2)
    assert r.exit_code == 0 and "[0] one" in r.stdout and "[1] two" in r.stdout


@pytest.mark.parametrize("args,code", [
    (["/nonexistent/model", "Hi"], 2),
    (["./no-such-dir", "Hi"], 2),
])
def test_bad_model_path_one_line(args, code):
    r = _run(*args)
    assert r.exit_code == code
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err[0].startswith("error:") and len(err) <= 2 and "Traceback" not in r.stderr


def test_usage_errors(tiny_models, tmp_path):
    path = tiny_models("llama")
    assert _run(path).exit_code == 2                                   # neither prompt nor --prompts
    assert _run(path, "x", "--prompts", tmp_path / "missing.txt").exit_code == 2
    assert _run(path, "x", "--kv-cache-dtype", "int8").exit_code == 2


def test_cuda_backend_without_gpu_is_one_line(tiny_models):
    from qtool.runtime.backends import cuda_usable
    if cuda_usable()[0]:
        pytest.skip("a GPU with CuPy is present")
    r = _run(tiny_models("llama"), "Hi", "--backend", "cuda")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = _run("someorg/some-model", "Hi")
    assert r.exit_code == 1
    assert r.stderr.startswith("error:") and "hub" in r.stderr and "Traceback" not in r.stderr


def test_stop_string_cuts_output(tiny_models):
    path = tiny_models("llama")
    full = _json(_run(path, "Water boils at", "--max-new-tokens", 12, "--json"))["completions"][0]
    if len(full["text"]) < 4:
        pytest.fail(f"the tiny model produced too little text to test --stop: {full['text']!r}")
    stop = full["text"][2:4]
    cut = _json(_run(path, "Water boils at", "--max-new-tokens", 12, "--stop", stop, "--json"))["completions"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][:full["text"].find(stop)]


def test_process_exit_after_torch_keeps_output_atexit_and_codes(tiny_models):
    """`python -m qtool` ends a torch-loaded process with os._exit (cli._exit): the output of a real run is
    complete and equal to the in-process run's, atexit handlers still run, and SystemExit's code convention
    (None -> 0, int -> itself, text -> printed, 1) holds."""
    import subprocess
    import sys
    from cli_helpers import REPO, run_qtool
    path = tiny_models("llama")
    sub = run_qtool("run", str(path), "Hello", "--max-new-tokens", "4", "--json", "--backend", "torch")
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout)["completions"] == _json(_run(path, "Hello", "--max-new-tokens", 4, "--json",
                                                               "--backend", "torch"))["completions"]
    for code, rc, err in (("None", 0, ""), ("3", 3, ""), ("'bad thing'", 1, "bad thing")):
        p = subprocess.run([sys.executable, "-c", "import atexit, sys, torch; from qtool.cli import _exit; "
                            "atexit.register(lambda: print('atexit ran')); print('out', end=' '); "
                            f"_exit({code})"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert (p.returncode, p.stdout, p.stderr.strip()) == (rc, "out atexit ran\n", err)
    # the interpreter's teardown (here: a __del__ of a module global) is skipped, except under a profiler
    for profiled, tail in ((False, "atexit ran\n"), (True, "atexit ran\nteardown ran\n")):
        p = subprocess.run([sys.executable, "-c", "import atexit, sys, torch; from qtool.cli import _exit\n"
                            "class D:\n    def __del__(self): print('teardown ran')\n"
                            "d = D(); atexit.register(lambda: print('atexit ran'))\n"
                            + ("sys.setprofile(lambda *a: None)\n" if profiled else "") + "_exit(0)"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert (p.returncode, p.stdout) == (0, tail), p.stderr
