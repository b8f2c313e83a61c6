"""Errors that end a qtool command, each carrying its exit code.

Contract: every expected failure is raised as a QtoolError subclass with a one-line message;
the CLI prints ``error: <message>`` (plus an optional ``hint:`` line) on stderr and exits
with the class's code. Exit codes: 0 done, 1 failed, 2 usage error, 3 refused by a support
matrix, 130 interrupted (Ctrl-C). `first_line(exc)` is the one-line form of any other exception's message. Nothing here
imports anything heavy.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3
EXIT_INTERRUPTED = 130


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of ``str(exc)`` stripped; when that is empty, ``empty`` (default: the class name)."""
    s = str(exc).strip()
    if s:
        return s.splitlines()[0]
    return type(exc).__name__ if empty is None else empty


class QtoolError(Exception):
    """Base class: a failure with a clear one-line message (exit 1)."""

    exit_code = EXIT_FAILED
    kind = "failed"

    def __init__(self, message: str, hint: str | None = None, data: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.data = data or {}

    def to_json(self) -> dict:
        out = {"ok": False, "error": {"code": self.kind, "exit_code": self.exit_code,
                                      "message": self.message}}
        if self.hint:
            out["error"]["hint"] = self.hint
        out["error"].update(self.data)
        return out


class Failure(QtoolError):
    """The request was valid but could not be carried out (exit 1)."""


class CheckpointError(Failure):
    """A checkpoint is missing, malformed, truncated or contradicts itself (exit 1)."""

    kind = "bad_checkpoint"


class UsageError(QtoolError):
    """A bad flag value, unknown name or missing path given by the user (exit 2)."""

    exit_code = EXIT_USAGE
    kind = "usage"


class Interrupted(QtoolError):
    """Ctrl-C (exit 130, as shells report SIGINT)."""

    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"


class Unsupported(QtoolError):
    """Refused by the model or hardware support matrix, or by a recipe rule (exit 3)."""

    exit_code = EXIT_UNSUPPORTED
    kind = "unsupported"
