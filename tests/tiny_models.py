"""Builders for tiny random Hugging Face checkpoints used by the tests (no hub access).

Contract: `make_tiny_model(family, path, **overrides)` saves a randomly initialised bf16
checkpoint of the given family ('llama', 'mistral', 'qwen2', 'qwen3', or 'llama3' = llama with
llama3 rope scaling) with a small byte-level BPE tokenizer and a chat template, and returns the
path. Dimensions are multiples of 128 so every block format applies. Deterministic per seed.
"""
from __future__ import annotations

from pathlib import Path

TINY_DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=384, max_position_embeddings=512,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.",
    "Quantization maps floating point weights to fewer bits: FP8, NVFP4, MXFP4 and INT4.",
    "A small language model predicts the next token from the previous ones, one step at a time.",
    "Water boils at one hundred degrees Celsius at sea level; ice melts at zero degrees.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
] * 20


def make_tokenizer(path: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_tiny_model(family: str, path, seed: int = 0, dtype: str = "bfloat16", **overrides) -> Path:
    import torch
    import transformers as tf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dims = {**TINY_DIMS, **overrides}
    if family in ("llama", "llama3"):
        if family == "llama3":
            dims.setdefault("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
            dims["rope_theta"] = 500000.0
        cfg = tf.LlamaConfig(**dims)
        arch = "LlamaForCausalLM"
    elif family == "mistral":
        cfg = tf.MistralConfig(**dims, sliding_window=None)
        arch = "MistralForCausalLM"
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**dims)
        arch = "Qwen2ForCausalLM"
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**dims)
        arch = "Qwen3ForCausalLM"
    else:
        raise ValueError(family)
    cfg.architectures = [arch]
    tok = make_tokenizer(path, dims["vocab_size"])
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = getattr(tf, arch)(cfg).to(getattr(torch, dtype))
    with torch.no_grad():  # a little more spread than the default init so quantization matters
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    return path
