"""`qtool quantize` refusals and usage errors: right exit code, one line, nothing loaded or written.

The model folders here hold a real config.json but a GARBAGE model.safetensors: a request that
is refused before loading exits with its code; one that tried to load would fail differently.
Also: the atomic output folder on Ctrl-C, and the cause of "Invalid device string: 'bfloat16'".
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli import app

runner = CliRunner()

SMOLLM2_SHAPE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                 "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                 "max_position_embeddings": 8192}


def fake_model(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


@pytest.fixture
def smol_shaped(tmp_path):
    return fake_model(tmp_path / "smol", SMOLLM2_SHAPE)


def invoke(*args):
    r = runner.invoke(app, ["quantize", *args])
    assert "Traceback" not in (r.stdout + (r.stderr or "")), r.stdout
    return r


def errors(r) -> list[str]:
    return [ln for ln in (r.stderr or r.stdout).splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("args,needle", [
    (["--quant", "nvfp4", "--kv-cache-quant", "nvfp4"], "NVFP4 KV cache needs fp8"),
    (["--quant", "nvfp4", "--gpu", "sm90"], "NVFP4 is not supported on Hopper"),
    (["--quant", "w4a16-awq", "--gpu", "sm120", "--awq-block-size", "64"], "W4A16 AWQ is not supported"),
    (["--quant", "w4a8-gptq", "--awq-block-size", "64"], "W4A8 GPTQ is not supported"),
    (["--quant", "mxfp4"], "MXFP4 is not supported for LLaMA"),
])
def test_refusals_exit_3_before_loading(smol_shaped, tmp_path, args, needle):
    out = tmp_path / "out"
    r = invoke("--model", str(smol_shaped), "-o", str(out), *args)
    assert r.exit_code == 3, r.stdout + (r.stderr or "")
    assert len(errors(r)) == 1 and needle in errors(r)[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["smol"]


def test_refusal_json_carries_verdict(smol_shaped, tmp_path):
    r = invoke("--model", str(smol_shaped), "-o", str(tmp_path / "o"), "--quant", "nvfp4", "--gpu", "h100", "--json")
    assert r.exit_code == 3
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "unsupported" and err["verdict"]["supported"] is False


def test_family_override_is_checked(smol_shaped, tmp_path):
    r = invoke("--model", str(smol_shaped), "-o", str(tmp_path / "o"), "--quant", "fp8", "--family", "GPT-OSS")
    assert r.exit_code == 3 and "GPT-OSS" in errors(r)[0]


def test_unknown_recipe_exit_2(smol_shaped, tmp_path):
    r = invoke("--model", str(smol_shaped), "-o", str(tmp_path / "o"), "--quant", "int3")
    assert r.exit_code == 2


def test_missing_model_path_one_line(tmp_path):
    r = invoke("--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--quant", "fp8", "--gpu", "sm90")
    assert r.exit_code == 2 and len(errors(r)) == 1 and "not found" in errors(r)[0]
    assert not (tmp_path / "o").exists()


def test_awq_block_size_names_working_sizes(smol_shaped, tmp_path):
    r = invoke("--model", str(smol_shaped), "-o", str(tmp_path / "o"), "--quant", "w4a16-awq", "--gpu", "sm90")
    assert r.exit_code == 2
    line = errors(r)[0]
    assert "576" in line and "64" in line and "128" in line
    assert not (tmp_path / "o").exists()


def test_builtin_smollm2_awq_block_checked_without_conversion(tmp_path):
    """The default model's config is known (or cached) before conversion, so the check is instant."""
    r = invoke("-o", str(tmp_path / "o"), "--quant", "w4a8-awq", "--gpu", "sm90")
    assert r.exit_code == 2 and "--awq-block-size 64" in errors(r)[0]


def test_existing_output_refused_without_force(smol_shaped, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke("--model", str(smol_shaped), "-o", str(out), "--quant", "fp8", "--gpu", "sm90")
    assert r.exit_code == 2 and "not empty" in errors(r)[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_staged_output_removed_on_interrupt(tmp_path):
    from qtool.quantize.output import staged
    target = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        with staged(target, force=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_staged_output_replaces_only_when_complete(tmp_path):
    from qtool.quantize.output import staged
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("old")
    (target / "qtool.json").write_text("{}")       # --force replaces only a previous qtool output
    with pytest.raises(RuntimeError):
        with staged(target, force=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["old", "qtool.json"]
    with staged(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_pretrained_leaves_string_dtype_on_live_config(tiny_models, tmp_path):
    """The cause of "Invalid device string: 'bfloat16'" (docs/quantize.md): transformers'
    save_pretrained (called by export_hf_checkpoint) stores config.dtype as a string."""
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.bfloat16)
    assert m.config.dtype == torch.bfloat16
    m.save_pretrained(tmp_path / "s")
    assert m.config.dtype == "bfloat16"
    with pytest.raises(RuntimeError, match="Invalid device string: 'bfloat16'"):
        torch.zeros(1).to(m.config.dtype)


def _hf_example(*args):
    import os
    import subprocess
    script = Path(__file__).resolve().parent.parent / "scripts" / "huggingface_example.sh"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "echo"})     # print the qtool command instead of running it


def test_huggingface_example_maps_modelopt_flags():
    r = _hf_example("--model", "m", "--quant", "fp8", "--kv_cache_quant", "nvfp4", "--calib", "64,64",
                    "--calib_seq=128", "--awq_block_size", "64", "--tp", "1", "--output", "o")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["-m", "qtool", "quantize", "--model", "m", "--quant", "fp8", "--kv-cache-quant", "nvfp4",
                                "--calib-size", "64", "--calib-seq-len", "128", "--batch-size", "0", "--output", "o",
                                "--awq-block-size", "64"]
    assert "--tp is ignored" in r.stderr


@pytest.mark.parametrize("modelopt,qtool_name", [("fp8_pc_pt", "fp8-rowwise"), ("fp8_pb_wo", "fp8-block"),
                                                 ("int4_awq", "w4a16-awq"), ("w4a8_awq", "w4a8-awq"),
                                                 ("int4_gptq", "w4a16-gptq"), ("mxfp4", "mxfp4")])
def test_huggingface_example_quant_names(modelopt, qtool_name):
    r = _hf_example("--quant", modelopt, "--kv_cache_quant", "none")
    assert r.returncode == 0 and f"--quant {qtool_name} " in r.stdout


@pytest.mark.parametrize("args", [["--quant", "int8_sq"], ["--kv_cache_quant", "int8"], ["--calib_dataset", "cnn_dailymail"],
                                  ["--bogus", "1"]])
def test_huggingface_example_rejects_in_one_line(args):
    r = _hf_example(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")


def test_recipe_needing_cuda_refused_in_one_line_on_cpu(smol_shaped, tmp_path, monkeypatch):
    """A recipe marked cpu_calibration = false (none is, with ModelOpt 0.47) fails in one line without CUDA."""
    import qtool.quantize.pipeline as pipeline
    import qtool.quantize.plan as plan
    from qtool.support import data
    if plan.cuda_available():
        pytest.skip("this machine has CUDA")
    real = data.recipes()["weights"]["fp8"]
    fake = data.Recipe(real.name, real.kind, real.column, real.title,
                       {**real.spec, "cpu_calibration": False, "cuda_reason": "its fake quant has no CPU kernel"})
    monkeypatch.setattr(pipeline, "recipe", lambda kind, name: fake if name == "fp8" else data.recipes()[kind][name])
    r = invoke("--model", str(smol_shaped), "-o", str(tmp_path / "o"), "--quant", "fp8", "--gpu", "sm90")
    assert r.exit_code == 1 and len(errors(r)) == 1
    assert "fp8 needs CUDA: its fake quant has no CPU kernel" in errors(r)[0]
    assert not (tmp_path / "o").exists()


def test_staged_output_creates_missing_parents(tmp_path):
    from qtool.quantize.output import staged
    target = tmp_path / "a" / "b" / "out"
    with staged(target, force=False) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert (target / "model.safetensors").read_bytes() == b"x"
    assert [p.name for p in target.parent.iterdir()] == ["out"]   # no staging leftovers
