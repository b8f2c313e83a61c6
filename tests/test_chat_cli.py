"""`qtool chat` (and `qtool run MODEL` without a prompt): multi-turn chat driven through stdin.

The conversation the model sees on each turn is checked against transformers' apply_chat_template of the
expected messages (earlier user and assistant turns included, `--system` first, nothing after `/reset`);
each streamed reply must equal the runtime's own greedy generation for that conversation; the model is
loaded once.
"""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qtool.cli import app

runner = CliRunner()


@pytest.fixture
def spy(monkeypatch):
    """Record the prompt ids of every generate() call and every weight load (the real functions still run)."""
    from qtool.runtime import generate as gen
    from qtool.runtime import loader
    calls = {"prompts": [], "loads": 0}
    real_generate, real_load = gen.generate, loader.load_weights

    def generate(model, tok, prompts_ids, *a, **k):
        calls["prompts"].append([list(p) for p in prompts_ids])
        return real_generate(model, tok, prompts_ids, *a, **k)

    def load_weights(*a, **k):
        calls["loads"] += 1
        return real_load(*a, **k)
    monkeypatch.setattr(gen, "generate", generate)
    monkeypatch.setattr(loader, "load_weights", load_weights)
    return calls


def _reference_reply(path, messages, n):
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import eos_ids, load_tokenizer
    from qtool.runtime.generate import GenerateOptions, generate
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(str(path))
    ids = ref(ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    tok = load_tokenizer(path)
    w = load_model_weights(str(path), progress=False)
    (r,), _ = generate(Model(w, TorchRefBackend()), tok, [ids], GenerateOptions(max_new_tokens=n), "bf16",
                       eos_ids(tok, w.config.eos_token_ids))
    return ids, r.text


@pytest.mark.parametrize("cmd", ["chat", "run"])
def test_two_turns_second_sees_first(cmd, tiny_models, spy, monkeypatch):
    """`chat` reading a pipe; `run` without a prompt on a terminal (input() then echoes '> ' on stdout)."""
    from qtool.commands import run as run_cmd
    if cmd == "run":
        monkeypatch.setattr(run_cmd, "stdin_is_terminal", lambda: True)
    path = tiny_models("llama")
    r = runner.invoke(app, [cmd, str(path), "--system", "Be brief.", "--max-new-tokens", "6"],
                      input="Hello there\nWhat did I say?\n/exit\nnever sent\n")
    assert r.exit_code == 0, r.stderr
    assert spy["loads"] == 1 and len(spy["prompts"]) == 2
    m1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids1, reply1 = _reference_reply(path, m1, 6)
    assert spy["prompts"][0] == [ids1]
    m2 = m1 + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "What did I say?"}]
    ids2, reply2 = _reference_reply(path, m2, 6)
    assert spy["prompts"][1] == [ids2]
    assert r.stdout == ("> " if cmd == "run" else "").join(["", reply1 + "\n", reply2 + "\n", ""])


def test_reset_forgets_but_keeps_system(tiny_models, spy):
    path = tiny_models("qwen2")
    r = runner.invoke(app, ["chat", str(path), "--system", "S", "--max-new-tokens", "3"],
                      input="first\n/reset\n\nsecond\n")
    assert r.exit_code == 0, r.stderr
    assert len(spy["prompts"]) == 2 and spy["loads"] == 1
    ids, _ = _reference_reply(path, [{"role": "system", "content": "S"}, {"role": "user", "content": "second"}], 3)
    assert spy["prompts"][1] == [ids]
    assert "reset" in r.stderr


def test_eof_ends_and_unknown_command_warns(tiny_models, spy):
    r = runner.invoke(app, ["chat", str(tiny_models("llama")), "--max-new-tokens", "2"], input="/nope\nhi")
    assert r.exit_code == 0, r.stderr
    assert len(spy["prompts"]) == 1 and "unknown command /nope" in r.stderr


def test_chat_usage_errors_one_line(tiny_models):
    r = runner.invoke(app, ["chat", str(tiny_models("llama")), "--temperature", "-1"])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "--temperature" in r.stderr
