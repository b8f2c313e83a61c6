"""Scoring models on the runtime: token windows → per-window sums of every run and every pair of runs.

Contract: ``load_model(ref, backend)`` resolves a model (folder, .gguf, hub id or built-in name, through
qtool.sources), loads its weights in their quantized form and builds ``runtime.model.Model`` on the named backend
('torch' = float32 CPU reference, 'cuda'), with the checkpoint's own KV-cache format. ``windows(ids, window,
max_tokens)`` cuts the token stream into consecutive non-overlapping windows (the last one kept when it has at
least 2 tokens). ``score(runs, pairs, windows, progress)`` runs every window through every run with
``Model.forward(all_logits=True)`` (a fresh cache per window, positions 0..T-1) and, for the T-1 predicted tokens,
sums the NLL of each run and, for each pair (a, b), the top-1 agreements and KL(b ‖ a) = Σ p_b (log p_b − log p_a).
A run may perturb its input embeddings: x · (1 + 2⁻²⁰ · randn), randn from a CPU generator seeded by
(seed, window), so the same perturbation reaches either backend; or (``sum64``, reference backend only) sum every
linear in float64 before rounding to float32. All sums are float64 Python numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.errors import UsageError

PERTURB = 2.0 ** -20


@dataclass
class Loaded:
    ref: str            # what the user gave
    label: str          # human description
    path: str           # local folder
    backend: str        # 'torch' | 'cuda'
    kv: str             # KV-cache format used
    model: object       # qtool.runtime.model.Model
    tokenizer: object
    recipe: str         # weight recipe ('bf16' when unquantized)


@dataclass
class Run:
    name: str
    loaded: Loaded
    perturb_seed: int | None = None
    sum64: bool = False     # the reference backend with every linear summed in float64 (torch backend only)


def load_model(ref: str, backend: str, progress: bool = True) -> Loaded:
    from qtool.runtime.backends import make_backend
    from qtool.runtime.chat import load_tokenizer
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    from qtool.sources import resolve_model_source
    src = resolve_model_source(ref, progress=progress)
    be = make_backend(backend)
    w = load_model_weights(str(src.path), progress=progress)
    recipe = _recipe(src.path)
    return Loaded(ref, src.label, str(src.path), be.name, w.kv_format, Model(w, be), load_tokenizer(src.path), recipe)


def _recipe(folder) -> str:
    from qtool.checkpoint.files import open_checkpoint
    from qtool.checkpoint.scheme import describe
    recipes = describe(open_checkpoint(str(folder))).checked_recipes()
    return "+".join(r for r in recipes if r) or "bf16"


def tokenize(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def windows(ids: list[int], window: int, max_tokens: int = 0) -> list[list[int]]:
    if window < 2:
        raise UsageError("--window must be at least 2 tokens")
    ids = ids[:max_tokens] if max_tokens else ids
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    out = [w for w in out if len(w) >= 2]
    if not out:
        raise UsageError("the evaluation text has fewer than 2 tokens")
    return out


def _logprobs(run: Run, ids: list[int], w_index: int) -> torch.Tensor:
    m = run.loaded.model
    be = m.backend
    x = torch.tensor([ids], dtype=torch.long, device=be.device)
    pos = torch.arange(len(ids), device=be.device)[None]
    if run.perturb_seed is not None:
        plain = be.embed
        gen = torch.Generator().manual_seed(run.perturb_seed * 1_000_003 + w_index)

        def embed(t):
            e = plain(t)
            noise = torch.randn(e.shape, generator=gen, dtype=torch.float32).to(e.device)
            return e * (1.0 + PERTURB * noise).to(e.dtype)
        be.embed = embed
    if run.sum64:
        be.sum64 = True
    try:
        cache = m.new_cache(1, len(ids), run.loaded.kv)
        logits = m.forward(x, pos, cache, all_logits=True)[0, :-1]
    finally:
        if run.perturb_seed is not None:
            del be.embed
        if run.sum64:
            be.sum64 = False
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def score(runs: list[Run], pairs: list[tuple[str, str]], wins: list[list[int]], advance=None):
    """({run: [(nll_sum, count)]}, {(a, b): [(agree, kl_sum, count)]}) over the windows."""
    per_run = {r.name: [] for r in runs}
    per_pair = {p: [] for p in pairs}
    with torch.inference_mode():
        for wi, ids in enumerate(wins):
            target = torch.tensor(ids[1:], dtype=torch.long)
            lps = {}
            for r in runs:
                lp = _logprobs(r, ids, wi)
                lps[r.name] = lp
                nll = -lp.gather(1, target[:, None]).double().sum().item()
                per_run[r.name].append((nll, len(ids) - 1))
                if advance:
                    advance()
            for a, b in pairs:
                la, lb = lps[a], lps[b]
                agree = int((la.argmax(-1) == lb.argmax(-1)).sum())
                kl = (lb.exp() * (lb - la)).sum(-1).double().sum().item()
                per_pair[(a, b)].append((agree, kl, len(ids) - 1))
    return per_run, per_pair
