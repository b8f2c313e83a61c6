"""Offline batch generation on the engine: what `qtool run --prompts` runs (vLLM's `LLM.generate`).

Contract: `run_batch(model, tok, prompts_ids, opts, kv_format, eos)` submits every prompt to one `Engine`
(the scheduler, paged KV cache, chunked prefill, preemption and prefix caching `qtool serve` uses), steps it
until every request has finished, streams nothing, and returns (list of runtime.generate.Completion in
prompt order, runtime.generate.Stats), the same types as `runtime.generate.generate`: finish_reason
'eos' | 'stop' | 'length', token_ids without the EOS token. Each request samples with its own
`GenerateOptions` copy and, with a seed, its own generator seeded with it, so every prompt's output is what
it gives alone. The KV cache holds every sequence that can run at once: the sum of ceil((prompt + max new) /
block_size) blocks over the `max_num_seqs` longest + the dummy block, on CUDA capped by what
`gpu_memory_utilization` of the card leaves (then the engine preempts; later prompts wait for free blocks).
Stats: a step that ran any prefill chunk counts as prefill time, a step of decode rows only as decode time;
decode_tokens = the rows of those decode steps; graph_s = the CUDA warm-up (kernels compiled, one decode graph
per padded batch size) outside both.
"""
from __future__ import annotations

import time

import torch

from qtool.engine.engine import Engine, kv_cache_blocks
from qtool.engine.request import Request, SamplingParams
from qtool.errors import Failure
from qtool.runtime.generate import Completion, GenerateOptions, Stats, check_prompt_lengths, context_limit


def run_batch(model, tok, prompts_ids: list[list[int]], opts: GenerateOptions, kv_format: str, eos: set[int], *,
              block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
              gpu_memory_utilization: float = 0.9) -> tuple[list[Completion], Stats]:
    be = model.backend
    lens = [len(p) for p in prompts_ids]
    limit = context_limit(model.config)
    check_prompt_lengths(lens, limit)
    max_new = [min(opts.max_new_tokens, limit - n) if limit else opts.max_new_tokens for n in lens]
    seq_blocks = [-(-(n + m) // block_size) for n, m in zip(lens, max_new)]
    max_num_seqs = min(len(prompts_ids), max_num_seqs)
    need = sum(sorted(seq_blocks, reverse=True)[:max_num_seqs])      # the longest sequences that can run at once
    blocks = min(kv_cache_blocks(be, block_size, kv_format, gpu_memory_utilization, cpu_tokens=need * block_size),
                 need + 1)
    if blocks <= max(seq_blocks):
        raise Failure(f"the KV cache has room for {max(0, blocks - 1) * block_size} tokens; the longest prompt "
                      f"+ answer needs {max(seq_blocks) * block_size}", hint="lower --max-new-tokens")
    engine = Engine(model, tok, kv_format, eos, num_blocks=blocks, block_size=block_size,
                    max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                    max_model_len=max(n + m for n, m in zip(lens, max_new)))
    graph_s = 0.0
    if be.device.type == "cuda":
        t = time.perf_counter()
        engine.warmup()
        graph_s = time.perf_counter() - t
    reasons: dict[str, str] = {}

    def done(out) -> None:
        if out.finished:
            reasons[out.request_id] = out.finish_reason

    reqs = [Request(str(i), list(p), SamplingParams(max_tokens=m, temperature=opts.temperature, top_k=opts.top_k,
                                                    top_p=opts.top_p, seed=opts.seed, stop=list(opts.stop)),
                    on_output=done) for i, (p, m) in enumerate(zip(prompts_ids, max_new))]
    for r in reqs:
        engine.add(r)
    prefill_s = decode_s = 0.0
    decode_steps = decode_tokens = 0
    c = engine.counters
    with torch.inference_mode():
        while engine.has_work():
            chunks, rows = c["prefill_tokens"], c["decode_rows"]
            t = time.perf_counter()
            engine.step()
            be.synchronize()
            dt = time.perf_counter() - t
            if c["prefill_tokens"] > chunks:
                prefill_s += dt
            elif c["decode_rows"] > rows:
                decode_s += dt
                decode_steps += 1
                decode_tokens += c["decode_rows"] - rows
    results = []
    for i, r in enumerate(reqs):
        reason, ids = reasons[r.id], list(r.output_ids)
        if reason == "abort":
            raise Failure(f"sampling failed for prompt {i + 1} (its logits hold NaN or inf)")
        if reason == "stop" and ids and ids[-1] in eos:
            reason, ids = "eos", ids[:-1]
        results.append(Completion(r.stream.text, ids, lens[i], reason))
    stats = Stats(backend=be.name, kv_cache_dtype=kv_format, prompt_tokens=sum(lens),
                  generated_tokens=sum(len(x.token_ids) for x in results), prefill_s=prefill_s, decode_s=decode_s,
                  decode_steps=decode_steps, decode_tokens=decode_tokens, batch=len(prompts_ids),
                  peak_memory_bytes=be.peak_memory_bytes(), weight_bytes=model.weights.nbytes(),
                  kv_cache_bytes=be.cache_nbytes(engine.cache), graph_s=graph_s)
    return results, stats
