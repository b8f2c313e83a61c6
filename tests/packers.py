"""Independent test packers: GPTQ, AutoAWQ (gemm) and DeepSeek-FP8 checkpoints, plus ModelOpt exports.

Contract: each `pack_*` takes a bf16 Hugging Face checkpoint folder (tests/tiny_models.py) and
writes a quantized copy, following only the layouts in shared/reference/checkpoint-formats.md §3-§4
(written here from the text, sharing no code with qtool). Every linear except lm_head is quantized.
Each returns a PackInfo with what the test expects `inspect` to report: the byte counts of the
quantized linears' tensors (weights + scales + zeros + g_idx + input_scale, bias excluded) and
their logical weight count. `decode_*` are the matching test-local decoders (used to prove the
packers right). `modelopt_export(src, out, cfg_name, kv_cfg)` runs ModelOpt 0.47 directly (max or
AWQ-lite calibration on two random 16-token batches, no forward after) and copies the tokenizer.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]        # nibble k of an AutoAWQ int32 holds column 8c + AWQ_ORDER[k]


@dataclass
class PackInfo:
    path: Path
    quant_bytes: int = 0          # bytes of the quantized linears' tensors (bias excluded)
    quant_weights: int = 0        # out*in summed over quantized linears
    all_bytes: int = 0            # bytes of every linear's tensors (bias excluded), lm_head included
    all_weights: int = 0
    modules: list[str] = field(default_factory=list)

    @property
    def bits_quantized(self) -> float:
        return 8 * self.quant_bytes / self.quant_weights

    @property
    def bits_all(self) -> float:
        return 8 * self.all_bytes / self.all_weights


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _copy_side_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, out / f.name)


def _pack(src: Path, out: Path, quantize_one, quantization_config: dict | None, extra_files: dict | None = None,
          skip=("lm_head",)) -> PackInfo:
    """Quantize every 2-D non-embedding linear weight with `quantize_one(name, W) -> {suffix: tensor}`."""
    src, out = Path(src), Path(out)
    _copy_side_files(src, out)
    sd = load_file(str(src / "model.safetensors"))
    info = PackInfo(out)
    new = {}
    for name, t in sd.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        is_linear = module and t.dim() == 2 and "embed" not in module
        if not is_linear:
            new[name] = t
            continue
        if module in skip:
            new[name] = t
            info.all_bytes += _nbytes(t)
            info.all_weights += t.numel()
            continue
        parts = quantize_one(module, t.float())
        for suffix, q in parts.items():
            new[f"{module}.{suffix}"] = q.contiguous()
        b = sum(_nbytes(q) for q in parts.values())
        info.quant_bytes += b
        info.quant_weights += t.numel()
        info.all_bytes += b
        info.all_weights += t.numel()
        info.modules.append(module)
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for fname, obj in (extra_files or {}).items():
        (out / fname).write_text(json.dumps(obj, indent=2))
    return info


def _pack_nibbles(q: torch.Tensor, dim: int, order=None) -> torch.Tensor:
    """Pack 8 uint4 values (int64 tensor) along `dim` into one int32: value k at bits 4k (optionally permuted)."""
    q = q.movedim(dim, -1)
    q = q.reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    if order is not None:
        q = q[..., order]
    packed = torch.zeros(q.shape[:-1], dtype=torch.int64)
    for k in range(8):
        packed |= (q[..., k] & 0xF) << (4 * k)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
    return packed.movedim(-1, dim)


def _unpack_nibbles(p: torch.Tensor, dim: int, order=None) -> torch.Tensor:
    p = p.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    vals = torch.stack([(p >> (4 * k)) & 0xF for k in range(8)], dim=-1)
    if order is not None:
        inv = [0] * 8
        for k, c in enumerate(order):
            inv[c] = k
        vals = vals[..., inv]
    return vals.reshape(*vals.shape[:-2], -1).movedim(-1, dim)


# ------------------------------------------------------------------ GPTQ (AutoGPTQ v1, symmetric 4-bit)

def random_int4_linear(fmt: str, g: torch.Generator, O: int = 256, K: int = 512, gs: int = 128):
    """LinearWeights of random 4-bit codes, zeros and scales in the "gptq" (g_idx in order), "gptq-actorder"
    (g_idx permuted) or "autoawq" packing of this module's packers."""
    from qtool.runtime.weights import LinearWeights
    q = torch.randint(0, 16, (K, O), generator=g)
    z = torch.randint(0, 15, (K // gs, O), generator=g)
    s = (torch.rand(K // gs, O, generator=g) * 0.02 + 0.001).half()
    if fmt.startswith("gptq"):
        gi = torch.arange(K) // gs
        if fmt == "gptq-actorder":
            gi = gi[torch.randperm(K, generator=g)]
        t = {"qweight": _pack_nibbles(q, 0), "qzeros": _pack_nibbles(z, 1), "scales": s, "g_idx": gi.int()}
        return LinearWeights("gptq", "none", O, K, t, group_size=gs)
    if fmt != "autoawq":
        raise ValueError(fmt)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    t = {"qweight": _pack_nibbles(q, 1, order), "qzeros": _pack_nibbles(z, 1, order), "scales": s}
    return LinearWeights("autoawq", "none", O, K, t, group_size=gs)


def pack_gptq(src, out, group_size: int = 128, w4a8: bool = False, quantize_config_file: bool = False) -> PackInfo:
    def one(module, w):                       # w [out, in]
        o, i = w.shape
        wt = w.t()                            # [in, out]
        g = wt.reshape(i // group_size, group_size, o)
        scales = (g.abs().amax(dim=1) / 7).clamp(min=1e-8)          # [in/g, out]
        q = (torch.round(g / scales[:, None, :]) + 8).clamp(0, 15).to(torch.int64).reshape(i, o)
        parts = {"qweight": _pack_nibbles(q, 0),                     # [in/8, out]
                 "qzeros": _pack_nibbles(torch.full((i // group_size, o), 7, dtype=torch.int64), 1),
                 "scales": scales.to(torch.float16),
                 "g_idx": (torch.arange(i) // group_size).to(torch.int32)}
        if w4a8:
            parts["input_scale"] = torch.tensor(0.01, dtype=torch.float32)
        return parts
    qc = {"bits": 4, "group_size": group_size, "desc_act": False, "sym": True, "lm_head": False,
          "quant_method": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32"}
    if quantize_config_file:
        return _pack(src, out, one, None, {"quantize_config.json": qc})
    return _pack(src, out, one, qc)


def decode_gptq(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    q = _unpack_nibbles(qweight, 0)                         # [in, out]
    z = _unpack_nibbles(qzeros, 1) + 1                      # [groups, out]
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g])).t()             # [out, in]


# ------------------------------------------------------------------ AutoAWQ gemm (asymmetric uint4)

def pack_autoawq(src, out, group_size: int = 128) -> PackInfo:
    def one(module, w):
        o, i = w.shape
        g = w.t().reshape(i // group_size, group_size, o)
        lo, hi = g.amin(dim=1), g.amax(dim=1)
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).clamp(0, 15)
        q = (torch.round(g / scales[:, None, :]) + zeros[:, None, :]).clamp(0, 15).to(torch.int64).reshape(i, o)
        return {"qweight": _pack_nibbles(q, 1, AWQ_ORDER),                        # [in, out/8]
                "qzeros": _pack_nibbles(zeros.to(torch.int64), 1, AWQ_ORDER),     # [in/g, out/8]
                "scales": scales.to(torch.float16)}
    qc = {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm",
          "modules_to_not_convert": None}
    return _pack(src, out, one, qc)


def decode_autoawq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    q = _unpack_nibbles(qweight, 1, AWQ_ORDER)              # [in, out]
    z = _unpack_nibbles(qzeros, 1, AWQ_ORDER)               # [groups, out]
    gi = torch.arange(q.shape[0]) // group_size
    return ((q - z[gi]) * scales.float()[gi]).t()


# ------------------------------------------------------------------ DeepSeek-V3 FP8 block

def pack_deepseek_fp8(src, out, block=(128, 128)) -> PackInfo:
    bo, bi = block

    def one(module, w):
        o, i = w.shape
        po, pi = -(-o // bo) * bo, -(-i // bi) * bi
        wp = torch.zeros(po, pi)
        wp[:o, :i] = w
        blocks = wp.reshape(po // bo, bo, pi // bi, bi)
        s = (blocks.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)       # [ceil(o/128), ceil(i/128)]
        q = (blocks / s[:, None, :, None]).clamp(-448, 448).reshape(po, pi)[:o, :i].to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale_inv": s.float()}
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}
    return _pack(src, out, one, qc)


def decode_deepseek_fp8(weight, scale_inv, block=(128, 128)) -> torch.Tensor:
    s = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return weight.float() * s[: weight.shape[0], : weight.shape[1]]


# ------------------------------------------------------------------ ModelOpt exports (the real producer)

def modelopt_export(src, out, cfg_name: str, kv_cfg: str | None = None) -> Path:
    import modelopt.torch.quantization as mtq
    import transformers as tf
    from modelopt.torch.export import export_hf_checkpoint

    src, out = Path(src), Path(out)
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    if kv_cfg:
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, getattr(mtq, kv_cfg)["quant_cfg"])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (1, 16), generator=gen) for _ in range(2)]

    def loop(m):
        with torch.no_grad():
            for b in batches:
                m(input_ids=b)
    mtq.quantize(model, cfg, loop)
    export_hf_checkpoint(model, export_dir=str(out))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


# ------------------------------------------------------------------ session fixtures shared by the reader/inspect tests

import pytest  # noqa: E402

# name -> (ModelOpt config, KV config); expectations live in the tests
MODELOPT_CASES = {
    "fp8_kvfp8": ("FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "fp8_rowwise": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", None),
    "fp8_block": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", None),
    "nvfp4_kvnvfp4": ("NVFP4_DEFAULT_CFG", "NVFP4_KV_CFG"),
    "mxfp4": ("MXFP4_DEFAULT_CFG", None),
    "w4a16_nvfp4": ("W4A16_NVFP4_CFG", None),
    "w4a8_nvfp4_fp8": ("W4A8_NVFP4_FP8_CFG", None),
    "w4a8_mxfp4_fp8": ("W4A8_MXFP4_FP8_CFG", None),
    "int4_awq": ("INT4_AWQ_CFG", None),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", None),
}
PACKERS = {"gptq": pack_gptq, "gptq_w4a8": lambda s, o: pack_gptq(s, o, w4a8=True),
           "gptq_qcfg_file": lambda s, o: pack_gptq(s, o, quantize_config_file=True),
           "autoawq": pack_autoawq, "deepseek_fp8": pack_deepseek_fp8}
_CACHE: dict = {}


def modelopt_mixed_export(src, out) -> Path:
    """FP8 attention + NVFP4 MLP, layer 1 o_proj left out: ModelOpt writes MIXED_PRECISION."""
    import modelopt.torch.quantization as mtq
    nv = {e["quantizer_name"]: e for e in mtq.NVFP4_DEFAULT_CFG["quant_cfg"] if "cfg" in e}
    extra = [{"quantizer_name": "*mlp*weight_quantizer", "cfg": nv["*weight_quantizer"]["cfg"]},
             {"quantizer_name": "*mlp*input_quantizer", "cfg": nv["*input_quantizer"]["cfg"]},
             {"quantizer_name": "*layers.1.self_attn.o_proj*", "enable": False}]
    return _modelopt_with(src, out, "FP8_DEFAULT_CFG", extra)


def _modelopt_with(src, out, cfg_name, extra):
    import modelopt.torch.quantization as mtq
    saved = getattr(mtq, cfg_name)
    cfg = copy.deepcopy(saved)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + extra
    setattr(mtq, "_QTOOL_TEST_CFG", cfg)
    try:
        return modelopt_export(src, out, "_QTOOL_TEST_CFG")
    finally:
        delattr(mtq, "_QTOOL_TEST_CFG")


@pytest.fixture(scope="session")
def modelopt_ckpt(tmp_path_factory, tiny_models):
    """name -> folder of a ModelOpt export of the tiny llama (built on first use, once per session)."""
    def get(name: str) -> Path:
        key = ("modelopt", name)
        if key not in _CACHE:
            root = _CACHE.setdefault("modelopt_root", tmp_path_factory.mktemp("modelopt"))
            src = tiny_models("llama")
            if name == "mixed":
                _CACHE[key] = modelopt_mixed_export(src, root / name)
            else:
                cfg, kv = MODELOPT_CASES[name]
                _CACHE[key] = modelopt_export(src, root / name, cfg, kv)
        return _CACHE[key]
    return get


@pytest.fixture(scope="session")
def packed_ckpt(tmp_path_factory, tiny_models):
    """name -> PackInfo of a checkpoint written by the independent packers above."""
    def get(name: str) -> PackInfo:
        key = ("packed", name)
        if key not in _CACHE:
            root = _CACHE.setdefault("packed_root", tmp_path_factory.mktemp("packed"))
            _CACHE[key] = PACKERS[name](tiny_models("llama"), root / name)
        return _CACHE[key]
    return get
