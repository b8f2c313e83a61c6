"""The FastAPI app: OpenAI-compatible routes over the engine thread.

Contract: `create_app(state)` serves POST /v1/chat/completions, POST /v1/completions (SSE streams
ending `data: [DONE]`, or one JSON body), GET /v1/models, GET /health (503 until `state.ready`),
GET /version, POST /tokenize, GET /metrics. Every error is OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: 400 bad body / parameter / prompt longer than the
context, 401 missing or wrong API key (`state.api_key`; /health, /version, /metrics are public), 404
unknown model or route, 429 more than `state.max_waiting` queued (`x-should-retry: false`), 503 not
ready. A handler submits an `engine.Request` whose `on_output` hops to the event loop through the loop's
`_Mailbox` onto the request's own asyncio queue (one loop wake-up per batch of outputs, not per token: a decode
step's outputs cost one self-pipe write instead of one per row); when the client disconnects (stream
or not) or the handler ends early, the request is aborted and its blocks freed. Tokenization and chat templates
run on worker threads (a huge prompt does not stall the event loop); a stop string has at most 1024 chars. Sampling fields a request leaves
out take `state.sampling_defaults` (the checkpoint's generation_config.json, as vLLM), else OpenAI's.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qtool.serve.metrics import Metrics
from qtool.serve.schemas import ChatRequest, CompletionRequest, TokenizeRequest

PUBLIC = {"/health", "/version", "/metrics"}
MAX_STOP_CHARS = 1024      # the stop-string hold-back scans each stop's prefixes after every token


@dataclass
class ServerState:
    model_name: str
    root: str
    tok: object
    api_key: str | None = None
    max_waiting: int = 256
    engine: object = None
    max_model_len: int = 0
    ready: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    sampling_defaults: dict = field(default_factory=dict)   # generation_config.json's temperature/top_p/top_k
    metrics: Metrics = None

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = Metrics(self.model_name)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client text holding lone surrogates."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_response(state: ServerState, err: APIError) -> JSONResponse:
    state.metrics.status(err.status)
    return _AsciiJSON(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                        headers=err.headers)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "unavailable_error"}


class _Gate:
    """ASGI middleware (pure, so streaming and disconnects pass through untouched): the API key and the
    loading state of every non-public route."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC:
            return await self.app(scope, receive, send)
        st, err = self.state, None
        if st.api_key:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            auth = headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key")
            if key != st.api_key:
                err = APIError(401, "invalid or missing API key", "authentication_error")
        if err is None and not st.ready:
            err = APIError(503, "the model is loading", "unavailable_error")
        if err is not None:
            return await _error_response(st, err)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="qtool serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qtool = state

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(state, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, loc = "the request body is not valid JSON", []
        return _error_response(state, APIError(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}",
                                               param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        msg = "not found" if exc.status_code == 404 else str(exc.detail)
        return _error_response(state, APIError(exc.status_code, f"{request.method} {request.url.path}: {msg}",
                                               _TYPES.get(exc.status_code, "invalid_request_error")))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return _error_response(state, APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"))

    app.add_middleware(_Gate, state=state)

    @app.get("/health")
    async def health():
        if not state.ready:
            return JSONResponse(error_body("the model is loading", "unavailable_error", None, 503), status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        from qtool import __version__
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "qtool", "root": state.root, "parent": None,
                                            "max_model_len": state.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            _check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'")
        ids = await asyncio.to_thread(_chat_ids, state, body.messages) if body.messages is not None else \
            await asyncio.to_thread(_text_ids, state, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        arrival = time.monotonic()
        _check_model(state, body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if (body.top_logprobs or 0) > 1:
            raise APIError(400, "this server returns at most top_logprobs = 1", param="top_logprobs")
        ids = await asyncio.to_thread(_chat_ids, state, body.messages, body.add_generation_prompt)   # off the loop
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _params(state, body, ids, max_tokens, bool(body.logprobs))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await _respond(state, request, rid, ids, params, body, arrival, chat=True,
                              top_logprobs=body.top_logprobs or 0)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrival = time.monotonic()
        _check_model(state, body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if (body.logprobs or 0) > 1:
            raise APIError(400, "this server returns at most logprobs = 1 (the top-1 alternative)", param="logprobs")
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, "one prompt per request (n = 1)", param="prompt")
            p = p[0]
        if isinstance(p, str):
            ids = await asyncio.to_thread(_text_ids, state, p, True)
        else:
            vocab = state.engine.model.config.vocab_size
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            ids = list(p)
        params = _params(state, body, ids, body.max_tokens, body.logprobs is not None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await _respond(state, request, rid, ids, params, body, arrival, chat=False,
                              top_logprobs=body.logprobs or 0)

    return app


def _check_model(state: ServerState, name: str) -> None:
    if name not in (state.model_name, state.root):
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{state.model_name}'",
                       "not_found_error", "model", "model_not_found")


def _utf8(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: not valid Unicode text (a lone surrogate)", param=param)
    return text


def _text_ids(state: ServerState, text: str, special: bool) -> list[int]:
    return state.tok.encode(_utf8(text, "prompt"), add_special_tokens=special)


def _chat_ids(state: ServerState, messages, add_generation_prompt: bool = True) -> list[int]:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if not getattr(state.tok, "chat_template", None):
        raise APIError(400, "the model has no chat template: use /v1/completions, or start the server with "
                       "--chat-template", param="messages")
    try:
        msgs = [{"role": m.role, "content": _utf8(m.text(), "messages")} for m in messages]
        text = state.tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
    except APIError:
        raise
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages")
    except Exception as exc:  # noqa: BLE001 - jinja TemplateError and friends: the template refused the messages
        raise APIError(400, f"the chat template failed: {type(exc).__name__}: {exc}", param="messages")
    return state.tok.encode(text, add_special_tokens=False)


def _params(state: ServerState, body, ids: list[int], max_tokens: int | None, logprobs: bool):
    from qtool.engine.request import SamplingParams
    n, limit = len(ids), state.max_model_len
    if n == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    if n >= limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has {n}",
                       param="messages" if hasattr(body, "messages") else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = limit - n
    elif n + max_tokens > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens; you asked for {n} in the "
                       f"prompt + {max_tokens} to generate", param="max_tokens", code="context_length_exceeded")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    try:
        stop = [_utf8(x, "stop") for x in body.stop_list()]
        if any(len(x) > MAX_STOP_CHARS for x in stop):
            raise ValueError(f"stop: at most {MAX_STOP_CHARS} characters per sequence")
    except ValueError as exc:
        raise APIError(400, str(exc), param="stop")
    d = state.sampling_defaults           # a field the request leaves out: the checkpoint's, else OpenAI's default
    temperature = d.get("temperature", 1.0) if body.temperature is None else body.temperature
    top_p = d.get("top_p", 1.0) if body.top_p is None else body.top_p
    top_k = d.get("top_k", 0) if body.top_k is None else body.top_k
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(0, top_k),
                          top_p=top_p, seed=body.seed, stop=stop,
                          ignore_eos=body.ignore_eos, logprobs=logprobs)


class _Mailbox:
    """Outputs posted from the engine thread to one event loop: ``post(queue, out)`` appends under a lock and
    schedules one ``drain`` with ``call_soon_threadsafe`` only when none is pending, so the outputs of one engine
    step (one per running request) wake the loop once; ``drain`` (on the loop) puts them in posting order."""

    _by_loop: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, loop):
        self.loop = weakref.ref(loop)            # weak: the class-level map must not keep a finished loop alive
        self.lock, self.items, self.pending = threading.Lock(), [], False

    @classmethod
    def of(cls, loop) -> "_Mailbox":
        box = cls._by_loop.get(loop)
        if box is None:
            box = cls._by_loop[loop] = cls(loop)
        return box

    def post(self, queue: asyncio.Queue, out) -> None:
        with self.lock:
            self.items.append((queue, out))
            if self.pending:
                return
            self.pending = True
        loop = self.loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self.drain)
        except RuntimeError:                     # the event loop is closed or gone (shutdown): nobody will read
            with self.lock:
                self.items, self.pending = [], False

    def drain(self) -> None:
        with self.lock:
            items, self.items, self.pending = self.items, [], False
        for queue, out in items:
            queue.put_nowait(out)


class _Live:
    """One submitted request: its asyncio queue, its metrics (counted on the engine thread, so a request
    whose client is gone is still counted), and its abort when the handler ends before the request."""

    def __init__(self, state: ServerState, rid: str, ids: list[int], params, arrival: float):
        from qtool.engine.request import Request
        engine = state.engine
        if engine.queued() >= state.max_waiting:
            raise APIError(429, f"the server has {state.max_waiting} requests waiting; retry later",
                           "rate_limit_error", headers={"x-should-retry": "false"})
        self.state, self.arrival, self.last = state, arrival, None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.mailbox = _Mailbox.of(asyncio.get_running_loop())
        self.req = Request(rid, ids, params, on_output=self._on_output)
        self.done = False
        try:
            engine.add(self.req)
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt")

    def _on_output(self, out) -> None:          # engine thread
        m = self.state.metrics
        now = time.monotonic()
        if out.token_ids:
            (m.ttft if self.last is None else m.itl).labels(m.name).observe(now - (self.last or self.arrival))
            self.last = now
        if out.finished:
            m.status(out.finish_reason)
            m.prompt_tokens.labels(m.name).inc(out.prompt_tokens)
            m.generation_tokens.labels(m.name).inc(out.completion_tokens)
        self.mailbox.post(self.queue, out)

    async def next(self, request: Request | None = None):
        """The next Output; None when `request`'s client went away (checked every 0.5 s)."""
        while True:
            try:
                out = await asyncio.wait_for(self.queue.get(), 0.5 if request is not None else None)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            self.done = self.done or out.finished
            return out

    async def outputs(self):
        try:
            while True:
                out = await self.next()
                yield out
                if out.finished:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.state.engine.abort(self.req.id)


def _usage(p: int, c: int, cached: int) -> dict:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _token_str(tok, t: int) -> str:
    return tok.decode([t])


def _chat_logprobs(tok, lps, ids, top: int):
    if lps is None:
        return None
    content = []
    for (lp, top_id, top_lp), t in zip(lps, ids):
        s = _token_str(tok, t)
        alt = _token_str(tok, top_id)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": alt, "logprob": top_lp, "bytes": list(alt.encode())}][:top]})
    return {"content": content}


def _completion_logprobs(tok, lps, ids, offset: int, top: int):
    if lps is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for (lp, top_id, top_lp), t in zip(lps, ids):
        s = _token_str(tok, t)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({_token_str(tok, top_id): top_lp} if top else {})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


async def _respond(state, request: Request, rid: str, ids, params, body, arrival: float, chat: bool,
                   top_logprobs: int = 0):
    live = _Live(state, rid, ids, params, arrival)
    created = int(time.time())
    tok = state.tok
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": body.model}

    def lp_of(out, offset):
        if chat:
            return _chat_logprobs(tok, out.logprobs, out.token_ids, top_logprobs)
        return _completion_logprobs(tok, out.logprobs, out.token_ids, offset, top_logprobs)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def choice(text, out, offset, finish=None):
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": lp_of(out, offset) if out else None,
                        "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": lp_of(out, offset) if out else None,
                    "finish_reason": finish}

        def with_ids(ch, out):
            if body.return_token_ids:
                ch["token_ids"] = list(out.token_ids) if out else []
            return ch

        async def events():
            offset, p, c, cached = 0, len(ids), 0, 0
            if chat:
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            async for out in live.outputs():
                p, c, cached = out.prompt_tokens, out.completion_tokens, out.cached_tokens
                if out.finished:
                    if out.finish_reason == "abort":
                        yield sse(error_body("the request was cancelled by the server", "unavailable_error"))
                        break
                    yield sse({**head, "choices": [choice(None if chat else "", None, offset, out.finish_reason)]})
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": _usage(p, c, cached)})
                    break
                if out.text or out.logprobs or (body.return_token_ids and out.token_ids):
                    yield sse({**head, "choices": [with_ids(choice(out.text, out, offset), out)]})
                    offset += len(out.text)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    # non-stream: collect, watching for a client that went away
    text, token_ids, lps, finish, p, c, cached = [], [], [], None, len(ids), 0, 0
    try:
        while finish is None:
            out = await live.next(request)
            if out is None:
                return Response(status_code=499)
            p, c, cached = out.prompt_tokens, out.completion_tokens, out.cached_tokens
            text.append(out.text)
            token_ids += out.token_ids
            lps += out.logprobs or []
            finish = out.finish_reason if out.finished else None
    finally:
        live.close()
    if finish == "abort":
        raise APIError(503, "the request was cancelled by the server", "unavailable_error")
    full = "".join(text)
    lp = None
    if params.logprobs:
        from types import SimpleNamespace
        lp = lp_of(SimpleNamespace(logprobs=lps, token_ids=token_ids[:len(lps)]), 0)
    if chat:
        ch = {"index": 0, "message": {"role": "assistant", "content": full}, "logprobs": lp, "finish_reason": finish}
        obj = "chat.completion"
    else:
        ch = {"index": 0, "text": full, "logprobs": lp, "finish_reason": finish}
        obj = "text_completion"
    if body.return_token_ids:
        ch["token_ids"] = token_ids
    return {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [ch], "usage": _usage(p, c, cached)}
