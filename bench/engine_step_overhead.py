#!/usr/bin/env python3
"""Host work of one engine decode step (qtool.engine.Engine.step) with the model's compute taken out.

Contract: ``python3 bench/engine_step_overhead.py MODEL_DIR [--batch 1 8] [--steps 1000]``. Loads MODEL_DIR on
the reference backend, replaces `Model.forward` with a function that returns fixed logits (one word token
most likely), submits `batch` requests of one short prompt and times the decode steps: what remains is the
scheduler, block bookkeeping, block-table rebuild, sampling read-back and incremental detokenizing that
every engine step costs on the host. On a GPU the engine runs this between two decode graphs (the GPU idles),
while runtime.generate's `decode_loop` queues the next step before reading a token; that gap is why a
single `qtool run PROMPT` stays on generate() (docs/architecture.md, qtool/commands/run.py).
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    import torch
    from qtool.engine.engine import Engine
    from qtool.engine.request import Request, SamplingParams
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import load_tokenizer, prompt_ids
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    torch.set_num_threads(1)
    tok = load_tokenizer(args.model)
    model = Model(load_model_weights(args.model, progress=False), TorchRefBackend())
    logits = torch.zeros(max(args.batch), model.config.vocab_size)
    logits[:, tok.encode(" water", add_special_tokens=False)[0]] = 1.0
    model.forward = lambda ids, pos, cache, **kw: logits[:ids.shape[0]]
    for b in args.batch:
        e = Engine(model, tok, "bf16", [], num_blocks=b * (args.steps // 16 + 4) + 1, block_size=16,
                   max_num_seqs=b, max_model_len=args.steps + 64)
        for i in range(b):
            e.add(Request(str(i), prompt_ids(tok, "Water boils at"),
                          SamplingParams(max_tokens=args.steps, ignore_eos=True)))
        with torch.inference_mode():
            e.step()                                   # the prefill
            t, n = time.perf_counter(), 0
            while e.has_work():
                e.step()
                n += 1
        print(f"batch {b}: {(time.perf_counter() - t) / n * 1e6:.0f} us of host work per decode step ({n} steps)")


if __name__ == "__main__":
    main()
