"""Atomic output folder: everything is written to a temporary folder next to the target and
renamed into place only when complete.

Contract: `check_target(path, force)` raises UsageError (exit 2) when `path` is a file or a
non-empty folder and `force` is not set — call it before loading anything; missing parent folders
are fine (created by `staged`). `staged(path, force)`
is a context manager yielding the temporary folder; on normal exit the target is replaced
(an existing one is moved aside and deleted only after the rename succeeded); on any exception,
Ctrl-C included, the temporary folder is removed and the target is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from qtool.errors import UsageError


def check_target(path: Path, force: bool) -> None:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UsageError(f"--output {path} exists and is not empty",
                         hint="choose another folder, or pass --force to replace it")
    parent = path.resolve().parent
    while not parent.exists():   # missing parents are created by staged(), under the nearest existing one
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}")


@contextlib.contextmanager
def staged(path: Path, force: bool):
    path = Path(path).resolve()
    check_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.qtool-tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.qtool-old-", dir=path.parent))
            os.rename(path, old / "x")
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old / "x", path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
