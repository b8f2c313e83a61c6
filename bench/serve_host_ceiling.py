#!/usr/bin/env python3
"""`qtool serve`'s host ceiling: the real HTTP server and engine over a model whose compute is a sleep.

Contract: ``python3 bench/serve_host_ceiling.py MODEL_DIR [--port P] [--decode-ms A B] [--prefill-ms C D]``
serves MODEL_DIR's tokenizer and config through qtool's own FastAPI app, engine and scheduler thread, exactly as
`qtool serve` wires them (qtool.commands.serve), on the reference backend, with `Model.forward` replaced by a
stand-in: it sleeps A + B x rows ms for a decode step and C + D x positions / 1000 ms for a prefill forward
(time.sleep drops the GIL, as a CUDA synchronisation does), then returns fixed logits over 1,024 ids (so the
sampling read-back is cheap, as a GPU argmax is). Drive it with
``python3 scripts/bench_serve.py --url http://127.0.0.1:P``; with A = B = C = 0 the output tok/s is what the host
(HTTP, SSE encoding, scheduler, detokenizer, metrics, all under one GIL) can deliver at all; with the GPU's step
times it tells how much of a served figure the host costs.
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--decode-ms", type=float, nargs=2, default=(0.0, 0.0), metavar=("A", "B"),
                    help="a decode step sleeps A + B x rows ms")
    ap.add_argument("--prefill-ms", type=float, nargs=2, default=(0.0, 0.0), metavar=("C", "D"),
                    help="a prefill forward of B x T positions sleeps C + D x B x T / 1000 ms")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args()

    import torch
    import uvicorn
    from qtool.engine.engine import Engine, EngineLoop
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import load_tokenizer
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    from qtool.serve.app import ServerState, create_app

    torch.set_num_threads(1)
    tok = load_tokenizer(args.model)
    model = Model(load_model_weights(args.model, progress=False), TorchRefBackend())
    vocab = 1024
    table = torch.zeros(vocab, vocab)
    table[torch.arange(vocab), (torch.arange(vocab) * 7 + 300) % vocab] = 1.0   # next id from the position

    def forward(ids, pos, cache, last_index=None):
        B, T = ids.shape
        if T == 1:
            time.sleep((args.decode_ms[0] + args.decode_ms[1] * B) / 1e3)
            p = pos[:, 0]
        else:
            time.sleep((args.prefill_ms[0] + args.prefill_ms[1] * B * T / 1e3) / 1e3)
            p = pos[torch.arange(B), last_index]
        return table[p % vocab]
    model.forward = forward

    blocks = args.max_num_seqs * (args.max_model_len // 16 + 1) + 1
    engine = Engine(model, tok, "bf16", [], num_blocks=blocks, block_size=16, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=2048, max_model_len=args.max_model_len)
    state = ServerState(model_name="fake", root=str(args.model), tok=tok)
    state.engine, state.max_model_len, state.ready = engine, engine.max_model_len, True
    state.metrics.bind(engine)
    loop = EngineLoop(engine).start()
    print(f"fake-compute server on http://127.0.0.1:{args.port} (decode {args.decode_ms[0]} + "
          f"{args.decode_ms[1]} x rows ms, prefill {args.prefill_ms[0]} + {args.prefill_ms[1]} x positions / 1000 ms)", flush=True)
    try:
        uvicorn.run(create_app(state), host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        loop.stop()


if __name__ == "__main__":
    main()
