"""The one support check every command runs before it loads anything.

Contract: `check_request(rows, quant, kv, arch)` looks up the model matrix (for `rows`, any row's
Y suffices), the hardware matrix (for `arch`, or any architecture when `arch` is None and
`any_arch` is set) and the recipe rules (e.g. NVFP4 KV needs FP8 weights; applied only when both
recipes are given), and returns a Verdict with every finding, the reasons for a refusal and what
would work instead. `enforce(verdict, force)` raises Unsupported (exit 3) on refusal unless
`force`, in which case it returns a warning text to print and record.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qtool.errors import Unsupported
from qtool.formats.registry import recipe as _recipe, recipe_min_archs, recipes
from qtool.support import data
from qtool.support.gpus import Arch, archs


@dataclass
class Finding:
    matrix: str      # 'model' | 'hardware' | 'rule'
    subject: str     # row, or recipe name for rules
    recipe: str      # CLI recipe name, e.g. 'fp8' or 'kv:nvfp4'
    column: str
    supported: bool
    detail: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Verdict:
    supported: bool
    findings: list[Finding] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)
    archs_ok: list[str] = field(default_factory=list)   # architectures that can run it (when arch is None)

    def as_dict(self) -> dict:
        return {"supported": self.supported, "reasons": self.reasons, "alternatives": self.alternatives,
                "architectures_supported": self.archs_ok,
                "findings": [f.as_dict() for f in self.findings]}

    def message(self) -> str:
        return " ".join(self.reasons)


def _label(kind: str, name: str) -> str:
    return name if kind == "weights" else f"kv {name}"


def model_allows(rows: list[str], column: str) -> bool:
    mm = data.model_matrix()
    return any(mm.supported(r, column) for r in rows)


def hardware_allows(arch: Arch, column: str) -> bool:
    return data.hardware_matrix().supported(arch.row, column)


def usable_recipes(rows: list[str] | None, arch: Arch | None) -> list[str]:
    """Recipe labels (weights names, then 'kv X') allowed by the given rows and/or arch."""
    out = []
    for kind in ("weights", "kv"):
        for name, r in recipes()[kind].items():
            if rows is not None and not model_allows(rows, r.column):
                continue
            if arch is not None and not hardware_allows(arch, r.column):
                continue
            out.append(_label(kind, name))
    return out


def _capability(arch_key: str) -> float:
    return min(float(c) for c in data.gpus()["arch"][arch_key]["capabilities"])


def runtime_cell(arch: Arch, label: str) -> str:
    """qtool's CUDA runtime on `arch` for a recipe label ('fp8', 'kv nvfp4'): 'Y', 'q' or '.'.

    'Y': the hardware matrix says Y and qtool runs it; 'q': qtool's kernels run it although the
    hardware matrix says '.'; '.': qtool's CUDA backend does not run it there (an older architecture
    than the `min_arch` of one of its formats, recipes/formats.toml).
    """
    kind, name = ("kv", label[3:]) if label.startswith("kv ") else ("weights", label)
    if any(_capability(arch.key) < _capability(m) for m in recipe_min_archs(kind, name)):
        return "."
    return "Y" if hardware_allows(arch, _recipe(kind, name).column) else "q"


def _rule_violation(quant: str, kv: str) -> str | None:
    kv_r = _recipe("kv", kv)
    need = kv_r.get("requires_weights")
    if need and quant not in need:
        return (f"an NVFP4 KV cache needs {' or '.join(need)} weights, not {quant}: "
                f"{kv_r.get('requires_reason')}") if kv == "nvfp4" else \
               f"a {kv} KV cache needs {' or '.join(need)} weights: {kv_r.get('requires_reason')}"
    return None


def check_request(rows: list[str] | None, quant: str | None, kv: str | None,
                  arch: Arch | None, any_arch: bool = False) -> Verdict:
    """Check (model rows, weight recipe, KV recipe, target arch). None skips that dimension.

    With `arch=None` and `any_arch=True` the hardware check passes when at least one architecture
    supports every requested recipe, and `archs_ok` lists those architectures.
    """
    v = Verdict(True)
    wanted = [("weights", quant), ("kv", kv)]
    wanted = [(k, n) for k, n in wanted if n]
    fam = " / ".join(rows) if rows else ""
    for kind, name in wanted:
        r = _recipe(kind, name)
        if rows is not None:
            ok = model_allows(rows, r.column)
            v.findings += [Finding("model", row, _label(kind, name), r.column,
                                   data.model_matrix().supported(row, r.column)) for row in rows]
            if not ok:
                v.supported = False
                v.reasons.append(f"{r.column} is not supported for {fam} (model support matrix).")
        if arch is not None:
            ok = hardware_allows(arch, r.column)
            v.findings.append(Finding("hardware", arch.row, _label(kind, name), r.column, ok))
            if not ok:
                v.supported = False
                v.reasons.append(f"{r.column} is not supported on {arch.label} (hardware support matrix).")
    if arch is None and any_arch and wanted:
        hw = data.hardware_matrix()
        for key, a in archs().items():
            if all(hw.supported(a.row, _recipe(k, n).column) for k, n in wanted):
                v.archs_ok.append(key)
        if not v.archs_ok:
            v.supported = False
            v.reasons.append("no GPU architecture supports " + " with ".join(
                _recipe(k, n).column for k, n in wanted) + " (hardware support matrix).")
    if quant and kv:
        bad = _rule_violation(quant, kv)
        v.findings.append(Finding("rule", f"kv {kv}", _label("kv", kv), _recipe("kv", kv).column, bad is None, bad or ""))
        if bad:
            v.supported = False
            v.reasons.append(bad[0].upper() + bad[1:] + ".")
    if not v.supported:
        usable = usable_recipes(rows, arch)
        v.alternatives = usable
        listed = ", ".join(usable) if usable else "no recipe in the matrices"
        if arch is not None and rows:
            v.reasons.append(f"On {arch.label}, {fam} can use: {listed}.")
        elif arch is not None:
            v.reasons.append(f"{arch.label} supports: {listed}.")
        elif rows:
            v.reasons.append(f"{fam} supports: {listed}.")
    return v


def enforce(verdict: Verdict, force: bool) -> str | None:
    """Raise Unsupported unless the verdict passes; with force, return the warning text instead."""
    if verdict.supported:
        return None
    if force:
        return "--force: running a request the support matrices refuse: " + verdict.message()
    raise Unsupported(verdict.message(), hint="pass --force to run it anyway (recorded in the output)",
                      data={"verdict": verdict.as_dict()})
