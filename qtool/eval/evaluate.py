"""One evaluation, end to end: load, tokenize, score, summarise into the result dict of `qtool eval --json`.

Contract: ``evaluate(EvalRequest, progress)`` loads each model and the baseline once (a (reference, backend) pair
loaded once, so a baseline equal to a model is reused), tokenizes the text with the first model's tokenizer (a
model whose tokenizer gives other ids is a UsageError), cuts windows, and scores, every window through every run:
  * each model's perplexity with its 95 % interval (``results``, in the order given);
  * with a baseline: its perplexity, and per model the paired gap (ppl ratio model/baseline, top-1 agreement,
    mean KL(baseline ‖ model), each with its interval);
  * with ``noise_floor`` N > 0: N more runs of the reference (the baseline, else the first model), each with its
    input embeddings scaled by 1 + 2⁻²⁰·randn (seeds 1..N); every pair among the reference and those runs is
    compared the same way, and the floor is the worst self-pair (lowest agreement, highest KL, ratio farthest
    from 1). Per model, ``within_floor`` says whether its gap is no worse than that floor.
``progress`` is a callable(total) → advance() or None. Returns a JSON-ready dict.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import UsageError
from qtool.eval import DEFAULT_TEXT, stats


@dataclass
class EvalRequest:
    models: list[str]
    text: Path | None = None
    window: int = 512
    max_tokens: int = 16384
    backend: str = "torch"
    baseline: str | None = None
    baseline_backend: str | None = None
    noise_floor: int = 0
    show_progress: bool = True


def read_text(path: Path | None) -> tuple[str, str]:
    p = Path(path) if path else DEFAULT_TEXT
    if not p.is_file():
        raise UsageError(f"--text file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--text {p}: not UTF-8 text")
    if not text.strip():
        raise UsageError(f"--text {p}: empty")
    label = f"qtool/data/{p.name} (default)" if path is None else str(p)
    return text, label


def evaluate(req: EvalRequest, progress=None) -> dict:
    from qtool.eval import score as sc
    t0 = time.perf_counter()
    if not req.models:
        raise UsageError("give at least one MODEL")
    if req.noise_floor < 0:
        raise UsageError("--noise-floor must be 0 or more")
    text, text_label = read_text(req.text)
    loaded: dict[tuple[str, str], sc.Loaded] = {}

    def get(ref: str, backend: str):
        key = (ref, backend)
        if key not in loaded:
            loaded[key] = sc.load_model(ref, backend, req.show_progress)
        return loaded[key]

    models = [get(m, req.backend) for m in req.models]
    ids = sc.tokenize(models[0].tokenizer, text)
    base = get(req.baseline, req.baseline_backend or req.backend) if req.baseline else None
    for other in models[1:] + ([base] if base is not None else []):
        if other is not models[0] and sc.tokenize(other.tokenizer, text) != ids:
            raise UsageError(f"{other.ref}: its tokenizer splits the text differently from {models[0].ref}'s",
                             hint="compare checkpoints of the same model")
    wins = sc.windows(ids, req.window, req.max_tokens)

    names = [f"model{i}" for i in range(len(models))]
    runs = [sc.Run(n, m) for n, m in zip(names, models)]
    ref_name = "baseline" if base is not None else names[0]
    ref = base if base is not None else models[0]
    pairs = []
    if base is not None:
        runs.append(sc.Run("baseline", base))
        pairs += [(n, "baseline") for n in names]
    floor_names = [ref_name] + [f"floor{i}" for i in range(1, req.noise_floor + 1)]
    runs += [sc.Run(n, ref, perturb_seed=i) for i, n in enumerate(floor_names[1:], 1)]
    sum64 = req.noise_floor > 0 and ref.backend == "torch"
    if sum64:
        floor_names.append("floor_sum64")
        runs.append(sc.Run("floor_sum64", ref, sum64=True))
    floor_pairs = [(b, a) for i, a in enumerate(floor_names) for b in floor_names[i + 1:]]
    pairs += floor_pairs

    advance = progress(len(wins) * len(runs)) if progress else None
    per_run, per_pair = sc.score(runs, pairs, wins, advance)

    out = {"ok": True,
           "text": {"source": text_label, "tokens_available": len(ids), "tokens_scored": sum(len(w) - 1 for w in wins),
                    "window": req.window, "windows": len(wins)},
           "interval": f"95 % bootstrap over windows ({stats.BOOTSTRAP} resamples, seed {stats.SEED})"}
    if base is not None:
        out["baseline"] = {**_describe(base), "perplexity": stats.perplexity(per_run["baseline"])}
    if req.noise_floor:
        self_pairs = [{"pair": [a, b], **stats.paired(per_run[a], per_run[b], per_pair[(a, b)])}
                      for a, b in floor_pairs]
        out["noise_floor"] = {"runs": req.noise_floor, "reference": ref.ref, "backend": ref.backend,
                              "perturbation": "input embeddings x (1 + 2^-20 randn), seeds 1..N"
                              + ("; and every linear summed in float64 (floor_sum64)" if sum64 else ""),
                              "worst": stats.worst(self_pairs), "pairs": self_pairs}
    results = []
    for n, m in zip(names, models):
        r = {**_describe(m), "perplexity": stats.perplexity(per_run[n])}
        if base is not None:
            r["gap"] = stats.paired(per_run[n], per_run["baseline"], per_pair[(n, "baseline")])
            if req.noise_floor:
                r["within_floor"] = _within(r["gap"], out["noise_floor"]["worst"])
        results.append(r)
    out["results"] = results
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _describe(m) -> dict:
    return {"ref": m.ref, "label": m.label, "recipe": m.recipe, "kv_cache": m.kv, "backend": m.backend}


def _within(gap: dict, worst: dict) -> dict:
    import math
    return {"top1_agreement": gap["top1_agreement"]["value"] >= worst["top1_agreement"],
            "mean_kl": gap["mean_kl"]["value"] <= worst["mean_kl"],
            "ppl_ratio": abs(math.log(gap["ppl_ratio"]["value"])) <= abs(math.log(worst["ppl_ratio"]))}


def evaluate_checkpoint(path, source, max_tokens: int, window: int = 256, backend: str = "auto") -> dict:
    """`qtool quantize --eval`: the new checkpoint against its source on the default text (no noise floor).

    Returns the compact record stored as qtool.json's "eval": text, tokens, window, backend, both perplexities
    and the gap (ratio, agreement, KL), each with its 95 % interval.
    """
    from qtool.runtime.backends import resolve_backend_name
    backend = resolve_backend_name(backend)
    r = evaluate(EvalRequest(models=[str(path)], window=window, max_tokens=max_tokens, backend=backend,
                             baseline=str(source), show_progress=False))
    m = r["results"][0]
    return {"text": r["text"]["source"], "tokens": r["text"]["tokens_scored"], "window": window,
            "windows": r["text"]["windows"], "backend": backend, "interval": r["interval"],
            "perplexity": m["perplexity"], "source_perplexity": r["baseline"]["perplexity"], "gap": m["gap"],
            "seconds": r["seconds"]}
