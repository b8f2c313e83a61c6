"""`qtool chat MODEL`: an interactive multi-turn chat on qtool's runtime (the model loads once).

Contract: runs `run.chat_loop` (in run.py, which `run` with no prompt on a terminal also calls, so the two
modules import each other in one direction only): it loads MODEL through `run.open_session` (same checks, exit codes and warnings as `qtool run`),
then reads user turns line by line from stdin (a `> ` prompt on stderr when stdin is a terminal) until
EOF or `/exit` (`/quit`). Each turn renders the whole conversation so far (optional `--system` message,
every earlier user and assistant turn) with the chat template (no template: the turns joined raw, with a
warning) and streams the reply on stdout, then a newline. `/reset` forgets the conversation (the system
message stays); `/help` lists the commands. Sampling flags and generation_config.json defaults are as for
`qtool run`. `qtool run MODEL` with no prompt on a terminal runs this loop.
"""
from __future__ import annotations

from typing import List, Optional

import typer

from qtool.commands._common import check_text, guarded
from qtool.commands._options import EXIT_CODES_HELP
from qtool.commands.run import (BACKEND_OPT, FORCE_OPT, KV_OPT, MAX_NEW_OPT, SEED_OPT, STOP_OPT, STRICT_OPT,
                                SYSTEM_OPT, TEMPERATURE_OPT, TOP_K_OPT, TOP_P_OPT, BackendChoice, KvDtype, chat_loop)

EPILOG = ("Examples:  qtool chat smollm2-135m  |  qtool chat ./SmolLM2-fp8 --system 'Answer in one sentence.'  |  "
          "printf 'Hi\\nAnd again?\\n' | qtool chat ./model --max-new-tokens 64.  "
          "In the chat: /reset forgets the conversation, /exit (or Ctrl-D) ends it.  " + EXIT_CODES_HELP)

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
