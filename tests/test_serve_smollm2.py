"""`qtool serve` on SmolLM2-135M-Instruct (the built-in checkpoint; skipped when it is not available here):
chat completions, streamed and not, through the official `openai` client equal `runtime.generate`'s greedy
text for the same templated prompt (the reference path of `qtool run`, checked against HF in test_generate.py).
"""
from __future__ import annotations

import pytest

from test_serve import Server
from test_tokenizer import smollm2  # noqa: F401 (fixture)

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_smollm2_chat_matches_run_reference(smollm2):
    import openai
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.chat import eos_ids, load_tokenizer, prompt_ids
    from qtool.runtime.generate import GenerateOptions, generate
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    server = Server("smollm2-135m", "--max-model-len", "256", "--num-kv-blocks", "64")   # the built-in name
    try:
        tok = load_tokenizer(smollm2)
        weights = load_model_weights(str(smollm2), progress=False)
        (want,), _ = generate(Model(weights, TorchRefBackend()), tok, [prompt_ids(tok, MSGS[1]["content"], "Be brief.")],
                              GenerateOptions(max_new_tokens=12), "bf16", eos_ids(tok, weights.config.eos_token_ids))
        assert "Paris" in want.text
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id
        assert name == "smollm2-135m"                      # a built-in name is served as typed
        r = client.chat.completions.create(model=name, messages=MSGS, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want.text
        assert r.usage.completion_tokens == len(want.token_ids) + (want.finish_reason == "eos")
        chunks = list(client.chat.completions.create(model=name, messages=MSGS, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    finally:
        code, err = server.stop()
    assert code == 0, err
