"""Shared plumbing for CLI commands: consoles, error reporting, JSON output.

Contract: decorate every command function with ``@guarded``. A QtoolError becomes one line on
stderr (``error: …`` and optionally ``hint: …``) and its exit code; with ``--json`` the error is
also printed on stdout as ``{"ok": false, "error": {...}}``. Any other exception is reported in
one line with exit 1 unless ``--debug`` (or QTOOL_DEBUG=1) asks for the traceback; PermissionError and
safetensors errors get specific messages. Ctrl-C exits 130 with the error code "interrupted" (also in
JSON). `run_click(call, argv)` runs the click entry point non-standalone and reports click's usage
errors the same way (exit 2). `check_text(value, what)` refuses text that came from non-UTF-8 bytes
(naming the argument and the byte offset); `decode_utf8(data, what)` does the same for file contents.
"""
from __future__ import annotations

import functools
import json
import os
import sys

import typer
from rich.console import Console

from qtool.errors import Failure, Interrupted, QtoolError, UsageError, first_line

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


def _json_requested(argv) -> bool:
    argv = list(argv)
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def run_click(call, argv):
    """Call click's main (standalone_mode=False); its usage errors → one line, exit 2 (JSON with --json)."""
    try:
        from typer._click import exceptions as click_exc      # typer >= 0.22 vendors click
    except ImportError:
        from click import exceptions as click_exc
    try:
        return call()
    except click_exc.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":   # bare `qtool`: the help text, as click prints it
            stderr.print(exc.format_message(), markup=False, highlight=False)
            return 2
        cmd = exc.ctx.command_path if exc.ctx is not None else "qtool"
        message = " ".join((exc.format_message() or "usage error").split())
        _report(UsageError(message.rstrip("."), hint=f"see '{cmd} --help'"), _json_requested(argv))
        return 2
    except typer.Abort:
        _report(Interrupted("interrupted"), _json_requested(argv))
        return Interrupted.exit_code


def check_text(value, what: str):
    """Raise UsageError when `value` (str, or list of str) holds bytes that were not UTF-8 (surrogate escapes)."""
    for text in ([value] if isinstance(value, str) else (value or [])):
        for i, ch in enumerate(text):
            if "\udc80" <= ch <= "\udcff":
                offset = len(text[:i].encode("utf-8", "surrogateescape"))
                raise UsageError(f"{what} is not valid UTF-8: byte {offset} is 0x{ord(ch) - 0xdc00:02x}",
                                 hint="pass text encoded as UTF-8 (e.g. iconv -t UTF-8)")
    return value


def decode_utf8(data: bytes, what: str) -> str:
    """bytes → str, or UsageError naming `what`, the line and the byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{what} is not valid UTF-8: line {line}, byte {exc.start} (0x{data[exc.start]:02x})",
                         hint="save the file as UTF-8 (e.g. iconv -t UTF-8)") from None


def _specific(exc: Exception) -> QtoolError | None:
    """A specific one-line error for generic library exceptions, or None."""
    if isinstance(exc, PermissionError):
        where = exc.filename or first_line(exc)
        return Failure(f"permission denied: {where}", hint="make it readable (and writable for outputs) by this user")
    if type(exc).__name__ == "SafetensorError":
        return Failure(f"a safetensors file is damaged or truncated ({first_line(exc)})",
                       hint="copy or download the checkpoint again")
    return None


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
            err = Interrupted("interrupted; no output was left behind")
            _report(err, json_mode)
            raise typer.Exit(err.exit_code)
        except Exception as exc:  # noqa: BLE001 - last line of defence: never a traceback
            if debug_enabled():
                raise
            err = _specific(exc) or QtoolError(f"{type(exc).__name__}: {first_line(exc, empty='')}".rstrip(": "),
                                               hint="run again with --debug for the full traceback")
            _report(err, json_mode)
            raise typer.Exit(err.exit_code)

    return wrapper
