"""The quantize pipeline: `prepare` (all checks, nothing loaded) then `run` (load → calibrate → export).

Contract: `prepare(Request)` refuses an input that is already quantized (exit 2), resolves the family rows (from --family or the model's config.json,
read without loading weights), the target architecture (--gpu, else the local GPU, else any
architecture), runs `check_request` + `enforce` (Unsupported, exit 3, unless force), checks the
output folder, the INT4 block size, CUDA needs and the calibration source, and returns a Plan.
`run(Plan)` does the work inside an atomic output folder and returns the result dict that is
also the core of qtool.json. One model per process (see docs/quantize.md: ModelOpt's KV-cache
plugin leaves process-wide state behind).
"""
from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qtool.errors import UsageError
from qtool.formats.registry import Recipe, recipe
from qtool.quantize import configs, plan as planmod
from qtool.quantize.output import check_target, staged


@dataclass
class Request:
    model: str
    quant: str
    kv: str | None                   # KV recipe; None = no KV-cache quantization
    output: Path
    gpu: str | None = None
    family: str | None = None
    calib_data: Path | None = None
    calib_size: int = 512
    calib_seq_len: int = 512
    batch_size: int = 0
    block_size: int = 128
    device_map: str | None = None
    max_memory: str | None = None
    force: bool = False
    targets: str | None = None      # --for: trtllm, vllm, qtool, all (None: every consumer where possible)
    algorithm: str | None = None    # --algorithm: recipes/algorithms.toml (None: the recipe's own)
    eval_tokens: int = 0            # --eval: score this many held-out tokens against the source (0: off)
    # --eval's scorer, (checkpoint, source, tokens) -> qtool.json's "eval" record: given by the command layer
    # (qtool.eval sits above quantize, which may not import it); needed when eval_tokens > 0
    evaluator: Callable[[Path, Path, int], dict] | None = None
    progress: bool = True
    debug: bool = False


@dataclass
class Plan:
    req: Request
    rows: list[str]
    rows_how: str
    arch: object | None
    verdict: object
    force_warning: str | None
    config: dict | None
    texts: list[str] = field(default_factory=list)
    calib_desc: str = ""
    block_size: int | None = None
    choice: object | None = None    # qtool.support.consumers.Choice: the export layout and where it loads
    recipe: Recipe | None = None               # the weight recipe, looked up once
    kv_recipe: Recipe | None = None            # None: no KV-cache quantization
    source: object | None = None               # ModelSource when prepare already resolved it (a hub id)
    max_memory: dict | None = None             # --max-memory, parsed


def _rows(req: Request, cfg: dict | None, how: str) -> tuple[list[str], str]:
    from qtool.support.families import resolve_family, rows_for_config
    if req.family:
        return [resolve_family(req.family)], "given by --family"
    if cfg is None:
        return [], ""
    return rows_for_config(cfg), f"detected from {how}"


def prepare(req: Request) -> Plan:
    from qtool.support.check import check_request, enforce
    from qtool.support.gpus import target_arch

    if req.eval_tokens and req.evaluator is None:
        raise ValueError("Request.eval_tokens needs Request.evaluator (the command layer's qtool.eval scorer)")
    src = None
    cfg, how = planmod.peek_config(req.model)
    if cfg is None:
        from qtool.sources import resolve_model_source   # a hub id: fetched first; a bad path: one line
        src = resolve_model_source(req.model, progress=req.progress)
        req.model = str(src.path)
        cfg, how = planmod.peek_config(req.model)
    _refuse_quantized_input(req.model)
    rows, rows_how = _rows(req, cfg, how)
    arch = target_arch(req.gpu)
    verdict = check_request(rows or None, req.quant, req.kv, arch, any_arch=arch is None)
    force_warning = enforce(verdict, req.force)
    check_target(req.output, req.force, req.model)
    rec, kv_rec = recipe("weights", req.quant), (recipe("kv", req.kv) if req.kv else None)
    block = req.block_size if rec.get("block_size_option") else None
    configs.check_algorithm(req.quant, req.algorithm)
    from qtool.quantize import targets
    choice = targets.resolve(req.quant, req.kv, req.targets, block, cfg)
    cuda = planmod.cuda_problem(rec, kv_rec)
    if cuda:
        from qtool.errors import Failure
        raise Failure(cuda, hint="run it on a machine with an NVIDIA GPU")
    from qtool.calibration import calibration_texts
    max_memory = None
    if req.max_memory:
        from qtool.quantize.ptq import parse_max_memory
        max_memory = parse_max_memory(req.max_memory)
        if not req.device_map:
            raise UsageError("--max-memory needs --device-map (e.g. --device-map auto)")
    texts, desc = calibration_texts(str(req.calib_data) if req.calib_data else None, req.calib_size)
    return Plan(req, rows, rows_how, arch, verdict, force_warning, cfg, texts, desc, block, choice, rec, kv_rec, src,
                max_memory)


def _refuse_quantized_input(model: str) -> None:
    """Exit 2 for an input that is already quantized: its scales would be ignored on load (docs/quantize.md)."""
    from qtool.checkpoint.validate import quantized_input
    if Path(model).expanduser().is_dir() and (what := quantized_input(Path(model).expanduser())):
        raise UsageError(f"{model} is already quantized: {what}; qtool quantizes bf16/fp16/fp32 checkpoints",
                         hint="give the unquantized model it was made from")


def _peak_memory() -> dict:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_mib": round(rss_kib / 1024, 1), "cuda_max_allocated_mib": None}
    try:
        import torch
        if torch.cuda.is_available():
            out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far: robust to other load on the machine."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return round(ru.ru_utime + ru.ru_stime, 2)


def _versions() -> dict:
    from importlib.metadata import version
    out = {}
    for key, dist in (("modelopt_version", "nvidia-modelopt"), ("torch_version", "torch"),
                      ("transformers_version", "transformers")):
        try:
            out[key] = version(dist)
        except Exception:  # noqa: BLE001
            out[key] = None
    return out


def _auto_batch(req: Request) -> int:
    if req.batch_size:
        return req.batch_size
    import torch
    return 16 if torch.cuda.is_available() else 4


def run(plan: Plan) -> dict:
    from qtool.quantize import export as exp, ptq
    from qtool.quantize.manifest import build_manifest, write_manifest
    from qtool.quantize.progress import Stages
    from qtool.sources import resolve_model_source

    req = plan.req
    t0 = time.perf_counter()
    _sigterm_as_interrupt()
    source = plan.source or resolve_model_source(req.model, progress=req.progress)
    spec = plan.recipe.spec
    label = req.quant + (f" + kv {req.kv}" if req.kv else "")
    with staged(req.output, req.force, source.path) as tmp, Stages(req.progress) as stages:
        stages.stage(f"loading {source.path.name}")
        offload = tmp / ".offload"
        with ptq.quiet(req.debug):
            model, tok = ptq.load_model(source.path, req.device_map, plan.max_memory, offload)
            cfg = configs.build_config(plan.recipe, plan.kv_recipe, plan.block_size, req.algorithm)
        from qtool.calibration import calibration_batches
        batch = _auto_batch(req)
        batches = calibration_batches(tok, plan.texts, req.calib_seq_len, batch)
        n_samples = sum(int(b["input_ids"].shape[0]) for b in batches)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        t_cal = time.perf_counter()
        passes = ptq.calibrate(model, cfg, batches, stages, label, req.debug)
        calib_s = time.perf_counter() - t_cal
        stages.stage(f"exporting to {req.output}")
        t_exp = time.perf_counter()
        exp.export_checkpoint(model, tok, source.path, tmp, req.debug)
        modelopt_hf = None
        versions = _versions()
        if spec.get("quant_method") == "gptq":
            stages.stage("writing the GPTQ layout")
            conv = _gptq(tmp, plan.block_size, bool(spec.get("fp8_activations")), versions["modelopt_version"])
            modelopt_hf = conv["modelopt_hf_quant_config"]
        from qtool.quantize.targets import finish
        consumers_rec = finish(tmp, plan.choice, plan.block_size, versions["modelopt_version"])
        modelopt_hf = consumers_rec.pop("replaced_hf_quant_config", modelopt_hf)
        export_s = time.perf_counter() - t_exp
        if offload.exists():
            import shutil
            shutil.rmtree(offload, ignore_errors=True)
        evaluation = None
        if req.eval_tokens:
            stages.stage(f"evaluating against {source.path.name} ({req.eval_tokens} held-out tokens)")
            del model
            evaluation = req.evaluator(tmp, source.path, req.eval_tokens)
        stages.stage("writing qtool.json")
        result = _result(plan, source, tmp, cfg, versions, modelopt_hf, batch, n_samples, n_tokens, passes,
                         calib_s, export_s, t0)
        result["eval"] = result["manifest"]["eval"] = evaluation
        result["consumers"] = result["manifest"]["consumers"] = consumers_rec
        write_manifest(tmp, build_manifest(**result["manifest"]))
        result["files"] = sorted(p.name for p in tmp.iterdir())
        result["size_mib"] = round(sum(p.stat().st_size for p in tmp.iterdir()) / 2**20, 2)
    result.pop("manifest")
    result["output"] = str(Path(req.output).resolve())
    return result


def _sigterm_as_interrupt() -> None:
    """The first SIGTERM unwinds like Ctrl-C, so the staged output folder is removed (main thread only)."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)    # a second SIGTERM kills at once
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:      # not the main thread (e.g. an embedding test runner)
        pass


def _gptq(tmp: Path, group: int, fp8_act: bool, modelopt_version: str) -> dict:
    from qtool.quantize.gptq_layout import convert_to_gptq
    return convert_to_gptq(tmp, group, fp8_act, modelopt_version or "?")


def _result(plan: Plan, source, tmp: Path, cfg: dict, versions: dict, modelopt_hf, batch, n_samples, n_tokens,
            passes, calib_s, export_s, t0) -> dict:
    req = plan.req
    spec = plan.recipe.spec
    hf_q = tmp / "hf_quant_config.json"
    hfq = json.loads(hf_q.read_text()).get("quantization", {}) if hf_q.is_file() else {}
    config_q = json.loads((tmp / "config.json").read_text()).get("quantization_config", {})
    fmt = (config_q.get("quant_method") if config_q.get("quant_method") not in (None, "modelopt")
           else (hfq.get("quant_algo") or "?"))
    calibration = {"source": plan.calib_desc, "data": str(req.calib_data) if req.calib_data else None,
                   "size": req.calib_size, "samples": n_samples, "tokens": n_tokens, "seq_len": req.calib_seq_len,
                   "batch_size": batch, "passes": passes, "algorithm": configs.describe_algorithm(cfg),
                   "seconds": round(calib_s, 2)}
    target = (f"{plan.arch.row} ({plan.arch.key})" if plan.arch is not None else None)
    peak = _peak_memory()
    wall = round(time.perf_counter() - t0, 2)
    manifest_facts = {
        **versions,
        "source": {"model": req.model, "label": source.label, "kind": source.kind, "path": str(source.path),
                   "families": plan.rows, "families_from": plan.rows_how},
        "recipe": {"name": req.quant, "column": plan.recipe.column,
                   "modelopt_config": spec["modelopt_config"], "quant_algo": hfq.get("quant_algo"),
                   "quant_method": spec.get("quant_method"), "group_size": hfq.get("group_size") or plan.block_size},
        "kv_cache": {"name": req.kv or "none",
                     "modelopt_config": plan.kv_recipe.spec["modelopt_config"] if plan.kv_recipe else None,
                     "kv_cache_quant_algo": hfq.get("kv_cache_quant_algo")},
        "modelopt": {"algorithm": cfg.get("algorithm"), "hf_quant_config": hfq or None,
                     "replaced_hf_quant_config": modelopt_hf},
        "calibration": calibration,
        "target": {"gpu": req.gpu, "arch": plan.arch.key if plan.arch is not None else None, "row": target,
                   "any_arch": plan.arch is None},
        "verdict": plan.verdict.as_dict(),
        "forced": bool(plan.force_warning),
        "force_warning": plan.force_warning,
        "format": fmt,
        "wall_time_s": wall,
        "peak_memory": peak,
        "device": peak.get("cuda_device") or "cpu",
        "files": sorted(p.name for p in tmp.iterdir()) + ["qtool.json"],
        "timings_s": {"calibration": round(calib_s, 2), "export": round(export_s, 2), "cpu_user_sys": _cpu_s()},
    }
    return {"recipe": req.quant, "kv_cache": req.kv or "none", "format": fmt,
            "quant_algo": hfq.get("quant_algo"), "kv_cache_quant_algo": hfq.get("kv_cache_quant_algo"),
            "calibration": calibration, "wall_time_s": wall, "peak_memory": peak, "forced": bool(plan.force_warning),
            "verdict": plan.verdict.as_dict(), "architectures_supported": plan.verdict.archs_ok,
            "target": target, "source": source.label, "manifest": manifest_facts}
