"""Tests for qtool.calibration: .txt/.jsonl/folder parsing, bad inputs, the offline default corpus, batching.

Batches are checked against the tokenizer called directly and against an HF transformers forward
(padded batch vs each sequence alone), not against qtool's own code.
"""
from __future__ import annotations

import json
import socket

import pytest

from qtool.calibration import ChatText, calibration_batches, calibration_texts
from qtool.errors import UsageError

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_txt_splits_on_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird\n", encoding="utf-8")
    texts, desc = calibration_texts(f, 10)
    assert texts == ["first doc\nline two", "second doc", "third"]
    assert "3 samples" in desc and str(f) in desc


def test_jsonl_text_and_messages(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"text": "plain text record"}, {"messages": CHAT}, {"text": "   "}])
    texts, _ = calibration_texts(f, 10)
    assert texts[0] == "plain text record"
    assert isinstance(texts[1], ChatText) and texts[1].messages == CHAT
    assert texts[1] == "user: Hi there\nassistant: Hello! How can I help?"
    assert len(texts) == 2   # blank text records are dropped


def test_folder_is_recursive_sorted_and_ignores_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    _jsonl(tmp_path / "sub" / "a.jsonl", [{"text": "from sub/a"}])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    texts, desc = calibration_texts(tmp_path, 10)
    assert texts == ["from b", "from sub/a"]   # sorted paths: b.txt < sub/a.jsonl
    assert "2 files" in desc


def test_sampling_is_deterministic_capped_and_in_source_order(tmp_path):
    f = tmp_path / "many.txt"
    f.write_text("\n\n".join(f"doc {i}" for i in range(100)), encoding="utf-8")
    a, desc = calibration_texts(f, 17)
    b, _ = calibration_texts(f, 17)
    assert a == b and len(a) == 17 and len(set(a)) == 17
    assert a == sorted(a, key=lambda t: int(t.split()[1]))
    assert "17 samples of 100" in desc
    few, desc = calibration_texts(f, 500)
    assert len(few) == 100 and "only 100" in desc


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "missing.txt", "not found"),
    (lambda d: _write(d / "data.csv", "a,b\n"), ".txt, .jsonl"),
    (lambda d: _write(d / "bad.jsonl", '{"text": "ok"}\n{not json\n'), "line 2"),
    (lambda d: _write(d / "nofield.jsonl", '{"prompt": "x"}\n'), "neither a 'text'"),
    (lambda d: _write(d / "badmsg.jsonl", '{"messages": [{"role": "user"}]}\n'), "neither a 'text'"),
    (lambda d: _write_bytes(d / "latin1.txt", b"caf\xe9 au lait\n"), "not UTF-8"),
    (lambda d: _write(d / "empty.txt", "\n\n  \n"), "no text"),
    (lambda d: _mkdir(d / "emptydir"), "no .txt or .jsonl"),
])
def test_bad_inputs_are_one_line_usage_errors(tmp_path, make, fragment):
    with pytest.raises(UsageError) as err:
        calibration_texts(make(tmp_path), 8)
    assert fragment in err.value.message and "\n" not in err.value.message


def test_bad_size_is_usage_error():
    with pytest.raises(UsageError):
        calibration_texts(None, 0)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path


def test_default_corpus_needs_no_network_and_is_deterministic(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default corpus must not touch the network")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    a, desc = calibration_texts(None, 64)
    b, _ = calibration_texts(None, 64)
    assert a == b and len(a) == 64 and len(set(a)) == 64
    assert any(isinstance(t, ChatText) for t in a)              # chat dialogues
    assert any("statement" in t for t in a)                    # Python language reference prose
    assert "default corpus" in desc and "pydoc_data" in desc
    big, _ = calibration_texts(None, 100000)
    assert 250 < len(big) < 100000
    assert sum(len(t) for t in big) > 300_000                   # several hundred KB of text


def test_default_corpus_excludes_heldout_text():
    from qtool.calibration import DATA_DIR
    held = [p for p in (DATA_DIR / "heldout_en.txt").read_text(encoding="utf-8").split("\n\n") if len(p) > 80]
    assert held
    corpus = "\n".join(calibration_texts(None, 100000)[0])
    assert not any(p[:80] in corpus for p in held)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tiny_models("llama")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def test_batches_match_tokenizer_and_pad_with_mask(tiny):
    tok, _ = tiny
    texts = ["short one", "a somewhat longer text about quantization and calibration " * 3,
             ChatText(CHAT), "x"]
    batches = calibration_batches(tok, texts, seq_len=24, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    expected = [tok(t, truncation=True, max_length=24)["input_ids"] for t in texts[:2]]
    chat = tok.apply_chat_template(CHAT, tokenize=False)
    expected.append(tok(chat, add_special_tokens=False, truncation=True, max_length=24)["input_ids"])
    expected.append(tok("x")["input_ids"])
    got = []
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape
        for ids, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()):
            n = sum(mask)
            assert mask == [1] * n + [0] * (len(mask) - n)                # right padding
            assert all(i == tok.pad_token_id for i in ids[n:])
            got.append(ids[:n])
    assert sorted(got) == sorted(expected)
    assert max(len(g) for g in got) == 24                                 # truncated to seq_len
    assert "<|im_start|>" in tok.decode(next(g for g in got if g == expected[2]))


def test_padded_batch_forward_matches_unpadded(tiny):
    import torch
    tok, model = tiny
    texts = ["The capital of France is Paris.", "Water boils at one hundred degrees Celsius at sea level."]
    (batch,) = calibration_batches(tok, texts, seq_len=64, batch_size=2)
    with torch.no_grad():
        logits = model(**batch).logits.float()
        for row in range(2):
            n = int(batch["attention_mask"][row].sum())
            alone = model(input_ids=batch["input_ids"][row:row + 1, :n]).logits.float()
            torch.testing.assert_close(logits[row, :n], alone[0], atol=3e-2, rtol=3e-2)
