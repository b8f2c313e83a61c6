"""Checkpoint validation shared by `inspect` (problems, exit 1) and the runtime loader (`run`: the first problem
fails the load, exit 1), so the two cannot disagree.

Contract: `problems(files, scheme)` returns one line per problem, naming the tensor or config key:
config.json values the runtime relies on (`hidden_size` missing or not a positive integer, `num_hidden_layers`
missing, not an integer, or 0: zero layers; no numbered layer tensors at all), overlapping tensor byte ranges in
a safetensors file, a linear weight missing from some layers (families qtool runs: the seven attention/MLP
projections and whatever linear the other layers have), config.json `quantization_config.kv_cache_scheme`
contradicting hf_quant_config.json `kv_cache_quant_algo`, and the VALUES of the scale tensors (weight scales,
`weight_scale_2`, `weight_scale_inv`, `input_scale`, `k_scale`, `v_scale`): NaN, Inf, zero or negative (a
per-block 4-bit weight scale may be 0: its block is all zero). Scale values are read from the local files
without torch or numpy, up to 65536 elements per tensor (larger ones, and a hub checkpoint's, are left to
`inspect --deep`). Everything computed from config values is bounded by the tensors present
(`present_layers`), so a config claiming 1e9 layers costs nothing. `require_valid(files, scheme)` raises
CheckpointError with the first problem. `quantized_input(folder)` says what makes a checkpoint already
quantized (or None): the quantize command refuses such an input. Torch-free.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from qtool.checkpoint.files import CheckpointFiles, TensorInfo
from qtool.checkpoint.scheme import LAYER_RE, CheckpointScheme, text_config
from qtool.errors import CheckpointError

RUNTIME_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
MAX_SCALE_ELEMENTS = 1 << 16        # larger scale tensors are left to `inspect --deep`
SCALE_ROLES = ("weight_scale", "weight_scale_2", "weight_scale_inv", "input_scale")
BLOCK_SCALED = ("nvfp4", "mxfp4", "int4-awq", "gptq", "autoawq")   # their weight_scale: per small block, may be 0


def present_layers(files: CheckpointFiles) -> list[int]:
    """Sorted indices of the numbered layers that have tensors."""
    return sorted({int(m.group(1)) for name in files.tensors if (m := LAYER_RE.search(name))})


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _config(files: CheckpointFiles, layers: list[int]) -> list[str]:
    c = text_config(files.config)
    out = []
    key = next((k for k in HIDDEN_KEYS if k in c), None)
    if key is None:
        out.append("config.json: hidden_size is missing")
    elif not _positive_int(c[key]):
        out.append(f"config.json: {key} {c[key]!r} is not a positive integer")
    key = next((k for k in LAYER_KEYS if k in c), None)
    if key is None:
        out.append("config.json: num_hidden_layers is missing")
    elif isinstance(c[key], bool) or not isinstance(c[key], int):
        out.append(f"config.json: {key} {c[key]!r} is not an integer")
    elif c[key] <= 0:
        out.append(f"config.json: {key} is {c[key]}: the model has no layers")
    if not layers and files.tensors:
        out.append("no numbered layer tensors (e.g. model.layers.0.*): the checkpoint has zero layers")
    return out


def _overlaps(files: CheckpointFiles) -> list[str]:
    out = []
    by_file: dict[Path, list[TensorInfo]] = {}
    for t in files.tensors.values():
        by_file.setdefault(t.file, []).append(t)
    for path, ts in by_file.items():
        ts.sort(key=lambda t: (t.offset, t.nbytes))
        prev = None
        for t in ts:
            if t.nbytes == 0:
                continue
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                out.append(f"{path.name}: tensors {prev.name} and {t.name} overlap (bytes {prev.offset}.."
                           f"{prev.offset + prev.nbytes} and {t.offset}..{t.offset + t.nbytes})")
            if prev is None or t.offset + t.nbytes > prev.offset + prev.nbytes:
                prev = t
    return out


def _missing_linears(files: CheckpointFiles, scheme: CheckpointScheme, layers: list[int]) -> list[str]:
    """Linear weights some layers lack: relative to the other layers, and to the runtime families' projections."""
    have: dict[str, set[int]] = {}
    prefix = None
    for module in scheme.linears:
        m = LAYER_RE.search(module + ".")
        if m is None:
            continue
        prefix = prefix or module[: m.start(1)]
        have.setdefault(module[m.end(1) + 1:], set()).add(int(m.group(1)))
    if prefix is None:
        prefix = "model.layers."
    from qtool.checkpoint.report import ranges
    from qtool.support.data import runtime_model_types
    if str(text_config(files.config).get("model_type", "")).lower() not in runtime_model_types():
        return []       # other families may differ per layer by design (dense and MoE layers)
    out = []
    for suffix in sorted(set(have) | set(RUNTIME_LINEARS)):
        missing = [i for i in layers if i not in have.get(suffix, set())]
        if missing:
            where = prefix + (str(missing[0]) if len(missing) == 1 else "{" + ranges(missing) + "}")
            out.append(f"{where}.{suffix}.weight: missing (a linear weight every layer needs)")
    return out


def _kv_declared(files: CheckpointFiles) -> tuple[str | None, str | None]:
    """(config.json kv_cache_scheme as 'fp8'/'nvfp4'/'none' or None when it says nothing, hf_quant_config's)."""
    qc = files.config.get("quantization_config")
    from_cfg = None
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "modelopt":
        s = qc.get("kv_cache_scheme")
        if isinstance(s, dict):
            from_cfg = "fp8" if s.get("num_bits") == 8 else f"{s.get('type', '?')}{s.get('num_bits', '?')}"
        elif isinstance(s, str):
            from_cfg = s.lower()
        else:
            from_cfg = "none"
    hq = files.hf_quant_config
    from_hq = None
    if isinstance(hq, dict) and isinstance(hq.get("quantization"), dict):
        from_hq = str(hq["quantization"].get("kv_cache_quant_algo") or "none").lower()
    return from_cfg, from_hq


def _kv_contradiction(files: CheckpointFiles) -> list[str]:
    from_cfg, from_hq = _kv_declared(files)
    if from_cfg is None or from_hq is None or from_cfg == from_hq:
        return []
    return [f"config.json quantization_config.kv_cache_scheme says a {from_cfg} KV cache but hf_quant_config.json "
            f"kv_cache_quant_algo says {from_hq}"]


# ------------------------------------------------------------------------------------------ scale values

_E4M3: list[float] = []


def _e4m3(code: int) -> float:
    s, e, m = -1.0 if code & 0x80 else 1.0, (code >> 3) & 0xF, code & 7
    if e == 15 and m == 7:
        return float("nan")
    return s * (m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def decode(raw: bytes, dtype: str) -> list[float] | None:
    """The float values of a little-endian safetensors buffer (F32, F16, BF16, F64, F8_E4M3); None for others."""
    import struct
    from array import array
    if dtype in ("F32", "F64", "BF16"):
        if dtype == "BF16":                   # the high half of a float32
            wide = bytearray(2 * len(raw))
            wide[2::4], wide[3::4] = raw[0::2], raw[1::2]
            raw = bytes(wide)
        a = array("d" if dtype == "F64" else "f", raw)
        if sys.byteorder == "big":
            a.byteswap()
        return a.tolist()
    if dtype == "F16":
        return list(struct.unpack(f"<{len(raw) // 2}e", raw))
    if dtype == "F8_E4M3":
        if not _E4M3:
            _E4M3.extend(_e4m3(c) for c in range(256))
        return [_E4M3[c] for c in raw]
    return None


def _scale_tensors(scheme: CheckpointScheme) -> list[tuple[str, bool]]:
    """(tensor name, whether 0 is a valid value: the per-block scale of an all-zero block) of every scale."""
    names = []
    for spec in scheme.linears.values():
        for role in SCALE_ROLES:
            if role in spec.tensors:
                names.append((spec.tensors[role], role == "weight_scale" and spec.format in BLOCK_SCALED))
    for k, v in scheme.kv_scales.values():
        names += [(n, False) for n in (k, v) if n]
    return names


def scale_problem(name: str, values: list[float], zero_ok: bool = False) -> str | None:
    """One line when a scale tensor holds NaN, Inf, zero (unless `zero_ok`) or negative values."""
    inf = float("inf")
    counts = {"NaN": 0, "Inf": 0, "zero": 0, "negative": 0}
    for v in values:
        if 0.0 < v < inf or (zero_ok and v == 0):
            continue
        counts["NaN" if v != v else "Inf" if v in (inf, -inf) else "zero" if v == 0 else "negative"] += 1
    n = len(values)
    bad = [f"{k} of {n} {w}" if n > 1 else w for w, k in counts.items() if k]
    rule = "finite and >= 0" if zero_ok else "finite and > 0"
    return f"{name}: scale is {', '.join(bad)} (a scale must be {rule})" if bad else None


def _scale_values(files: CheckpointFiles, scheme: CheckpointScheme) -> list[str]:
    if files.remote:
        return []
    out = []
    handles = {}
    try:
        for name, zero_ok in _scale_tensors(scheme):
            t = files.tensors.get(name)
            if t is None or t.numel > MAX_SCALE_ELEMENTS:
                continue
            f = handles.get(t.file)
            if f is None:
                try:
                    f = handles[t.file] = open(t.file, "rb")
                except OSError:
                    continue                      # unreadable files are reported where they are opened
            f.seek(t.offset)
            raw = f.read(t.nbytes)
            values = decode(raw, t.dtype) if len(raw) == t.nbytes else None
            if values is not None:
                msg = scale_problem(name, values, zero_ok)
                if msg:
                    out.append(msg)
    finally:
        for f in handles.values():
            f.close()
    return out


# ------------------------------------------------------------------------------------------ entry points

def problems(files: CheckpointFiles, scheme: CheckpointScheme) -> list[str]:
    layers = present_layers(files)
    return (_config(files, layers) + _overlaps(files) + _missing_linears(files, scheme, layers)
            + _kv_contradiction(files) + _scale_values(files, scheme))


def require_valid(files: CheckpointFiles, scheme: CheckpointScheme) -> None:
    found = problems(files, scheme)
    if found:
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise CheckpointError(found[0] + more, hint=f"qtool inspect {files.source} lists every problem")


QUANT_ROLES = ("weight_scale", "weight_scale_2", "weight_scale_inv", "input_scale", "k_scale", "v_scale",
               "qweight", "qzeros", "scales", "g_idx", "pre_quant_scale")


def quantized_input(folder: Path) -> str | None:
    """What marks the checkpoint in `folder` as already quantized (config JSON, else tensor dtypes/roles), or None."""
    from qtool.checkpoint.files import open_local, read_json
    from qtool.errors import QtoolError
    folder = Path(folder)
    hq = read_json(folder / "hf_quant_config.json")
    if hq is not None:
        q = hq.get("quantization") if isinstance(hq.get("quantization"), dict) else {}
        return f"a ModelOpt {q.get('quant_algo') or '?'} checkpoint (hf_quant_config.json)"
    cfg = read_json(folder / "config.json") or {}
    qc = text_config(cfg).get("quantization_config", cfg.get("quantization_config"))
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        return f"a {method} checkpoint (config.json quantization_config)"
    if (folder / "quantize_config.json").is_file():
        return "a GPTQ checkpoint (quantize_config.json)"
    try:
        files = open_local(folder, strict=False)
    except QtoolError:
        return None                              # unreadable weights fail, one line, when they are loaded
    found: dict[int, str] = {}          # the most telling evidence first: low-bit dtypes, packed weights, scales
    for name, t in files.tensors.items():
        role = name.rpartition(".")[2]
        if t.dtype.startswith("F8_") or t.dtype in ("F4", "F6_E2M3", "F6_E3M2"):
            found.setdefault(0, f"{t.dtype} tensors (e.g. {name})")
        elif role == "weight" and t.dtype in ("U8", "I8", "I32") and len(t.shape) == 2:
            found.setdefault(1, f"packed integer weights (e.g. {name}, {t.dtype})")
        elif role in QUANT_ROLES:
            found.setdefault(2, f"quantization tensors (e.g. {name})")
    return found[min(found)] if found else None
