"""qtool's Tokenizer (`tokenizers` + jinja2) against transformers' AutoTokenizer, and the incremental detokenizer.

transformers is the reference: the same ids from encode, the same text from decode, the same rendered chat
prompt from apply_chat_template, on SmolLM2 (the built-in model) and the tiny test checkpoints. TextStream
(DecodeStream underneath) must stream exactly the full decode, cut at the first stop string, without
re-decoding the whole sequence per token.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest

from cli_helpers import REPO

TEXTS = ["Hello", " Hello world!", "The capital of France is Paris.\n\nNext line\ttab",
         "<|im_start|>user\nhi<|im_end|>", "naïve café – 東京 🙂 ü", "  leading and trailing  ", "",
         "def add(a, b):\n    return a + b\n"]

MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about café ☕"}],
]


@pytest.fixture(scope="module")
def smollm2():
    from qtool.sources import resolve_model_source
    try:
        return resolve_model_source("smollm2-135m", progress=False).path
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"SmolLM2 not available here: {exc}")


@pytest.fixture(scope="module")
def bos_tiny(tiny_models, tmp_path_factory):
    """A tiny tokenizer whose tokenizer.json post-processor adds BOS and EOS (as Llama's do)."""
    path = tmp_path_factory.mktemp("bos") / "tok"
    src = tiny_models("llama")
    path.mkdir()
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special")):
            shutil.copy(f, path / f.name)
    tj = json.loads((path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {k: {"id": k, "ids": [ids[k]], "tokens": [k]} for k in ("<|im_start|>", "<|im_end|>")}}
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return path


def _pair(folder, generic=False):
    """(ours, transformers'). generic: transformers' own reading of tokenizer.json (PreTrainedTokenizerFast),
    for the tiny qwen2 checkpoint, whose model-specific Qwen2Tokenizer replaces the pre-tokenizer of
    tokenizer.json with Qwen2's regex (real Qwen2 tokenizer.json files already carry it; the tiny one doesn't)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from qtool.runtime.tokenizer import Tokenizer
    cls = PreTrainedTokenizerFast if generic else AutoTokenizer
    return Tokenizer.from_folder(folder), cls.from_pretrained(str(folder))


@pytest.mark.parametrize("which", ["smollm2", "llama", "mistral", "qwen3", "qwen2", "bos_tiny"])
def test_encode_decode_template_equal_transformers(which, request, tiny_models):
    folder = request.getfixturevalue(which) if which in ("smollm2", "bos_tiny") else tiny_models(which)
    ours, ref = _pair(folder, generic=which == "qwen2")
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == \
                ref(text, add_special_tokens=special)["input_ids"], (text, special)
    if which == "bos_tiny":
        assert ours.encode("hi")[0] == ref.bos_token_id and ours.encode("hi")[-1] == ref.eos_token_id
    rng = random.Random(0)
    ids_all = [ours.encode(t, add_special_tokens=True) for t in TEXTS]
    ids_all += [[rng.randrange(ours.vocab_size) for _ in range(40)] for _ in range(20)]
    for ids in ids_all:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    for m in MESSAGES:
        for gen in (True, False):
            assert ours.apply_chat_template(m, add_generation_prompt=gen) == \
                ref.apply_chat_template(m, tokenize=False, add_generation_prompt=gen), (m, gen)
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == \
        (ref.eos_token_id, ref.bos_token_id, ref.pad_token_id)


def test_long_text_encodes_with_the_gil_released(smollm2):
    """A long prompt (past GIL_FREE_CHARS) gives transformers' ids, and another thread keeps running while it is
    encoded (a server tokenizes on a worker thread: with the GIL held, an 8 MB prompt froze every request)."""
    import threading
    import time
    from transformers import AutoTokenizer
    from qtool.runtime import tokenizer as tk
    ours, ref = tk.Tokenizer.from_folder(smollm2), AutoTokenizer.from_pretrained(str(smollm2))
    text = "naïve café word, " * 6000                    # 102,000 characters
    assert len(text) > tk.GIL_FREE_CHARS
    assert ours.encode(text) == ref(text)["input_ids"]
    big, ticks, done = text * 15, [0], threading.Event()   # the same path, on a text long enough to time

    def spin():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)
    t = threading.Thread(target=spin)
    t.start()
    t0 = time.perf_counter()
    ours.encode(big)
    took = time.perf_counter() - t0
    done.set()
    t.join()
    assert took > 0.05 and ticks[0] > 0.1 * took / 0.001, (took, ticks[0])   # GIL held: a handful of ticks


def test_prompt_ids_equal_transformers_chat_ids(smollm2):
    from transformers import AutoTokenizer
    from qtool.runtime.chat import load_tokenizer, prompt_ids
    ref = AutoTokenizer.from_pretrained(str(smollm2))
    tok = load_tokenizer(smollm2)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expect = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    expect = expect["input_ids"] if isinstance(expect, dict) or hasattr(expect, "keys") else expect
    assert prompt_ids(tok, "Hi there", "Be brief.") == list(expect)
    assert prompt_ids(tok, "Hi there", raw=True) == ref("Hi there")["input_ids"]


def test_loading_imports_neither_torch_nor_transformers(tiny_models):
    code = ("import sys; from qtool.runtime.chat import load_tokenizer, prompt_ids; "
            f"t = load_tokenizer({str(tiny_models('llama'))!r}); prompt_ids(t, 'hi', 'sys'); t.decode([5, 6]); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_template_and_bad_tokenizer_file(tiny_models, tmp_path):
    from qtool.errors import CheckpointError
    from qtool.runtime.tokenizer import Tokenizer
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer.from_folder(empty)


# ---------------------------------------------------------------- TextStream
def _stream(tok, ids, stops=()):
    from qtool.runtime.generate import TextStream
    ts = TextStream(tok, list(stops))
    out = []
    for i in ids:
        out.append(ts.add(i))
        if ts.stopped:
            break
    out.append(ts.flush())
    return "".join(out), ts


@pytest.mark.parametrize("which", ["smollm2", "llama"])
def test_text_stream_equals_full_decode(which, request, tiny_models):
    from transformers import AutoTokenizer
    from qtool.runtime.chat import load_tokenizer
    folder = request.getfixturevalue(which) if which == "smollm2" else tiny_models(which)
    tok, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    rng = random.Random(1)
    seqs = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    seqs += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))] for _ in range(60)]
    # byte-level pieces of multi-byte characters, one token per byte
    seqs += [[tok.backend.token_to_id(c) for c in "Ã©Ã¯ðŁĻĤ" if tok.backend.token_to_id(c) is not None]]
    for ids in seqs:
        full = ref.decode(ids, skip_special_tokens=True)
        text, ts = _stream(tok, ids)
        assert text == full == ts.text, ids
        for stop in ("a", "is", "\n", "🙂", "Paris"):
            text, ts = _stream(tok, ids, [stop])
            cut = full.find(stop)
            assert text == (full if cut < 0 else full[:cut]), (ids, stop)
            assert ts.stopped == (cut >= 0)


def test_text_stream_holds_back_partial_utf8_and_stop_prefix(tiny_models):
    from qtool.runtime.chat import load_tokenizer
    from qtool.runtime.generate import TextStream
    tok = load_tokenizer(tiny_models("llama"))
    bytes_ids = [tok.backend.token_to_id(c) for c in "ðŁĻĤ"]      # the 4 bytes of 🙂, one token each
    assert None not in bytes_ids
    ts = TextStream(tok, [])
    pieces = [ts.add(i) for i in bytes_ids]
    assert pieces[:3] == ["", "", ""] and pieces[3] == "🙂"
    ts = TextStream(tok, ["Paris."])
    got = [ts.add(i) for i in tok.encode("It is Paris", add_special_tokens=False)]
    assert "".join(got) == "It is " and ts.flush() == "Paris"


def test_text_stream_does_not_redecode_per_token(tiny_models, monkeypatch):
    from qtool.runtime.chat import load_tokenizer
    tok = load_tokenizer(tiny_models("llama"))
    ids = tok.encode("The capital of France is Paris. The capital of Italy is Rome.", add_special_tokens=False)
    calls = []
    real = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: calls.append(a) or real(*a, **k))
    text, _ = _stream(tok, ids, ["Madrid"])
    assert text == real(ids)
    assert len(calls) <= 1          # one reconciling decode in flush, none per token
