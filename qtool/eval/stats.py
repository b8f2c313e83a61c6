"""Per-window sums → estimates with 95 % intervals: a bootstrap over windows (pure Python, fixed seed).

Contract: a run is a list of per-window ``(nll_sum, count)``; a pair of runs over the same windows is a list of
per-window ``(agree, kl_sum, count)`` plus both runs' NLL sums. Windows are the resampling unit (tokens inside a
window are correlated; windows are nearly independent), resampled ``BOOTSTRAP`` times with ``random.Random(SEED)``;
intervals are the 2.5 / 97.5 percentiles. Perplexity = exp(sum NLL / sum count); the ratio of two runs on the same
windows = exp(mean NLL a − mean NLL b), resampled jointly (paired), so shared difficulty of the text cancels.
"""
from __future__ import annotations

import math
import random

BOOTSTRAP = 2000
SEED = 0
LEVEL = 0.95


def _resamples(n: int) -> list[list[int]]:
    rng = random.Random(SEED)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(BOOTSTRAP)]


def _interval(values: list[float]) -> list[float]:
    v = sorted(values)
    lo = v[int(math.floor((1 - LEVEL) / 2 * (len(v) - 1)))]
    hi = v[int(math.ceil((1 + LEVEL) / 2 * (len(v) - 1)))]
    return [lo, hi]


def _mean_ratio(num: list[float], den: list[float], idx=None) -> float:
    idx = range(len(num)) if idx is None else idx
    return sum(num[i] for i in idx) / max(sum(den[i] for i in idx), 1e-300)


def perplexity(windows: list[tuple[float, int]]) -> dict:
    """{'value', 'ci95', 'nll_mean', 'tokens', 'windows'} of one run."""
    nll, cnt = [w[0] for w in windows], [w[1] for w in windows]
    mean = _mean_ratio(nll, cnt)
    boots = [math.exp(_mean_ratio(nll, cnt, idx)) for idx in _resamples(len(nll))] if len(nll) > 1 else [math.exp(mean)]
    return {"value": math.exp(mean), "ci95": _interval(boots), "nll_mean": mean, "tokens": int(sum(cnt)),
            "windows": len(nll)}


def paired(a: list[tuple[float, int]], b: list[tuple[float, int]], pair: list[tuple[int, float, int]]) -> dict:
    """Run a against run b on the same windows: ppl ratio a/b, top-1 agreement, mean KL(b ‖ a), each with its interval."""
    if [w[1] for w in a] != [w[1] for w in b]:
        raise ValueError("paired runs must cover the same windows")
    na, nb, cnt = [w[0] for w in a], [w[0] for w in b], [w[1] for w in a]
    agree, kl = [p[0] for p in pair], [p[1] for p in pair]
    diff = [x - y for x, y in zip(na, nb)]

    def est(idx=None):
        return (math.exp(_mean_ratio(diff, cnt, idx)), _mean_ratio(agree, cnt, idx), _mean_ratio(kl, cnt, idx))

    point = est()
    boots = [est(idx) for idx in _resamples(len(cnt))] if len(cnt) > 1 else [point]
    return {"ppl_ratio": {"value": point[0], "ci95": _interval([x[0] for x in boots])},
            "top1_agreement": {"value": point[1], "ci95": _interval([x[1] for x in boots])},
            "mean_kl": {"value": point[2], "ci95": _interval([x[2] for x in boots])},
            "tokens": int(sum(cnt))}


def worst(pairs: list[dict]) -> dict:
    """The worst of several self-pairs: lowest agreement, highest KL, ratio farthest from 1 (point estimates)."""
    ratios = [p["ppl_ratio"]["value"] for p in pairs]
    return {"top1_agreement": min(p["top1_agreement"]["value"] for p in pairs),
            "mean_kl": max(p["mean_kl"]["value"] for p in pairs),
            "ppl_ratio": max(ratios, key=lambda r: abs(math.log(r)))}
