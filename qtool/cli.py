"""The `qtool` command line: registers the commands and the global --debug flag.

Contract: importing this module imports typer, rich and the light command modules only (no torch,
transformers, modelopt or cupy), so `qtool --help` and `qtool matrix` start instantly. Each
command module imports its heavy dependencies inside the command body. Click's own errors (bad
or missing option values, unknown options or commands) and Ctrl-C outside a command take the same
path as QtoolError (`_common.report_click_error`): one `error:` line, a `hint:`, exit 2 (130 for
Ctrl-C), and the JSON error on stdout when `--json` is among the arguments. Shell completion:
`qtool --install-completion` / `--show-completion`. `main` (the console script and `python -m qtool`) ends a
process that has loaded torch with `os._exit` once the command has returned, after running the atexit
handlers and flushing stdout/stderr: the interpreter's teardown of torch's modules and of the loaded weights
(~0.5 s on a 2-core CPU) is skipped; with other non-daemon threads alive, or under a profiler, debugger or
coverage tool, it exits normally.
"""
from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from qtool import __version__
from qtool.commands import _common
from qtool.commands._options import EXIT_CODES_HELP
from qtool.commands import eval as eval_cmd
from qtool.commands import inspect as inspect_cmd
from qtool.commands import matrix as matrix_cmd
from qtool.commands import quantize as quantize_cmd
from qtool.commands import chat as chat_cmd
from qtool.commands import run as run_cmd
from qtool.commands import serve as serve_cmd


class _QtoolGroup(TyperGroup):
    """Runs click in non-standalone mode so its usage errors reach qtool's one-line reporter."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        rv = _common.run_click(lambda: super(_QtoolGroup, self).main(
            args=argv, prog_name=prog_name or "qtool", complete_var=complete_var, standalone_mode=False, **extra), argv)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="qtool",
    cls=_QtoolGroup,
    help="Quantize LLMs with NVIDIA ModelOpt, inspect quantized checkpoints, and run them.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(flag: bool):
    if flag:
        typer.echo(f"qtool {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    _common.set_debug(debug)


app.command("matrix", epilog=matrix_cmd.EPILOG)(matrix_cmd.matrix)
app.command("quantize", epilog=quantize_cmd.EPILOG)(quantize_cmd.quantize)
app.command("inspect", epilog=inspect_cmd.EPILOG)(inspect_cmd.inspect)
app.command("run", epilog=run_cmd.EPILOG)(run_cmd.run)
app.command("eval", epilog=eval_cmd.EPILOG)(eval_cmd.eval)
app.command("serve", epilog=serve_cmd.EPILOG)(serve_cmd.serve)
app.command("chat", epilog=chat_cmd.EPILOG)(chat_cmd.chat)


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code
    _exit(code)


def _exit(code) -> None:
    """Exit with `code` (SystemExit's convention); skip the interpreter's teardown when torch is loaded."""
    import threading
    if "torch" not in sys.modules or sys.getprofile() is not None or sys.gettrace() is not None or \
            any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)          # also under a profiler, debugger or coverage tool: they write their data at exit
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit
    import os
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):       # a closed pipe: what the interpreter's own exit reports as 120
            code = code or 120
    os._exit(code)
