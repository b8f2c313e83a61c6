"""Soundness checks of a checkpoint from its headers and JSON (the `inspect` problem list).

Contract: `check(files, scheme)` returns (problems, notes). Problems are one line each, naming
the tensor or file: what `open_checkpoint(strict=False)` and `describe(strict=False)` collected
(truncated data, corrupt entries, missing/unexpected scale tensors, shapes or dtypes contradicting
the format, config vs tensors), plus config.json against the tensors (vocab/hidden size vs the
embedding, layer count vs the numbered layers, projection shapes vs hidden/intermediate/head
sizes, a missing lm_head), a missing tokenizer, KV scales present for some layers only, and everything
`qtool.checkpoint.validate` finds (the checks the runtime loader shares: scale values, zero layers, overlaps…).
Notes are harmless facts (no chat template, KV scales absent everywhere so engines use 1.0).
"""
from __future__ import annotations

import re

from qtool.checkpoint import validate
from qtool.checkpoint.files import CheckpointFiles
from qtool.checkpoint.scheme import LAYER_RE, CheckpointScheme, num_layers
from qtool.support.families import text_config

TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _config_vs_tensors(files: CheckpointFiles, scheme: CheckpointScheme) -> list[str]:
    out: list[str] = []
    c = text_config(files.config)
    hidden, vocab = c.get("hidden_size"), c.get("vocab_size")
    heads = c.get("num_attention_heads")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or (hidden // heads if isinstance(hidden, int) and heads else None)
    inter = c.get("intermediate_size")
    embeds = [n for n in scheme.other_tensors if re.search(r"(^|\.)(embed_tokens|wte|word_embeddings)\.weight$", n)]
    for name in embeds:
        shape = files.tensors[name].shape
        if len(shape) != 2:
            out.append(f"{name}: shape {list(shape)} is not [vocab, hidden]")
            continue
        if isinstance(vocab, int) and shape[0] != vocab:
            out.append(f"{name}: {shape[0]} rows but config.json vocab_size is {vocab}")
        if isinstance(hidden, int) and shape[1] != hidden:
            out.append(f"{name}: width {shape[1]} but config.json hidden_size is {hidden}")
    n = num_layers(files.config)
    seen = {int(m.group(1)) for name in files.tensors if (m := LAYER_RE.search(name))}
    if isinstance(n, int) and seen:
        prefix = _layer_prefix(files)
        top = max(seen) + 1                        # bounded by the tensors present, whatever the config says
        for i in sorted(set(range(min(n, top))) - seen):
            out.append(f"{prefix}{i}: no tensors, but config.json num_hidden_layers is {n}")
        if n > top:
            where = f"{top}" if n == top + 1 else f"{top}-{n - 1}"
            out.append(f"{prefix}{where}: no tensors, but config.json num_hidden_layers is {n}")
        extra = c.get("num_nextn_predict_layers") or 0      # DeepSeek-V3 MTP layers follow the last one
        for i in sorted(i for i in seen if i >= n + (extra if isinstance(extra, int) else 0)):
            out.append(f"{prefix}{i}: tensors beyond config.json num_hidden_layers = {n}")
    want = {  # projection name -> (out, in) from the config
        "q_proj": (heads * head_dim if heads and head_dim else None, hidden),
        "k_proj": (kv_heads * head_dim if kv_heads and head_dim else None, hidden),
        "v_proj": (kv_heads * head_dim if kv_heads and head_dim else None, hidden),
        "o_proj": (hidden, heads * head_dim if heads and head_dim else None),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
        "lm_head": (vocab, hidden),
    }
    if c.get("kv_lora_rank"):               # multi-head latent attention (DeepSeek): other projection shapes
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            want.pop(name)
    for module, spec in scheme.linears.items():
        exp = want.get(module.rsplit(".", 1)[-1])
        if not exp or not spec.out_features or "expert" in module:    # MoE experts have their own sizes
            continue
        got = (spec.out_features, spec.in_features)
        if any(isinstance(e, int) and e != g for e, g in zip(exp, got)):
            t = spec.tensors.get("weight") or spec.tensors.get("qweight")
            out.append(f"{t}: layer is [{got[0]} out, {got[1]} in] but config.json implies "
                       f"[{exp[0]} out, {exp[1]} in]")
    tied = files.config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))
    if embeds and not tied and "lm_head" not in scheme.linears and scheme.linears:
        out.append("lm_head.weight: missing (config.json tie_word_embeddings is false)")
    return out


def _layer_prefix(files: CheckpointFiles) -> str:
    for name in files.tensors:
        m = LAYER_RE.search(name)
        if m:
            return name[: m.start(1)]
    return "layers."


def _kv_scales(scheme: CheckpointScheme) -> tuple[list[str], list[str]]:
    if scheme.kv_format == "bf16" or not scheme.kv_scales:
        return [], []
    present = [(k, v) for k, v in scheme.kv_scales.values()]
    if not any(k or v for k, v in present):
        return [], [f"{scheme.kv_format} KV cache without k_scale/v_scale tensors: engines use scale 1.0"]
    problems = []
    template = next((k or v) for k, v in present if k or v)
    m = LAYER_RE.search(template)
    for layer, (k, v) in scheme.kv_scales.items():
        for role, name in (("k_scale", k), ("v_scale", v)):
            if name is None:
                guess = template[: m.start(1)] + str(layer) + template[m.end(1):]
                guess = re.sub(r"\.(k_proj\.k_scale|v_proj\.v_scale|k_scale|v_scale)$",
                               ".k_proj.k_scale" if role == "k_scale" else ".v_proj.v_scale", guess)
                problems.append(f"{guess}: missing (other layers have their {role})")
    return problems, []


def check(files: CheckpointFiles, scheme: CheckpointScheme) -> tuple[list[str], list[str]]:
    problems = list(files.problems) + list(scheme.problems)
    notes = list(scheme.notes)
    problems += _config_vs_tensors(files, scheme) + validate.problems(files, scheme)
    if not any(n in files.tokenizer_files for n in TOKENIZER_CORE):
        problems.append("tokenizer: missing (no tokenizer.json, tokenizer.model or vocab.json next to config.json)")
    elif not files.has_chat_template:
        notes.append("tokenizer has no chat template")
    kv_problems, kv_notes = _kv_scales(scheme)
    problems += kv_problems
    notes += kv_notes
    return problems, notes
