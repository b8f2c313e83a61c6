"""`qtool run --prompts` on the engine (qtool.engine.offline.run_batch) against `qtool run PROMPT` alone.

References: each prompt's answer from `qtool run PROMPT` (the single-prompt path, runtime.generate, itself
checked against HF in test_generate.py), and independently HF transformers' greedy `generate` on the same
tiny model with the same bf16 KV rounding (test_runtime_vs_hf.hf_reference) for the token ids. Sampling with a
seed, stop strings and EOS must give per prompt what the prompt gives alone; stats must add up; an empty prompts
file and a prompt beyond the context are one-line usage errors (exit 2) before any weight loads.
"""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qtool.cli import app
from qtool.engine.engine import block_bytes
from qtool.engine.offline import run_batch
from qtool.runtime.generate import GenerateOptions, generate
from test_runtime_vs_hf import hf_reference

runner = CliRunner()
PROMPTS = ["Water boils at", "The capital of Spain is", "def add(a, b):",
           "A small language model predicts the next token from the previous ones"]


def _run(*args, input=None):
    return runner.invoke(app, ["run", *map(str, args)], input=input)


def _doc(r):
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def _alone(path, prompt, *flags):
    (c,) = _doc(_run(path, prompt, "--json", *flags))["completions"]
    return c


def _batch(path, tmp_path, *flags, prompts=PROMPTS):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return _doc(_run(path, "--prompts", f, "--json", *flags))


def _same_as_alone(path, doc, *flags):
    for p, c in zip(PROMPTS, doc["completions"]):
        a = _alone(path, p, *flags)
        assert c["prompt"] == p
        assert (c["text"], c["prompt_tokens"], c["generated_tokens"], c["finish_reason"]) == \
            (a["text"], a["prompt_tokens"], a["generated_tokens"], a["finish_reason"]), p


@pytest.fixture(scope="module")
def llama(tiny_models):
    """(path, tokenizer, reference-backend Model, templated prompt ids of PROMPTS) of the tiny llama."""
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import load_tokenizer, prompt_ids
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    path = tiny_models("llama")
    tok = load_tokenizer(path)
    return path, tok, Model(load_model_weights(str(path), progress=False), TorchRefBackend()), \
        [prompt_ids(tok, p) for p in PROMPTS]


def test_greedy_batch_equals_each_prompt_alone_and_stats_add_up(tiny_models, tmp_path):
    path = tiny_models("llama")
    doc = _batch(path, tmp_path, "--max-new-tokens", 12, "--system", "Be brief.")
    assert len(doc["completions"]) == len(PROMPTS) and len({c["text"] for c in doc["completions"]}) > 1
    _same_as_alone(path, doc, "--max-new-tokens", 12, "--system", "Be brief.")
    s, cs = doc["stats"], doc["completions"]
    from qtool.runtime.chat import load_tokenizer, prompt_ids
    tok = load_tokenizer(path)
    assert [c["prompt_tokens"] for c in cs] == [len(prompt_ids(tok, p, "Be brief.")) for p in PROMPTS]
    assert s["prompt_tokens"] == sum(c["prompt_tokens"] for c in cs)
    assert s["generated_tokens"] == sum(c["generated_tokens"] for c in cs)
    assert all(c["generated_tokens"] == 12 for c in cs if c["finish_reason"] == "length")
    assert s["batch"] == len(PROMPTS) and s["backend"] == "torch" and s["kv_cache_bytes"] > 0
    # all prompts prefilled in the first step (their first token), then one decode row per further sampled token
    sampled = [c["generated_tokens"] + (c["finish_reason"] == "eos") for c in cs]
    assert s["decode_steps"] == max(sampled) - 1 and s["decode_tokens"] == sum(sampled) - len(cs)
    assert s["prefill_s"] > 0 and s["decode_s"] > 0
    assert s["decode_tok_s"] == pytest.approx(s["decode_tokens"] / s["decode_s"], rel=1e-3)
    assert s["prefill_tok_s"] == pytest.approx(s["prompt_tokens"] / s["prefill_s"], rel=1e-3)


def test_batch_token_ids_equal_hf_greedy_generate(llama):
    """Independent of the single-prompt path: the engine's greedy tokens are HF's."""
    path, tok, model, ids = llama
    out, stats = run_batch(model, tok, ids, GenerateOptions(max_new_tokens=12), "bf16", set())
    hf = hf_reference(path, path, "bf16")
    for i in (0, 3):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids[i]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0, min_new_tokens=12)[0, len(ids[i]):].tolist()
        assert out[i].token_ids == ref
        assert out[i].text == tok.decode(ref, skip_special_tokens=True)


def test_eos_ends_a_prompt_as_alone(llama):
    """A token the model does generate is declared EOS: that prompt ends with 'eos' and without the token,
    exactly as runtime.generate ends it alone; the other prompts run on."""
    path, tok, model, ids = llama
    opts = GenerateOptions(max_new_tokens=10)
    free, _ = run_batch(model, tok, ids, opts, "bf16", set())
    eos = {free[1].token_ids[4]}
    out, stats = run_batch(model, tok, ids, opts, "bf16", eos)
    for p, o in zip(ids, out):
        (want,), _ = generate(model, tok, [p], opts, "bf16", eos)
        assert (o.text, o.token_ids, o.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert out[1].finish_reason == "eos" and len(out[1].token_ids) <= 4
    assert stats.generated_tokens == sum(len(o.token_ids) for o in out)


def test_more_prompts_than_running_slots(llama):
    """With 2 running slots, the cache is sized for the 2 longest sequences and the other prompts wait for
    their blocks: the answers are those of the unconstrained batch."""
    path, tok, model, ids = llama
    opts = GenerateOptions(max_new_tokens=9)
    free, st = run_batch(model, tok, ids, opts, "bf16", set())
    two, st2 = run_batch(model, tok, ids, opts, "bf16", set(), max_num_seqs=2, block_size=4)
    assert [o.token_ids for o in two] == [o.token_ids for o in free]
    need = sorted((-(-(len(p) + 9) // 4) for p in ids), reverse=True)[:2]       # blocks of the 2 longest
    assert st2.kv_cache_bytes == block_bytes(model.backend, 4, "bf16") * (sum(need) + 1)
    assert st.kv_cache_bytes == block_bytes(model.backend, 16, "bf16") * (sum(-(-(len(p) + 9) // 16) for p in ids) + 1)


def test_seeded_sampling_and_stop_equal_alone(tiny_models, tmp_path):
    path = tiny_models("qwen2")
    flags = ("--max-new-tokens", 10, "--temperature", 0.9, "--top-k", 40, "--top-p", 0.9, "--seed", 5)
    doc = _batch(path, tmp_path, *flags)
    _same_as_alone(path, doc, *flags)
    greedy = _alone(path, PROMPTS[0], "--max-new-tokens", 12)["text"]
    if len(greedy) < 4:
        pytest.fail(f"the tiny model produced too little text to test --stop: {greedy!r}")
    stop = ("--max-new-tokens", 12, "--stop", greedy[2:4])
    doc = _batch(path, tmp_path, *stop)
    assert doc["completions"][0]["finish_reason"] == "stop"
    _same_as_alone(path, doc, *stop)


def test_plain_output_in_prompt_order(tiny_models, tmp_path):
    path = tiny_models("llama")
    doc = _batch(path, tmp_path, "--max-new-tokens", 6)
    r = _run(path, "--prompts", "-", "--max-new-tokens", 6, input="".join(p + "\n" for p in PROMPTS))
    assert r.exit_code == 0, r.stderr
    want = "".join(f"--- [{i}] {p}\n{c['text']}\n" for i, (p, c) in enumerate(zip(PROMPTS, doc["completions"])))
    assert r.stdout == want
    assert f"{len(PROMPTS)} prompts" in r.stderr and "decode" in r.stderr


def _one_line(r, code, needle):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("backend:")]
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert lines and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert len(lines) <= 2 and all(ln.startswith(("error:", "hint:")) for ln in lines), r.stderr


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_prompts_file_is_usage_error(tiny_models, tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    _one_line(_run(tiny_models("llama"), "--prompts", f), 2, "no prompts")
    _one_line(_run(tiny_models("llama"), "--prompts", "-", input=content), 2, "no prompts")


def test_prompt_beyond_context_is_usage_error_before_loading(tiny_models, tmp_path, monkeypatch):
    from qtool.runtime import loader
    loads = []
    monkeypatch.setattr(loader, "load_weights", lambda *a, **k: loads.append(1))
    path = tiny_models("llama")                           # max_position_embeddings 512
    f = tmp_path / "p.txt"
    f.write_text("Hello\n" + "water " * 600 + "\n")
    r = _run(path, "--prompts", f, "--json")
    _one_line(r, 2, "prompt 2 of 2 has")
    assert "512 positions" in r.stderr and json.loads(r.stdout)["error"]["code"] == "usage"
    _one_line(_run(path, "water " * 600), 2, "the prompt has")
    assert loads == []
