"""`qtool inspect` (placeholder until its issue lands)."""
from __future__ import annotations

import typer

from qtool.commands._common import guarded
from qtool.errors import Failure

EPILOG = ""


@guarded
def inspect():
    """Not implemented yet."""
    raise Failure("qtool inspect is not implemented yet")
