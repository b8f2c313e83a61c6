"""`qtool serve` end to end: a server subprocess on a free loopback port (tiny random llama, reference
backend, a KV budget small enough to force preemption), driven by the official `openai` client and httpx.

References: `qtool.runtime.generate` in this process (checked against HF in test_generate.py) for the greedy
text; the same server answering each request alone for the concurrent batch; the OpenAI wire contract
(error shape, SSE framing, usage chunk) as written in docs/serve.md.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
PROMPTS = ["The capital of France is", "Water boils at", "def add(a, b):", "Quantization maps floating point",
           "A small language model predicts", "Ice melts at", "The capital of Italy is Rome.", "print(add(2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def concurrently(fn, args: list) -> list:
    """[fn(a) for a in args], each call on its own thread, all in flight together."""
    out = [None] * len(args)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(args[i]))) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


class Server:
    def __init__(self, model: Path, *args: str, backend: str = "torch"):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "qtool", "serve", str(model), "--backend", backend,
                                      "--port", str(self.port), *args], cwd=REPO,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"},   # tiny matmuls: threads only contend
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.saw_503 = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                r = self.http.get("/health")
                if r.status_code == 200:
                    return
                assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
                self.saw_503 = True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become ready")

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def server(tiny_models):
    # 8 usable blocks of 8 = 64 tokens: one request fits, four at once do not
    s = Server(tiny_models("llama"), "--api-key", KEY, "--num-kv-blocks", "9", "--block-size", "8", "--max-num-seqs", "4",
               "--max-waiting", "4", "--max-num-batched-tokens", "24", "--served-model-name", "tiny")
    yield s
    # SIGTERM drains: a stream in flight when the signal comes still runs to its end
    import httpx
    got = []

    def stream():
        with httpx.stream("POST", s.url + "/v1/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 40, "stream": True,
                                "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
            got.extend(ln for ln in r.iter_lines() if ln)
    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 20
    while metric(s.metrics(), "qtool_num_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    code, err = s.stop()
    t.join()
    assert code == 0, err
    assert got[-1] == "data: [DONE]" and json.loads(got[-2][6:])["usage"]["completion_tokens"] == 40
    assert "serving 'tiny' at http://127.0.0.1:" in err and "KV cache bf16: 64 tokens" in err and "stopped" in err


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_models):
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import load_tokenizer
    from qtool.runtime.generate import GenerateOptions, generate
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    path = tiny_models("llama")
    tok = load_tokenizer(path)
    model = Model(load_model_weights(str(path), progress=False), TorchRefBackend())

    def ref(ids, n):
        (c,), _ = generate(model, tok, [ids], GenerateOptions(max_new_tokens=n), "bf16", eos=set())
        return c
    return tok, ref


def test_completions_match_reference_stream_and_not(client, reference, server):
    tok, ref = reference
    prompt = PROMPTS[0]
    want = ref(tok(prompt)["input_ids"], 10)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok(prompt)["input_ids"]), 10)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 10 and all(v <= 0 for v in lp.token_logprobs)
    assert [list(d.values())[0] for d in lp.top_logprobs] == lp.token_logprobs      # greedy: chosen = top-1
    lp0 = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    assert lp0.token_logprobs == lp.token_logprobs[:3] and lp0.top_logprobs == [{}, {}, {}]   # 0: no alternatives
    ids_doc = server.http.post("/v1/completions", headers={"authorization": f"Bearer {KEY}"},
                               json={"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0,
                                     "ignore_eos": True, "return_token_ids": True}).json()
    assert ids_doc["choices"][0]["token_ids"] == want.token_ids
    tiny_t = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=1e-30,
                                       extra_body={"ignore_eos": True})
    assert tiny_t.choices[0].text == want.text                                      # a tiny temperature is greedy
    top_p0 = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, top_p=0,
                                       extra_body={"ignore_eos": True})
    assert top_p0.choices[0].text == want.text                                      # top_p 0 keeps the top token
    for tiny_p in (5e-324, 1e-46):                  # 0 in float32: the top token too (was 503, found by a fuzz)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, top_p=tiny_p,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == want.text
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_and_not(client, reference, server):
    tok, ref = reference
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Water boils at"}]
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
    want = ref(ids, 8)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == len(ids)
    lp = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                        top_logprobs=1, extra_body={"ignore_eos": True}).choices[0].logprobs.content
    assert len(lp) == 4 and all(e.top_logprobs[0].logprob == e.logprob <= 0 for e in lp)   # greedy: chosen = top-1
    assert "".join(e.token for e in lp) == want.text[:len("".join(e.token for e in lp))]
    again = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})        # the prompt's full blocks: cached
    assert again.choices[0].message.content == want.text
    assert again.usage.prompt_tokens_details.cached_tokens == (len(ids) - 1) // 8 * 8 > 0
    m = server.metrics()
    assert metric(m, "qtool_prefix_cache_hits_total") > 0
    assert metric(m, "qtool_prefill_forwards_total") >= 3                   # one per request above, at least
    assert metric(m, "qtool_prefill_computed_positions_total") >= metric(m, "qtool_prefill_tokens_total") > 0
    assert metric(m, "qtool_decode_rows_total") >= metric(m, "qtool_decode_steps_total") >= 7   # 8 tokens: 7 decoded
    pre, dec = metric(m, "qtool_engine_prefill_seconds_total"), metric(m, "qtool_engine_decode_seconds_total")
    assert pre > 0 and dec > 0 and metric(m, "qtool_engine_step_seconds_total") >= pre + dec
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None   # no include_usage
    # raw SSE framing: data lines, ends with [DONE]
    with server.http.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                            json={"model": "tiny", "messages": msgs, "max_tokens": 3, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in resp.iter_lines() if ln]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    # a stop string: the text ends before it and finish_reason is "stop"
    stop = want.text[2:5]
    if stop.strip():
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stop=[stop])
        assert r.choices[0].message.content == want.text[:want.text.index(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_concurrent_greedy_equal_alone_with_preemption(client, server):
    def ask(p):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    alone = [ask(p) for p in PROMPTS]
    before = metric(server.metrics(), "qtool_num_preemptions_total")
    got = concurrently(ask, PROMPTS)
    assert got == alone
    m = server.metrics()
    assert metric(m, "qtool_num_preemptions_total") > before          # 4 running x 3 blocks > 8 blocks
    assert metric(m, "qtool_kv_cache_blocks_used") == 0 and metric(m, "qtool_kv_cache_blocks_free") == 8


def test_disconnect_mid_stream_frees_blocks(server):
    aborts = metric(server.metrics(), "qtool_requests_total", status="abort")
    with server.http.stream("POST", "/v1/completions", headers={"authorization": f"Bearer {KEY}"},
                            json={"model": "tiny", "prompt": "Hello", "max_tokens": 50, "stream": True,
                                  "ignore_eos": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = server.metrics()
        if metric(m, "qtool_requests_total", status="abort") > aborts and metric(m, "qtool_kv_cache_blocks_used") == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the aborted request's blocks were not freed:\n" + m)
    assert metric(m, "qtool_generation_tokens_total") > 0 and metric(m, "qtool_num_requests_running") == 0


BAD = [  # (body or raw bytes, status, param)
    (b"{not json", 400, None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages"),   # lone surrogate
    (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 80}]}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": "x" * 5000}, 400, "stop"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=range(len(BAD)))
def test_bad_requests_are_4xx_openai_errors(server, body, status, param):
    h = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = server.http.post("/v1/chat/completions", headers=h,
                         content=body if isinstance(body, bytes) else json.dumps(body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param


def test_auth_routes_and_misc(server, client):
    import openai
    h = server.http
    assert h.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].root.endswith("llama")
    assert h.get("/v1/nothing", headers={"authorization": f"Bearer {KEY}"}).status_code == 404
    assert h.get("/version").json()["version"]
    tk = h.post("/tokenize", json={"prompt": "Water boils at"}, headers={"authorization": f"Bearer {KEY}"}).json()
    assert tk["count"] == len(tk["tokens"]) > 0 and tk["max_model_len"] == 64
    assert 'qtool_requests_total{model_name="tiny",status="401"}' in server.metrics()


def test_queue_full_is_429(server):
    import httpx
    h = {"authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 48, "ignore_eos": True}
    codes, headers = [], []

    def go():
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/v1/completions", json=body, headers=h)
            codes.append(r.status_code)
            headers.append(r.headers.get("x-should-retry"))
    threads = [threading.Thread(target=go) for _ in range(11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(200) >= 8 and 429 in codes          # 4 running + 4 waiting; the rest are refused
    assert all(x == "false" for c, x in zip(codes, headers) if c == 429)
    assert metric(server.metrics(), "qtool_kv_cache_blocks_used") == 0


def test_refusals_before_loading(tiny_models):
    from typer.testing import CliRunner
    from qtool.cli import app
    r = CliRunner().invoke(app, ["serve", str(tiny_models("llama")), "--kv-cache-dtype", "nvfp4", "--backend", "torch"])
    assert r.exit_code == 3 and "nvfp4" in r.stderr.lower() and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = CliRunner().invoke(app, ["serve", str(tiny_models("llama")), "--backend", "torch",
                                     "--port", str(s.getsockname()[1])])
    assert r.exit_code == 2 and "cannot listen" in r.stderr


def test_loading_state_in_process():
    """While the weights load: /health and every /v1 route answer 503 in OpenAI's error shape; the key is checked
    first; /version and /metrics answer."""
    from fastapi.testclient import TestClient
    from qtool.serve.app import ServerState, create_app
    state = ServerState(model_name="m", root="/nowhere", tok=None, api_key="k")
    with TestClient(create_app(state)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/chat/completions", json={}, headers={"authorization": "Bearer k"})
        assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert c.get("/version").status_code == 200 and c.get("/metrics").status_code == 200


def test_sampling_defaults_follow_generation_config():
    """Fields a request leaves out take generation_config.json's values (as vLLM), else OpenAI's defaults."""
    from qtool.serve.app import ServerState, _params
    from qtool.serve.schemas import CompletionRequest
    body = CompletionRequest(model="m", prompt="x")
    plain = _params(ServerState("m", "/", None, max_model_len=64), body, [1, 2], 4, False)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)
    st = ServerState("m", "/", None, max_model_len=64, sampling_defaults={"temperature": 0.6, "top_p": 0.9, "top_k": 20})
    got = _params(st, body, [1, 2], 4, False)
    assert (got.temperature, got.top_p, got.top_k) == (0.6, 0.9, 20)
    own = _params(st, CompletionRequest(model="m", prompt="x", temperature=0, top_p=1.0, top_k=0), [1, 2], 4, False)
    assert (own.temperature, own.top_p, own.top_k) == (0, 1.0, 0)


def test_mailbox_keeps_order_and_lets_closed_loops_go():
    """The engine thread's outputs reach each request's queue in posting order (4 posting threads, 32 queues on a
    running loop); posting to a closed loop keeps nothing, and a finished loop is not kept alive."""
    import asyncio
    import gc
    import weakref
    from qtool.serve.app import _Mailbox

    async def main():
        loop = asyncio.get_running_loop()
        box = _Mailbox.of(loop)
        assert _Mailbox.of(loop) is box
        queues = [asyncio.Queue() for _ in range(32)]

        def post(first):
            for n in range(500):
                for q in queues[first::4]:
                    box.post(q, n)
        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        got = [[await q.get() for _ in range(500)] for q in queues]
        for t in threads:
            t.join()
        assert all(g == list(range(500)) for g in got) and not box.items

    asyncio.run(main())
    loop = asyncio.new_event_loop()
    box, ref = _Mailbox.of(loop), weakref.ref(loop)
    loop.close()
    for n in range(100):
        box.post(asyncio.Queue(), n)
    assert not box.items and not box.pending
    del loop, box
    gc.collect()
    assert ref() is None


def test_bench_serve_reads_the_engine_split(server):
    """scripts/bench_serve.py's engine split: the counters come from this server's /metrics, and the split of a
    level's wall time is the counters' differences (hand-computed case)."""
    import asyncio
    import httpx
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_serve

    async def read():
        async with httpx.AsyncClient(timeout=30) as c:
            return await bench_serve.engine_counters(c, server.url)
    got = asyncio.run(read())
    assert got is not None and set(got) == set(bench_serve.ENGINE_COUNTERS) and min(got.values()) >= 0
    keys = bench_serve.ENGINE_COUNTERS           # step, prefill, decode seconds; decode steps, rows; forwards, positions
    before = dict.fromkeys(keys, 1.0)
    after = {k: 1.0 + d for k, d in zip(keys, (1.5, 0.5, 0.75, 10, 40, 2, 1000))}
    assert bench_serve.engine_split(before, after, 2.0) == {
        "prefill_pct": 25.0, "decode_pct": 37.5, "host_pct": 12.5, "idle_pct": 25.0, "decode_ms_per_step": 75.0,
        "mean_decode_batch": 4.0, "prefill_forwards": 2, "prefill_ms_per_forward": 250.0,
        "positions_per_prefill_forward": 500}
    assert bench_serve.engine_split(None, after, 2.0) is None
