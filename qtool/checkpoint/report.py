"""The `inspect` report: one JSON-able dict (schema in docs/inspect.md) and its compact rich rendering.

Contract: `build(files, scheme, sizes, problems, notes, deep)` returns the report dict: model
(family rows from the model matrix), recipe (weights, activations, KV cache), layer groups,
sizes, the support verdict per GPU architecture (qtool.support.check.check_request), whether
qtool's runtime can run it here, problems and notes. `render(report, console)` prints it. No
torch import: the local runtime check looks for torch / cupy / an NVIDIA device node only.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path

from qtool.checkpoint.files import CheckpointFiles
from qtool.checkpoint.scheme import LAYER_RE, CheckpointScheme, num_layers
from qtool.checkpoint.sizes import Sizes, human_bytes, human_count
from qtool.errors import QtoolError
from qtool.formats import registry
from qtool.support.data import runtime_model_types
from qtool.support.families import text_config

SCHEMA_VERSION = 1


def ranges(nums: list[int]) -> str:
    """'0-3,5' for [0, 1, 2, 3, 5]."""
    nums = sorted(set(nums))
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def layer_groups(scheme: CheckpointScheme) -> list[dict]:
    """Linears grouped by (name with the layer index replaced by *, format, activation, group size)."""
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for module, s in scheme.linears.items():
        m = LAYER_RE.search(module + ".")
        pattern = module if m is None else module[: m.start(1)] + "*" + module[m.end(1):]
        key = (pattern, s.format, s.activation, s.group_size, s.fp8_weight_stage)
        g = groups.setdefault(key, {"modules": pattern, "format": s.format, "activation": s.activation,
                                    "group_size": s.group_size, "fp8_weight_stage": s.fp8_weight_stage,
                                    "count": 0, "layers": [], "excluded": module in scheme.excluded})
        g["count"] += 1
        if m is not None:
            g["layers"].append(int(m.group(1)))
    out = []
    for g in groups.values():
        g["layers"] = ranges(g["layers"]) if g["layers"] else None
        out.append(g)
    return out


def _model(files: CheckpointFiles) -> dict:
    from qtool.support.families import rows_for_config
    c = text_config(files.config)
    try:
        rows, err = rows_for_config(files.config), None
    except QtoolError as exc:
        rows, err = [], exc.message
    return {"model_type": files.config.get("model_type"), "architectures": files.config.get("architectures") or [],
            "family_rows": rows, "family_error": err, "num_layers": num_layers(files.config),
            "hidden_size": c.get("hidden_size"), "vocab_size": c.get("vocab_size"),
            "torch_dtype": files.config.get("torch_dtype") or files.config.get("dtype")}


def _kv_scales_state(scheme: CheckpointScheme) -> str | None:
    if scheme.kv_format == "bf16":
        return None
    have = sum(1 for k, v in scheme.kv_scales.values() if k and v)
    if have == 0:
        return "absent"
    return "calibrated" if have == len(scheme.kv_scales) else "partial"


def _recipe(scheme: CheckpointScheme) -> dict:
    quant = [s for s in scheme.linears.values() if s.format != "bf16"]
    fmts = sorted({s.format for s in quant}, key=list(registry.weight_formats()).index)
    acts = sorted({s.activation for s in quant})
    groups = sorted({s.group_size for s in quant if s.group_size})
    return {"name": scheme.recipe, "quant_method": scheme.quant_method, "quant_algo": scheme.quant_algo,
            "producer": scheme.producer, "weights": fmts or ["bf16"], "activations": acts or ["none"],
            "group_size": groups[0] if len(groups) == 1 else (groups or None),
            "fp8_weight_stage": any(s.fp8_weight_stage for s in quant),
            "kv_cache": scheme.kv_format, "kv_cache_quant_algo": scheme.kv_algo,
            "kv_scales": _kv_scales_state(scheme),
            "quantized_linears": len(quant), "linears": len(scheme.linears), "excluded": scheme.excluded}


def _support(model: dict, scheme: CheckpointScheme) -> dict:
    """Matrix verdict per architecture; model-matrix and recipe-rule reasons are listed once.

    A MIXED_PRECISION checkpoint is supported where every recipe its layers use is supported.
    """
    from qtool.support.check import check_request, runtime_cell
    from qtool.support.gpus import archs
    rows = model["family_rows"] or None
    kv = scheme.kv_recipe
    recipes = scheme.checked_recipes()
    unmapped = recipes is None
    out = {"rows": model["family_rows"], "recipe": scheme.recipe, "recipes": recipes or [], "kv": kv,
           "model_reasons": [], "rule_reasons": [], "architectures": {}}
    if unmapped:
        out["note"] = f"{scheme.quant_algo} has no column in the support matrices (no verdict for the weights)"
    for key, arch in archs().items():
        verdicts = [check_request(rows, r, kv, arch) for r in (recipes or [None])]
        blocked = []
        for f in (f for v in verdicts for f in v.findings):
            if f.supported:
                continue
            if f.matrix == "hardware":
                if f.column not in blocked:
                    blocked.append(f.column)
            elif f.matrix == "rule" and f.detail not in out["rule_reasons"]:
                out["rule_reasons"].append(f.detail)
            elif f.matrix == "model":
                msg = f"{f.column} is not supported for {', '.join(model['family_rows'])} (model matrix)"
                if msg not in out["model_reasons"] and not any(
                        g.supported for v in verdicts for g in v.findings if g.matrix == "model" and g.column == f.column):
                    out["model_reasons"].append(msg)
        ok = all(v.supported for v in verdicts)
        cells = [runtime_cell(arch, lb) for lb in _labels(scheme)]
        qtool_cuda = "." if "." in cells or unmapped else ("q" if "q" in cells else "Y")
        out["architectures"][key] = {"row": arch.row, "supported": None if unmapped and ok else ok,
                                     "hardware_blocked": blocked, "qtool_cuda": qtool_cuda}
    return out


def _local_arch():
    """The local GPU's Arch from `nvidia-smi` (no torch import), or None."""
    if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
        return None
    import subprocess
    from qtool.support.gpus import arch_for_capability
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.splitlines()
        cap, name = [x.strip() for x in out[0].split(",", 1)]
        major, minor = cap.split(".")
        return arch_for_capability(int(major), int(minor), name)
    except Exception:  # noqa: BLE001 - no usable GPU information: treat as no GPU
        return None


def _labels(scheme: CheckpointScheme) -> list[str]:
    out = list(scheme.checked_recipes() or [])
    return out + ([f"kv {scheme.kv_format}"] if scheme.kv_format != "bf16" else [])


def _runtime(files: CheckpointFiles, scheme: CheckpointScheme) -> dict:
    from qtool.support.check import runtime_cell
    mt = str(files.config.get("model_type", "")).lower()
    why = None
    if mt not in runtime_model_types():
        why = f"model_type {mt or '?'} is not one qtool's runtime implements ({', '.join(runtime_model_types())})"
    elif any(s.format not in registry.weight_formats() for s in scheme.linears.values()):
        why = "a layer format the runtime does not decode"
    elif importlib.util.find_spec("torch") is None:
        why = "PyTorch is not installed"
    cuda_why, arch = why, None
    if cuda_why is None:
        if scheme.checked_recipes() is None:
            cuda_why = f"{scheme.quant_algo} is no qtool recipe; the CUDA kernels cover the recipes only"
        elif importlib.util.find_spec("cupy") is None:
            cuda_why = "CuPy is not installed (pip install 'qtool[cuda12]' or 'qtool[cuda13]')"
        elif (arch := _local_arch()) is None:
            cuda_why = "no NVIDIA GPU on this machine"
        else:
            missing = [lb for lb in _labels(scheme) if runtime_cell(arch, lb) == "."]
            if missing:
                cuda_why = f"qtool's CUDA kernels do not run {', '.join(missing)} on {arch.key}"
    return {"torch": {"can_run": why is None, "reason": why},
            "cuda": {"can_run": cuda_why is None, "reason": cuda_why, "gpu": arch.key if arch else None}}


def _loads_in(files: CheckpointFiles, scheme: CheckpointScheme) -> dict:
    """TensorRT-LLM / vLLM / qtool: whether each loads this checkpoint (recipes/consumers.toml)."""
    from qtool.support.consumers import for_checkpoint
    group = _recipe(scheme)["group_size"]
    return for_checkpoint(scheme.quant_method, scheme.recipe, scheme.kv_format,
                          group if isinstance(group, int) else None, files.config, scheme.quant_algo,
                          files.tokenizer_config)


def build(files: CheckpointFiles, scheme: CheckpointScheme, sizes: Sizes, problems: list[str], notes: list[str],
          deep: dict | None = None) -> dict:
    model = _model(files)
    return {
        "schema": SCHEMA_VERSION,
        "ok": not problems,
        "source": files.source, "path": str(files.root), "remote": files.remote,
        "files": {"shards": [p.name for p in files.shard_files], "tensors": len(files.tensors),
                  "tokenizer": files.tokenizer_files, "chat_template": files.has_chat_template},
        "model": model,
        "recipe": _recipe(scheme),
        "layer_groups": layer_groups(scheme),
        "sizes": sizes.as_dict(),
        "support": _support(model, scheme),
        "runtime": _runtime(files, scheme),
        "loads_in": _loads_in(files, scheme),
        "problems": problems,
        "notes": notes,
        "deep": deep,
        "eval": _eval_record(files),
    }


def _eval_record(files: CheckpointFiles) -> dict | None:
    """qtool.json's "eval" (written by `qtool quantize --eval`) of a local checkpoint, else None."""
    if files.remote:
        return None
    from qtool.checkpoint.files import read_json
    try:
        manifest = read_json(Path(files.root) / "qtool.json") or {}
    except QtoolError:          # a broken qtool.json is not a problem of the weights
        return None
    rec = manifest.get("eval")
    return rec if isinstance(rec, dict) and "gap" in rec else None


# ------------------------------------------------------------------------------------------ rendering

def _recipe_line(r: dict) -> str:
    name = r["name"] or ("none (bf16)" if r["quant_method"] == "none" else "no qtool recipe")
    w = " + ".join(registry.weight_format(f).title if f in registry.weight_formats() else f for f in r["weights"])
    a = " + ".join(registry.activation_title(x) for x in r["activations"])
    g = f", group {r['group_size']}" if r["group_size"] else ""
    stage = " + FP8 stage" if r["fp8_weight_stage"] else ""
    kv = r["kv_cache"] + ("" if r["kv_scales"] is None else f" (k/v scales {r['kv_scales']})")
    algo = f" ({r['quant_method']}{' ' + r['quant_algo'] if r['quant_algo'] else ''})" if r["quant_method"] != "none" else ""
    return f"[bold]{name}[/bold]{algo} · weights {w}{g}{stage} · activations {a} · KV cache {kv}"


def render(rep: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    m, r, s = rep["model"], rep["recipe"], rep["sizes"]
    fam = ", ".join(m["family_rows"]) if m["family_rows"] else f"[yellow]{escape(m['family_error'] or '?')}[/yellow]"
    where = "hub" if rep["remote"] else "local"
    console.print(f"[bold]{escape(rep['source'])}[/bold]  ({where}, {len(rep['files']['shards'])} safetensors file(s), "
                  f"{rep['files']['tensors']} tensors)")
    console.print(f"Model     {escape(', '.join(m['architectures']) or '?')} ({m['model_type']}) · matrix rows: {fam} · "
                  f"{human_count(s['parameters'])} parameters · {m['num_layers']} layers")
    console.print(f"Recipe    {_recipe_line(r)}")
    if r["producer"]:
        console.print(f"Producer  {escape(r['producer'])}")
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for col in ("modules", "layers", "count", "weights", "activations", "group"):
        t.add_column(col, justify="right" if col in ("count", "group") else "left")
    for g in rep["layer_groups"]:
        fmt = g["format"] + ("+fp8" if g["fp8_weight_stage"] else "") + (" (excluded)" if g["excluded"] else "")
        t.add_row(escape(g["modules"]), g["layers"] or "-", str(g["count"]), fmt, g["activation"],
                  str(g["group_size"] or "-"))
    console.print(t)
    bpw = f"{s['bits_per_weight']:.2f}" if s["bits_per_weight"] else "?"
    bpwq = f" (quantized linears {s['bits_per_weight_quantized']:.2f})" if s["bits_per_weight_quantized"] else ""
    ratio = f"{s['size_vs_bf16']:.2f}x" if s["size_vs_bf16"] else "?"
    console.print(f"Size      {human_bytes(s['bytes_on_disk'])} on disk · {bpw} bits/weight{bpwq} · {ratio} of bf16 "
                  f"({human_bytes(s['bf16_bytes'])})")
    console.print(f"Memory    weights {human_bytes(s['tensor_bytes'])} + KV cache {human_bytes(s['kv_cache_bytes'])} "
                  f"({s['kv_format']}, context {s['context']} x batch {s['batch']}) = {human_bytes(s['memory_bytes'])}")
    sup = rep["support"]
    what = " + ".join((sup["recipes"] or [r["quant_algo"] or "bf16"]) + ([f"kv {sup['kv']}"] if sup["kv"] else []))
    console.print(f"Support   {escape(what)} on each GPU architecture (TensorRT-LLM matrices; qtool CUDA runtime cell)")
    t = Table(box=None, pad_edge=False, show_edge=False, show_header=False)
    for _ in range(5):
        t.add_column()
    for key, a in sup["architectures"].items():
        verdict = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "[yellow]?[/yellow]"}[a["supported"]]
        why = ("not in the hardware matrix: " + ", ".join(a["hardware_blocked"])) if a["hardware_blocked"] else ""
        t.add_row("         ", key, escape(a["row"]), verdict, f"qtool {a['qtool_cuda']}", escape(why))
    console.print(t)
    for msg in sup["model_reasons"] + sup["rule_reasons"] + ([sup["note"]] if sup.get("note") else []):
        console.print(f"          [yellow]{escape(msg)}[/yellow]")
    rt = rep["runtime"]
    parts = []
    for name, label in (("torch", "torch reference"), ("cuda", "CUDA")):
        e = rt[name]
        parts.append(f"{label} [green]yes[/green]" if e["can_run"] else f"{label} [red]no[/red] ({escape(e['reason'])})")
    console.print("Runtime   " + " · ".join(parts))
    if rep.get("loads_in"):
        cells = []
        for c in rep["loads_in"].values():
            mark = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "[yellow]?[/yellow]"}[c["loads"]]
            cells.append(f"{c['title']} {mark}" + (f" ({escape(c['reason'])})" if c["reason"] and not c["loads"] else ""))
        console.print("Loads in  " + " · ".join(cells))
        for c in rep["loads_in"].values():
            for n in c["notes"]:
                console.print(f"          [yellow]{c['title']}: {escape(n)}[/yellow]")
    if rep.get("eval"):
        console.print(f"Eval      {escape(eval_line(rep['eval']))}")
    if rep["deep"] is not None:
        d = rep["deep"]
        console.print(f"Deep      {d['tensors_read']} tensors read · {len(d['problems'])} value problem(s)")
    for n in rep["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(n)}")
    if rep["problems"]:
        console.print(f"[bold red]{len(rep['problems'])} problem(s):[/bold red]")
        for p in rep["problems"]:
            console.print(f"  [red]problem:[/red] {escape(p)}")
    else:
        console.print("[green]Sound[/green]    no problems found" + ("" if rep["deep"] is not None else
                                                                     " (headers and scales; --deep checks every value)"))


def eval_line(rec: dict) -> str:
    """One line for a qtool.json "eval" record (written by qtool.eval.evaluate; quantize's summary, inspect)."""
    def ci(d, fmt):
        return f"{d['value']:{fmt}} [{d['ci95'][0]:{fmt}}, {d['ci95'][1]:{fmt}}]"
    g = rec["gap"]
    return (f"perplexity {ci(rec['perplexity'], '.3f')} vs source {ci(rec['source_perplexity'], '.3f')}: "
            f"ratio {ci(g['ppl_ratio'], '.4f')}, top-1 agreement {g['top1_agreement']['value']:.3f}, "
            f"mean KL {g['mean_kl']['value']:.4f} ({rec['tokens']} held-out tokens, {rec['backend']} backend, "
            "95 % intervals)")
