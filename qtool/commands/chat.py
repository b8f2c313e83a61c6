"""`qtool chat MODEL`: an interactive multi-turn chat on qtool's runtime (the model loads once).

Contract: loads MODEL through `run.open_session` (same checks, exit codes and warnings as `qtool run`),
then reads user turns line by line from stdin (a `> ` prompt on stderr when stdin is a terminal) until
EOF or `/exit` (`/quit`). Each turn renders the whole conversation so far (optional `--system` message,
every earlier user and assistant turn) with the chat template (no template: the turns joined raw, with a
warning) and streams the reply on stdout, then a newline. `/reset` forgets the conversation (the system
message stays); `/help` lists the commands. Sampling flags and generation_config.json defaults are as for
`qtool run`. `qtool run MODEL` with no prompt on a terminal runs this loop.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import typer

from qtool.commands._common import check_text, guarded, info, warn
from qtool.commands._options import EXIT_CODES_HELP
from qtool.commands.run import (BACKEND_OPT, FORCE_OPT, KV_OPT, MAX_NEW_OPT, SEED_OPT, STOP_OPT, STRICT_OPT,
                                SYSTEM_OPT, TEMPERATURE_OPT, TOP_K_OPT, TOP_P_OPT, BackendChoice, KvDtype)

EPILOG = ("Examples:  qtool chat smollm2-135m  |  qtool chat ./SmolLM2-fp8 --system 'Answer in one sentence.'  |  "
          "printf 'Hi\\nAnd again?\\n' | qtool chat ./model --max-new-tokens 64.  "
          "In the chat: /reset forgets the conversation, /exit (or Ctrl-D) ends it.  " + EXIT_CODES_HELP)

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
    from qtool.commands import run as run_cmd
    from qtool.runtime import generate as gen
    from qtool.runtime.chat import conversation_ids, has_chat_template

    s = run_cmd.open_session(model, backend, kv_cache_dtype, strict, force, quiet=False)
    if not has_chat_template(s.tok):
        s.note("the tokenizer has no chat template: the turns are sent joined as raw text")
    sampling, _ = run_cmd.sampling_params(s.folder, {"temperature": temperature, "top_p": top_p, "top_k": top_k})
    opts = gen.GenerateOptions(max_new_tokens=max_new_tokens, seed=seed, stop=list(stop or []), **sampling)
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    interactive = run_cmd.stdin_is_terminal()
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
def chat(
    model: str = typer.Argument(..., help="Model folder, hub id (org/name) or built-in name (smollm2-135m)."),
    system: Optional[str] = SYSTEM_OPT,
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
):
    """Chat with a (quantized) checkpoint: multi-turn, streamed, the model loaded once."""
    check_text(system, "--system")
    check_text(model, "MODEL")
    chat_loop(model, backend, kv_cache_dtype, strict, force, max_new_tokens, temperature, top_k, top_p, seed,
              stop, system)
