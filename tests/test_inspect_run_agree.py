"""`qtool inspect --json` and `qtool run --json` say the same thing about every checkpoint the tests build.

References: what each builder wrote (tests/packers.py: ModelOpt 0.47's own exports, the independent GPTQ /
AutoAWQ / DeepSeek-FP8 packers, a bf16 tiny model), stated here per case as the recipes and KV cache a reader
must find; both commands must report exactly that (run: the recipes it checked and the KV cache it chose on
`--kv-cache-dtype auto`). A mixed or unmapped checkpoint must give the same list in both.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from packers import modelopt_ckpt, packed_ckpt  # noqa: F401 - fixtures
from qtool.cli import app

runner = CliRunner()

# case -> (recipes a reader must find, KV recipe or None); None: no recipe column (no matrix verdict)
MODELOPT = {
    "fp8_kvfp8": (["fp8"], "fp8"), "fp8_rowwise": (["fp8-rowwise"], None), "fp8_block": (["fp8-block"], None),
    "nvfp4_kvnvfp4": (["nvfp4"], "nvfp4"), "mxfp4": (["mxfp4"], None), "w4a16_nvfp4": (None, None),
    "w4a8_nvfp4_fp8": (None, None), "w4a8_mxfp4_fp8": (None, None), "int4_awq": (["w4a16-awq"], None),
    "w4a8_awq": (["w4a8-awq"], None), "mixed": (["fp8", "nvfp4"], None),
}
PACKED = {"gptq": (["w4a16-gptq"], None), "gptq_w4a8": (["w4a8-gptq"], None),
          "gptq_qcfg_file": (["w4a16-gptq"], None), "autoawq": (["w4a16-awq"], None),
          "deepseek_fp8": (["fp8-block"], None)}


def _json(args) -> dict:
    r = runner.invoke(app, [*map(str, args)])
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def _agree(path, recipes, kv):
    ins = _json(["inspect", path, "--json"])["support"]
    ran = _json(["run", path, "Hi", "--max-new-tokens", 1, "--force", "--backend", "torch", "--json"])
    assert ins["recipes"] == (recipes or []) and ("note" in ins) == (recipes is None)
    assert ran["recipes"] == recipes
    assert ins["kv"] == kv and ran["kv_cache_dtype"] == (kv or "bf16")
    assert ran["weight_recipe"] == (ins["recipe"] or "bf16")


@pytest.mark.parametrize("case", list(MODELOPT))
def test_modelopt_exports(case, modelopt_ckpt):
    _agree(modelopt_ckpt(case), *MODELOPT[case])


@pytest.mark.parametrize("case", list(PACKED))
def test_packed_checkpoints(case, packed_ckpt):
    _agree(packed_ckpt(case).path, *PACKED[case])


def test_bf16(tiny_models):
    _agree(tiny_models("llama"), [], None)
