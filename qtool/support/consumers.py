"""Where a checkpoint loads: TensorRT-LLM, vLLM and qtool's loader contracts (recipes/consumers.toml).

Contract: torch-free; everything comes from recipes/consumers.toml (parsed once, through the format
registry's TOML loader; the recipe names are the registry's). `cell(quant, kv,
layout, consumer, group_size, head_dim)` says whether one consumer loads a recipe (+ KV recipe) written
in one export layout, and why not. `choose(quant, kv, targets, group_size)` picks the export layout for
`qtool quantize --for`: targets None means "every consumer where one layout serves them all, else the
layout that serves the most (ties: the order of [layouts]) and a note saying so"; an explicit target
list that no layout satisfies gives a refusal (what fails, why, and what would work). `group_sizes`
gives the INT4 group sizes the targets accept for a layout. `for_checkpoint(scheme, config)` is the
"loads in" row of `qtool inspect`; `recipe_rows()` the rows of `qtool matrix`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from qtool.formats.registry import load_toml

TARGETS = ("trtllm", "vllm", "qtool")
# CheckpointScheme.quant_method → export layout
METHOD_LAYOUT = {"modelopt": "modelopt", "gptq": "gptq-v1", "awq": "autoawq-gemm"}


@functools.lru_cache(maxsize=None)
def contracts() -> dict:
    return load_toml("consumers.toml")


def title(consumer: str) -> str:
    return contracts()["consumers"][consumer]["title"]


def layouts() -> list[str]:
    return list(contracts()["layouts"])


def entry(kind: str, name: str, consumer: str) -> dict:
    return contracts()[kind][name][consumer]


def names(targets) -> str:
    return ", ".join(title(t) for t in targets)


@dataclass
class Cell:
    consumer: str
    loads: bool
    layout: str | None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"consumer": self.consumer, "title": title(self.consumer), "loads": self.loads, "layout": self.layout,
                "reason": self.reason, "notes": self.notes, "sources": self.sources}


def cell(quant: str | None, kv: str | None, layout: str | None, consumer: str, group_size: int | None = None,
         head_dim: int | None = None) -> Cell:
    """Does `consumer` load recipe `quant` (+ `kv`) written in `layout`?"""
    c = Cell(consumer, True, layout)
    if quant:
        e = entry("weights", quant, consumer)
        c.sources.append(e["source"])
        if not e["layouts"]:
            c.loads, c.reason = False, e["reason"]
        elif layout not in e["layouts"]:
            c.loads = False
            c.reason = (f"loads {quant} in the {' or '.join(e['layouts'])} layout, not {layout}"
                        + (f" ({e['reason']})" if e.get("reason") else ""))
        elif group_size and e.get("group_sizes") and group_size not in e["group_sizes"]:
            c.loads = False
            c.reason = (f"loads {quant} with group size "
                        + ", ".join(str(g) for g in e["group_sizes"]) + f", not {group_size}")
        if e.get("note"):
            c.notes.append(e["note"])
    if kv:
        e = entry("kv", kv, consumer)
        c.sources.append(e["source"])
        if layout not in e["layouts"] and c.loads:
            c.loads = False
            c.reason = f"kv {kv} in the {layout} layout: {contracts()['kv']['other_layouts_reason']}"
        if head_dim in e.get("head_dim_refused", []):
            c.notes.append(e["note"] + f" (this model has head_dim {head_dim})")
        elif e.get("note") and head_dim is None:
            c.notes.append(e["note"])
    return c


def _candidate_layouts(quant: str) -> list[str]:
    used = {lay for t in TARGETS for lay in entry("weights", quant, t)["layouts"]}
    return [lay for lay in layouts() if lay in used]


def group_sizes(quant: str, layout: str, targets) -> list[int] | None:
    """Positive INT4 group sizes every target in `targets` accepts for `layout` (None: no limit)."""
    out = None
    for t in targets:
        e = entry("weights", quant, t)
        if layout in e["layouts"] and e.get("group_sizes"):
            gs = {g for g in e["group_sizes"] if g > 0}
            out = gs if out is None else out & gs
    return sorted(out) if out is not None else None


def nearest(value: int, allowed) -> int | None:
    return min(allowed, key=lambda g: (abs(g - value), -g)) if allowed else None


@dataclass
class Choice:
    layout: str | None
    targets: tuple[str, ...]
    cells: dict[str, Cell]
    refused: str | None = None       # explicit targets that no layout satisfies
    hint: str | None = None
    note: str | None = None          # default target: no layout loads everywhere

    @property
    def loads_in(self) -> list[str]:
        return [t for t, c in self.cells.items() if c.loads]

    def as_dict(self) -> dict:
        return {"layout": self.layout, "targets": list(self.targets), "loads_in": self.loads_in,
                "note": self.note, "consumers": {t: c.as_dict() for t, c in self.cells.items()}}


def choose(quant: str, kv: str | None, targets=None, group_size: int | None = None,
           head_dim: int | None = None, fits=None) -> Choice:
    """The export layout for `quantize --for targets` (None: the default, every consumer where possible).

    `fits(g)` says whether group size g suits the model (divides its in_features); the nearest valid
    group size offered in a refusal is one that fits.
    """
    explicit = targets is not None
    wanted = tuple(targets) if explicit else TARGETS
    what = quant + (f" + kv {kv}" if kv else "")
    scored = []
    for lay in _candidate_layouts(quant):
        cells = {t: cell(quant, kv, lay, t, group_size, head_dim) for t in TARGETS}
        scored.append((lay, cells, [t for t in wanted if cells[t].loads]))
    for lay, cells, ok in scored:
        if len(ok) == len(wanted):
            return Choice(lay, wanted, cells)
    best_lay, best_cells, best_ok = max(scored, key=lambda s: len(s[2]))   # ties: the first, [layouts] order
    if group_size:      # only the group size stands in the way: refuse with the nearest valid one
        for lay, cells, ok in scored:
            if all(cell(quant, kv, lay, t, None, head_dim).loads for t in wanted):
                allowed = group_sizes(quant, lay, wanted) or []
                fitting = [g for g in allowed if fits is None or fits(g)]
                n = nearest(group_size, fitting)
                keep = [t for t in best_ok] if not explicit else []
                hint = ((f"--awq-block-size {n}" if n else "no group size they accept divides this model's layers")
                        + (f"; or --for {','.join(keep)} to keep group size {group_size}" if keep else ""))
                return Choice(None, wanted, cells, hint=hint, refused=(
                    f"--awq-block-size {group_size}: {names(wanted)} load{'s' if len(wanted) == 1 else ''} {what} "
                    f"({lay} layout) only with group size "
                    + ", ".join(map(str, allowed))))
    if not explicit and best_ok:
        missing = [t for t in TARGETS if not best_cells[t].loads]
        return Choice(best_lay, wanted, best_cells, note=(
            f"no export layout of {what} loads in all of {names(TARGETS)}: writing the {best_lay} layout, which "
            f"loads in {names(best_ok) or 'none of them'}; "
            + _reasons(best_cells, missing)))
    why = _reasons(best_cells, wanted)
    works = [f"--for {','.join(o)} ({lay})" for lay, _, o in
             ((lay, c, [t for t in TARGETS if c[t].loads]) for lay, c, _ in scored) if o]
    if not works and kv and any(cell(quant, None, lay, t).loads for lay, _, _ in scored for t in wanted):
        works = [f"{quant} without --kv-cache-quant"]
    return Choice(None, wanted, best_cells, refused=f"{names(wanted)} cannot load {what}: {why}",
                  hint="what loads it: " + ("; ".join(works) if works else "nothing: pick another --quant"))


def _reasons(cells: dict[str, Cell], targets) -> str:
    """'A, B: why; C: why' (targets with the same reason named once)."""
    by: dict[str, list[str]] = {}
    for t in targets:
        if not cells[t].loads:
            by.setdefault(cells[t].reason, []).append(title(t))
    return "; ".join(f"{', '.join(ts)}: {r}" for r, ts in by.items())


def parse_targets(value: str | None) -> tuple[str, ...] | None:
    """--for value → targets (None for the default); 'all' = every consumer; a comma list is allowed."""
    if value is None or value == "auto":
        return None
    if value == "all":
        return TARGETS
    out = []
    for part in value.split(","):
        part = part.strip().lower()
        if part not in TARGETS:
            from qtool.errors import UsageError
            raise UsageError(f"--for {value}: unknown target {part!r}",
                             hint="targets: " + ", ".join(TARGETS) + ", all (comma-separated for several)")
        out.append(part)
    return tuple(dict.fromkeys(out))


def recipe_rows() -> dict[str, dict[str, dict]]:
    """`qtool matrix`: recipe → consumer → {layouts, group_sizes, reason, note, source} (weights and kv)."""
    out = {}
    for kind in ("weights", "kv"):
        for name, per in contracts()[kind].items():
            if not isinstance(per, dict) or "qtool" not in per:
                continue
            label = name if kind == "weights" else f"kv {name}"
            out[label] = {t: {k: per[t].get(k) for k in ("layouts", "group_sizes", "reason", "note", "source")}
                          for t in TARGETS}
    return out


def config_notes(config: dict, consumer: str) -> list[str]:
    """Config-file facts a consumer's pinned transformers needs (TensorRT-LLM: transformers 4.57)."""
    pin = contracts()["consumers"][consumer].get("transformers", "")
    if not pin.startswith("4."):
        return []
    from qtool.support.config_compat import problems_for_457
    return [f"with transformers {pin} (some {title(consumer)} releases pin it): {p}" for p in problems_for_457(config)]


def for_checkpoint(quant_method: str, recipe: str | None, kv_format: str, group_size: int | None, config: dict,
                   quant_algo: str | None = None, tokenizer_config: dict | None = None) -> dict:
    """The "loads in" row of `qtool inspect`: consumer → Cell dict (loads None when unknown)."""
    layout = METHOD_LAYOUT.get(quant_method)
    kv = None if kv_format in (None, "bf16") else kv_format
    head_dim = _head_dim(config)
    out = {}
    for t in TARGETS:
        if quant_method == "none" and kv is None:
            c = Cell(t, True, "bf16", sources=["unquantized Hugging Face checkpoint"])
        elif layout == "modelopt" and recipe is None and quant_algo and quant_algo.upper() != "MIXED_PRECISION":
            # a ModelOpt format that is no qtool recipe (e.g. W4A16_NVFP4): the consumer's quant_algo list decides
            ok = t == "qtool" or algo_accepted(t, quant_algo)
            c = Cell(t, ok, layout, None if ok else f"does not accept quant_algo {quant_algo}")
            if kv and t != "qtool" and kv.upper() not in contracts()["consumers"][t]["kv_cache_quant_algos"]:
                c.loads, c.reason = False, f"does not accept kv_cache_quant_algo {kv.upper()}"
        elif layout is None or recipe is None:
            c = Cell(t, t == "qtool" and layout is not None, layout,
                     reason=f"{quant_method} {quant_algo or ''} is not a recipe in recipes/consumers.toml".strip())
            if t != "qtool":
                c.loads = None
        else:
            c = cell(recipe, kv, layout, t, group_size, head_dim)
            if c.loads and layout == "modelopt" and quant_algo and not algo_accepted(t, quant_algo):
                c.loads, c.reason = False, f"does not accept quant_algo {quant_algo}"
        if t != "qtool":
            c.notes += config_notes(config, t)
            if tokenizer_config is not None:
                from qtool.support.config_compat import tokenizer_problem_for_457
                p = tokenizer_problem_for_457(tokenizer_config)
                if p and contracts()["consumers"][t].get("transformers", "").startswith("4."):
                    c.notes.append(p)
        out[t] = c.as_dict()
    return out


def algo_accepted(consumer: str, algo: str) -> bool:
    cons = contracts()["consumers"][consumer]
    a = cons.get("algo_aliases", {}).get(algo, algo)
    if cons.get("algo_compare") == "upper":
        return a.upper() in cons["quant_algos"]
    return a in cons["quant_algos"]


def _head_dim(config: dict) -> int | None:
    c = config
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict):
            c = {**config, **config[key]}
    hd = c.get("head_dim")
    if not hd and c.get("hidden_size") and c.get("num_attention_heads"):
        hd = c["hidden_size"] // c["num_attention_heads"]
    return int(hd) if hd else None
