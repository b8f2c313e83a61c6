"""Qwen2 / Qwen2.5: the Llama decoder with biases on q/k/v (carried by the fused qkv LinearWeights).

Contract: identical layer computation to LlamaDecoder; exists so the family has its own module
(sliding-window layers, if a checkpoint enables them, are not applied).
"""
from __future__ import annotations

from qtool.runtime.families.llama import LlamaDecoder


class Qwen2Decoder(LlamaDecoder):
    pass
