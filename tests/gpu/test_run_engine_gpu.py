"""`qtool run --prompts` on the CUDA backend: the engine path (qtool.engine.offline.run_batch) against the reference.

1. run_batch over 3 prompts on CUDA (warm-up, decode graphs for padded batch sizes 1-3, the KV cache sized from
   the card) gives the reference backend's greedy tokens for each prompt, allowing a divergence only where the
   reference's top-2 margin is at float-noise level (test_serve_gpu._same_up_to_noise, as tests/gpu/test_e2e.py
   does for one prompt).
2. The CLI end to end (`qtool run --backend cuda --prompts FILE --json`): 3 completions in prompt order, stats of a
   batch of 3, and a KV cache sized for these sequences, not for --gpu-memory-utilization of the card.
"""
from __future__ import annotations

import json

import pytest

from test_serve_gpu import PROMPTS, _same_up_to_noise, models  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu


def test_run_batch_cuda_matches_reference(models):  # noqa: F811
    from qtool.engine.offline import run_batch
    from qtool.runtime.generate import GenerateOptions
    ref_m, cu_m, tok = models
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:3]]
    opts = GenerateOptions(max_new_tokens=16)
    ref, _ = run_batch(ref_m, tok, prompts, opts, "bf16", set())
    cu, st = run_batch(cu_m, tok, prompts, opts, "bf16", set())
    for p, a, b in zip(prompts, ref, cu):
        assert a.finish_reason == b.finish_reason == "length"
        _same_up_to_noise(ref_m, p, a.token_ids, b.token_ids)
    assert st.backend == "cuda" and st.batch == 3 and st.generated_tokens == 48
    assert st.decode_tokens == 45 and st.decode_tok_s > 0 and st.graph_s > 0


def test_run_prompts_cli_cuda(tiny_models, tmp_path):
    from typer.testing import CliRunner
    from qtool.cli import app
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PROMPTS[:3]) + "\n")
    r = CliRunner().invoke(app, ["run", str(tiny_models("llama")), "--prompts", str(f), "--backend", "cuda",
                                 "--max-new-tokens", "8", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [c["prompt"] for c in doc["completions"]] == PROMPTS[:3] and doc["backend"] == "cuda"
    s = doc["stats"]
    assert s["batch"] == 3 and s["generated_tokens"] == sum(c["generated_tokens"] for c in doc["completions"])
    assert 0 < s["kv_cache_bytes"] < 16 << 20          # 2 layers x 2 KV heads x 64 dims: ~16 KiB a block
