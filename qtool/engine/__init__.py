"""The serving engine: continuous batching over a paged KV cache, independent of HTTP.

Contract: `Engine(model, tok, kv_format, ...)` owns one paged cache (`backend.new_paged_cache`), a
`BlockManager` and a scheduler; `add(Request)` queues a request, `abort(id)` cancels one, `step()`
runs one scheduler iteration (admit, one prefill chunk per admitted request within the token budget,
one batched decode for every running sequence) and delivers `Output`s through each request's
`on_output` callback. `EngineLoop` runs `step()` on one background thread. Torch is imported only by
the modules that compute (engine.py).
"""
from qtool.engine.blocks import BlockManager
from qtool.engine.request import Output, Request, SamplingParams

__all__ = ["BlockManager", "Output", "Request", "SamplingParams"]
