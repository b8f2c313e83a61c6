"""End to end: the CUDA backend against the PyTorch reference backend (qtool.runtime.backends.torch_ref).

Tiny random checkpoints (tests/tiny_models.py) per family; quantized recipes are built in memory by re-encoding
every decoder linear with qtool.formats' ModelOpt-equivalent encoders (ModelOpt itself is not on the GPU
machine), GPTQ / AutoAWQ / DeepSeek-FP8 checkpoints with the independent test packers (tests/packers.py) and
loaded through the real loader. Over prefill + 32 teacher-forced decode steps: logits relative error <= 5e-2
and top-1 equal on >= 95% of steps (docs/numerics.md) — or, for recipes whose reference is itself that
sensitive, within the reference's own noise floor: the reference run against itself with every linear input
perturbed by up to 2e-7 relative (float32 rounding level; seen 2026-11-28: dynamic-FP8 recipes on these tiny
random models move up to 0.09 and agree on 79-100% of steps under that perturbation alone), else by up to 2^-9
(the prefill GEMMs' operand precision: bf16 operands or fp8 tensor-core sums), worst of 4 perturbations each;
the CUDA backend must stay within 1.5x that error and 10 points of that agreement. Also: CUDA-graph replay == eager (bitwise), and the
greedy continuation of a SmolLM2-shaped random model matches the reference.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.gpu
STEPS = 32


def _requant(mw, fmt, act, kv="bf16"):
    """A copy of ModelWeights mw with every decoder linear re-encoded as fmt / act (lm_head stays bf16)."""
    import test_kernels as tk
    g = torch.Generator().manual_seed(1)
    layers = []
    for L in mw.layers:
        new = {}
        for name in ("qkv", "o", "gate_up", "down"):
            lw = getattr(L, name)
            q = tk._lw(fmt, lw.dequantize(), act, g)
            q.bias = lw.bias
            new[name] = q
        scales = {"k_scale": 0.02, "v_scale": 0.02} if kv != "bf16" else {}
        layers.append(dataclasses.replace(L, **new, **scales))
    return dataclasses.replace(mw, layers=layers, kv_format=kv)


F32_NOISE = 2e-7          # float32 rounding of a linear's input
OPERAND_NOISE = 2.0 ** -9  # half a bf16 ulp at the bottom of a binade: the prefill GEMMs' operand precision


def _noisy_backend(seed: int, rel: float = F32_NOISE):
    from qtool.runtime.backends.torch_ref import TorchRefBackend

    class Noisy(TorchRefBackend):
        def linear(self, x, lw):
            g = torch.Generator().manual_seed(x.numel() * 7 + seed)
            return super().linear(x * (1 + rel * (2 * torch.rand(x.shape, generator=g) - 1)), lw)
    return Noisy()


def _within_floor(mw, kv, err, agree, rel):
    """(ok, detail): the CUDA result against the worst of 4 perturbations of the reference at ``rel`` (one is not
    enough: seen 2026-11-28 on qwen3 fp8-block, four seeds moved the reference by 0.012, 0.047, 0.084, 0.093)."""
    noise = [_run(mw, kv, other=_noisy_backend(s, rel)) for s in range(4)]
    nerr, nagree = max(n[0] for n in noise), min(n[1] for n in noise)
    return err <= max(5e-2, 1.5 * nerr) and agree >= min(0.95, nagree - 0.10), (rel, noise)


def _check(mw, kv):
    """Assert the CUDA backend is within numerics.md's bound of the reference, or within the reference's own noise
    floor: first at float32 rounding of every linear input, then at the prefill GEMMs' operand precision (bf16
    operands, or e4m3 products summed by the fp8 tensor cores' accumulator: 1.3e-4 from float64, run 56), the
    precision docs/numerics.md states for the cuBLAS path."""
    err, agree = _run(mw, kv)
    if err <= 5e-2 and agree >= 0.95:
        return
    floors = []
    for rel in (F32_NOISE, OPERAND_NOISE):
        ok, detail = _within_floor(mw, kv, err, agree, rel)
        if ok:
            return
        floors.append(detail)
    raise AssertionError((err, agree, "floors", floors))


def _run(mw, kv, prompt_len=12, steps=STEPS, seed=0, other=None):
    from qtool.runtime.backends.cuda import CudaBackend
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.model import Model
    ref, cu = Model(mw, TorchRefBackend()), Model(mw, other or CudaBackend())
    dev = "cpu" if other is not None else "cuda"
    V = mw.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (1, prompt_len), generator=g)
    pos = torch.arange(prompt_len).view(1, -1)
    total = prompt_len + steps + 1
    cr, cc = ref.new_cache(1, total, kv), cu.new_cache(1, total, kv)
    errs, agree = [], 0
    lr = ref.forward(ids, pos, cr)
    lc = cu.forward(ids.to(dev), pos.to(dev), cc).cpu()
    for step in range(steps + 1):
        errs.append(float((lc - lr).norm() / lr.norm()))
        agree += int(lc.argmax(-1) == lr.argmax(-1))
        if step == steps:
            break
        nxt = lr.argmax(-1).view(1, 1)
        p = torch.tensor([[prompt_len + step]])
        lr = ref.forward(nxt, p, cr)
        lc = cu.forward(nxt.to(dev), p.to(dev), cc).cpu()
    return max(errs), agree / (steps + 1)


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3"])
def test_families_bf16(tiny_models, family):
    from qtool.runtime.loader import load_model_weights
    mw = load_model_weights(str(tiny_models(family)), progress=False)
    _check(mw, "bf16")


RECIPES = [("fp8", "fp8", "fp8"), ("fp8-rowwise", "fp8-token", "bf16"), ("fp8-block", "fp8-block", "bf16"),
           ("nvfp4", "nvfp4", "nvfp4"), ("nvfp4", "none", "fp8"), ("mxfp4", "mxfp4", "bf16"),
           ("int4-awq", "none", "bf16"), ("w4a8-awq", "fp8", "fp8"), ("bf16", "none", "nvfp4")]


@pytest.mark.parametrize("fmt,act,kv", RECIPES)
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_recipes(tiny_models, family, fmt, act, kv):
    from qtool.runtime.loader import load_model_weights
    mw = _requant(load_model_weights(str(tiny_models(family)), progress=False), fmt, act, kv)
    _check(mw, kv)


@pytest.mark.parametrize("packer", ["pack_gptq", "pack_autoawq", "pack_deepseek_fp8"])
def test_packed_checkpoints(tiny_models, tmp_path, packer):
    import packers
    from qtool.runtime.loader import load_model_weights
    out = tmp_path / packer
    getattr(packers, packer)(tiny_models("llama"), out)
    mw = load_model_weights(str(out), progress=False)
    _check(mw, "bf16")


def test_graph_replay_equals_eager(tiny_models):
    from qtool.runtime.backends.cuda import CudaBackend
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    from qtool.kernels.weights import KLinear
    mw = _requant(load_model_weights(str(tiny_models("qwen3")), progress=False), "fp8", "fp8", "fp8")
    be = CudaBackend()
    m = Model(mw, be)
    # the decode step below replays gemv_mma4p on mma-tiled weights
    assert any(kl.tiled for kl in be._lin.values() if isinstance(kl, KLinear))
    prompt = torch.randint(0, mw.config.vocab_size, (1, 9)).cuda()
    outs = []
    for graphed in (False, True):
        cache = m.new_cache(1, 64, "fp8")
        m.forward(prompt, torch.arange(9).view(1, -1).cuda(), cache)
        step = (lambda i, p: m.forward(i, p, cache))
        if graphed:
            step = be.wrap_decode(step)
        tok, res = torch.tensor([[5]]).cuda(), []
        for t in range(12):
            lg = step(tok, torch.tensor([[9 + t]]).cuda())
            res.append(lg.clone())
            tok = lg.argmax(-1).view(1, 1)
        outs.append(torch.stack(res))
    assert torch.equal(outs[0], outs[1])
    # decode loop (step + sampling + advance in one graph) gives the same greedy tokens
    cache = m.new_cache(1, 64, "fp8")
    m.forward(prompt, torch.arange(9).view(1, -1).cuda(), cache)
    loop = be.decode_loop(lambda i, p: m.forward(i, p, cache), torch.tensor([[5]]).cuda(),
                          torch.tensor([[9]]).cuda())
    toks = [int(loop.next()) for _ in range(11)]
    assert toks == [int(x) for x in outs[0].argmax(-1).reshape(-1)[:11]]


def test_smollm2_shaped_greedy(tmp_path):
    """30 layers, d 576, 9/3 heads, vocab 49152, tied embeddings: free-running greedy continuation."""
    from tiny_models import make_tiny_model
    from qtool.runtime.backends.cuda import CudaBackend
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    path = make_tiny_model("llama", tmp_path / "smol", seed=3, hidden_size=576, intermediate_size=1536,
                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                           vocab_size=49152, tie_word_embeddings=True)
    mw = load_model_weights(str(path), progress=False)
    ref, cu = Model(mw, TorchRefBackend()), Model(mw, CudaBackend())
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    n = 24
    seqs = []
    for model, dev in ((ref, "cpu"), (cu, "cuda")):
        cache = model.new_cache(1, 16 + n + 1, "bf16")
        lg = model.forward(ids.to(dev), torch.arange(16).view(1, -1).to(dev), cache)
        toks, margins = [], []
        for t in range(n):
            top2 = lg.float().cpu().topk(2, -1).values[0]
            margins.append(float(top2[0] - top2[1]))
            tok = lg.argmax(-1).view(1, 1)
            toks.append(int(tok))
            lg = model.forward(tok, torch.tensor([[16 + t]]).to(dev), cache)
        seqs.append((toks, margins))
    (rt, rm), (ct, _) = seqs
    for t in range(n):
        if rt[t] != ct[t]:
            margin, moved = margin_and_noise(mw, ids[0].tolist() + rt[:t], "bf16")
            assert margin < max(1e-2, 1.5 * moved), f"diverged at step {t} with margin {margin} (noise: {moved})"
            break


def margin_and_noise(mw, ids: list[int], kv: str, draws: int = 2) -> tuple[float, float]:
    """The reference's top-2 logit margin after ``ids`` (one prefill, KV in ``kv``), and the most that the
    reference's own noise at the prefill GEMMs' operand precision (OPERAND_NOISE, ``draws`` draws) moves that
    margin: greedy outputs may part where margin < 1.5 x moved."""
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.model import Model
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]

    def logits(model):
        return model.forward(x, pos, model.new_cache(1, len(ids), kv))[0].float()
    lg = logits(Model(mw, TorchRefBackend()))
    top2 = lg.topk(2)
    i, j = top2.indices.tolist()
    margin = float(top2.values[0] - top2.values[1])
    moved = 0.0
    for seed in range(draws):
        ln = logits(Model(mw, _noisy_backend(seed, OPERAND_NOISE)))
        moved = max(moved, abs(float(ln[i] - ln[j]) - margin))
    return margin, moved
