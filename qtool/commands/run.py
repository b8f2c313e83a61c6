"""`qtool run` (placeholder until its issue lands)."""
from __future__ import annotations

import typer

from qtool.commands._common import guarded
from qtool.errors import Failure

EPILOG = ""


@guarded
def run():
    """Not implemented yet."""
    raise Failure("qtool run is not implemented yet")
