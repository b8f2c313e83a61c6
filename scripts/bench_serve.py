#!/usr/bin/env python3
"""Load test of `qtool serve`: N concurrent streaming clients on loopback, fixed prompt/output lengths.

Contract: `python3 scripts/bench_serve.py [--url http://127.0.0.1:8000 | --serve MODEL_DIR [--serve-args "..."]]
[--make-random DIR [--shape llama3.1-8b|tiny]] [--concurrency 1,8,32,64] [--input-len 512] [--output-len 128]
[--requests-per-level K] [--level-time-limit S] [--shared-prefix N [--compare-prefix-caching]] [--json out.json]`.
- `--make-random DIR` writes a random-weight ModelOpt-FP8 checkpoint (FP8 weights with per-tensor weight/input
  scales, FP8 KV with k_scale/v_scale, bf16 embeddings / lm_head; a word-level tokenizer "t<id>" covering the
  vocabulary) of the given shape, then uses it as --serve (skipped when DIR already holds one).
- `--serve DIR` starts `qtool serve DIR` on a free loopback port (its log in the temp folder; SIGTERM at the end).
- Per concurrency level c: a warm-up burst of c short requests (CUDA graphs of the padded sizes get captured),
  then max(K, 2c) requests (K default 16) issued with at most c in flight, no new request after
  --level-time-limit seconds. Each request: POST /v1/completions with a random token-id prompt of --input-len
  tokens, max_tokens --output-len, ignore_eos, stream with include_usage. Measured on the client: TTFT (send to
  the first text chunk), ITL (gaps between text chunks, all requests pooled), output tok/s (sum of usage
  completion tokens / wall time of the level), requests/s. A request that errors, or returns fewer tokens than
  asked, is counted as failed. Prints one row per level; --json writes all rows. Against `qtool serve` each row
  also tells where the engine's time went over the level (its /metrics counters before and after): prefill
  forwards, decode steps (ms per step, mean batch), host work inside steps, and idle.
- `--shared-prefix N`: every prompt is the same N tokens (a shared system prompt) followed by its own
  --input-len tokens; `--compare-prefix-caching` runs every level against a server with prefix caching and then
  one started with `--no-prefix-caching`, and prints the TTFT p50 of both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head_dim, vocab, max positions
    "llama3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, 131072),
    "tiny": (256, 512, 2, 4, 2, 64, 384, 4096),
}


# ---------------------------------------------------------------- random checkpoint
def make_random_checkpoint(out: Path, shape: str, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file
    if (out / "config.json").is_file():
        return out
    H, inter, L, nh, nkv, d, V, maxpos = SHAPES[shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)

    def codes(o, k):                     # e4m3 codes without NaN (0x7f / 0xff), as qtool.kernels.random_weights
        c = torch.randint(0, 0x7e, (o, k), generator=g, device=dev, dtype=torch.uint8)
        c |= torch.randint(0, 2, (o, k), generator=g, device=dev, dtype=torch.uint8) << 7
        return c.view(torch.float8_e4m3fn).cpu()

    def scalar(v):
        return torch.tensor(v, dtype=torch.float32)

    def bf16(*s, std=1.0):
        return (torch.randn(*s, generator=g, device=dev) * std).to(torch.bfloat16).cpu()

    index, shard = {}, 0

    def flush(tensors):
        nonlocal shard
        shard += 1
        name = f"model-{shard:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})

    flush({"model.embed_tokens.weight": bf16(V, H, std=0.02)})
    lin = {"self_attn.q_proj": (nh * d, H), "self_attn.k_proj": (nkv * d, H), "self_attn.v_proj": (nkv * d, H),
           "self_attn.o_proj": (H, nh * d), "mlp.gate_proj": (inter, H), "mlp.up_proj": (inter, H),
           "mlp.down_proj": (H, inter)}
    for i in range(L):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "self_attn.k_proj.k_scale": scalar(0.02), p + "self_attn.v_proj.v_scale": scalar(0.02)}
        for name, (o, k) in lin.items():
            t[p + name + ".weight"] = codes(o, k)
            t[p + name + ".weight_scale"] = scalar(1e-3)
            t[p + name + ".input_scale"] = scalar(0.02)
        flush(t)
    flush({"model.norm.weight": torch.ones(H, dtype=torch.bfloat16), "lm_head.weight": bf16(V, H, std=0.02)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    kv_scheme = {"dynamic": False, "num_bits": 8, "type": "float"}
    group = {"input_activations": kv_scheme, "weights": kv_scheme, "targets": ["Linear"]}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": inter,
           "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": d,
           "vocab_size": V, "max_position_embeddings": maxpos, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
           "quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_scheme": kv_scheme,
                                   "config_groups": {"group_0": group}, "ignore": ["lm_head"],
                                   "producer": {"name": "modelopt", "version": "0.47.0"}}}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.47.0"},
         "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}, indent=1))
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t1", "eos_token": "t2", "unk_token": "t0"}))
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, extra: list[str], timeout: float = 1800):
    import httpx
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"qtool_bench_serve_{port}.log"
    print(f"server log: {log_path}", file=sys.stderr)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "qtool", "serve", str(model), "--port", str(port), *extra],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become ready")


# ---------------------------------------------------------------- clients
async def one_request(client, url, model, prompt, n_out):
    body = {"model": model, "prompt": prompt, "max_tokens": n_out, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, last, gaps, tokens, err = None, None, [], 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    err = obj["error"].get("message")
                    continue
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                if obj.get("choices") and obj["choices"][0].get("text"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    if err or tokens != n_out:
        return {"error": err or f"{tokens} of {n_out} tokens"}
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens}


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


ENGINE_COUNTERS = ("engine_step_seconds_total", "engine_prefill_seconds_total", "engine_decode_seconds_total",
                   "decode_steps_total", "decode_rows_total", "prefill_forwards_total", "prefill_computed_positions_total")


async def engine_counters(client, url) -> dict | None:
    """The server's engine counters (qtool serve's /metrics), or None for a server without them."""
    try:
        text = (await client.get(url + "/metrics")).text
    except Exception:  # noqa: BLE001 - another server, or no /metrics: the split is left out
        return None
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith("qtool_") and name[6:] in ENGINE_COUNTERS:
            out[name[6:]] = float(line.rsplit(" ", 1)[1])
    return out if len(out) == len(ENGINE_COUNTERS) else None


def engine_split(before: dict | None, after: dict | None, wall: float) -> dict | None:
    """Where the server's engine spent a level's wall time: prefill forwards, decode forwards, host work in steps
    (scheduling, sampling, detokenizing, callbacks) and idle (waiting for requests), with per-forward figures."""
    if not before or not after or wall <= 0:
        return None
    d = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
    pre, dec, step = d["engine_prefill_seconds_total"], d["engine_decode_seconds_total"], d["engine_step_seconds_total"]
    steps, fwd = d["decode_steps_total"], d["prefill_forwards_total"]
    return {"prefill_pct": round(100 * pre / wall, 1), "decode_pct": round(100 * dec / wall, 1),
            "host_pct": round(100 * (step - pre - dec) / wall, 1), "idle_pct": round(100 * (wall - step) / wall, 1),
            "decode_ms_per_step": round(1e3 * dec / steps, 2) if steps else None,
            "mean_decode_batch": round(d["decode_rows_total"] / steps, 1) if steps else None,
            "prefill_forwards": int(fwd), "prefill_ms_per_forward": round(1e3 * pre / fwd, 1) if fwd else None,
            "positions_per_prefill_forward": round(d["prefill_computed_positions_total"] / fwd) if fwd else None}


async def level(url, model, vocab, c, n_req, n_in, n_out, time_limit, seed, prefix=()):
    import httpx
    rng = random.Random(seed)
    lo = min(1000, vocab // 4)
    prompts = [list(prefix) + [rng.randrange(lo, vocab) for _ in range(n_in)] for _ in range(n_req)]
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:
        warm = [[rng.randrange(lo, vocab) for _ in range(n_in)] for _ in range(c)]
        await asyncio.gather(*(one_request(client, url, model, p, 8) for p in warm))
        sem = asyncio.Semaphore(c)
        counters0 = await engine_counters(client, url)
        start = time.perf_counter()
        results = []

        async def run(p):
            async with sem:
                if time.perf_counter() - start > time_limit:
                    return
                results.append(await one_request(client, url, model, p, n_out))
        await asyncio.gather(*(run(p) for p in prompts))
        wall = time.perf_counter() - start
        split = engine_split(counters0, await engine_counters(client, url), wall)
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    itl = [g for r in ok for g in r["gaps"]]
    return {"concurrency": c, "requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3],
            "wall_s": round(wall, 2), "output_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "requests_s": round(len(ok) / wall, 3),
            "ttft_p50_ms": round(pct(ttft, 50) * 1e3, 1), "ttft_p99_ms": round(pct(ttft, 99) * 1e3, 1),
            "itl_p50_ms": round(pct(itl, 50) * 1e3, 2), "itl_p99_ms": round(pct(itl, 99) * 1e3, 2),
            "engine": split}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an already running server")
    ap.add_argument("--serve", type=Path, help="start `qtool serve DIR` for the run")
    ap.add_argument("--serve-args", default="--max-model-len 2048",
                    help="extra qtool serve arguments, one string (default: --max-model-len 2048; the model's 131072 "
                         "would size every row's block table and the attention split for 131072 positions)")
    ap.add_argument("--make-random", type=Path, help="write a random FP8 checkpoint here (if absent) and serve it")
    ap.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--requests-per-level", type=int, default=16)
    ap.add_argument("--level-time-limit", type=float, default=120.0)
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                    help="every prompt starts with the same N tokens (a shared system prompt) before its own")
    ap.add_argument("--compare-prefix-caching", action="store_true",
                    help="run the levels against a server with prefix caching and one with --no-prefix-caching")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model_dir = a.serve
    if a.make_random:
        t0 = time.monotonic()
        model_dir = make_random_checkpoint(a.make_random, a.shape)
        print(f"checkpoint {model_dir} ready ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    if model_dir is None and not a.url:
        ap.error("give --url, --serve or --make-random")
    if a.shared_prefix < 0:
        ap.error("--shared-prefix must be 0 or more")
    if a.compare_prefix_caching and model_dir is None:
        ap.error("--compare-prefix-caching starts the server twice: give --serve or --make-random")
    configs = [("", a.serve_args.split())]
    if a.compare_prefix_caching:
        configs = [("prefix caching on", a.serve_args.split()),
                   ("prefix caching off", a.serve_args.split() + ["--no-prefix-caching"])]
    runs, failed = [], False
    for label, extra in configs:
        rows, model, url = run_levels(a, model_dir, extra, label)
        runs.append({"label": label or None, "serve_args": extra, "rows": rows})
        failed |= any(r["failed"] for r in rows)
    if a.compare_prefix_caching:
        on, off = runs[0]["rows"], runs[1]["rows"]
        print("TTFT p50 with / without prefix caching: " + ", ".join(
            f"c{x['concurrency']} {x['ttft_p50_ms']:.1f} / {y['ttft_p50_ms']:.1f} ms "
            f"({y['ttft_p50_ms'] / x['ttft_p50_ms']:.1f}x)" for x, y in zip(on, off) if x["ttft_p50_ms"] > 0))
    if a.json:
        a.json.write_text(json.dumps({"model": model, "input_len": a.input_len, "output_len": a.output_len,
                                      "shared_prefix": a.shared_prefix, "rows": runs[0]["rows"], "runs": runs},
                                     indent=1))
    return 1 if failed else 0


def run_levels(a, model_dir, extra, label):
    """Every concurrency level against one server (started here from model_dir with ``extra``, else a.url):
    (rows, model name, url)."""
    import httpx
    proc = None
    if model_dir is not None:
        proc, url = start_server(model_dir, extra)
    else:
        url = a.url.rstrip("/")
    try:
        info = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        model = info["id"]
        vocab = json.loads((Path(info["root"]) / "config.json").read_text())["vocab_size"] \
            if Path(info["root"], "config.json").is_file() else 32000
        prefix = [random.Random(12345).randrange(min(1000, vocab // 4), vocab) for _ in range(a.shared_prefix)]
        rows = []
        shared = f" + {a.shared_prefix} shared" if a.shared_prefix else ""
        print((f"[{label}]\n" if label else "")
              + f"{'conc':>4} {'reqs':>5} {'fail':>4} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8}   (ms; {a.input_len}{shared} in / {a.output_len} out; {model})")
        for c in [int(x) for x in a.concurrency.split(",")]:
            r = asyncio.run(level(url, model, vocab, c, max(a.requests_per_level, 2 * c), a.input_len, a.output_len,
                                  a.level_time_limit, seed=c, prefix=prefix))
            rows.append(r)
            print(f"{c:>4} {r['requests']:>5} {r['failed']:>4} {r['output_tok_s']:>10.1f} {r['requests_s']:>7.2f} "
                  f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} {r['itl_p50_ms']:>8.2f} {r['itl_p99_ms']:>8.2f}"
                  + (f"   errors: {r['errors']}" if r["failed"] else ""), flush=True)
            if r["engine"]:
                e = {k: "-" if v is None else v for k, v in r["engine"].items()}
                print(f"{'':>5}engine: prefill {e['prefill_pct']}% ({e['prefill_forwards']} forwards, "
                      f"{e['prefill_ms_per_forward']} ms / {e['positions_per_prefill_forward']} positions each), "
                      f"decode {e['decode_pct']}% ({e['decode_ms_per_step']} ms/step at mean batch "
                      f"{e['mean_decode_batch']}), host {e['host_pct']}%, idle {e['idle_pct']}%", flush=True)
        if len(rows) > 1 and rows[0]["output_tok_s"] > 0:
            print("throughput vs concurrency 1: " + ", ".join(
                f"c{r['concurrency']} {r['output_tok_s'] / rows[0]['output_tok_s']:.1f}x" for r in rows[1:]))
        return rows, model, url
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
