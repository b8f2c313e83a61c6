"""The serving engine (continuous batching over the paged cache) on the reference backend.

Reference: `qtool.runtime.generate` (one request alone, contiguous cache; itself checked against HF
`generate` in test_generate.py). Greedy outputs of the engine must equal it whatever else is in the batch,
with chunked prefill, and under a block budget so small that requests get preempted and recomputed.
"""
from __future__ import annotations

import pytest
import torch

PROMPTS = ["The capital of France is", "Water boils at", "def add(a, b):", "Quantization maps floating point",
           "A small language model predicts the next token from the previous ones, one step", "Ice melts at",
           "The capital of Italy is Rome. The capital of Spain", "print(add(2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls only contend for the shared cores with more threads (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tiny_models):
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import load_tokenizer
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    path = tiny_models("llama")
    tok = load_tokenizer(path)
    model = Model(load_model_weights(str(path), progress=False), TorchRefBackend())
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return model, tok, prompts


def alone(model, tok, prompt, n, **kw):
    from qtool.runtime.generate import GenerateOptions, generate
    (c,), _ = generate(model, tok, [prompt], GenerateOptions(max_new_tokens=n, **kw), "bf16", eos=set())
    return c


def run_engine(model, tok, prompts, n=10, *, num_blocks=256, block_size=16, abort_after=None, warmup=False, **kw):
    from qtool.engine import Request, SamplingParams
    from qtool.engine.engine import Engine
    engine = kw.pop("engine", None) or Engine(
        model, tok, "bf16", [], num_blocks=num_blocks, block_size=block_size, max_num_seqs=kw.pop("max_num_seqs", 64),
        max_num_batched_tokens=kw.pop("max_num_batched_tokens", 256), max_model_len=256,
        prefix_caching=kw.pop("prefix_caching", True))
    if warmup:
        engine.warmup()       # writes only the dummy block 0: must not change any output
    outs = {}
    params = kw.pop("params", None)
    for i, p in enumerate(prompts):
        sp = params[i] if params else SamplingParams(max_tokens=n, ignore_eos=True, **kw)
        engine.add(Request(str(i), p, sp, on_output=lambda o: outs.setdefault(o.request_id, []).append(o)))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        if abort_after is not None and steps == abort_after:
            engine.abort("0")
        assert steps < 10_000
    return engine, outs


def tokens(outs, i):
    return [t for o in outs[str(i)] for t in o.token_ids]


def text(outs, i):
    return "".join(o.text for o in outs[str(i)])


def test_eight_concurrent_greedy_equal_alone(setup):
    model, tok, prompts = setup
    engine, outs = run_engine(model, tok, prompts, n=10, warmup=True)
    for i, p in enumerate(prompts):
        ref = alone(model, tok, p, 10)
        assert tokens(outs, i) == ref.token_ids, i
        assert text(outs, i) == ref.text
        last = outs[str(i)][-1]
        assert last.finished and last.finish_reason == "length" and last.completion_tokens == 10
    assert engine.blocks.used_blocks == 0 and not engine.running
    assert engine.counters["generation_tokens"] == 80


def test_chunked_prefill_and_preemption_keep_greedy_output(setup):
    model, tok, prompts = setup
    # 4-position blocks, 12 usable blocks = 48 positions: any one request fits, all eight do not
    engine, outs = run_engine(model, tok, prompts, n=12, num_blocks=13, block_size=4, max_num_batched_tokens=5)
    assert engine.counters["preemptions"] > 0
    for i, p in enumerate(prompts):
        assert tokens(outs, i) == alone(model, tok, p, 12).token_ids, i
    assert engine.blocks.used_blocks == 0


def test_abort_frees_blocks_and_others_continue(setup):
    model, tok, prompts = setup
    engine, outs = run_engine(model, tok, prompts[:3], n=20, abort_after=3)
    assert outs["0"][-1].finish_reason == "abort" and len(tokens(outs, "0")) < 20
    assert tokens(outs, 1) == alone(model, tok, prompts[1], 20).token_ids
    assert engine.blocks.used_blocks == 0 and engine.counters["finished_abort"] == 1


def test_stop_strings_seeds_and_logprobs(setup):
    from qtool.engine import SamplingParams
    model, tok, prompts = setup
    ref = alone(model, tok, prompts[0], 12)
    stop = ref.text[3:6]
    assert stop and stop in ref.text
    params = [SamplingParams(max_tokens=12, stop=[stop]),
              SamplingParams(max_tokens=12, temperature=1.3, top_k=50, top_p=0.9, seed=11),
              SamplingParams(max_tokens=6, logprobs=True),
              SamplingParams(max_tokens=12, temperature=1.3, top_k=50, top_p=0.9, seed=11)]
    ps = [prompts[0], prompts[1], prompts[2], prompts[1]]
    _, outs = run_engine(model, tok, ps, params=params)
    assert text(outs, 0) == ref.text[:ref.text.index(stop)] and outs["0"][-1].finish_reason == "stop"
    sampled = alone(model, tok, prompts[1], 12, temperature=1.3, top_k=50, top_p=0.9, seed=11)
    assert tokens(outs, 1) == tokens(outs, 3) == sampled.token_ids     # seeded: the batch does not matter
    # logprobs: the chosen (greedy) token's log-probability from a float64 log-softmax of contiguous logits
    ids = prompts[2] + tokens(outs, 2)
    full = model.forward(torch.tensor([ids]), torch.arange(len(ids))[None], model.new_cache(1, len(ids), "bf16"),
                         all_logits=True)[0].double().log_softmax(-1)
    lps = [lp for o in outs["2"] for lp in (o.logprobs or [])]
    assert len(lps) == 6
    for j, (chosen, top_id, top_lp) in enumerate(lps):
        pos = len(prompts[2]) - 1 + j
        assert top_id == ids[pos + 1] and abs(chosen - float(full[pos, ids[pos + 1]])) < 1e-4 and chosen == top_lp


def test_prefix_cache_reuses_blocks_and_keeps_output(setup):
    from qtool.engine.engine import Engine
    model, tok, _ = setup
    system = tok("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid. "
                 "Water boils at one hundred degrees", add_special_tokens=False)["input_ids"]
    assert len(system) > 24
    asks = [system + tok(q, add_special_tokens=False)["input_ids"] for q in (" and ice", " def add", " Quantization")]
    engine = Engine(model, tok, "bf16", [], num_blocks=64, block_size=8, max_num_seqs=8, max_num_batched_tokens=256,
                    max_model_len=256)
    for i, p in enumerate(asks):            # one after the other: the first fills the cache, the others hit it
        _, outs = run_engine(model, tok, [p], n=8, engine=engine)
        assert tokens(outs, 0) == alone(model, tok, p, 8).token_ids, i
        assert outs["0"][-1].cached_tokens == (0 if i == 0 else len(system) // 8 * 8)
    # the same prompt again: every full block but the one holding the last prompt token comes from the cache
    _, outs = run_engine(model, tok, [asks[0]], n=8, engine=engine)
    assert outs["0"][-1].cached_tokens == (len(asks[0]) - 1) // 8 * 8
    assert tokens(outs, 0) == alone(model, tok, asks[0], 8).token_ids
    assert engine.blocks.used_blocks == 0 and engine.blocks.cached_blocks > 0


def test_block_manager_prefix_cache_lru():
    from qtool.engine import BlockManager
    bm = BlockManager(4, 2)                          # 3 usable blocks of 2
    ids = [5, 6, 7, 8, 9]
    assert bm.ensure("a", 5) and bm.match("b", ids) == 0
    bm.register("a", ids, 5)                          # blocks [5,6] and [7,8] are full and computed
    assert bm.cached_blocks == 2
    assert bm.match("b", ids) == 4 and bm.table("b") == bm.table("a")[:2]      # shared while "a" runs
    bm.free("a")
    bm.free("b")
    assert bm.free_blocks == 3 and bm.cached_blocks == 2
    assert bm.match("c", [5, 6, 7, 0, 1]) == 2        # the chain key: [7, 0] after [5, 6] is not cached
    assert bm.ensure("c", 5) and bm.cached_blocks == 1   # the third block: the plain one, then an LRU eviction
    bm.free("c")
    assert bm.match("d", [1, 2, 7, 8, 9]) == 0        # same block content after another prefix: no hit


def test_block_manager():
    from qtool.engine import BlockManager
    bm = BlockManager(5, 4)
    assert bm.ensure("a", 9) and bm.table("a") == [1, 2, 3] and bm.free_blocks == 1
    assert not bm.ensure("b", 5) and bm.table("b") == [] and bm.free_blocks == 1
    bm.free("a")
    assert bm.free_blocks == 4 and 0 not in bm.table("b")
    assert bm.ensure("b", 16) and sorted(bm.table("b")) == [1, 2, 3, 4]


def test_dropped_engine_is_freed_without_the_cycle_collector(setup):
    """A dropped Engine (its paged cache and, on CUDA, its captured graphs) is freed when its last reference goes,
    not later by the cycle collector: collected in the middle of another engine's graph capture, it would free
    device memory inside that capture and invalidate it (GPU run 52, tests/gpu/test_serve_gpu.py)."""
    import gc
    import weakref
    model, tok, prompts = setup
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        engine, _ = run_engine(model, tok, prompts[:2], n=3)
        ref = weakref.ref(engine)
        cache = weakref.ref(engine.cache.block_tables)
        del engine
        assert ref() is None and cache() is None
    finally:
        if enabled:
            gc.enable()
