"""``load_model_weights``: a checkpoint (local folder or hub id) → ModelWeights, weights kept quantized.

Contract: ``load_weights(files, scheme)`` takes opened checkpoint files and their description
(qtool.checkpoint.scheme.describe, made once by the caller); ``load_model_weights(path_or_id)`` opens,
describes and loads. The per-layer formats come from the description (which validates every tensor
against its format), loads each tensor in its on-disk dtype onto the CPU, builds one LinearWeights per linear
and fuses q|k|v and gate|up (qtool.runtime.fusion, which says in ``note`` and in ``ModelWeights.notes`` where
it re-quantized or kept parts). Families: llama (incl. llama3 rope scaling), mistral, qwen2 (q/k/v bias),
qwen3 (q/k RMSNorm); tied or untied embeddings. An unknown model_type raises Unsupported; a bad checkpoint
raises CheckpointError (one line each), as does anything qtool.checkpoint.validate finds (the checks inspect
makes: NaN/Inf/zero/negative scales, zero layers, overlapping tensors, a missing linear weight, ...), checked by
``load_weights`` first; it also fails on a folder replaced since ``open_checkpoint`` began reading it
(qtool.checkpoint.snapshot; so config, tokenizer and weights come from one version). A quantized KV cache
without k_scale/v_scale uses 1.0 and lists those layers in ``kv_scale_defaults``. A hub id is resolved by
qtool.sources (offline: one-line Failure). Progress goes to stderr.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qtool.errors import CheckpointError, Unsupported
from qtool.runtime.fusion import fuse
from qtool.runtime.weights import LayerWeights, LinearWeights, ModelConfig, ModelWeights

ATTN = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj")


# ---------------------------------------------------------------- config
def _rope(cfg: dict) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    scaling = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else None
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    merged = {**params, **(scaling or {})}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind == "default":
        return theta, None
    merged = {k: v for k, v in merged.items() if k not in ("rope_theta", "type")}
    merged["rope_type"] = kind
    return theta, merged


def _eos(cfg: dict, gen: dict | None) -> list[int]:
    ids: list[int] = []
    for src in (gen or {}, cfg):
        v = src.get("eos_token_id")
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, int) and x not in ids:
                ids.append(x)
    return ids


def model_config(cfg: dict, gen: dict | None, tensor_names) -> ModelConfig:
    """The runtime config of a llama-family checkpoint from config.json (+ generation_config.json)."""
    from qtool.support.families import text_config
    cfg = text_config(cfg)
    family = str(cfg.get("model_type", "")).lower()
    from qtool.support.data import runtime_model_types
    if family not in runtime_model_types():
        raise Unsupported(f"model_type {cfg.get('model_type')!r} is not supported by qtool run "
                          f"(supported: {', '.join(runtime_model_types())})")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        theta, scaling = _rope(cfg)
        names = set(tensor_names)
        return ModelConfig(
            family=family, hidden_size=hidden, intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False))
            or not ({"lm_head.weight", "lm_head.qweight"} & names),
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in names,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in names,
            bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
            eos_token_ids=_eos(cfg, gen))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: missing or invalid {exc} for a {family} model")


# ---------------------------------------------------------------- tensors
class _Reader:
    """Loads tensors by name from the shards (safetensors, CPU, on-disk dtype)."""

    def __init__(self, files):
        self.files, self._open = files, {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        info = self.files.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is missing")
        path = str(info.file)
        if path not in self._open:
            try:
                self._open[path] = safe_open(path, framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - any library failure is a bad file
                raise CheckpointError(f"{Path(path).name}: cannot open ({exc})")
        try:
            return self._open[path].get_tensor(name)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{name}: cannot read from {Path(path).name} ({exc})")


def _linear(spec, reader: _Reader) -> LinearWeights:
    tensors = {role: reader.get(name) for role, name in spec.tensors.items() if role != "bias"}
    bias = reader.get(spec.tensors["bias"]) if "bias" in spec.tensors else None
    return LinearWeights(spec.format, spec.activation, spec.out_features, spec.in_features, tensors,
                         spec.group_size, spec.fp8_weight_stage, bias)


def load_model_weights(path_or_id: str, progress: bool = True) -> ModelWeights:
    """Open (a hub id through qtool.sources), describe and load a checkpoint."""
    from qtool.checkpoint.files import open_checkpoint
    from qtool.checkpoint.scheme import describe
    from qtool.sources import looks_like_hub_id, resolve_model_source
    local = Path(path_or_id).expanduser()
    if local.exists() or not looks_like_hub_id(path_or_id):
        files = open_checkpoint(str(local))
    else:
        files = open_checkpoint(str(resolve_model_source(path_or_id, progress).path))
        files.source = path_or_id
    model_config(files.config, files.generation_config, files.tensors)     # family first: Unsupported
    return load_weights(files, describe(files), progress)


def load_weights(files, scheme, progress: bool = True) -> ModelWeights:
    """ModelWeights from opened checkpoint files and their description (qtool.checkpoint.scheme.describe)."""
    from qtool.checkpoint.validate import require_valid
    config = model_config(files.config, files.generation_config, files.tensors)
    require_valid(files, scheme)                # the checks inspect makes: scale values, zero layers, ...
    reader, notes = _Reader(files), list(scheme.notes)

    def need(name: str) -> torch.Tensor:
        return reader.get(name)

    def lin(module: str) -> LinearWeights:
        spec = scheme.linears.get(module)
        if spec is None:
            raise CheckpointError(f"{module}: linear layer missing from the checkpoint")
        return _linear(spec, reader)

    embed = need("model.embed_tokens.weight")
    layers: list[LayerWeights] = []
    fusion_notes: dict[str, int] = {}
    kv_defaults: list[int] = []
    with _progress(progress, config.num_layers, files.source) as advance:
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            qkv = fuse([lin(p + "self_attn." + m) for m in ATTN], "q/k/v")
            gate_up = fuse([lin(p + "mlp." + m) for m in MLP], "gate/up")
            for lw in (qkv, gate_up):
                if ";" in lw.note or lw.parts is not None:      # anything beyond a plain concatenation
                    fusion_notes[lw.note] = fusion_notes.get(lw.note, 0) + 1
            k_scale, v_scale = _kv_scales(scheme, i, reader, kv_defaults)
            layers.append(LayerWeights(
                input_norm=need(p + "input_layernorm.weight"), post_attn_norm=need(p + "post_attention_layernorm.weight"),
                qkv=qkv, o=lin(p + "self_attn.o_proj"), gate_up=gate_up, down=lin(p + "mlp.down_proj"),
                q_norm=need(p + "self_attn.q_norm.weight") if config.qk_norm else None,
                k_norm=need(p + "self_attn.k_norm.weight") if config.qk_norm else None,
                k_scale=k_scale, v_scale=v_scale))
            advance()
    notes += [f"{note} (in {n} of {config.num_layers} layers)" for note, n in fusion_notes.items()]
    from qtool.checkpoint import snapshot
    snapshot.verify(files.root, files.pin)     # pinned before config.json was read: one version of the folder
    if "lm_head" in scheme.linears and not config.tie_word_embeddings:
        lm_head = lin("lm_head")
    else:   # tied (as transformers does, even when a copy of lm_head.weight is also stored)
        lm_head = LinearWeights("bf16", "none", config.vocab_size, config.hidden_size, {"weight": embed},
                                note="tied to the embedding")
    return ModelWeights(config=config, embed=embed, final_norm=need("model.norm.weight"), lm_head=lm_head,
                        layers=layers, kv_format=scheme.kv_format, source=files.source,
                        scheme_summary=scheme.summary(), notes=_dedupe(notes), kv_scale_defaults=kv_defaults)


def _kv_scales(scheme, layer: int, reader: _Reader, defaulted: list[int]):
    if scheme.kv_format == "bf16":
        return None, None
    k_name, v_name = scheme.kv_scales.get(layer, (None, None))
    out = []
    for name in (k_name, v_name):
        if name is None:
            out.append(1.0)
            if layer not in defaulted:
                defaulted.append(layer)
        else:
            out.append(float(reader.get(name).float().reshape(-1)[0]))
    return out[0], out[1]


def _dedupe(notes: list[str]) -> list[str]:
    seen, out = set(), []
    for n in notes:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


class _progress:
    """A rich progress bar on stderr (or nothing); ``with _progress(...) as advance: advance()``."""

    def __init__(self, enabled: bool, total: int, source: str):
        self.enabled, self.total, self.source, self.bar = enabled, total, source, None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        self.bar = Progress(TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(Path(self.source).name or self.source, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
