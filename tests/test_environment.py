"""qtool/ reads only the documented user-facing environment variables (issue 15).

Reference: the list under "Environment variables" in docs/architecture.md. Every `os.environ` / `os.getenv` /
`environ` use in qtool/ is found with `ast`; each must name a variable of that list by a string literal (a
computed name cannot be checked, so it fails too). `HF_*` stands for huggingface_hub's own variables.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _documented() -> list[str]:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("### Environment variables", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^- `([A-Z0-9_*]+)`", section, flags=re.M)


def _allowed(name: str, documented: list[str]) -> bool:
    return any(name == d or (d.endswith("*") and name.startswith(d[:-1])) for d in documented)


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ")


def _uses(tree: ast.AST):
    """(line, variable name or None when not a literal) of every environment read or write."""
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and (
                getattr(node.func, "attr", getattr(node.func, "id", None)) in ("getenv", "putenv", "unsetenv")):
            arg = node.args[0] if node.args else None
            yield node.lineno, arg.value if isinstance(arg, ast.Constant) else None
        elif _is_environ(node):
            parent = parents.get(node)
            if isinstance(parent, ast.Subscript):
                key = parent.slice
            elif isinstance(parent, ast.Attribute) and isinstance(parents.get(parent), ast.Call):
                call = parents[parent]
                key = call.args[0] if call.args else None
            elif isinstance(parent, ast.ImportFrom) or isinstance(parent, ast.alias):
                continue
            else:
                key = None
            yield node.lineno, key.value if isinstance(key, ast.Constant) else None


def test_the_list_is_documented():
    assert {"QTOOL_CACHE", "XDG_CACHE_HOME", "QTOOL_HUB_TIMEOUT", "HF_*", "QTOOL_DEBUG", "QTOOL_API_KEY"} <= set(
        _documented())


def test_finder_sees_every_form():
    code = ("import os\nos.environ.get('A')\nos.environ['B']\nos.getenv('C')\nos.environ.setdefault('D', '1')\n"
            "os.environ.get(name)\nx = dict(os.environ)\n")
    assert [n for _, n in sorted(_uses(ast.parse(code)), key=lambda u: u[0])] == ["A", "B", "C", "D", None, None]


def test_only_documented_variables_in_qtool():
    documented = _documented()
    bad = []
    for path in sorted((REPO / "qtool").rglob("*.py")):
        for line, name in _uses(ast.parse(path.read_text(encoding="utf-8"))):
            if name is None or not _allowed(name, documented):
                bad.append(f"{path.relative_to(REPO)}:{line}: {name or 'a computed name'}")
    assert not bad, "environment variables not documented in docs/architecture.md:\n" + "\n".join(bad)
