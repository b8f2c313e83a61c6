"""Loads the support data in `recipes/` (the two matrices, families, GPUs, notes, runtime support).

Contract: everything qtool knows about what is supported comes from these files; this module
only parses them (csv + tomllib, no heavy imports) and caches the result. Matrix cells are the
seed's literal 'Y' / '.' strings. Recipes come from the format registry (qtool.formats.registry),
re-exported here as `recipes()` / `Recipe`.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field

from qtool.formats.registry import Recipe, load_toml as _toml, recipes, recipes_dir  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Matrix:
    """A support matrix: row names, column names and cells ('Y' or '.')."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    cells: dict[tuple[str, str], str] = field(hash=False, compare=False)
    notes: tuple[str, ...] = ()

    def supported(self, row: str, column: str) -> bool:
        return self.cells[(row, column)] == "Y"

    def row_dict(self, row: str) -> dict[str, str]:
        return {c: self.cells[(row, c)] for c in self.columns}


def _read_matrix(filename: str, name: str, notes: list[str]) -> Matrix:
    with open(recipes_dir() / filename, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows, cells = [], {}
        for line in reader:
            if not line:
                continue
            rows.append(line[0])
            for col, val in zip(header[1:], line[1:]):
                cells[(line[0], col)] = val
    return Matrix(name, tuple(header[1:]), tuple(rows), cells, tuple(notes))


@functools.lru_cache(maxsize=None)
def notes() -> dict:
    return _toml("notes.toml")


@functools.lru_cache(maxsize=None)
def model_matrix() -> Matrix:
    return _read_matrix("model_matrix.csv", "model", notes()["model_matrix"]["notes"])


@functools.lru_cache(maxsize=None)
def hardware_matrix() -> Matrix:
    return _read_matrix("hardware_matrix.csv", "hardware", notes()["hardware_matrix"]["notes"])


@functools.lru_cache(maxsize=None)
def families() -> dict:
    return _toml("families.toml")


@functools.lru_cache(maxsize=None)
def gpus() -> dict:
    return _toml("gpus.toml")


@functools.lru_cache(maxsize=None)
def runtime_support() -> dict:
    """Where the GPU test suite has passed (recipes/runtime_support.toml; where the kernels run: formats.toml)."""
    path = recipes_dir() / "runtime_support.toml"
    return _toml("runtime_support.toml") if path.exists() else {}


def runtime_model_types() -> tuple[str, ...]:
    """The model_types qtool's runtime implements (recipes/runtime_support.toml [runtime])."""
    return tuple(runtime_support()["runtime"]["model_types"])
