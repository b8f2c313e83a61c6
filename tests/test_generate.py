"""Generation: greedy tokens vs Hugging Face `generate`, batching, sampling, stop strings, chat template.

References: HF transformers' own greedy `generate` on the same weights with the same bf16 KV rounding
(the emulating model of test_runtime_vs_hf.py); the softmax of known logits for sampling (computed
here in float64); the tokenizer's own chat template for prompts.
"""
from __future__ import annotations

import pytest
import torch

from test_runtime_vs_hf import hf_reference


@pytest.fixture(scope="module")
def llama(tiny_models):
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import load_tokenizer
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    path = tiny_models("llama")
    return path, Model(load_model_weights(str(path), progress=False), TorchRefBackend()), load_tokenizer(path)


def _gen(model, tok, prompts, **kw):
    from qtool.runtime.generate import GenerateOptions, generate
    opts = GenerateOptions(**{"max_new_tokens": 12, **kw})
    return generate(model, tok, prompts, opts, "bf16", eos=set())


def test_greedy_matches_hf_generate(llama):
    path, model, tok = llama
    hf = hf_reference(path, path, "bf16")
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=12)[0, len(prompt):].tolist()
    (out,), stats = _gen(model, tok, [prompt])
    assert out.token_ids == ref
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert stats.prompt_tokens == len(prompt) and stats.generated_tokens == 12 and stats.decode_steps == 11


def test_batch_with_different_lengths_matches_single(llama):
    _, model, tok = llama
    prompts = [tok.encode(t, add_special_tokens=False) for t in
               ("Water boils at", "A small language model predicts the next token from the", "def add(a, b):")]
    assert len({len(p) for p in prompts}) == 3
    batch, _ = _gen(model, tok, prompts)
    for p, b in zip(prompts, batch):
        (single,), _ = _gen(model, tok, [p])
        assert b.token_ids == single.token_ids


def test_sampling_seeded_and_degenerate_cases(llama):
    _, model, tok = llama
    p = [tok.encode("Quantization maps", add_special_tokens=False)]
    (greedy,), _ = _gen(model, tok, p)
    (a,), _ = _gen(model, tok, p, temperature=1.5, seed=7)
    (b,), _ = _gen(model, tok, p, temperature=1.5, seed=7)
    (c,), _ = _gen(model, tok, p, temperature=1.5, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    (k1,), _ = _gen(model, tok, p, temperature=1.0, top_k=1, seed=3)
    (p0,), _ = _gen(model, tok, p, temperature=1.0, top_p=1e-6, seed=3)
    assert k1.token_ids == greedy.token_ids == p0.token_ids
    for tiny in (1e-46, 5e-324):         # rounds to 0 in float32: still the most likely token, not an error
        (pt,), _ = _gen(model, tok, p, temperature=1.0, top_p=tiny, seed=3)
        assert pt.token_ids == greedy.token_ids


def test_sample_distribution_with_top_k_and_top_p():
    from qtool.runtime.sampling import sample
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    gen = torch.Generator().manual_seed(0)
    n = 20000

    def freq(**kw):
        draws = torch.stack([sample(logits, generator=gen, **kw) for _ in range(n)]).flatten()
        return torch.bincount(draws, minlength=6).double() / n

    def expected(keep):
        p = torch.softmax(logits[0].double() / 0.8, 0)
        p = torch.where(torch.tensor(keep), p, torch.zeros_like(p))
        return p / p.sum()
    full = expected([True] * 6)
    f = freq(temperature=0.8)
    assert (f - full).abs().max() < 0.015
    f = freq(temperature=0.8, top_k=3)
    assert (f - expected([True, True, True, False, False, False])).abs().max() < 0.015
    # top_p: the smallest prefix of the sorted distribution whose mass reaches p
    mass = torch.cumsum(full, 0)
    keep = [bool(i == 0 or mass[i - 1] < 0.9) for i in range(6)]
    f = freq(temperature=0.8, top_p=0.9)
    assert (f - expected(keep)).abs().max() < 0.015
    assert f[[i for i, k in enumerate(keep) if not k]].sum() == 0
    assert sample(logits, temperature=0).item() == 0
    f = freq(temperature=0.8, top_p=1e-46)            # 0.0 in a float32 comparison: the top token alone
    assert f[0] == 1 and f[1:].sum() == 0


def test_stop_string_and_streaming(llama):
    _, model, tok = llama
    p = [tok.encode("The capital of Italy", add_special_tokens=False)]
    (full,), _ = _gen(model, tok, p, max_new_tokens=16)
    assert len(full.text) > 6
    # a 3-character stop string from the greedy text, past its start, made of whole characters (a random model's
    # text holds U+FFFD for partial UTF-8 sequences, which a streamed decode resolves differently)
    i = next((i for i in range(3, len(full.text) - 2) if "\ufffd" not in full.text[i:i + 3]), None)
    if i is None:
        pytest.skip("the tiny model's greedy text has no 3 whole characters in a row")
    stop = full.text[i:i + 3]
    pieces = []
    from qtool.runtime.generate import GenerateOptions, generate
    (out,), _ = generate(model, tok, p, GenerateOptions(max_new_tokens=16, stop=[stop]), "bf16", set(),
                         on_text=lambda row, t: pieces.append(t))
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    assert "".join(pieces) == out.text
    # streaming without stop strings reproduces the full text exactly
    pieces.clear()
    generate(model, tok, p, GenerateOptions(max_new_tokens=16), "bf16", set(), on_text=lambda r, t: pieces.append(t))
    assert "".join(pieces) == full.text


def test_eos_stops_generation(llama):
    _, model, tok = llama
    p = [tok.encode("Water boils at", add_special_tokens=False)]
    (full,), _ = _gen(model, tok, p)
    eos = full.token_ids[4]
    from qtool.runtime.generate import GenerateOptions, generate
    (out,), _ = generate(model, tok, p, GenerateOptions(max_new_tokens=12), "bf16", {eos})
    first = full.token_ids.index(eos)
    assert out.finish_reason == "eos" and out.token_ids == full.token_ids[:first]


def test_chat_template_and_raw(llama):
    path, _, tok = llama
    from qtool.runtime.chat import prompt_ids
    ids = prompt_ids(tok, "Hi there", system="Be brief.")
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "Be brief." in text
    assert ids == tok.encode(text, add_special_tokens=False)
    assert prompt_ids(tok, "Hi there", raw=True) == tok.encode("Hi there")
