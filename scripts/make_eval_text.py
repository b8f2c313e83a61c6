#!/usr/bin/env python
"""Builds qtool/data/eval_stdlib_docs.txt, the default held-out text of `qtool eval` (run once; the file is committed).

Contract: reads the docstrings (module, class, function; in source order, parsed with `ast`, nothing imported) of
the fixed list of pure-Python CPython 3.11 standard-library modules below (PSF licence), keeps those of at least
MIN_CHARS characters, cleans them with `inspect.cleandoc`, and drops every docstring that shares a 12-word
sequence with qtool's calibration corpus (`qtool.calibration.calibration_texts(None, ...)`: CPython's
pydoc_data.topics, qtool/data/calib_mix.txt, calib_chat.jsonl), so the text is held out from calibration.
Each kept docstring is written under a heading line with its qualified name, blocks separated by one blank line,
up to PER_MODULE_CHARS per module and TARGET_CHARS in all. Provenance and the overlap rule: docs/eval.md. Run: python scripts/make_eval_text.py
"""
from __future__ import annotations

import ast
import inspect
import re
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "qtool" / "data" / "eval_stdlib_docs.txt"
MODULES = ["argparse", "textwrap", "difflib", "heapq", "bisect", "fractions", "statistics", "calendar", "string",
           "shlex", "csv", "json/__init__", "json/decoder", "json/encoder", "pathlib", "shutil", "tempfile",
           "subprocess", "threading", "queue", "sched", "random", "inspect", "functools", "collections/__init__",
           "dataclasses", "enum", "contextlib", "logging/__init__", "logging/handlers", "unittest/case",
           "doctest", "pprint", "reprlib", "weakref", "abc", "numbers", "datetime", "zipfile", "tarfile", "gzip",
           "configparser", "optparse", "getopt", "gettext", "locale", "smtplib", "imaplib", "ftplib",
           "socketserver", "http/client", "http/cookiejar", "urllib/parse", "urllib/request", "email/message",
           "email/utils", "mailbox", "ipaddress", "selectors", "asyncio/tasks", "asyncio/events", "pdb", "cmd",
           "trace", "timeit", "tokenize", "codecs", "copy", "operator", "glob", "fnmatch", "filecmp", "netrc",
           "plistlib", "pickle", "zipimport", "runpy", "importlib/__init__", "warnings", "traceback", "typing"]
MIN_CHARS = 300
TARGET_CHARS = 200_000
PER_MODULE_CHARS = 4_000        # spread the text over many modules
SHINGLE = 12


def shingles(text: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def docstrings(path: Path, module: str):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc
    stack = [(tree, module)]
    while stack:
        node, prefix = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                d = ast.get_docstring(child, clean=True)
                if d:
                    yield name, d
                if isinstance(child, ast.ClassDef):
                    stack.append((child, name))


def main() -> int:
    if sys.version_info[:2] != (3, 11):
        print("the committed text was made from CPython 3.11's standard library; run this with Python 3.11")
        return 2
    sys.path.insert(0, str(REPO))
    from qtool.calibration import calibration_texts
    calib = set()
    for t in calibration_texts(None, 100000)[0]:
        calib |= shingles(str(t))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    blocks, total, dropped = [], 0, 0
    for mod in MODULES:
        used = 0
        for name, doc in docstrings(stdlib / f"{mod}.py", mod.replace("/__init__", "").replace("/", ".")):
            doc = inspect.cleandoc(doc)
            if len(doc) < MIN_CHARS:
                continue
            if shingles(doc) & calib:
                dropped += 1
                continue
            blocks.append(f"{name}\n{doc}")
            total += len(blocks[-1]) + 2
            used += len(blocks[-1]) + 2
            if total >= TARGET_CHARS or used >= PER_MODULE_CHARS:
                break
        if total >= TARGET_CHARS:
            break
    OUT.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(blocks)} docstrings, {total} characters; {dropped} dropped for overlap "
          f"with the calibration corpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
