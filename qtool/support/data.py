"""Loads the support data in `recipes/` (the two matrices, recipes, families, GPUs, notes).

Contract: everything qtool knows about what is supported comes from these files; this module
only parses them (csv + tomllib, no heavy imports) and caches the result. Matrix cells are the
seed's literal 'Y' / '.' strings.
"""
from __future__ import annotations

import csv
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parent.parent.parent / "recipes"


def recipes_dir() -> Path:
    """The folder of data files: the source tree's `recipes/`, or the installed package's."""
    if RECIPES_DIR.is_dir():
        return RECIPES_DIR
    import importlib.resources
    return Path(str(importlib.resources.files("recipes")))


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


@dataclass(frozen=True)
class Recipe:
    """One quantization recipe: kind is 'weights' or 'kv'; `spec` holds the TOML table."""

    name: str
    kind: str
    column: str
    title: str
    spec: dict = field(hash=False, compare=False)

    def get(self, key, default=None):
        return self.spec.get(key, default)


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


def _toml(filename: str) -> dict:
    with open(recipes_dir() / filename, "rb") as f:
        return tomllib.load(f)


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
def recipes() -> dict[str, dict[str, Recipe]]:
    """{'weights': {cli_name: Recipe}, 'kv': {cli_name: Recipe}} in file order."""
    raw = _toml("recipes.toml")
    return {kind: {name: Recipe(name, kind, spec["column"], spec["title"], spec)
                   for name, spec in raw[kind].items()} for kind in ("weights", "kv")}


def weight_recipe_names() -> list[str]:
    return list(recipes()["weights"])


def kv_recipe_names() -> list[str]:
    return list(recipes()["kv"])


@functools.lru_cache(maxsize=None)
def families() -> dict:
    return _toml("families.toml")


@functools.lru_cache(maxsize=None)
def gpus() -> dict:
    return _toml("gpus.toml")


@functools.lru_cache(maxsize=None)
def runtime_support() -> dict:
    """qtool's own kernels: which formats they run on which arch (recipes/runtime_support.toml)."""
    path = recipes_dir() / "runtime_support.toml"
    return _toml("runtime_support.toml") if path.exists() else {}
