"""Shared plumbing for CLI commands: consoles, error reporting, JSON output.

Contract: decorate every command function with ``@guarded``. A QtoolError becomes one line on
stderr (``error: …`` and optionally ``hint: …``) and its exit code; with ``--json`` the error is
also printed on stdout as ``{"ok": false, "error": {...}}``. Any other exception is reported in
one line with exit 1 unless ``--debug`` (or QTOOL_DEBUG=1) asks for the traceback. Ctrl-C exits 130.
"""
from __future__ import annotations

import functools
import json
import os
import sys

import typer
from rich.console import Console

from qtool.errors import QtoolError, first_line

stdout = Console(highlight=False, soft_wrap=True)
if stdout.width < 120:  # wide tables (the matrices) need ~110 columns; a pipe or narrow terminal gets 120
    stdout = Console(highlight=False, soft_wrap=True, width=120)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

_state = {"debug": os.environ.get("QTOOL_DEBUG") == "1"}


def set_debug(on: bool) -> None:
    _state["debug"] = _state["debug"] or on


def debug_enabled() -> bool:
    return _state["debug"]


def print_json(obj) -> None:
    """Print one JSON document on stdout (no rich markup, no wrapping)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {message}", markup=True)


def info(message: str) -> None:
    stderr.print(message, markup=False)


def _report(err: QtoolError, json_mode: bool) -> None:
    stderr.print(f"[bold red]error:[/bold red] {_escape(err.message)}", markup=True)
    if err.hint:
        stderr.print(f"[cyan]hint:[/cyan] {_escape(err.hint)}", markup=True)
    if json_mode:
        print_json(err.to_json())


def _escape(text: str) -> str:
    from rich.markup import escape
    return escape(text)


def guarded(fn):
    """Turn QtoolError / unexpected exceptions into one-line messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_mode = bool(kwargs.get("json_output"))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except QtoolError as err:
            if debug_enabled():
                raise
            _report(err, json_mode)
            raise typer.Exit(err.exit_code)
        except KeyboardInterrupt:
            stderr.print("[bold red]error:[/bold red] interrupted; no output was left behind", markup=True)
            raise typer.Exit(130)
        except Exception as exc:  # noqa: BLE001 - last line of defence: never a traceback
            if debug_enabled():
                raise
            first = first_line(exc, empty="")
            err = QtoolError(f"{type(exc).__name__}: {first}".rstrip(": "),
                             hint="run again with --debug for the full traceback")
            _report(err, json_mode)
            raise typer.Exit(err.exit_code)

    return wrapper
