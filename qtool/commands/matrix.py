"""`qtool matrix`: show the model and hardware support matrices, or answer one support question.

Contract: reads only recipes/ data (no torch); output is rich tables, or JSON with --json
(schema in README.md). With --quant/--kv-cache-quant plus --model and/or --gpu it answers that
one question: exit 0 when supported, 3 when refused.
"""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from qtool.commands._common import guarded, print_json, stdout
from qtool.commands._options import EXIT_CODES_HELP, GPU_HELP, KvRecipe, WeightRecipe, kv_value, value
from qtool.formats import registry
from qtool.support import consumers, data
from qtool.support.check import check_request, runtime_cell, usable_recipes
from qtool.support.families import rows_for_model
from qtool.support.gpus import archs, resolve_gpu

EPILOG = ("Examples:  qtool matrix  |  qtool matrix --gpu h100  |  qtool matrix --model ./Llama-3.1-8B  |  "
          "qtool matrix --model 'LLaMA 3' --quant fp8-rowwise  |  qtool matrix --gpu sm90 --quant nvfp4 --json.  "
          + EXIT_CODES_HELP)


def _matrix_json(m: data.Matrix, rows=None) -> dict:
    rows = rows or m.rows
    return {"columns": list(m.columns), "rows": {r: m.row_dict(r) for r in rows}, "notes": list(m.notes)}


def _short_headers() -> dict[str, str]:
    """Matrix column → the CLI recipe name, stacked on two lines (keeps 12 columns in 80 characters)."""
    return {col: name.replace("-", "\n").replace(" ", "\n") for name, col in _recipe_columns().items()}


def _table(m: data.Matrix, title: str, rows=None, first: str = "Model") -> Table:
    t = Table(title=title, title_justify="left", show_lines=False, pad_edge=False, padding=(0, 1),
              caption="columns are qtool recipe names (see the list below the tables)", caption_justify="left")
    t.add_column(first, style="bold", no_wrap=True)
    heads = _short_headers()
    for c in m.columns:
        t.add_column(heads.get(c, c), justify="center", no_wrap=True)
    for r in rows or m.rows:
        t.add_row(r, *[("[green]Y[/green]" if m.cells[(r, c)] == "Y" else "[dim].[/dim]") for c in m.columns])
    return t


def _print_notes(m: data.Matrix) -> None:
    for n in m.notes:
        stdout.print(f"[dim]Note: {n}[/dim]")


def _runtime_row(arch) -> dict[str, str]:
    """Matrix column → qtool runtime cell ('Y', 'q', '.') on `arch` (check.runtime_cell)."""
    return {col: runtime_cell(arch, label) for label, col in _recipe_columns().items()}


def _recipe_columns() -> dict[str, str]:
    out = {n: r.column for n, r in registry.recipes()["weights"].items()}
    out.update({f"kv {n}": r.column for n, r in registry.recipes()["kv"].items()})
    return out


@guarded
def matrix(
    gpu: Optional[str] = typer.Option(None, "--gpu", help=GPU_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="A model folder (config.json is read) or a family name as the matrix spells it, e.g. 'LLaMA 3', 'Qwen-2/2.5'."),
    family: Optional[str] = typer.Option(None, "--family", help="Use this matrix row instead of detecting it from --model."),
    quant: Optional[WeightRecipe] = typer.Option(None, "--quant", help="Ask about this weight/activation recipe."),
    kv_cache_quant: Optional[KvRecipe] = typer.Option(None, "--kv-cache-quant", help="Ask about this KV-cache recipe."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable output (schema in README)."),
):
    """Show which quantization recipes each model family and each GPU architecture supports."""
    quant_s, kv_s = value(quant), kv_value(kv_cache_quant)
    arch = resolve_gpu(gpu) if gpu else None
    rows, how = (None, None)
    if model or family:
        rows, how = rows_for_model(model or family, family)
    mm, hm = data.model_matrix(), data.hardware_matrix()

    if quant_s or kv_s:
        return _answer(rows, how, arch, quant_s, kv_s, json_output)

    if json_output:
        out = {"recipes": _recipe_columns()}
        if arch is None and rows is None:
            out.update(model_matrix=_matrix_json(mm), hardware_matrix=_matrix_json(hm),
                       rules=data.notes()["rules"]["notes"], loads_in=consumers.recipe_rows())
        if arch is not None:
            out["gpu"] = {"arch": arch.key, "row": arch.row, "title": arch.title,
                          "supports": hm.row_dict(arch.row),
                          "qtool_runtime": _runtime_row(arch),
                          "recipes": usable_recipes(None, arch),
                          "families": {r: usable_recipes([r], arch) for r in (rows or mm.rows)}}
        if rows is not None:
            out["model"] = {"query": model or family, "rows": rows, "matched_by": how,
                            "matrix": {r: mm.row_dict(r) for r in rows},
                            "recipes": usable_recipes(rows, None)}
        print_json(out)
        return

    if arch is None and rows is None:
        stdout.print(_table(mm, "Model support matrix (TensorRT-LLM)"))
        _print_notes(mm)
        stdout.print()
        stdout.print(_table(hm, "Hardware support matrix (TensorRT-LLM)", first="GPU"))
        _print_notes(hm)
        stdout.print()
        for n in data.notes()["rules"]["notes"]:
            stdout.print(f"[dim]Rule: {n}[/dim]")
        stdout.print("[dim]Recipe names: " + "; ".join(f"{k} = {v}" for k, v in _recipe_columns().items()) + "[/dim]")
        stdout.print()
        stdout.print(_loads_in_table())
        return
    if rows is not None:
        stdout.print(f"[bold]{model or family}[/bold] → {', '.join(rows)} ({how}); a recipe is supported when any of these rows says Y.")
        stdout.print(_table(mm, "Model support matrix", rows=rows))
        stdout.print("Supported recipes: " + (", ".join(usable_recipes(rows, None)) or "none"))
    if arch is not None:
        t = _table(hm, f"{arch.title}: hardware support (TensorRT-LLM) and qtool's runtime", rows=[arch.row], first="GPU")
        cells = _runtime_row(arch)
        t.add_row("qtool runtime", *[{"Y": "[green]Y[/green]", "q": "[yellow]q[/yellow]"}.get(cells[c], "[dim].[/dim]")
                                     for c in hm.columns])
        stdout.print(t)
        stdout.print("[dim]qtool runtime: Y = supported and run by qtool's CUDA kernels; q = run by qtool's kernels "
                     "(decoded in-kernel) although the hardware matrix says '.'; `qtool run --strict` refuses q. "
                     f"GPU tests have passed on: {', '.join(data.runtime_support().get('cuda', {}).get('tested', []))}.[/dim]")
        stdout.print(f"{arch.label} supports: " + (", ".join(usable_recipes(None, arch)) or "none"))
        t = Table(title=f"What each model family can use on {arch.label}", title_justify="left")
        t.add_column("Family", style="bold")
        t.add_column("Recipes (model and hardware matrix both Y)")
        for r in rows or mm.rows:
            t.add_row(r, ", ".join(usable_recipes([r], arch)) or "[dim]none[/dim]")
        stdout.print(t)


def _loads_in_table() -> Table:
    """recipe × consumer: the export layout each loads (recipes/consumers.toml), or why not."""
    t = Table(title="Loads in: the export layout each consumer reads (qtool quantize --for)", title_justify="left",
              caption="versions and loader files: recipes/consumers.toml; '.' = cannot load (qtool matrix --json: why)",
              caption_justify="left")
    t.add_column("Recipe", style="bold", no_wrap=True)
    for c in consumers.TARGETS:
        t.add_column(f"{consumers.title(c)}")
    for label, per in consumers.recipe_rows().items():
        cells = []
        for c in consumers.TARGETS:
            e = per[c]
            if not e["layouts"]:
                cells.append("[dim].[/dim]")
                continue
            g = [x for x in (e.get("group_sizes") or []) if x > 0]
            cells.append("[green]" + " | ".join(e["layouts"]) + "[/green]" + (f" (group {'/'.join(map(str, g))})" if g else ""))
        t.add_row(label, *cells)
    return t


def _loads_in(quant, kv) -> dict:
    ch = consumers.choose(quant, kv) if quant else None
    return ch.as_dict() if ch else {}


def _answer(rows, how, arch, quant, kv, json_output):
    if rows is None and arch is None:
        v = check_request(None, quant, kv, None, any_arch=True)
        mm = data.model_matrix()
        cols = [registry.recipes()[k][n].column for k, n in (("weights", quant), ("kv", kv)) if n]
        fams = [r for r in mm.rows if all(mm.supported(r, c) for c in cols)]
        if json_output:
            print_json({"query": {"quant": quant, "kv_cache_quant": kv}, "supported": v.supported,
                        "families": fams, "architectures": v.archs_ok, "verdict": v.as_dict(),
                        "loads_in": _loads_in(quant, kv)})
        else:
            stdout.print(f"{' + '.join(cols)}: families {', '.join(fams) or 'none'}; "
                         f"architectures {', '.join(v.archs_ok) or 'none'}.")
            if not v.supported:
                stdout.print("[red]refused:[/red] " + v.message())
            _print_loads_in(quant, kv)
        raise typer.Exit(0 if v.supported else 3)
    v = check_request(rows, quant, kv, arch)
    if json_output:
        print_json({"query": {"rows": rows, "matched_by": how, "gpu": arch.key if arch else None,
                              "quant": quant, "kv_cache_quant": kv}, **v.as_dict(), "loads_in": _loads_in(quant, kv)})
    else:
        what = " + ".join(x for x in (quant, f"kv {kv}" if kv else None) if x)
        subject = " / ".join(filter(None, [", ".join(rows) if rows else None,
                                           f"{arch.label}" if arch else None]))
        if v.supported:
            stdout.print(f"[green]supported:[/green] {what} for {subject}.")
        else:
            stdout.print(f"[red]refused:[/red] {what} for {subject}. " + v.message())
        _print_loads_in(quant, kv)
    raise typer.Exit(0 if v.supported else 3)


def _print_loads_in(quant, kv) -> None:
    if not quant:
        return
    from rich.markup import escape
    ch = consumers.choose(quant, kv)
    stdout.print(f"Loads in: {consumers.names(ch.loads_in) or 'none'} ({ch.layout} layout by default)"
                 + "".join(f"; {consumers.title(t)}: {escape(c.reason)}" for t, c in ch.cells.items() if not c.loads))
