"""Batched prefill in the engine: the prefill chunks of one step run as padded [B, Tmax] forwards (engine.py step 3).

References: `qtool.runtime.generate` (one request alone, contiguous cache) and HF transformers' greedy `generate`
(test_runtime_vs_hf.hf_reference) for the tokens; for the KV cache, a fresh forward of each request's computed
tokens alone into a contiguous cache: every computed position of every running request, and every block registered
in the prefix cache, must hold what that lone forward stores (a padded token written into another request's block,
a cached block or a real position would differ there by far more than the batched matmuls' float noise).
"""
from __future__ import annotations

import torch
from test_engine import alone, one_thread, run_engine, setup, tokens  # noqa: F401 - fixtures

from qtool.engine.engine import PAD_RATIO, pack_chunks


def _prompts(tok):
    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]
    system = enc("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.")[:24]
    assert len(system) == 24
    return {"long": enc("A small language model predicts the next token from the previous ones, one step at a time."),
            "mid": enc("Quantization maps floating point weights to"), "short": enc("Ice melts at"),
            "shared1": system + enc(" and ice"), "shared2": system + enc(" def add"),
            "system": system + enc(" Quantization")}


class Recorder:
    """Wraps model.forward: (engine step, (shape, first positions)) of every prefill forward (the engine passes
    last_index; its decode step does not)."""

    def __init__(self, model, engine):
        self.model, self.engine, self.calls = model, engine, []
        self._forward = model.forward

    def __enter__(self):
        def forward(ids, positions, cache, last_index=None, **kw):
            if last_index is not None:
                shape, starts = tuple(ids.shape), tuple(positions[:, 0].tolist())
                self.calls.append((self.engine.counters["steps"], (shape, starts)))
            return self._forward(ids, positions, cache, last_index=last_index, **kw)
        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward

    def per_step(self):
        out = {}
        for step, shape in self.calls:
            out.setdefault(step, []).append(shape)
        return out


def _lone_kv(model, ids, fmt="bf16"):
    """Per layer (K, V) [len(ids), Hkv, d] float32 that a forward of ids alone stores (contiguous cache)."""
    from qtool.formats import kv_decode
    be = model.backend
    cache = model.new_cache(1, len(ids), fmt)
    model.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    return [(kv_decode(fmt, *(t[0] for t in cache.k[i]), scale=be.k_scales[i]),
             kv_decode(fmt, *(t[0] for t in cache.v[i]), scale=be.v_scales[i])) for i in range(len(cache.k))]


def _paged_kv(engine, table, n, layer):
    from qtool.formats import kv_decode
    be, c, bs = engine.be, engine.cache, engine.block_size
    blocks = torch.tensor([table[p // bs] for p in range(n)])
    slots = torch.arange(n) % bs
    k = kv_decode(c.fmt, *(t[blocks, slots] for t in c.k[layer]), scale=be.k_scales[layer])
    v = kv_decode(c.fmt, *(t[blocks, slots] for t in c.v[layer]), scale=be.v_scales[layer])
    return k, v


def _assert_kv(engine, model, ids, table, n, what):
    assert 0 not in table[:-(-n // engine.block_size)], what
    for layer, (k, v) in enumerate(_lone_kv(model, ids[:n])):
        pk, pv = _paged_kv(engine, table, n, layer)
        torch.testing.assert_close(pk, k, rtol=2e-2, atol=2e-2, msg=lambda m: f"{what} layer {layer} K: {m}")
        torch.testing.assert_close(pv, v, rtol=2e-2, atol=2e-2, msg=lambda m: f"{what} layer {layer} V: {m}")


def _check_cache(engine, model):
    """Every computed position of every running request, as a lone forward stores it."""
    for r in engine.running:
        if r.num_computed:
            _assert_kv(engine, model, r.all_ids, engine.blocks.table(r.id), r.num_computed, f"request {r.id}")


def _check_registered(engine, model, all_ids):
    """Every block registered in the prefix cache holds its token chain's K/V as a lone forward stores them."""
    from qtool.engine.blocks import _key
    bm, bs, seen = engine.blocks, engine.block_size, 0
    for ids in all_ids:
        parent, chain = b"", []
        for i in range(len(ids) // bs):
            parent = _key(parent, ids[i * bs:(i + 1) * bs])
            b = bm._by_key.get(parent)
            if b is None:
                break
            chain.append(b)
        if chain:
            _assert_kv(engine, model, ids, chain, len(chain) * bs, f"cached chain of {ids[:4]}")
            seen += len(chain)
    assert seen > 0


def test_pack_chunks_bounds_padding_and_table():
    # equal lengths: one group; rows ordered by start position
    assert pack_chunks([(0, 16), (32, 16), (8, 16)], 256) == [[0, 2, 1]]
    chunks = [(0, 40), (0, 38), (16, 35), (0, 5), (48, 3), (0, 20), (205, 30)]
    groups = pack_chunks(chunks, 240)
    assert sorted(i for g in groups for i in g) == list(range(len(chunks)))
    for g in groups:
        T = max(chunks[i][1] for i in g)
        assert len(g) * T <= PAD_RATIO * sum(chunks[i][1] for i in g)
        assert all(chunks[i][0] + T <= 240 for i in g)
        assert [chunks[i][0] for i in g] == sorted(chunks[i][0] for i in g)
    # 40, 38, 35, 20, 5: 200 positions for 138 tokens; the 3-token chunk would make it 240 for 141 (> 1.5x);
    # 205 + 40 > 240: the 30-token chunk cannot take Tmax 40, and with it the 3 tokens would waste too much
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 3, 5], [4], [6]]


def _run(engine, model, prompts, n, check=False):
    """Adds every prompt at once (greedy, n tokens), steps to the end; returns ({id: outputs}, Recorder)."""
    from qtool.engine import Request, SamplingParams
    outs = {}
    for i, p in enumerate(prompts):
        engine.add(Request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True),
                           on_output=lambda o: outs.setdefault(o.request_id, []).append(o)))
    with Recorder(model, engine) as rec:
        while engine.has_work():
            engine.step()
            if check:
                _check_cache(engine, model)
            assert engine.counters["steps"] < 500
    return outs, rec


def test_prompts_arriving_together_take_one_prefill_forward(setup):
    from qtool.engine.engine import Engine
    model, tok, prompts = setup
    similar = [p for p in prompts if 4 <= len(p) <= 8][:4]
    assert len(similar) == 4 and len({len(p) for p in similar}) > 1
    engine = Engine(model, tok, "bf16", [], num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                    max_model_len=64)
    outs, rec = _run(engine, model, similar, 6)
    steps = rec.per_step()
    assert list(steps) == [0] and len(steps[0]) == 1, steps        # one prefill forward, in the first step
    assert steps[0][0][0] == (4, max(len(p) for p in similar))
    for i, p in enumerate(similar):
        assert tokens(outs, i) == alone(model, tok, p, 6).token_ids, i


def test_batched_prefill_mixed_lengths_equal_alone_hf_and_cache_intact(setup, tiny_models):
    from test_runtime_vs_hf import hf_reference

    from qtool.engine.engine import Engine
    model, tok, _ = setup
    P = _prompts(tok)
    assert len(P["long"]) > 24 and len({len(P[k]) for k in ("long", "mid", "short", "shared1")}) == 4
    engine = Engine(model, tok, "bf16", [], num_blocks=64, block_size=8, max_num_seqs=8, max_num_batched_tokens=24,
                    max_model_len=128)
    run_engine(model, tok, [P["system"]], n=4, engine=engine)    # fills the prefix cache with the system prompt
    names = ["long", "mid", "short", "shared1", "shared2"]
    n = 8
    outs, rec = _run(engine, model, [P[k] for k in names], n, check=True)
    calls = [c for _, c in rec.calls]
    # rows of different lengths and start positions shared a forward, with padding
    assert any(shape[0] > 1 and len(set(starts)) > 1 for shape, starts in calls), calls
    assert engine.counters["prefill_positions"] > engine.counters["prefill_tokens"]
    assert len(calls) < sum(shape[0] for shape, _ in calls), calls          # fewer forwards than chunks
    assert max(len(c) for c in rec.per_step().values()) <= 2, calls
    assert [outs[str(i)][-1].cached_tokens for i in range(len(names))] == [0, 0, 0, 24, 24]
    for i, name in enumerate(names):
        assert tokens(outs, i) == alone(model, tok, P[name], n).token_ids, name
    hf = hf_reference(tiny_models("llama"), tiny_models("llama"), "bf16")
    with torch.no_grad():                                        # "long" took two chunks, batched with others
        ref = hf.generate(torch.tensor([P["long"]]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=n)[0, len(P["long"]):].tolist()
    assert tokens(outs, names.index("long")) == ref
    _check_registered(engine, model, [P[k] + tokens(outs, i) for i, k in enumerate(names)] + [P["system"]])
    assert engine.blocks.used_blocks == 0


def test_batched_prefill_with_preemption(setup):
    from qtool.engine.engine import Engine
    model, tok, prompts = setup
    # 4-position blocks, 14 usable blocks = 56 positions: any one request fits, all eight do not
    engine = Engine(model, tok, "bf16", [], num_blocks=15, block_size=4, max_num_seqs=8, max_num_batched_tokens=24,
                    max_model_len=64)
    outs, rec = _run(engine, model, prompts, 10, check=True)
    assert engine.counters["preemptions"] > 0
    assert any(shape[0] > 1 for _, (shape, _) in rec.calls)
    for i, p in enumerate(prompts):
        assert tokens(outs, i) == alone(model, tok, p, 10).token_ids, i
    assert engine.blocks.used_blocks == 0


def test_padded_positions_stay_inside_the_block_table(setup):
    """A row near max_model_len whose start + Tmax would pass the table's width runs in a forward of its own."""
    from qtool.engine import Request, SamplingParams
    from qtool.engine.engine import Engine
    model, tok, prompts = setup
    long = (prompts[4] + prompts[6] + prompts[0])[:46]
    assert len(long) == 46
    other = (prompts[6] + prompts[2])[:16]
    engine = Engine(model, tok, "bf16", [], num_blocks=32, block_size=8, max_num_seqs=4, max_num_batched_tokens=40,
                    max_model_len=48)
    outs = {}
    engine.add(Request("0", long, SamplingParams(max_tokens=2, ignore_eos=True),
                       on_output=lambda o: outs.setdefault(o.request_id, []).append(o)))
    with Recorder(model, engine) as rec:
        engine.step()                                                # long: positions 0..39
        engine.add(Request("1", other, SamplingParams(max_tokens=4, ignore_eos=True),
                           on_output=lambda o: outs.setdefault(o.request_id, []).append(o)))
        while engine.has_work():
            engine.step()
            _check_cache(engine, model)
    second = rec.per_step()[1]                       # long's last 6 at 40..45 and other's 16: 40 + 16 > 48
    assert sorted(second) == [((1, 6), (40,)), ((1, 16), (0,))], second
    assert tokens(outs, 0) == alone(model, tok, long, 2).token_ids
    assert tokens(outs, 1) == alone(model, tok, other, 4).token_ids
