"""`qtool run MODEL "prompt"`: generate text with qtool's own runtime (CUDA kernels or the CPU reference).

Contract: resolves MODEL (local folder, built-in name, or hub id via qtool.sources), describes the
checkpoint once from its JSON and tensor headers (qtool.checkpoint.scheme.describe, what `inspect`
reports) to find the family rows and the recipes, picks the KV-cache dtype, and runs the support check (model matrix + recipe rules: refused → exit 3 unless
--force; hardware matrix for the local GPU: a warning, refused with --strict) BEFORE any weight is
loaded; prompts are encoded and checked against the model's context (exit 2) before it too. Then hands the
files and that description to the loader (weights kept in their quantized form), builds the backend (auto =
cuda when a GPU and CuPy are usable, else the float32 CPU reference), and generates. Prompts: the PROMPT
argument, --prompts FILE ('-' = stdin), else stdin when it is not a terminal, else an interactive chat
(qtool.commands.chat); all text input must be UTF-8 (else exit 2 naming the argument or file and the byte offset).
--prompts (any number of prompts) runs on qtool.engine (`engine.offline.run_batch`: the continuous-batching
scheduler, paged KV cache and kernels of `qtool serve`), streams nothing and prints the answers in prompt
order. One prompt (the argument or stdin text) runs on `runtime.generate.generate`, streamed: its decode
is the backend's `decode_loop` (one captured graph of step + sampling, queued one step ahead of the host),
which `qtool run`'s decode tok/s is held to (>= 90 % of scripts/bench_decode.py, issue #16); an engine step
does its host work (~40 us at batch 1, bench/engine_step_overhead.py) and a blocking read-back between two
decode graphs, so the GPU idles for it at every token.
Either way: one stats line on stderr, or one JSON document with --json. temperature / top_p / top_k: the
flag, else generation_config.json, else greedy defaults (the JSON says which and from where); with --seed
each prompt samples with its own generator, so a prompt's answer does not depend on the others.
`open_session` is the setup `chat` shares. torch/transformers/cupy are imported inside the command only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from qtool.commands._common import guarded, info, print_json, stdout, warn
from qtool.commands._options import EXIT_CODES_HELP, KvDtype
from qtool.errors import Unsupported, UsageError

EPILOG = ('Examples:  qtool run ./SmolLM2-fp8-nvfp4kv "What is the capital of France?"  |  '
          'qtool run smollm2-135m "Hello" --kv-cache-dtype fp8  |  '
          'qtool run ./model "Once upon a time" --raw --temperature 0.8 --top-p 0.9 --seed 1  |  '
          'qtool run ./model --prompts prompts.jsonl --json  |  echo "Hi" | qtool run ./model  |  '
          'qtool run ./model (no prompt on a terminal: an interactive chat, as qtool chat).  ' + EXIT_CODES_HELP)


class BackendChoice(str, Enum):
    auto = "auto"
    cuda = "cuda"
    torch = "torch"


def _kv_choice(asked: str, ckpt_kv: str | None, source: str) -> str:
    if asked == "auto":
        return ckpt_kv if ckpt_kv in ("fp8", "nvfp4") else "bf16"
    if asked == "nvfp4" and ckpt_kv != "nvfp4":
        raise Unsupported(
            "--kv-cache-dtype nvfp4 needs a checkpoint calibrated for an NVFP4 KV cache; this one "
            + (f"has a {ckpt_kv} KV cache" if ckpt_kv else "has no KV-cache quantization"),
            hint=f"produce one with: qtool quantize --model {source} --quant fp8 --kv-cache-quant nvfp4 --output OUT_DIR")
    return asked


def _backend_label(name: str) -> str:
    return "torch (PyTorch reference, float32 on CPU)" if name == "torch" else name


def resolve_and_check(model: str, backend: str, kv_cache_dtype: str, strict: bool, force: bool, note,
                      progress: bool = True):
    """Resolve MODEL, describe it and run the support check (model matrix, recipe rules, hardware matrix)
    before any weight is read (`qtool run` and `qtool serve`). Raises Unsupported (exit 3); `note(msg)`
    gets the warnings. Returns folder, files, config, scheme, recipes, kv, be_name."""
    from types import SimpleNamespace
    from qtool.checkpoint.files import open_checkpoint
    from qtool.checkpoint.scheme import describe
    from qtool.sources import resolve_model_source
    from qtool.support.check import check_request, enforce
    from qtool.support.families import rows_for_config
    from qtool.runtime.backends import cuda_usable, make_backend, resolve_backend_name
    src = resolve_model_source(model, progress=progress)
    folder = src.path
    files = open_checkpoint(str(folder))
    if src.kind == "hub":
        files.source = model
    config = files.config
    rows = rows_for_config(config)
    scheme = describe(files)             # the description inspect prints; the loader gets it as is
    recipes = scheme.checked_recipes()
    kv = _kv_choice(kv_cache_dtype, scheme.kv_recipe, model)
    be_name = resolve_backend_name(backend)
    if be_name == "cuda" and not cuda_usable()[0]:
        make_backend("cuda")      # raises the one-line Failure
    arch = None
    if be_name == "cuda":
        from qtool.support.gpus import local_gpu
        arch = local_gpu()
    kv_recipe = None if kv == "bf16" else kv
    for weight_recipe in recipes or [None]:
        msg = enforce(check_request(rows, weight_recipe, kv_recipe, None), force)
        if msg:
            note(msg)
        if arch is not None:
            hw = check_request(None, weight_recipe, kv_recipe, arch)
            if not hw.supported:
                if strict:
                    raise Unsupported(hw.message(), hint="drop --strict to run it on qtool's kernels anyway")
                note("hardware matrix: " + hw.message() + " (running on qtool's own kernels anyway; --strict refuses)")
    if strict and arch is None and be_name == "torch":
        note("--strict: no GPU in use, so the hardware matrix does not apply to the CPU reference backend")
    from qtool.runtime.families import family_class
    family_class(SimpleNamespace(family=config.get("model_type", "?")))     # model code exists (else exit 3)
    return SimpleNamespace(folder=folder, files=files, config=config, scheme=scheme, recipes=recipes, kv=kv,
                           be_name=be_name)


# Options shared with `qtool chat` (typer reads them from each signature).
BACKEND_OPT = typer.Option(BackendChoice.auto, "--backend",
                           help="cuda (CuPy kernels), torch (CPU float32 reference), auto = cuda when a GPU and CuPy are present.")
KV_OPT = typer.Option(KvDtype.auto, "--kv-cache-dtype",
                      help="KV cache storage: auto = the checkpoint's; fp8 works for any checkpoint; nvfp4 needs a checkpoint quantized for it.")
STRICT_OPT = typer.Option(False, "--strict", help="Refuse anything the hardware matrix does not mark Y for the local GPU.")
FORCE_OPT = typer.Option(False, "--force", help="Run a request the model matrix refuses (with a warning).")
MAX_NEW_OPT = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens to generate per prompt.")
TEMPERATURE_OPT = typer.Option(None, "--temperature", min=0.0,
                               help="0 = greedy. Default: generation_config.json's, else 0.")
TOP_K_OPT = typer.Option(None, "--top-k", min=0,
                         help="Sample among the k most likely tokens (0 = all). Default: generation_config.json's, else 0.")
TOP_P_OPT = typer.Option(None, "--top-p", min=0.0, max=1.0,
                         help="Nucleus sampling mass (1 = all). Default: generation_config.json's, else 1.")
SEED_OPT = typer.Option(None, "--seed", help="Seed for sampling.")
STOP_OPT = typer.Option(None, "--stop", help="Stop when this text appears (repeatable).")
SYSTEM_OPT = typer.Option(None, "--system", help="System message for the chat template.")

_SAMPLING_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


def sampling_params(folder: Path, flags: dict) -> tuple[dict, dict]:
    """(values, source of each) for temperature/top_p/top_k: the flag, else generation_config.json, else qtool's
    default (greedy), as vLLM's --generation-config auto. do_sample: false in the config means greedy."""
    from qtool.checkpoint.files import read_json
    gc = read_json(folder / "generation_config.json") or {}
    values, source = {}, {}
    for key, default in _SAMPLING_DEFAULTS.items():
        if flags.get(key) is not None:
            values[key], source[key] = type(default)(flags[key]), "flag"
        elif isinstance(gc.get(key), (int, float)) and not isinstance(gc.get(key), bool) and \
                not (key == "temperature" and gc.get("do_sample") is False):
            values[key], source[key] = type(default)(gc[key]), "generation_config.json"
        elif key == "temperature" and gc.get("do_sample") is False:
            values[key], source[key] = 0.0, "generation_config.json (do_sample false)"
        else:
            values[key], source[key] = default, "default"
    return values, source


@dataclass
class Session:
    """A loaded model ready to generate (what `run` and `chat` share)."""
    folder: Path
    scheme: object
    recipes: list
    kv: str
    tok: object
    weights: object
    net: object
    backend: object
    eos: set
    warnings: list

    def note(self, msg: str) -> None:
        self.warnings.append(msg)
        warn(msg)


def open_session(model: str, backend: BackendChoice, kv_cache_dtype: KvDtype, strict: bool, force: bool,
                 quiet: bool, warnings: list | None = None, before_load=None) -> Session:
    """Resolve, describe and check MODEL (exit 3 refusals before any weight is read), load the tokenizer
    (`before_load(tok, context)` may encode and check prompts then; context = the model's positions), then the
    weights and the backend."""
    warnings = [] if warnings is None else warnings

    def note(msg: str) -> None:
        warnings.append(msg)
        warn(msg)

    c = resolve_and_check(model, backend.value, kv_cache_dtype.value, strict, force, note, progress=not quiet)
    folder, files, scheme, recipes, kv = c.folder, c.files, c.scheme, c.recipes, c.kv
    from qtool.runtime.backends import make_backend
    from qtool.runtime.chat import eos_ids, load_tokenizer
    tok = load_tokenizer(folder)
    if before_load is not None:
        from qtool.runtime.loader import model_config
        before_load(tok, model_config(files.config, files.generation_config, files.tensors).max_position_embeddings)

    # 2. load and build
    from qtool.runtime.loader import load_weights
    weights = load_weights(files, scheme, progress=not quiet)
    if weights.kv_scale_warning(kv):       # every layer whose k/v scale is 1.0, named
        note(weights.kv_scale_warning(kv))
    be = make_backend(c.be_name)
    if be.name == "torch":
        info("backend: torch — the PyTorch reference (float32 on CPU); it defines the numerics and is slow")
    from qtool.runtime.model import Model
    return Session(folder, scheme, recipes, kv, tok, weights, Model(weights, be), be,
                   eos_ids(tok, weights.config.eos_token_ids), warnings)


def stdin_is_terminal() -> bool:
    return sys.stdin is None or sys.stdin.isatty()


def _read_stdin() -> str:
    from qtool.commands._common import decode_utf8
    stream = getattr(sys.stdin, "buffer", None)
    return decode_utf8(stream.read(), "stdin") if stream is not None else sys.stdin.read()


def _prompt_texts(prompt: str | None, prompts: str | None) -> list[str] | None:
    """The prompts: the argument, --prompts FILE or '-' (stdin), else stdin text; None = interactive (a terminal)."""
    from qtool.commands._common import check_text, decode_utf8
    from qtool.runtime.chat import parse_prompts
    if prompt is not None and prompts is not None:
        raise UsageError("give either a PROMPT argument or --prompts FILE, not both")
    if prompt is not None:
        return [check_text(prompt, "the PROMPT argument")]
    if prompts == "-":
        return parse_prompts(_read_stdin(), "stdin (--prompts -)")
    if prompts is not None:
        p = Path(check_text(prompts, "--prompts"))
        if not p.is_file():
            raise UsageError(f"--prompts file not found: {prompts}")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise UsageError(f"--prompts {prompts}: cannot read ({exc.strerror or exc})") from None
        return parse_prompts(decode_utf8(data, f"--prompts {prompts}"), str(prompts))
    if stdin_is_terminal():
        return None
    text = _read_stdin()
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise UsageError("no prompt: give a PROMPT argument, --prompts FILE, or text on stdin",
                         hint="qtool chat MODEL talks interactively")
    return [text]


# ---------------------------------------------------------------- the interactive chat (`qtool chat`, `run` on a tty)

HELP = "commands: /reset (forget the conversation), /exit or /quit (end; Ctrl-D too), /help"


def _read_turn(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")    # readline editing on a terminal; the prompt goes to stdout only there
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def chat_loop(model: str, backend: BackendChoice, kv_cache_dtype: KvDtype, strict: bool, force: bool,
              max_new_tokens: int, temperature, top_k, top_p, seed, stop, system) -> None:
    from qtool.commands._common import check_text
    from qtool.runtime import generate as gen
    from qtool.runtime.chat import conversation_ids, has_chat_template

    s = open_session(model, backend, kv_cache_dtype, strict, force, quiet=False)
    if not has_chat_template(s.tok):
        s.note("the tokenizer has no chat template: the turns are sent joined as raw text")
    sampling, _ = sampling_params(s.folder, {"temperature": temperature, "top_p": top_p, "top_k": top_k})
    opts = gen.GenerateOptions(max_new_tokens=max_new_tokens, seed=seed, stop=list(stop or []), **sampling)
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    interactive = stdin_is_terminal()
    if interactive:
        info(f"chatting with {s.folder.name} — {HELP}")

    def on_text(row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        line = _read_turn(interactive)
        if line is None:
            break
        check_text(line, "the chat input")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            messages = list(base)
            info("(conversation reset)")
            continue
        if cmd == "/help":
            info(HELP)
            continue
        if cmd.startswith("/") and " " not in cmd:
            warn(f"unknown command {cmd}; {HELP}")
            continue
        messages.append({"role": "user", "content": line})
        ids = conversation_ids(s.tok, messages)
        (result,), _ = gen.generate(s.net, s.tok, [ids], opts, s.kv, s.eos, on_text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": result.text})


@guarded
def run(
    model: str = typer.Argument(..., help="Model folder, hub id (org/name) or built-in name (smollm2-135m)."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt. Omitted: --prompts, else text on stdin, "
                                                      "else (on a terminal) an interactive chat."),
    backend: BackendChoice = BACKEND_OPT,
    kv_cache_dtype: KvDtype = KV_OPT,
    strict: bool = STRICT_OPT,
    force: bool = FORCE_OPT,
    max_new_tokens: int = MAX_NEW_OPT,
    temperature: Optional[float] = TEMPERATURE_OPT,
    top_k: Optional[int] = TOP_K_OPT,
    top_p: Optional[float] = TOP_P_OPT,
    seed: Optional[int] = SEED_OPT,
    stop: Optional[List[str]] = STOP_OPT,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is (no chat template)."),
    system: Optional[str] = SYSTEM_OPT,
    prompts: Optional[str] = typer.Option(None, "--prompts",
                                          help="File of prompts ('-' = stdin): one per line, or JSON lines with a 'prompt' field."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document (completions + stats)."),
):
    """Generate text from a (quantized) checkpoint on qtool's runtime."""
    from qtool.commands._common import check_text
    check_text(system, "--system")
    check_text(stop, "--stop")
    check_text(model, "MODEL")
    texts = _prompt_texts(prompt, prompts)
    if texts is None:                  # no prompt on a terminal: the interactive chat
        return chat_loop(model, backend, kv_cache_dtype, strict, force, max_new_tokens, temperature, top_k, top_p,
                         seed, stop, system)
    ids: list = []

    def encode(tok, context: int) -> None:
        from qtool.runtime.chat import has_chat_template, prompt_ids
        from qtool.runtime.generate import check_prompt_lengths
        if not raw and not has_chat_template(tok):
            session_warnings.append("the tokenizer has no chat template: the prompt is sent as is (as with --raw)")
            warn(session_warnings[-1])
        ids.extend(prompt_ids(tok, t, system, raw) for t in texts)
        check_prompt_lengths([len(i) for i in ids], context)

    session_warnings: list[str] = []
    s = open_session(model, backend, kv_cache_dtype, strict, force, json_output, session_warnings, encode)
    sampling, sources = sampling_params(s.folder, {"temperature": temperature, "top_p": top_p, "top_k": top_k})
    from qtool.runtime.generate import GenerateOptions, stats_line
    opts = GenerateOptions(max_new_tokens=max_new_tokens, seed=seed, stop=list(stop or []), **sampling)
    if prompts is not None:            # a batch: the engine's scheduler and kernels, as `qtool serve`
        from qtool.engine.offline import run_batch
        results, stats = run_batch(s.net, s.tok, ids, opts, s.kv, s.eos)
        if not json_output:
            for i, (t, r) in enumerate(zip(texts, results)):
                stdout.print(f"[bold]--- [{i}] {t}[/bold]", markup=True)
                sys.stdout.write(r.text + "\n")
    else:                              # one prompt, streamed on the pipelined decode loop (see the docstring)
        from qtool.runtime.generate import generate

        def on_text(row: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        results, stats = generate(s.net, s.tok, ids, opts, s.kv, s.eos, None if json_output else on_text)
        if not json_output:
            sys.stdout.write("\n")
    info(stats_line(stats, _backend_label(s.backend.name)))
    if json_output:
        print_json({"ok": True, "model": str(s.folder), "checkpoint": s.scheme.summary(),
                    "weight_recipe": s.scheme.recipe or "bf16", "recipes": s.recipes,
                    "backend": s.backend.name, "kv_cache_dtype": s.kv, "warnings": s.warnings,
                    "sampling": {**sampling, "seed": seed, "source": sources},
                    "completions": [{"prompt": t, "text": r.text, "prompt_tokens": r.prompt_tokens,
                                     "generated_tokens": len(r.token_ids), "finish_reason": r.finish_reason}
                                    for t, r in zip(texts, results)],
                    "stats": stats.as_dict()})
