"""`qtool quantize` (placeholder until its issue lands)."""
from __future__ import annotations

import typer

from qtool.commands._common import guarded
from qtool.errors import Failure

EPILOG = ""


@guarded
def quantize():
    """Not implemented yet."""
    raise Failure("qtool quantize is not implemented yet")
