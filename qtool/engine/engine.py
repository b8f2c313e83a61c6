"""The scheduler loop of continuous batching over the paged KV cache.

Contract: `Engine(model, tok, kv_format, eos_ids, num_blocks=..., block_size=16, max_num_seqs=64,
max_num_batched_tokens=2048, max_model_len=...)`. Each `step()`:
1. takes in new requests and aborts (thread-safe `add` / `abort`); an aborted request leaves at once
   and its blocks are freed;
2. admits waiting requests (FIFO, preempted ones first) while fewer than `max_num_seqs` run and the
   free blocks could hold the request's tokens so far;
3. gives every running sequence with more than one uncomputed token (a new prompt, or a preempted
   request's prompt + output, recomputed) one prefill chunk: at most `max_num_batched_tokens` per
   step in all (the decode rows count one each; the oldest prefill always gets a chunk), so a long
   prompt delays running streams by one chunk at most. The chunks of a step run together, packed
   by `pack_chunks` into as few forwards as the padding bound allows (one when the chunks have
   similar lengths): a forward of shape [B, Tmax] whose row b holds its chunk's n_b tokens at
   positions s_b..s_b+n_b-1 followed by Tmax-n_b padded tokens (id 0) at the NEXT positions
   s_b+n_b..s_b+Tmax-1, and `Model.forward(..., last_index=n_b-1)` gives each row's last real
   logits (sampled only for rows whose prompt is then fully computed). Padding bound: B x Tmax <=
   PAD_RATIO (1.5) x the group's real tokens (chunks taken longest first into the first group that
   keeps the bound): on the H100 a forward's fixed cost (weights read, launches, GEMMs at small M:
   8B fp8, 54 ms for 512 positions against 80 ms for 2,048) is worth ~2,600 positions at the marginal
   rate, so merging wins even at that bound; once the GEMMs run at cuBLAS rates the cost is
   proportional and the bound keeps the waste to at most a third of the computed positions; a
   forward computes at most 1.5 x max_num_batched_tokens positions. Where padded KV goes: positions
   past a row's real length map through its block table to the unfilled slots of its own last
   reserved block (overwritten later by its real tokens; that block is not full, so not in the
   prefix cache) or, beyond its reserved blocks, to table entries that are zero (the dummy block 0);
   a row joins a group only while s_b + Tmax fits the table's width (never past it, nor past the
   RoPE table). Padded positions stay consecutive, so prefill attention takes a causal call
   per run of rows that share a start position;
4. runs one batched decode step (T = 1) for every sequence with exactly one uncomputed token, the
   batch padded to the next size of `DECODE_SIZES` (padded rows: token 0, position 0, dummy block 0)
   through `backend.wrap_decode` (CUDA graphs per padded size);
5. samples per request (greedy rows by one argmax; others with their own temperature / top-k /
   top-p / seeded generator), detokenizes incrementally with stop-string and UTF-8 hold-back
   (runtime.generate.TextStream) and calls `request.on_output`.
Time accounting (`counters`, seconds, added at the end of each step): `step_s` all of step(); `prefill_s` /
`decode_s` the prefill forwards and the decode steps from their inputs to the sampled tokens read on the host
(the read waits for the device, so a GPU's time lands where it is spent; a prefill forward that samples no row
synchronises the backend instead); `decode_steps` counts decode forwards. step_s minus both is the host's share:
scheduling, block bookkeeping, detokenizing and the request callbacks (picking the tokens counts as prefill /
decode).
With prefix caching (default), an admitted request first takes the cached full blocks of its longest
cached prefix (blocks.py: exact token-chain keys, LRU eviction) and computes only the rest.
When a sequence needs a block and none is free, the newest running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed. A request whose prompt plus
max_tokens fits the cache alone always completes. Greedy output does not depend on the batch beyond
floating-point noise of the batched matmuls.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import torch

from qtool.engine.blocks import BlockManager
from qtool.engine.request import Output, Request
from qtool.runtime.generate import TextStream

DECODE_SIZES = (1, 2, 4, 8, 16, 32, 64)
PAD_RATIO = 1.5        # a batched prefill forward computes at most 1.5x its real positions (module contract)


def decode_sizes(max_num_seqs: int) -> list[int]:
    """Padded decode batch sizes: DECODE_SIZES below max_num_seqs, then max_num_seqs itself."""
    return [s for s in DECODE_SIZES if s < max_num_seqs] + [max_num_seqs]


def block_bytes(backend, block_size: int, kv_format: str) -> int:
    """Bytes of one KV block across all layers, measured on the backend's own cache layout."""
    one = backend.cache_nbytes(backend.new_paged_cache(2, block_size, kv_format, max_batch=1, max_blocks_per_seq=1))
    return one - backend.cache_nbytes(backend.new_paged_cache(1, block_size, kv_format, max_batch=1,
                                                              max_blocks_per_seq=1))


def kv_cache_blocks(backend, block_size: int, kv_format: str, gpu_memory_utilization: float,
                    cpu_tokens: int, reserve_bytes: int = 2 << 30) -> int:
    """Blocks of the paged cache: on CUDA, total × utilization − what is in use after the weights
    loaded − `reserve_bytes` for activations and graphs; on the CPU, `cpu_tokens` positions."""
    per_block = block_bytes(backend, block_size, kv_format)
    if backend.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(backend.device)
        avail = total * gpu_memory_utilization - (total - free) - reserve_bytes
        return max(0, int(avail // per_block))
    return -(-cpu_tokens // block_size) + 1


def pack_chunks(chunks: list[tuple[int, int]], max_positions: int) -> list[list[int]]:
    """Groups of the prefill chunks (start position, length) that run as one padded forward each, as lists of
    indices into `chunks`. Chunks are taken longest first (the oldest first among equal lengths), each into the
    first group it fits: B x Tmax <= PAD_RATIO x the group's real tokens, and start + Tmax <= `max_positions`
    (the block table's width in positions) so the padded positions stay inside the table. Within a group, rows
    are ordered by start position (rows sharing one start take one prefill attention call)."""
    groups: list[list[int]] = []                 # first member: the longest chunk, which sets Tmax
    real: list[int] = []
    for i in sorted(range(len(chunks)), key=lambda j: -chunks[j][1]):
        start, n = chunks[i]
        for g, members in enumerate(groups):
            T = chunks[members[0]][1]
            if (len(members) + 1) * T <= PAD_RATIO * (real[g] + n) and start + T <= max_positions:
                members.append(i)
                real[g] += n
                break
        else:
            groups.append([i])
            real.append(n)
    return [sorted(g, key=lambda j: (chunks[j][0], j)) for g in groups]


class Engine:
    def __init__(self, model, tok, kv_format: str, eos_ids, *, num_blocks: int, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, max_model_len: int,
                 prefix_caching: bool = True):
        self.model, self.tok, self.kv_format = model, tok, kv_format
        self.be = model.backend
        self.eos = set(int(e) for e in eos_ids)
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.max_model_len = min(max_model_len, self.blocks.usable * block_size)
        self.sizes = decode_sizes(max_num_seqs)
        self.max_blocks_per_seq = self.blocks.blocks_for(self.max_model_len)
        self.cache = self.be.new_paged_cache(num_blocks, block_size, kv_format, max_batch=self.sizes[-1],
                                             max_blocks_per_seq=self.max_blocks_per_seq)
        self._tables = torch.zeros(self.sizes[-1], self.max_blocks_per_seq, dtype=torch.int32)
        cache = self.cache            # not self: no cycle, so a dropped engine frees its graphs at once
        self._decode = self.be.wrap_decode(lambda ids, pos: model.forward(ids, pos, cache))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._cv = threading.Condition()
        self._time = {"prefill_s": 0.0, "decode_s": 0.0}     # this step's parts of the time accounting
        self._requeued = 0             # preempted requests in `waiting` (already accepted once)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "preemptions": 0, "steps": 0,
                         "prefill_tokens": 0, "decode_rows": 0,     # positions computed by prefill chunks / decode
                         "prefill_forwards": 0, "prefill_positions": 0,   # prefill forwards and their B x Tmax positions
                         "decode_steps": 0, "step_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}   # module contract

    # -- thread-safe entry points -----------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.blocks.usable * self.block_size

    def add(self, req: Request) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise ValueError("the prompt encodes to zero tokens")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; this server allows {self.max_model_len} "
                             "(prompt + at least one generated token)")
        req.params.max_tokens = max(1, min(req.params.max_tokens, self.max_model_len - n))
        p = req.params
        if p.top_p <= 0:                  # keep only the most likely token (top_p 0 would keep none)
            p.top_k, p.top_p = 1, 1.0
        p.top_k = max(0, p.top_k)
        with self._cv:
            self._inbox.append(req)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

    def queued(self) -> int:
        """Accepted requests that will have to wait (never admitted, beyond the free running slots): what a
        queue limit counts."""
        fresh = len(self._inbox) + len(self.waiting) - self._requeued
        return max(0, fresh - max(0, self.max_num_seqs - len(self.running)))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inbox or self._aborts)

    def wait_for_work(self, timeout: float) -> bool:
        with self._cv:
            if not self.has_work():
                self._cv.wait(timeout)
            return self.has_work()

    def warmup(self) -> None:
        """Run a prefill chunk and one decode step per padded batch size on the dummy block 0 (every block
        table row is zero), so kernels compile and CUDA graphs are captured before the first request."""
        dev = self.be.device
        n = min(2 * self.block_size, self.max_num_batched_tokens, self.max_blocks_per_seq * self.block_size)
        self.cache.block_tables.zero_()
        with torch.inference_mode():
            self.model.forward(torch.zeros(1, n, dtype=torch.long, device=dev),
                               torch.arange(n, device=dev)[None], self.cache)
            for size in self.sizes:
                z = torch.zeros(size, 1, dtype=torch.long, device=dev)
                self._decode(z, z.clone())
        self.be.synchronize()

    # -- one scheduler iteration ------------------------------------------------------------------
    def step(self) -> None:
        t0 = time.perf_counter()
        self._time = {"prefill_s": 0.0, "decode_s": 0.0}
        self._take_inbox()
        self._admit()
        decode = [r for r in self.running if len(r.all_ids) - r.num_computed == 1]
        prefill = [r for r in self.running if len(r.all_ids) - r.num_computed > 1]
        budget = self.max_num_batched_tokens - len(decode)
        chunks: list[tuple[Request, int]] = []
        for i, r in enumerate(prefill):
            if r not in self.running:
                continue                                   # preempted by an older request's reservation
            n = min(len(r.all_ids) - r.num_computed, budget if i else max(budget, self.max_num_batched_tokens))
            if n <= 0:
                break
            if self._reserve(r, r.num_computed + n):
                budget -= n
                chunks.append((r, n))
        decode = [r for r in decode if r in self.running and self._reserve(r, r.num_computed + 1)]
        decode = [r for r in decode if r in self.running]    # a later reservation may preempt an earlier row
        chunks = [(r, n) for r, n in chunks if r in self.running]
        for group in pack_chunks([(r.num_computed, n) for r, n in chunks], self.max_blocks_per_seq * self.block_size):
            self._prefill([chunks[j] for j in group])
        if decode:
            self._decode_step(decode)
        self.counters["steps"] += 1
        self.counters["step_s"] += time.perf_counter() - t0     # before its parts (metrics.py reads them first)
        for k, v in self._time.items():
            self.counters[k] += v

    def _take_inbox(self) -> None:
        with self._cv:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = set(self._aborts), []
        for r in new:
            if r.params.seed is not None:
                r.generator = torch.Generator(device=self.be.device)
                r.generator.manual_seed(int(r.params.seed))
            r.stream = TextStream(self.tok, r.params.stop)
            self.counters["prompt_tokens"] += len(r.prompt_ids)
            self.waiting.append(r)
        if aborts:
            for r in [r for r in list(self.waiting) + self.running if r.id in aborts]:
                self._finish(r, "abort")

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if self.blocks.blocks_for(len(r.all_ids) + 1) > self.blocks.free_blocks and self.running:
                break
            self.running.append(self.waiting.popleft())
            self._requeued -= r.preemptions > 0
            if r.num_computed == 0:                        # cached full blocks of the same prefix: not recomputed
                r.num_computed = self.blocks.match(r.id, r.all_ids)
                if r.cached_tokens is None:
                    r.cached_tokens = r.num_computed

    def _reserve(self, r: Request, n_tokens: int) -> bool:
        """Blocks for positions 0..n_tokens-1 of r, preempting the newest running requests if needed;
        False when r itself had to be preempted."""
        while not self.blocks.ensure(r.id, n_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is r:
                return False
        return True

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self.blocks.free(r.id)
        r.num_computed = 0
        r.preemptions += 1
        self.counters["preemptions"] += 1
        self._requeued += 1
        self.waiting.appendleft(r)

    def _fill_tables(self, rows: list[Request], padded: int) -> None:
        tables = [self.blocks.table(r.id) for r in rows]
        width = max(len(t) for t in tables)
        self._tables[:padded].zero_()
        self._tables[:len(rows), :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                        dtype=torch.int32)
        self.cache.block_tables[:padded].copy_(self._tables[:padded])

    def _prefill(self, chunks: list[tuple[Request, int]]) -> None:
        """One forward [B, Tmax] over the chunks (r, n) of B requests: row b holds r's tokens num_computed ..
        num_computed + n - 1, then Tmax - n padded tokens (id 0) at the next positions (see the module contract);
        the logits of each row's last real position are sampled where the chunk completes the request."""
        dev = self.be.device
        T = max(n for _, n in chunks)
        ids = torch.zeros(len(chunks), T, dtype=torch.long)
        for b, (r, n) in enumerate(chunks):
            ids[b, :n] = torch.tensor(r.all_ids[r.num_computed:r.num_computed + n], dtype=torch.long)
        start = torch.tensor([r.num_computed for r, _ in chunks], dtype=torch.long)
        pos = start[:, None] + torch.arange(T, dtype=torch.long)[None]
        last = torch.tensor([n - 1 for _, n in chunks], dtype=torch.long)
        t0 = time.perf_counter()
        self._fill_tables([r for r, _ in chunks], len(chunks))
        logits = self.model.forward(ids.to(dev), pos.to(dev), self.cache, last_index=last.to(dev))
        self.counters["prefill_forwards"] += 1
        self.counters["prefill_positions"] += len(chunks) * T
        done = []
        for b, (r, n) in enumerate(chunks):
            r.num_computed += n
            self.counters["prefill_tokens"] += n
            self.blocks.register(r.id, r.all_ids, r.num_computed)
            if r.num_computed == len(r.all_ids):
                done.append(b)
        if done:
            self._sample([chunks[b][0] for b in done], logits[done], ("prefill_s", t0))
        else:
            self.be.synchronize()
            self._time["prefill_s"] += time.perf_counter() - t0

    def _decode_step(self, rows: list[Request]) -> None:
        B = len(rows)
        P = next(s for s in self.sizes if s >= B)
        pad = [0] * (P - B)
        ids = torch.tensor([r.all_ids[r.num_computed] for r in rows] + pad, dtype=torch.long).view(P, 1)
        pos = torch.tensor([r.num_computed for r in rows] + pad, dtype=torch.long).view(P, 1)
        t0 = time.perf_counter()
        self._fill_tables(rows, P)
        logits = self._decode(ids.to(self.be.device), pos.to(self.be.device))[:B]
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += B
        for r in rows:
            r.num_computed += 1
            if r.num_computed % self.block_size == 0:
                self.blocks.register(r.id, r.all_ids, r.num_computed)
        self._sample(rows, logits, ("decode_s", t0))

    # -- sampling and outputs ---------------------------------------------------------------------
    def _sample(self, rows: list[Request], logits: torch.Tensor, timed: tuple[str, float]) -> None:
        """Pick each row's token (one host read of the picks: the device's forward and sampling are done there,
        so the time since ``timed[1]`` is added to ``timed[0]``), then append it to its request."""
        picks = logits.argmax(dim=-1)
        failed = set()
        for i, r in enumerate(rows):
            p = r.params
            if not p.greedy:     # NaN / inf logits (a broken checkpoint) must not fail the whole batch
                row = torch.nan_to_num(logits[i:i + 1].float(), nan=-1e30, posinf=1e30, neginf=-1e30)
                try:
                    picks[i] = self.be.sample(row, p.temperature, p.top_k, p.top_p, r.generator)[0]
                except RuntimeError:     # a degenerate distribution: this request ends, the batch goes on
                    failed.add(i)
        tokens = picks.tolist()
        self._time[timed[0]] += time.perf_counter() - timed[1]
        lps: list = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.params.logprobs]
        if want:
            lp = torch.log_softmax(logits[want].float(), dim=-1)
            top_lp, top_id = lp.max(dim=-1)
            chosen = lp.gather(1, picks[want].reshape(-1, 1)).squeeze(1)
            for j, i in enumerate(want):
                lps[i] = (float(chosen[j]), int(top_id[j]), float(top_lp[j]))
        for i, (r, t, lp) in enumerate(zip(rows, tokens, lps)):
            if i in failed:
                self._finish(r, "abort")
            else:
                self._append(r, t, lp)

    def _append(self, r: Request, token: int, lp) -> None:
        now = time.monotonic()
        if r.first_token_time is None:
            r.first_token_time = now
        r.output_ids.append(token)
        r.all_ids.append(token)
        self.counters["generation_tokens"] += 1
        text, reason = "", None
        if token in self.eos and not r.params.ignore_eos:
            reason = "stop"
        else:
            text = r.stream.add(token)
            if r.stream.stopped:
                reason = "stop"
            elif len(r.output_ids) >= r.params.max_tokens or len(r.all_ids) >= self.max_model_len:
                reason = "length"
        if reason:
            text += r.stream.flush()
        self._emit(r, Output(r.id, text, [token], [lp] if lp is not None else None))
        if reason:
            self._finish(r, reason)

    def _emit(self, r: Request, out: Output) -> None:
        out.prompt_tokens, out.completion_tokens = len(r.prompt_ids), len(r.output_ids)
        out.cached_tokens = r.cached_tokens or 0
        if r.on_output is not None:
            r.on_output(out)

    def _finish(self, r: Request, reason: str) -> None:
        if r.finished:
            return
        r.finished = True
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
            self._requeued -= r.preemptions > 0
        self.blocks.free(r.id)
        self.counters[f"finished_{reason}"] = self.counters.get(f"finished_{reason}", 0) + 1
        self._emit(r, Output(r.id, "", [], None, finished=True, finish_reason=reason))

    def abort_all(self, reason: str = "abort") -> None:
        self._take_inbox()
        for r in list(self.waiting) + list(self.running):
            self._finish(r, reason)


class EngineLoop:
    """Runs `engine.step()` on one background thread until `stop()`; a step that raises finishes
    every in-flight request with reason 'abort' (logged through `on_error`) and the loop goes on."""

    def __init__(self, engine: Engine, on_error=None):
        self.engine, self.on_error = engine, on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qtool-engine", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.wait_for_work(0.05):
                continue
            try:
                with torch.inference_mode():
                    self.engine.step()
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                if self.on_error:
                    self.on_error(exc)
                self.engine.abort_all()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self.engine._cv:
            self.engine._cv.notify_all()
        self._thread.join(timeout)
