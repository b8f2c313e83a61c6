"""One snapshot of a checkpoint folder: detect a folder replaced while it was being read.

Contract: `pin(path)` returns a token for the checkpoint now at `path` (the folder's device and inode, which
`quantize --force` changes by swapping the whole folder, plus `qtool.json`'s random `id`, which any rewrite by
qtool changes); None for a path that is not a local folder (a hub id). Take it BEFORE reading any file.
`verify(path, token)`, called AFTER every file has been read or opened, raises CheckpointError (exit 1) when
the folder at `path` is no longer the one pinned, so a reader racing a replace gets either one whole version
or a clear failure, never config.json of one version with the weights of another. Torch-free.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from qtool.errors import CheckpointError


def _id(folder: Path) -> str | None:
    try:
        doc = json.loads((folder / "qtool.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc.get("id") if isinstance(doc, dict) else None


def pin(path) -> tuple | None:
    folder = Path(path).expanduser()
    try:
        st = os.stat(folder)
    except OSError:
        return None
    if not folder.is_dir():
        return None
    return st.st_dev, st.st_ino, _id(folder)


def verify(path, token: tuple | None) -> None:
    if token is None:
        return
    if pin(path) != token:
        raise CheckpointError(f"{path} was replaced while it was being loaded (e.g. by qtool quantize --force)",
                              hint="run the command again")
