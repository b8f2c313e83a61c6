"""`qtool quantize --for`: the export layout, chosen before loading, written after ModelOpt's export.

Contract: `resolve(quant, kv, for_value, block, cfg)` runs before any weight is loaded and returns a
`consumers.Choice` (the layout and where it loads); it raises Unsupported (exit 3: what cannot load it,
why, what would) when the named targets cannot load the recipe, or the group size is not one they accept
(with the nearest valid size), and UsageError when the group size does not divide the model's layers
(naming only sizes the targets accept). `--force` does not override a loader: the checkpoint would not
load. `finish(out_dir, choice, block, modelopt_version)` runs on the exported folder: writes the AutoAWQ
layout when the choice says so (GPTQ is written by the pipeline as before), adds the transformers-4.5x
config keys (qtool/support/config_compat.py), and returns the `consumers` record of qtool.json.
"""
from __future__ import annotations

from pathlib import Path

from qtool.errors import Unsupported, UsageError
from qtool.support import consumers


def resolve(quant: str, kv: str | None, for_value: str | None, block: int | None, cfg: dict | None):
    from qtool.quantize import plan as planmod
    targets = consumers.parse_targets(for_value)
    dims = planmod.linear_in_features(cfg) if cfg else {}

    def fits(g: int) -> bool:
        return all(v % g == 0 for v in dims.values())
    head_dim = consumers._head_dim(cfg) if cfg else None
    choice = consumers.choose(quant, kv, targets, block, head_dim, fits)
    if choice.refused:
        raise Unsupported(choice.refused, hint=choice.hint, data={"consumers": choice.as_dict()})
    if block:
        allowed = consumers.group_sizes(quant, choice.layout, [t for t in choice.targets if t in choice.loads_in])
        problem = planmod.block_size_problem(cfg, block, allowed=allowed)
        if problem:
            raise UsageError(problem)
    return choice


def finish(out_dir: Path, choice, block: int | None, modelopt_version: str | None) -> dict:
    out = {"layout": choice.layout, **choice.as_dict()}
    if choice.layout == "autoawq-gemm":
        from qtool.quantize.awq_layout import convert_to_autoawq
        conv = convert_to_autoawq(out_dir, block, modelopt_version or "?")
        out["autoawq"] = {k: conv[k] for k in ("modules", "folded", "requantized")}
        out["replaced_hf_quant_config"] = conv["modelopt_hf_quant_config"]
    from qtool.support.config_compat import apply
    out["config_compat"] = apply(out_dir)
    return out


def summary(record: dict) -> str:
    """Lines for the quantize summary: where the checkpoint loads, and what a user of each must know."""
    loads = record.get("loads_in") or []
    lines = [f"loads in: {consumers.names(loads) or 'none of ' + consumers.names(consumers.TARGETS)} "
             f"({record['layout']} layout; serving commands: docs/quantize.md \"Use the checkpoint elsewhere\")"]
    req = (record.get("autoawq") or {}).get("requantized") or []
    if req:
        worst = max(r["relative_change"] for r in req)
        lines.append(f"note: AutoAWQ layout: {len(req)} layer(s) re-quantized with their AWQ scale folded into the "
                     f"weight ({req[0]['reason']}; largest relative change {worst:.3f}); the rest folded exactly; "
                     "qtool.json consumers.autoawq lists them")
    seen = set()
    for t in loads:
        for n in record["consumers"][t]["notes"]:
            if n not in seen:
                seen.add(n)
                lines.append(f"note: {consumers.title(t)}: {n}")
    return "\n".join(lines)
