"""`inspect --deep`: read every tensor and check values (NaN/Inf, bad scales, all-zero blocks, min/max).

Contract: `deep_check(files, scheme)` loads tensors one at a time (safetensors + torch, imported
here) and returns (problems, stats). Problems, one line naming the tensor: NaN or Inf values in
float tensors and in FP8 weights; zero, negative or non-finite scales (every scale role,
k/v scales, E8M0 code 255); all-zero blocks of a linear weight (a block = the format's group of
input elements, 128 for unblocked formats; packed FP4/INT4 bytes count as zero when every code
is ±0). Stats: per tensor dtype, min, max, mean |x| of the decoded float values (scales and
unpacked float weights; packed integer weights report only their all-zero block count).
"""
from __future__ import annotations

from pathlib import Path

from qtool.checkpoint.files import CheckpointFiles
from qtool.checkpoint.scheme import CheckpointScheme
from qtool.errors import Failure

SCALE_ROLES = ("weight_scale", "weight_scale_2", "weight_scale_inv", "input_scale", "scales", "pre_quant_scale",
               "k_scale", "v_scale")


def _block_elems(spec) -> int:
    return spec.group_size or 128


def _zero_blocks(t, spec) -> tuple[int, int]:
    """(all-zero blocks, block elements) of a linear's weight / qweight tensor."""
    import torch
    fmt = spec.format
    if fmt in ("gptq", "autoawq"):
        return 0, 0          # zero codes are not zero weights here (zero point); checked through scales
    if t.dtype == torch.uint8:
        if fmt in ("nvfp4", "mxfp4"):
            zero = (t & 0x77) == 0                     # both E2M1 nibbles are ±0
            per_block = _block_elems(spec) // 2        # bytes per block along in
        else:                                           # int4-awq: two output rows per byte
            zero = t == 0
            per_block = _block_elems(spec)
    else:
        v = t.float() if t.dtype != torch.float32 else t
        zero = v == 0
        per_block = _block_elems(spec)
    rows, cols = zero.shape
    if per_block <= 0 or cols % per_block:
        per_block = cols
    blocks = zero.reshape(rows, cols // per_block, per_block).all(dim=-1)
    elems = per_block * (2 if t.dtype == torch.uint8 and fmt in ("nvfp4", "mxfp4") else 1)
    return int(blocks.sum()), elems


def _stats(name: str, t, role: str | None) -> tuple[dict, list[str]]:
    import torch
    problems: list[str] = []
    st: dict = {"name": name, "dtype": str(t.dtype).replace("torch.", "")}
    if t.dtype == torch.uint8 and role in ("weight_scale",):      # E8M0 exponents
        nan = int((t == 255).sum())
        if nan:
            problems.append(f"{name}: {nan} E8M0 scale(s) are NaN (code 255)")
        st.update(min=int(t.min()) - 127 if t.numel() else None, max=int(t.max()) - 127 if t.numel() else None,
                  unit="log2")
        return st, problems
    if not (t.is_floating_point()):
        return st, problems
    v = t.float()
    nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
    if nan:
        problems.append(f"{name}: {nan} NaN value(s)")
    if inf:
        problems.append(f"{name}: {inf} Inf value(s)")
    finite = v[torch.isfinite(v)]
    if finite.numel():
        st.update(min=float(finite.min()), max=float(finite.max()), mean_abs=float(finite.abs().mean()))
    if role in SCALE_ROLES:
        zero, neg = int((v == 0).sum()), int((v < 0).sum())
        if zero:
            problems.append(f"{name}: {zero} zero scale(s)")
        if neg:
            problems.append(f"{name}: {neg} negative scale(s)")
    return st, problems


def deep_check(files: CheckpointFiles, scheme: CheckpointScheme) -> tuple[list[str], list[dict]]:
    if files.remote:
        raise Failure(f"--deep reads tensor data, which is not downloaded for hub id {files.source}",
                      hint="download the checkpoint (huggingface-cli download) and inspect the folder")
    from safetensors import safe_open

    role_of: dict[str, tuple[str, object]] = {}
    for spec in scheme.linears.values():
        for role, name in spec.tensors.items():
            role_of[name] = (role, spec)
    for k, v in scheme.kv_scales.values():
        for name, role in ((k, "k_scale"), (v, "v_scale")):
            if name:
                role_of[name] = (role, None)
    by_file: dict[Path, list[str]] = {}
    for name, info in files.tensors.items():
        by_file.setdefault(info.file, []).append(name)
    problems: list[str] = []
    stats: list[dict] = []
    for path, names in by_file.items():
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - corrupt file: one line
            problems.append(f"{path.name}: cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            continue
        with handle as f:
            for name in names:
                role, spec = role_of.get(name, (None, None))
                try:
                    t = f.get_tensor(name)
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"{name}: cannot be read ({type(exc).__name__})")
                    continue
                st, pr = _stats(name, t, role)
                problems += pr
                if role in ("weight", "qweight") and spec is not None and t.dim() == 2:
                    zb, elems = _zero_blocks(t, spec)
                    st["zero_blocks"] = zb
                    if zb:
                        problems.append(f"{name}: {zb} all-zero block(s) of {elems} weights")
                stats.append(st)
    return problems, stats
