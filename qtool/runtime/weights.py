"""Runtime weights: every linear layer kept in its QUANTIZED on-disk form (CPU tensors), plus the model config.

Contract: ``LinearWeights.tensors`` maps ROLES (weight, weight_scale, weight_scale_2, weight_scale_inv,
input_scale, pre_quant_scale, qweight, qzeros, scales, g_idx) to tensors exactly as stored in the checkpoint
(or as fused by qtool.runtime.fusion, which ``note`` then describes: e.g. a fused FP8 per-tensor q|k|v carries a
per-row ``weight_scale [out]``). ``dequantize()`` is the float32 ``[out, in]`` weight
per docs/numerics.md; ``quantize_input(x)`` is the activation side (``x * pre_quant_scale`` then the activation
rule). A group that could not be fused exactly (rare: see qtool/runtime/fusion.py) has ``format == 'parts'``
and ``parts`` set: apply each part to the same input and concatenate the outputs along the last dim
(``dequantize()`` already returns the concatenation). ``ModelWeights.nbytes()`` counts the bytes held (an FP8 checkpoint is about half of bf16).
Built by qtool.runtime.loader.load_model_weights; consumed by the model code and both backends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class LinearWeights:
    format: str                       # one of qtool.formats.FORMATS
    activation: str                   # one of qtool.formats.ACTIVATIONS
    out_features: int
    in_features: int
    tensors: dict[str, torch.Tensor]  # role -> on-disk (quantized) tensor, CPU
    group_size: int | None = None
    fp8_weight_stage: bool = False    # W4A8 AWQ: int4 then FP8 per-tensor (weight_scale_2)
    bias: torch.Tensor | None = None
    note: str = ""                    # e.g. 'fused q/k/v; requantized to shared scale'
    parts: list[LinearWeights] | None = None   # set (format 'parts') when a q/k/v or gate/up group stays unfused

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[out, in]`` via qtool.formats.decode_weight; written into ``out`` (contiguous float32
        ``[out, in]``) when given."""
        from qtool.formats import decode_weight
        if out is not None and tuple(out.shape) != (self.out_features, self.in_features):
            raise ValueError(f"out {tuple(out.shape)} != ({self.out_features}, {self.in_features})")
        if self.parts is not None:
            if out is None:
                return torch.cat([p.dequantize() for p in self.parts])
            start = 0
            for p in self.parts:
                p.dequantize(out[start:start + p.out_features])
                start += p.out_features
            return out
        w = decode_weight(self.format, self.tensors, self.group_size, self.fp8_weight_stage, out)
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"decoded weight {tuple(w.shape)} != ({self.out_features}, {self.in_features})")
        return w

    @property
    def input_scale(self) -> torch.Tensor | None:
        return self.tensors.get("input_scale")

    @property
    def pre_quant_scale(self) -> torch.Tensor | None:
        return self.tensors.get("pre_quant_scale")

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ (float32): ``x * pre_quant_scale`` (when present), then the activation rule of ``activation``."""
        from qtool.formats import quantize_activation
        if self.parts is not None:
            raise ValueError("a 'parts' LinearWeights has one input transform per part; use each part's")
        x = x.float()
        pqs = self.pre_quant_scale
        if pqs is not None:
            x = x * pqs.float().to(x.device)
        return quantize_activation(self.activation, x, self.input_scale)

    def nbytes(self) -> int:
        if self.parts is not None:
            return sum(p.nbytes() for p in self.parts)
        return sum(_tensor_bytes(t) for t in self.tensors.values()) + _tensor_bytes(self.bias)


@dataclass
class ModelConfig:
    family: str                       # 'llama' | 'mistral' | 'qwen2' | 'qwen3'
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    qkv: LinearWeights                # fused q|k|v along out
    o: LinearWeights
    gate_up: LinearWeights            # fused gate|up along out
    down: LinearWeights
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    k_scale: float | None = None
    v_scale: float | None = None

    def nbytes(self) -> int:
        norms = sum(_tensor_bytes(t) for t in (self.input_norm, self.post_attn_norm, self.q_norm, self.k_norm))
        return norms + sum(lw.nbytes() for lw in (self.qkv, self.o, self.gate_up, self.down))


@dataclass
class ModelWeights:
    config: ModelConfig
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: LinearWeights
    layers: list[LayerWeights]
    kv_format: str                    # 'bf16' | 'fp8' | 'nvfp4', from the checkpoint
    source: str
    scheme_summary: str
    notes: list[str] = field(default_factory=list)
    kv_scale_defaults: list[int] = field(default_factory=list)   # layers whose missing k/v scale became 1.0

    def kv_scale_warning(self, kv: str) -> str | None:
        """The warning for a quantized KV cache (`kv`) that runs with scale 1.0 in some layers, else None."""
        if kv not in ("fp8", "nvfp4"):
            return None
        layers = sorted(set(self.kv_scale_defaults) | {i for i, L in enumerate(self.layers)
                                                       if L.k_scale is None or L.v_scale is None})
        if not layers:
            return None
        from qtool.checkpoint.report import ranges
        return (f"the checkpoint has no calibrated k_scale/v_scale in layer(s) {ranges(layers)} of "
                f"{len(self.layers)}: the {kv} KV cache uses scale 1.0 there "
                "(quantize with --kv-cache-quant for calibrated scales)")

    def nbytes(self) -> int:
        """Bytes held in memory (a tied lm_head that shares the embedding tensor is counted once)."""
        total = _tensor_bytes(self.embed) + _tensor_bytes(self.final_norm)
        head_w = self.lm_head.tensors.get("weight")
        if not (head_w is not None and head_w.data_ptr() == self.embed.data_ptr()):
            total += self.lm_head.nbytes()
        return total + sum(layer.nbytes() for layer in self.layers)
