"""Prometheus metrics of the server (prometheus_client, one registry per app).

Contract: `Metrics(model_name)` registers, with a `model_name` label on each:
`qtool_requests_total{status}` (finish reason stop/length/abort, or the HTTP error status of a refused
request), `qtool_prompt_tokens_total`, `qtool_generation_tokens_total`, the histograms
`qtool_time_to_first_token_seconds` (from the request's arrival) and `qtool_inter_token_latency_seconds`,
and the gauges `qtool_num_requests_running`, `qtool_num_requests_waiting`, `qtool_kv_cache_blocks_used`,
`qtool_kv_cache_blocks_free`, `qtool_num_preemptions_total`, `qtool_prefix_cache_queries_total` / `_hits_total`
(tokens), the prefill and decode work (`qtool_prefill_forwards_total`, `..._tokens_total`,
`..._computed_positions_total`, `qtool_decode_steps_total`, `qtool_decode_rows_total`) and where the engine's time
went (`qtool_engine_step_seconds_total`, `qtool_engine_prefill_seconds_total`, `qtool_engine_decode_seconds_total`:
qtool.engine.engine's time accounting; registered after its parts, so a scrape, which reads in registration
order while the engine adds the step's total before its parts, never shows the parts ahead of the total), read
from the engine at scrape time (`bind(engine)`). `render()` → (body,
content type).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = ["model_name"]
        self.name = model_name
        self.requests = Counter("qtool_requests", "Finished or refused requests by status", lab + ["status"], registry=r)
        self.prompt_tokens = Counter("qtool_prompt_tokens", "Prompt tokens of admitted requests", lab, registry=r)
        self.generation_tokens = Counter("qtool_generation_tokens", "Generated tokens", lab, registry=r)
        self.ttft = Histogram("qtool_time_to_first_token_seconds", "Arrival to first token", lab,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("qtool_inter_token_latency_seconds", "Gap between two tokens of a request", lab,
                             buckets=ITL_BUCKETS, registry=r)
        self.gauges = {k: Gauge(f"qtool_{k}", doc, lab, registry=r) for k, doc in (
            ("num_requests_running", "Requests in the running batch"),
            ("num_requests_waiting", "Requests queued for admission"),
            ("kv_cache_blocks_used", "KV-cache blocks held by requests"),
            ("kv_cache_blocks_free", "KV-cache blocks free"),
            ("num_preemptions_total", "Requests preempted (blocks freed, recomputed later)"),
            ("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache"),
            ("prefix_cache_hits_total", "Prompt tokens found in the prefix cache (not recomputed)"),
            ("prefill_forwards_total", "Prefill forwards (each packs the chunks of one scheduler step)"),
            ("prefill_tokens_total", "Prompt positions computed by prefill (cache hits excluded)"),
            ("prefill_computed_positions_total", "Positions the prefill forwards computed, padding included"),
            ("decode_steps_total", "Batched decode forwards"),
            ("decode_rows_total", "Sequence rows the decode forwards computed (padding excluded)"),
            ("engine_prefill_seconds_total", "Time in prefill forwards, inputs to the sampled tokens on the host"),
            ("engine_decode_seconds_total", "Time in decode steps, inputs to the sampled tokens on the host"),
            ("engine_step_seconds_total", "Time the engine spent in scheduler steps"))}   # after its parts: module doc

    def bind(self, engine) -> None:
        reads = {"num_requests_running": lambda: len(engine.running),
                 "num_requests_waiting": lambda: len(engine.waiting) + len(engine._inbox),
                 "kv_cache_blocks_used": lambda: engine.blocks.used_blocks,
                 "kv_cache_blocks_free": lambda: engine.blocks.free_blocks,
                 "num_preemptions_total": lambda: engine.counters["preemptions"],
                 "prefix_cache_queries_total": lambda: engine.blocks.queried_tokens,
                 "prefix_cache_hits_total": lambda: engine.blocks.hit_tokens,
                 "prefill_forwards_total": lambda: engine.counters["prefill_forwards"],
                 "prefill_tokens_total": lambda: engine.counters["prefill_tokens"],
                 "prefill_computed_positions_total": lambda: engine.counters["prefill_positions"],
                 "decode_steps_total": lambda: engine.counters["decode_steps"],
                 "decode_rows_total": lambda: engine.counters["decode_rows"],
                 "engine_step_seconds_total": lambda: engine.counters["step_s"],
                 "engine_prefill_seconds_total": lambda: engine.counters["prefill_s"],
                 "engine_decode_seconds_total": lambda: engine.counters["decode_s"]}
        for k, fn in reads.items():
            self.gauges[k].labels(self.name).set_function(fn)

    def status(self, status) -> None:
        self.requests.labels(self.name, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
