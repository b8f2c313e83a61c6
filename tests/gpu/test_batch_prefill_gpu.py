"""Batched prefill of the engine (engine.py step 3: a step's prefill chunks as padded [B, Tmax] forwards) on the
CUDA backend, against the PyTorch reference backend.

Prompts of mixed lengths arrive together (two longer than one chunk, two sharing a cached 32-token prefix, so one
forward holds rows of different lengths and start positions, with padding): every request's greedy tokens equal the
reference's greedy tokens for that request alone, allowing a divergence only where the reference's top-2 margin is
float noise (as tests/gpu/test_e2e.py::test_smollm2_shaped_greedy); after every step, every computed position of
every running request holds (per position, relative error <= 0.2; a padded token written over it would differ by
~1) the K/V the reference stores for that request's tokens alone — which also covers the prefix-cached blocks the
shared rows read.
"""
from __future__ import annotations

import pytest
import torch
from test_serve_gpu import models  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu


def _lone_kv(ref_m, ids, fmt):
    """Per layer (K, V) [len(ids), Hkv, d] float32 that the reference stores for ids alone."""
    from qtool.formats import kv_decode
    be = ref_m.backend
    cache = ref_m.new_cache(1, len(ids), fmt)
    ref_m.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    return [(kv_decode(fmt, *(t[0] for t in cache.k[i]), scale=be.k_scales[i]),
             kv_decode(fmt, *(t[0] for t in cache.v[i]), scale=be.v_scales[i])) for i in range(len(cache.k))]


def _engine_kv(engine, table, n, layer, which):
    """[n, Hkv, d] float32 of positions 0..n-1 through `table`, read back by prefill attention's own gather and
    decode (block table row 0 is the engine's scratch: it refills the rows it uses before every forward)."""
    from qtool.kernels import prefill_attention
    c = engine.cache
    c.block_tables[0].zero_()
    c.block_tables[0, :len(table)] = torch.tensor(table, dtype=torch.int32, device=c.block_tables.device)
    return prefill_attention._decoded(c, which, layer, 0, 1, n)[0].transpose(0, 1).float().cpu()


def _check_cache(engine, ref_m, fmt):
    for r in engine.running:
        n = r.num_computed
        if not n:
            continue
        table = engine.blocks.table(r.id)
        assert 0 not in table[:-(-n // engine.block_size)]
        for layer, kv in enumerate(_lone_kv(ref_m, r.all_ids[:n], fmt)):
            for which, want in zip("kv", kv):
                got = _engine_kv(engine, table, n, layer, which)
                err = (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1).clamp(min=1e-6)
                assert float(err.max()) <= 0.2, (r.id, layer, which, int(err.argmax()), float(err.max()))


def _run(models, fmt):
    from test_engine_batch_prefill import Recorder

    from qtool.engine import Request, SamplingParams
    from qtool.engine.engine import Engine
    ref_m, cu_m, tok = models
    g = torch.Generator().manual_seed(0)
    V = ref_m.config.vocab_size
    system = torch.randint(0, V, (40,), generator=g).tolist()
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 70, 19, 37, 8)]
    prompts += [system + torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 11)]
    engine = Engine(cu_m, tok, fmt, [], num_blocks=128, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
                    max_model_len=256)
    engine.warmup()
    n = 12
    outs = {}

    def add(i, p, m):
        engine.add(Request(str(i), p, SamplingParams(max_tokens=m, ignore_eos=True),
                           on_output=lambda o: outs.setdefault(o.request_id, []).extend(o.token_ids)))
    with torch.inference_mode():
        add("system", system + [1], 1)                      # fills the prefix cache with the 32-token prefix
        while engine.has_work():
            engine.step()
        for i, p in enumerate(prompts):
            add(i, p, n)
        with Recorder(cu_m, engine) as rec:
            while engine.has_work():
                engine.step()
                _check_cache(engine, ref_m, fmt)
                assert engine.counters["steps"] < 500
    calls = [c for _, c in rec.calls]
    assert any(shape[0] > 1 and len(set(starts)) > 1 for shape, starts in calls), calls
    assert engine.counters["prefill_positions"] > engine.counters["prefill_tokens"], calls
    assert len(calls) < sum(shape[0] for shape, _ in calls), calls
    assert engine.blocks.used_blocks == 0
    return prompts, [outs[str(i)] for i in range(len(prompts))], n


def _alone(ref_m, tok, prompt, n, fmt):
    from qtool.runtime.generate import GenerateOptions, generate
    (c,), _ = generate(ref_m, tok, [prompt], GenerateOptions(max_new_tokens=n), fmt, eos=set())
    return c.token_ids


def _same_up_to_noise(ref_m, prompt, want, got, fmt):
    """got == want, or they part where the reference's top-2 margin (teacher-forced on want, KV in fmt) is noise:
    below 1e-2 of the top logit, or below 1.5x what the reference's own noise at the prefill GEMMs' operand
    precision moves it (test_e2e.margin_and_noise: the floor the CUDA prefill is held to)."""
    from test_e2e import margin_and_noise
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(want, got)):
        if a != b:
            margin, moved = margin_and_noise(ref_m.weights, prompt + want[:t], fmt)
            assert margin < max(1e-2, 1.5 * moved), f"diverged at step {t} with margin {margin} (noise: {moved})"
            return


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_batched_prefill_cuda_mixed_lengths(models, fmt):
    ref_m, _, tok = models
    prompts, got, n = _run(models, fmt)
    for p, g in zip(prompts, got):
        want = _alone(ref_m, tok, p, n, fmt)
        _same_up_to_noise(ref_m, p, want, g, fmt)
