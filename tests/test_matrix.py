"""Foundation tests: support data against the seed text, the check's verdicts, family and GPU
resolution, and the `qtool matrix` CLI (exit codes, JSON, start-up cost)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from conftest import SEED_DIR
from qtool.cli import app
from qtool.errors import Unsupported, UsageError
from qtool.formats import registry
from qtool.support import data
from qtool.support.check import check_request, enforce
from qtool.support.families import resolve_family, rows_for_config, rows_for_model
from qtool.support.gpus import arch_for_capability, resolve_gpu

runner = CliRunner()


# --- an independent reading of the seed page -------------------------------------------------

def _seed_text() -> str:
    files = sorted(SEED_DIR.glob("*.txt")) if SEED_DIR.exists() else []
    if not files:
        pytest.skip("shared/seed is not beside this checkout")
    return files[0].read_text(encoding="utf-8")


def _seed_table(title: str):
    """Parse one matrix of the seed: 12 header cells, then rows of 12 cells, one cell per line."""
    text = _seed_text()
    body = text.split(title, 1)[1]
    body, note = body.split("\nNote", 1)
    cells = [ln.strip() for ln in body.splitlines() if ln.strip()]
    header, rest = cells[:12], cells[12:]
    assert len(rest) % 12 == 0, "seed table is not rectangular"
    rows = [rest[i:i + 12] for i in range(0, len(rest), 12)]
    note_text = note.split("\n\n", 1)[1] if "\n\n" in note else note
    return header, rows, note_text


@pytest.mark.parametrize("title,getter", [("Model Supported Matrix#", data.model_matrix),
                                          ("Hardware Support Matrix#", data.hardware_matrix)])
def test_every_cell_matches_the_seed(title, getter):
    header, rows, note = _seed_table(title)
    m = getter()
    assert list(m.columns) == header[1:]
    assert list(m.rows) == [r[0] for r in rows]
    for r in rows:
        for col, val in zip(header[1:], r[1:]):
            assert val in ("Y", ".")
            assert m.cells[(r[0], col)] == val, (r[0], col)
    # the note under the matrix, verbatim (whitespace-normalised)
    norm = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    assert any(norm(n) in norm(note) for n in m.notes)


def test_seed_rule_is_in_the_recipe_data():
    text = re.sub(r"\s+", " ", _seed_text())
    assert "only supports FP8 weight/activation quantization when NVFP4 KV cache is enabled" in text
    kv = data.recipes()["kv"]["nvfp4"]
    assert kv.get("requires_weights") == ["fp8"]


def test_every_recipe_names_a_matrix_column():
    cli = {"weights": ["fp8", "fp8-rowwise", "fp8-block", "nvfp4", "mxfp4", "w4a16-awq", "w4a8-awq",
                       "w4a16-gptq", "w4a8-gptq"], "kv": ["fp8", "nvfp4"]}
    for kind, names in cli.items():
        assert list(data.recipes()[kind]) == names
        for n in names:
            col = data.recipes()[kind][n].column
            assert col in data.model_matrix().columns and col in data.hardware_matrix().columns
    # all 11 columns are covered by exactly one recipe
    cols = [r.column for k in ("weights", "kv") for r in data.recipes()[k].values()]
    assert sorted(cols) == sorted(data.model_matrix().columns)


# --- the check ------------------------------------------------------------------------------

LLAMA31 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "max_position_embeddings": 131072}
LLAMA2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
          "max_position_embeddings": 4096}
SMOLLM2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
           "max_position_embeddings": 8192, "rope_theta": 100000}
QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936}


def test_nvfp4_weights_with_nvfp4_kv_is_refused_needs_fp8():
    v = check_request(rows_for_config(LLAMA2), "nvfp4", "nvfp4", resolve_gpu("sm100"))
    assert not v.supported
    assert any("fp8" in r.lower() and "nvfp4 kv" in r.lower() for r in v.reasons)
    with pytest.raises(Unsupported):
        enforce(v, force=False)
    assert "--force" in enforce(v, force=True)


@pytest.mark.parametrize("cfg", [LLAMA2, LLAMA31, QWEN3], ids=["LLaMA-v2", "LLaMA 3", "Qwen-3"])
def test_fp8_with_nvfp4_kv_on_sm100_is_supported(cfg):
    assert check_request(rows_for_config(cfg), "fp8", "nvfp4", resolve_gpu("sm100")).supported


@pytest.mark.parametrize("family", ["LLaMA-v2", "LLaMA 3", "Qwen-3"])
def test_fp8_with_nvfp4_kv_on_sm100_by_family_name(family):
    rows, _ = rows_for_model(family)
    assert check_request(rows, "fp8", "nvfp4", resolve_gpu("b200")).supported


def test_nvfp4_on_hopper_is_refused_with_alternatives():
    v = check_request(rows_for_config(LLAMA31), "nvfp4", None, resolve_gpu("sm90"))
    assert not v.supported
    msg = v.message()
    assert "NVFP4 is not supported on Hopper (sm90)" in msg
    assert "fp8-rowwise" in v.alternatives and "w4a8-awq" in v.alternatives and "kv fp8" in v.alternatives
    assert "nvfp4" not in v.alternatives


def test_w4a16_awq_on_ampere_for_mistral_is_supported():
    rows = rows_for_config({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    assert rows == ["Mistral"]
    assert check_request(rows, "w4a16-awq", None, resolve_gpu("a100")).supported
    assert check_request(rows, "w4a16-awq", None, resolve_gpu("sm86")).supported


def test_any_arch_lists_the_architectures():
    v = check_request(rows_for_config(SMOLLM2), "fp8", "nvfp4", None, any_arch=True)
    assert v.supported and v.archs_ok == ["sm100"]
    v = check_request(None, "w4a8-gptq", None, None, any_arch=True)
    assert set(v.archs_ok) == {"sm90", "sm89"}


def test_w4a8_gptq_has_no_model_row():
    for row in data.model_matrix().rows:
        assert not check_request([row], "w4a8-gptq", None, None).supported


# --- families and GPUs ------------------------------------------------------------------------

def test_family_detection_rules():
    assert rows_for_config(LLAMA31) == ["LLaMA", "LLaMA 3"]
    assert rows_for_config(LLAMA2) == ["LLaMA", "LLaMA-v2"]
    assert rows_for_config(SMOLLM2) == ["LLaMA", "LLaMA-v2"]
    assert rows_for_config({"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 2048}) == ["LLaMA"]
    assert rows_for_config(QWEN3) == ["Qwen-3"]
    assert rows_for_config({"model_type": "qwen2"}) == ["Qwen-2/2.5"]
    assert rows_for_config({"model_type": "gemma3_text"}) == ["Gemma 3"]
    with pytest.raises(Unsupported) as e:
        rows_for_config({"model_type": "mamba", "architectures": ["MambaForCausalLM"]})
    assert "LLaMA-v2" in e.value.hint and "Qwen-3" in e.value.hint


@pytest.mark.parametrize("typed,row", [("LLaMA-v2", "LLaMA-v2"), ("llama-v2", "LLaMA-v2"),
                                       ("Qwen-2/2.5", "Qwen-2/2.5"), ("qwen-2/2.5", "Qwen-2/2.5"),
                                       ("Gemma 3", "Gemma 3"), ("GEMMA 3", "Gemma 3"), ("llama 3", "LLaMA 3")])
def test_family_names_as_the_seed_spells_them(typed, row):
    assert resolve_family(typed) == row


def test_unknown_family_lists_known_ones():
    with pytest.raises(UsageError) as e:
        resolve_family("falcon")
    assert "Mistral" in e.value.hint


@pytest.mark.parametrize("name,key", [("sm120", "sm120"), ("sm100", "sm100"), ("sm90", "sm90"), ("sm89", "sm89"),
                                      ("sm80", "sm80"), ("sm86", "sm86"), ("h100", "sm90"), ("H200", "sm90"),
                                      ("b200", "sm100"), ("l40s", "sm89"), ("a100", "sm80"),
                                      ("rtx-4090", "sm89"), ("rtx-5090", "sm120"), ("hopper", "sm90")])
def test_gpu_names(name, key):
    assert resolve_gpu(name).key == key


def test_gpu_ambiguous_and_unknown():
    with pytest.raises(UsageError) as e:
        resolve_gpu("blackwell")
    assert "sm100" in e.value.message and "sm120" in e.value.message
    with pytest.raises(UsageError) as e:
        resolve_gpu("tpu-v5")
    assert "h100" in e.value.hint


def test_capabilities_map_to_rows():
    assert arch_for_capability(9, 0).row == "Hopper"
    assert arch_for_capability(10, 3).row == "Blackwell(sm100)"
    assert arch_for_capability(12, 0).row == "Blackwell(sm120)"
    assert arch_for_capability(8, 6).row == "Ampere"
    assert arch_for_capability(8, 9).row == "Ada Lovelace"
    with pytest.raises(Unsupported):
        arch_for_capability(7, 0)


# --- the CLI --------------------------------------------------------------------------------

def test_cli_model_quant_supported_exits_0():
    r = runner.invoke(app, ["matrix", "--model", "LLaMA 3", "--quant", "fp8-rowwise"])
    assert r.exit_code == 0, r.output


def test_cli_gpu_quant_refused_exits_3():
    r = runner.invoke(app, ["matrix", "--gpu", "sm90", "--quant", "nvfp4"])
    assert r.exit_code == 3
    assert "NVFP4" in r.output


def test_cli_json_parses():
    r = runner.invoke(app, ["matrix", "--gpu", "sm100", "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["gpu"]["row"] == "Blackwell(sm100)"
    assert doc["gpu"]["supports"]["NVFP4 KV Cache"] == "Y"
    r = runner.invoke(app, ["matrix", "--json"])
    doc = json.loads(r.stdout)
    assert doc["model_matrix"]["rows"]["Qwen-3"]["NVFP4 KV Cache"] == "Y"
    assert doc["hardware_matrix"]["rows"]["Ampere"]["FP8(per tensor)"] == "."
    r = runner.invoke(app, ["matrix", "--gpu", "sm90", "--model", "LLaMA-v2", "--quant", "nvfp4",
                            "--kv-cache-quant", "nvfp4", "--json"])
    assert r.exit_code == 3
    doc = json.loads(r.stdout)
    assert doc["supported"] is False and doc["alternatives"]


def test_cli_model_path_detects_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31))
    r = runner.invoke(app, ["matrix", "--model", str(tmp_path), "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["model"]["rows"] == ["LLaMA", "LLaMA 3"]


@pytest.mark.parametrize("args,code", [(["matrix", "--gpu", "blackwell"], 2), (["matrix", "--gpu", "tpu"], 2),
                                       (["matrix", "--quant", "int3"], 2), (["matrix", "--model", "falcon"], 2),
                                       (["matrix", "--model", "./no/such/dir"], 2)])
def test_cli_usage_errors_exit_2_without_traceback(args, code):
    r = runner.invoke(app, args)
    assert r.exit_code == code
    assert "Traceback" not in r.output


def test_help_lists_recipe_names_from_the_data():
    r = runner.invoke(app, ["matrix", "--help"], env={"COLUMNS": "250"})
    for name in registry.recipe_names("weights"):
        assert name in r.output


def test_matrix_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.time(); from qtool.cli import app\n"
            "try: app(['matrix','--gpu','sm100'])\nexcept SystemExit: pass\n"
            "heavy=[m for m in ('torch','transformers','modelopt','cupy') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - t
    assert "HEAVY []" in out
    assert elapsed < 1.5, f"qtool matrix took {elapsed:.2f}s"
    out = subprocess.run([sys.executable, "-m", "qtool", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "matrix" in out.stdout


def test_runtime_row_marks_qtool_kernel_cells_from_the_data():
    # qtool's kernels need sm_89+ (e4m3 cvt, mma.sync e4m3): every recipe runs on Hopper (Y where the hardware
    # matrix says Y, else q), none on Ampere
    from qtool.support.check import runtime_cell
    hop, amp = resolve_gpu("sm90"), resolve_gpu("sm86")
    for kind in ("weights", "kv"):
        for name, r in data.recipes()[kind].items():
            label = name if kind == "weights" else f"kv {name}"
            assert runtime_cell(hop, label) == ("Y" if data.hardware_matrix().supported("Hopper", r.column) else "q")
            assert runtime_cell(amp, label) == "."
    assert runtime_cell(hop, "nvfp4") == "q" and runtime_cell(hop, "fp8") == "Y"
    r = runner.invoke(app, ["matrix", "--gpu", "h200", "--json"])
    assert json.loads(r.stdout)["gpu"]["qtool_runtime"]["NVFP4"] == "q"
