"""ModelOpt's fake quantization against qtool's reference, for the recipes ModelOpt calibrates only on a GPU.

The device half of tests/test_modelopt_vs_reference.py (its ``compare``: the same tiny llama, calibration,
export and criterion: perplexity ratio qtool/ModelOpt within 1 % with its 95 % interval inside [0.98, 1.02], and
KL(ModelOpt || qtool) below the quantization's own KL(bf16 || ModelOpt)). ModelOpt runs on CUDA, qtool's float32
reference on the CPU. Needs ModelOpt (scripts/gpu_tests.sh installs the carried wheels); skipped without it.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

CASES = [("nvfp4", None, None), ("nvfp4", None, "awq_lite"), ("mxfp4", None, None), ("fp8", "nvfp4", None)]
# FP8 KV and the INT4 AWQ / GPTQ recipes run on the CPU (tests/test_modelopt_vs_reference.py)


@pytest.mark.parametrize("quant,kv,algorithm", CASES)
def test_modelopt_fake_quant_matches_reference_gpu(tiny_models, tmp_path, quant, kv, algorithm):
    pytest.importorskip("modelopt")
    from test_modelopt_vs_reference import compare
    compare(tiny_models("llama"), tmp_path, quant, kv, algorithm)
