"""`qtool serve MODEL`: an OpenAI-compatible HTTP server with continuous batching (qtool.engine).

Contract: resolves MODEL and runs the same support check as `qtool run` (exit 3 when refused) before
any weight loads; loads the tokenizer (--chat-template: a file or a literal Jinja template), binds
--host:--port (a port in use is a usage error), then loads the weights on a background thread while
/health answers 503. Start-up logs what loaded, the KV-cache capacity in tokens and the URL. The KV
cache gets --num-kv-blocks blocks, else on CUDA what --gpu-memory-utilization of the card leaves after
the weights (minus a 2 GiB reserve), else (CPU) room for min(--max-num-seqs, 8) sequences of
--max-model-len. The API key comes from --api-key or QTOOL_API_KEY. SIGINT / SIGTERM stop accepting,
give in-flight requests up to 30 s, cancel the rest and exit 0. fastapi/uvicorn/torch load inside.
"""
from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path
from typing import Optional

import typer

from qtool.commands._common import guarded, info, warn
from qtool.commands._options import EXIT_CODES_HELP
from qtool.commands.run import BackendChoice, KvDtype
from qtool.errors import Failure, UsageError

EPILOG = ('Examples:  qtool serve ./SmolLM2-fp8  |  qtool serve ./Llama-3.1-8B-fp8 --port 8080 --api-key sk-local  |  '
          'curl localhost:8000/v1/chat/completions -H "content-type: application/json" '
          "-d '{\"model\": \"SmolLM2-fp8\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'.  "
          + EXIT_CODES_HELP)


def _check_port(host: str, port: int) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="pick another --port, or stop the process that holds it")


def _chat_template(value: str) -> str:
    p = Path(value)
    if "{" not in value and p.is_file():
        return p.read_text(encoding="utf-8")
    if "{" not in value:
        raise UsageError(f"--chat-template {value}: no such file (give a file or a Jinja template)")
    return value


@guarded
def serve(
    model: str = typer.Argument(..., help="Model folder, hub id (org/name) or built-in name (smollm2-135m)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 = every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="QTOOL_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 routes (also QTOOL_API_KEY)."),
    backend: BackendChoice = typer.Option(BackendChoice.auto, "--backend",
                                          help="cuda (CuPy kernels), torch (CPU float32 reference), auto = cuda when a GPU and CuPy are present."),
    kv_cache_dtype: KvDtype = typer.Option(KvDtype.auto, "--kv-cache-dtype",
                                           help="KV cache storage: auto = the checkpoint's; fp8 works for any checkpoint; nvfp4 needs a checkpoint quantized for it."),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", min=1, max=1024, help="Most sequences decoded together."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=2,
                                                help="Most tokens (prompt + output) per request; default the model's context."),
    max_num_batched_tokens: int = typer.Option(2048, "--max-num-batched-tokens", min=16,
                                               help="Token budget of one scheduler step (prefill chunks + decode rows)."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", min=0.05, max=0.99,
                                                 help="Fraction of the GPU's memory qtool may use (weights + KV cache + activations)."),
    num_kv_blocks: Optional[int] = typer.Option(None, "--num-kv-blocks", min=2, help="Override the KV-cache size in blocks."),
    block_size: int = typer.Option(16, "--block-size", min=1, max=256, help="Positions per KV-cache block."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The model id clients send (default: a folder's name; a hub id or built-in name as typed)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="A Jinja chat template, or a file holding one."),
    max_waiting: int = typer.Option(256, "--max-waiting", min=0, help="Queued requests beyond this get 429."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching",
                                        help="Reuse the KV blocks of prompt prefixes seen before (shared system prompts, conversations)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse anything the hardware matrix does not mark Y for the local GPU."),
    force: bool = typer.Option(False, "--force", help="Serve a checkpoint the model matrix refuses (with a warning)."),
):
    """Serve a (quantized) checkpoint over an OpenAI-compatible HTTP API."""
    from qtool.commands.run import resolve_and_check
    c = resolve_and_check(model, backend.value, kv_cache_dtype.value, strict, force, warn)
    folder, kv, scheme = c.folder, c.kv, c.scheme
    limit = int(c.config.get("max_position_embeddings") or 0) or None
    if max_model_len and limit and max_model_len > limit:
        raise UsageError(f"--max-model-len {max_model_len} is beyond the model's {limit} positions")
    from qtool.runtime.chat import eos_ids, load_tokenizer
    tok = load_tokenizer(folder)
    if chat_template:
        tok.chat_template = _chat_template(chat_template)
    _check_port(host, port)

    import uvicorn
    from qtool.serve.app import ServerState, create_app
    name = served_model_name or (Path(str(folder)).name if Path(model).exists() else model)   # hub id / built-in as typed
    from qtool.commands.run import sampling_params
    values, sources = sampling_params(folder, {})
    defaults = {k: v for k, v in values.items() if sources[k] != "default"}
    state = ServerState(model_name=name, root=str(folder), tok=tok, api_key=api_key or None, max_waiting=max_waiting,
                        sampling_defaults=defaults)
    if defaults:
        info(f"sampling defaults from generation_config.json: {defaults} (a request's own values win)")
    holder: dict = {}

    def load() -> None:
        try:
            import torch
            from qtool.engine.engine import Engine, EngineLoop, kv_cache_blocks
            from qtool.runtime.backends import make_backend
            from qtool.runtime.loader import load_weights
            from qtool.runtime.model import Model
            weights = load_weights(c.files, scheme, progress=False)
            if kv in ("fp8", "nvfp4") and any(L.k_scale is None or L.v_scale is None for L in weights.layers):
                warn(f"the checkpoint has no calibrated k_scale/v_scale: the {kv} KV cache uses scale 1.0")
            be = make_backend(c.be_name)
            with torch.inference_mode():
                net = Model(weights, be)
            length = max_model_len or limit or 4096
            blocks = num_kv_blocks or kv_cache_blocks(be, block_size, kv, gpu_memory_utilization,
                                                      cpu_tokens=length * min(max_num_seqs, 8))
            if (blocks - 1) * block_size < length:
                warn(f"the KV cache holds {max(0, blocks - 1) * block_size} tokens, less than --max-model-len {length}: "
                     "requests are limited to what fits")
            if blocks < 2:
                raise Failure("no memory is left for the KV cache",
                              hint="raise --gpu-memory-utilization or lower --max-model-len")
            engine = Engine(net, tok, kv, eos_ids(tok, weights.config.eos_token_ids), num_blocks=blocks,
                            block_size=block_size, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, max_model_len=length,
                            prefix_caching=prefix_caching)
            if be.device.type == "cuda":
                engine.warmup()           # kernels compiled, decode graphs captured before /health says ok
            state.engine, state.max_model_len = engine, engine.max_model_len
            state.metrics.bind(engine)
            holder["loop"] = EngineLoop(engine, on_error=lambda e: warn(f"engine step failed: {type(e).__name__}: {e}"))
            holder["loop"].start()
            state.ready = True
            info(f"loaded {folder} ({scheme.summary()}, {weights.nbytes() / 2**30:.2f} GiB) on backend {be.name}; "
                 f"KV cache {kv}: {engine.capacity_tokens} tokens ({blocks - 1} blocks of {block_size}); "
                 f"max model len {engine.max_model_len}, max {max_num_seqs} sequences")
            info(f"serving '{name}' at http://{host}:{port}/v1 (Ctrl-C stops)")
        except BaseException as exc:  # noqa: BLE001 - reported on the main thread
            holder["error"] = exc
            server.should_exit = True

    from contextlib import asynccontextmanager, contextmanager

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, name="qtool-load", daemon=True).start()
        yield
        loop = holder.get("loop")
        if loop is not None:
            loop.stop()
            loop.engine.abort_all()

    class _Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            """SIGINT / SIGTERM start the graceful shutdown (a second one forces it), and the process then
            exits 0 (uvicorn's own handler re-raises the signal after shutting down)."""
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    app = create_app(state, lifespan=lifespan)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                            lifespan="on")
    server = _Server(config)
    info(f"qtool serve: loading {folder} (backend {c.be_name}, KV {kv}); /health answers 503 until ready")
    server.run()
    if "error" in holder:
        raise holder["error"]
    info("qtool serve: stopped")
