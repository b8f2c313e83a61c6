"""The import rules of docs/architecture.md hold for qtool/ (issue 15).

Reference: the rule table in docs/architecture.md ("Import rules"), parsed here, and the issue's list of
edges that must never exist. The import graph is built with `ast` from every `import` / `from ... import`
in qtool/, at module level and inside functions alike (relative imports resolved; `from pkg import mod`
counts as importing pkg and pkg.mod). Fails on an edge the table does not allow, on a layer the table does not
name, on a table that allows a forbidden edge, and on any import cycle between modules of qtool/.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QTOOL = REPO / "qtool"
# the issue's edges (layer -> layer) that the rules must forbid; "*" = any layer below commands
FORBIDDEN = [("quantize", "commands"), ("runtime", "quantize"), ("checkpoint", "quantize"), ("support", "runtime"),
             ("formats", "commands"), ("*", "commands")]
ABOVE_COMMANDS = {"commands", "cli", "__main__"}


def _rules() -> dict[str, set[str]]:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("### Import rules", 1)[1]
    rules = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*([^|]+?)\s*\|\s*([^|]*?)\s*\|$", line)
        if not m or m.group(1) in ("layer", "---"):
            continue
        layer = m.group(1).strip("` ")
        rules[layer] = {x.strip("` ") for x in m.group(2).split(",") if x.strip()}
    return rules


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> qtool modules it imports (module-level and function-level imports)."""
    files = {_module(p): p for p in QTOOL.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "qtool"


def test_rules_forbid_the_issue_edges():
    rules = _rules()
    for src, dst in FORBIDDEN:
        for layer in (rules if src == "*" else [src]):
            if src == "*" and layer in ABOVE_COMMANDS:
                continue
            assert dst not in rules[layer], f"docs/architecture.md allows {layer} -> {dst}"


def test_every_import_follows_the_rules():
    rules, graph = _rules(), _graph()
    bad, unknown = [], set()
    for mod, targets in graph.items():
        src = _layer(mod)
        if src == "qtool":
            continue
        if src not in rules:
            unknown.add(src)
            continue
        for t in targets:
            dst = _layer(t)
            if dst not in (src, "qtool") and dst not in rules[src]:
                bad.append(f"{mod} -> {t}")
    assert not unknown, f"layers missing from docs/architecture.md's import rules: {sorted(unknown)}"
    assert not bad, "imports the rules of docs/architecture.md forbid:\n" + "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles in qtool/: " + "; ".join(" <-> ".join(c) for c in cycles)
