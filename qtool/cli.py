"""The `qtool` command line: registers the commands and the global --debug flag.

Contract: importing this module imports typer, rich and the light command modules only (no torch,
transformers, modelopt or cupy), so `qtool --help` and `qtool matrix` start instantly. Each
command module imports its heavy dependencies inside the command body.
"""
from __future__ import annotations

import typer

from qtool import __version__
from qtool.commands import _common
from qtool.commands._options import EXIT_CODES_HELP
from qtool.commands import eval as eval_cmd
from qtool.commands import inspect as inspect_cmd
from qtool.commands import matrix as matrix_cmd
from qtool.commands import quantize as quantize_cmd
from qtool.commands import run as run_cmd
from qtool.commands import serve as serve_cmd

app = typer.Typer(
    name="qtool",
    help="Quantize LLMs with NVIDIA ModelOpt, inspect quantized checkpoints, and run them.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
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


def main() -> None:
    app()
