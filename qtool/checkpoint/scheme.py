"""What format every linear layer of a checkpoint is in (from config JSON + tensor headers).

Contract: `describe(files)` returns a CheckpointScheme: the producer and quant method, the qtool
recipe it corresponds to, the KV-cache format and per-layer k/v scale tensor names, and a
LinearSpec (weight format and activation scheme of the format registry, group size, out/in features
and role -> tensor-name map) for every linear layer, quantized or not. The format of each layer
is read from the tensors (dtype and shapes, the layouts of docs/numerics.md; each format's expected
tensors come from the registry, recipes/formats.toml) and compared with
what the config declares (hf_quant_config.json incl. MIXED_PRECISION `quantized_layers` and
`exclude_modules`, GPTQ/AWQ/DeepSeek `quantization_config`, quantize_config.json). Any
disagreement, missing or unexpected scale tensor, or shape/dtype that contradicts the format
raises CheckpointError naming the tensor; with `strict=False` all of them are collected in
`.problems` instead (what `inspect` prints). Headers only: no torch.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from qtool.checkpoint.files import CheckpointFiles, TensorInfo
from qtool.errors import CheckpointError
from qtool.formats import registry
from qtool.support.families import text_config

EMBED_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings", "embed_positions",
               "position_embeddings", "token_type_embeddings")
KV_ROLES = ("k_scale", "v_scale")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class LinearSpec:
    module: str                      # e.g. 'model.layers.0.self_attn.q_proj'
    format: str
    activation: str
    group_size: int | None
    out_features: int
    in_features: int
    tensors: dict[str, str]          # role -> tensor name
    fp8_weight_stage: bool = False   # W4A8_AWQ second FP8 stage (weight_scale_2)


@dataclass
class CheckpointScheme:
    producer: str | None
    quant_method: str                # 'modelopt', 'gptq', 'awq', 'fp8' (DeepSeek), 'none'
    quant_algo: str | None           # raw, e.g. 'FP8', 'fp8_pb_wo', 'W4A16_AWQ', 'MIXED_PRECISION'
    recipe: str | None               # qtool recipe name when it maps, else None
    kv_format: str                   # 'bf16' | 'fp8' | 'nvfp4'
    kv_scales: dict[int, tuple[str | None, str | None]]
    linears: dict[str, LinearSpec]
    excluded: list[str]
    other_tensors: list[str]
    kv_algo: str | None = None       # raw kv_cache_quant_algo
    problems: list[str] = field(default_factory=list)   # strict=False: what would have raised
    notes: list[str] = field(default_factory=list)      # harmless facts worth a warning line

    @property
    def kv_recipe(self) -> str | None:
        """The KV recipe of the checkpoint, None when its KV cache is not quantized."""
        return None if self.kv_format == "bf16" else self.kv_format

    def checked_recipes(self) -> list[str] | None:
        """Recipes whose matrix columns decide the verdict ([] for bf16; every layer's recipe for a mixed
        checkpoint); None when a quantized layer's format has no recipe (no column)."""
        if self.quant_method == "none":
            return []
        return [self.recipe] if self.recipe else layer_recipes(self.linears)

    def summary(self) -> str:
        """One line: recipe (method; format/activation of the linears; KV cache)."""
        fmts = sorted({(s.format, s.activation) for s in self.linears.values()})
        parts = [f"{f}" + (f"/act {a}" if a != "none" else "") for f, a in fmts]
        head = self.recipe or self.quant_algo or "bf16"
        return f"{head} ({self.quant_method}; {', '.join(parts)}; kv {self.kv_format})"


class _Collector:
    def __init__(self, strict: bool):
        self.strict, self.problems = strict, []

    def __call__(self, msg: str):
        if self.strict:
            raise CheckpointError(msg)
        self.problems.append(msg)


def _is_scalar(t: TensorInfo) -> bool:
    return t.shape in ((), (1,))


def num_layers(config: dict) -> int | None:
    c = text_config(config)
    n = c.get("num_hidden_layers", c.get("n_layer", c.get("num_layers")))
    return n if isinstance(n, int) else None


def _group_tensors(tensors: dict[str, TensorInfo]):
    """module -> {role: TensorInfo} for linear roles; kv scales; the rest."""
    modules: dict[str, dict[str, TensorInfo]] = {}
    kv: dict[str, TensorInfo] = {}
    for name, t in tensors.items():
        mod, _, role = name.rpartition(".")
        if role in KV_ROLES:
            kv[name] = t
        elif role in registry.tensor_roles() and mod:
            modules.setdefault(mod, {})[role] = t
    return modules, kv


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last in EMBED_NAMES or "embed" in last


def _is_linear(module: str, roles: dict[str, TensorInfo]) -> bool:
    if _is_embedding(module):
        return False
    if "qweight" in roles:
        return True
    w = roles.get("weight")
    return w is not None and len(w.shape) == 2


# ---------------------------------------------------------------------------- config side

@dataclass
class _Declared:
    producer: str | None
    method: str
    algo: str | None
    kv_algo: str | None
    group_size: int | None
    exclude: list[str]
    layers: dict[str, dict] | None         # MIXED_PRECISION quantized_layers
    qcfg: dict                             # the raw quantization block


def _declared(files: CheckpointFiles, bad) -> _Declared:
    cfg = files.config
    hq = files.hf_quant_config
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        bad("config.json: quantization_config is not an object")
        qc = None
    if hq is not None:
        q = hq.get("quantization")
        if not isinstance(q, dict):
            raise CheckpointError("hf_quant_config.json has no 'quantization' object")
        prod = hq.get("producer") or {}
        producer = (f"{prod.get('name', '?')} {prod.get('version', '')}".strip()
                    if isinstance(prod, dict) else str(prod))
        return _Declared(producer, "modelopt", q.get("quant_algo"), q.get("kv_cache_quant_algo"),
                         q.get("group_size"), list(q.get("exclude_modules") or []), q.get("quantized_layers"), q)
    if qc is None and files.quantize_config is not None:
        qc = {"quant_method": "gptq", **files.quantize_config}
    if qc is None:
        return _Declared(None, "none", None, None, None, [], None, {})
    method = str(qc.get("quant_method", "")).lower()
    if method == "modelopt":            # compressed-tensors-style block written by ModelOpt into config.json
        prod = qc.get("producer") or {}
        kvs = qc.get("kv_cache_scheme")
        kv = "NVFP4" if isinstance(kvs, str) and kvs.upper() == "NVFP4" else (
            "FP8" if isinstance(kvs, dict) and kvs.get("num_bits") == 8 else None)
        return _Declared(f"{prod.get('name', 'modelopt')} {prod.get('version', '')}".strip(), "modelopt",
                         qc.get("quant_algo"), kv, qc.get("group_size"), list(qc.get("ignore") or []),
                         qc.get("quantized_layers"), qc)
    if method == "gptq" or (not method and "bits" in qc and files.quantize_config is not None):
        return _Declared(_gptq_producer(qc), "gptq", "GPTQ", None, qc.get("group_size"),
                         [], None, qc)
    if method == "awq":
        return _Declared("autoawq", "awq", "AWQ", None, qc.get("group_size"),
                         list(qc.get("modules_to_not_convert") or []), None, qc)
    if method == "fp8":
        return _Declared(None, "fp8", "FP8_BLOCK_SCALES", None, None,
                         list(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []), None, qc)
    raise CheckpointError(f"quantization_config.quant_method {qc.get('quant_method')!r} is not a format qtool reads",
                          hint="qtool reads ModelOpt exports, GPTQ, AutoAWQ (gemm), DeepSeek FP8 and bf16/fp16/fp32")


def _gptq_producer(qc: dict) -> str:
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    q = meta.get("quantizer")
    name = str(q[0]) if isinstance(q, list) and q else (str(q) if q else "gptq")
    return f"{meta['producer']} ({name})" if meta.get("producer") else name


def _check_method_params(d: _Declared, bad) -> None:
    qc = d.qcfg
    if d.method == "gptq":
        if qc.get("bits", 4) != 4:
            bad(f"GPTQ with bits={qc.get('bits')} is not supported (qtool reads 4-bit GPTQ)")
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt != "gptq":
            bad(f"GPTQ checkpoint_format {fmt!r} is not supported (qtool reads the v1 'gptq' layout)")
    elif d.method == "awq":
        if qc.get("bits", 4) != 4:
            bad(f"AWQ with bits={qc.get('bits')} is not supported (qtool reads 4-bit AutoAWQ)")
        ver = str(qc.get("version", "gemm")).lower()
        if ver != "gemm":
            bad(f"AutoAWQ version {ver!r} is not supported (qtool reads the 'gemm' layout)")
    elif d.method == "fp8":
        wbs = qc.get("weight_block_size")
        if not (isinstance(wbs, list) and len(wbs) == 2 and all(isinstance(x, int) and x > 0 for x in wbs)):
            bad("quantization_config (quant_method fp8) has no weight_block_size [128, 128]; "
                "only the DeepSeek block layout is read")


def _modelopt_module(d: _Declared, module: str, bad) -> tuple[str | None, int | None]:
    """(upper-case quant algo or None when left unquantized, declared group size) for one module."""
    algo = (d.algo or "").upper() or None
    if algo == "MIXED_PRECISION":
        layers = d.layers if isinstance(d.layers, dict) else {}
        for pat, spec in layers.items():
            if module == pat or fnmatch.fnmatchcase(module, pat):
                if not isinstance(spec, dict):
                    return None, None
                return (str(spec.get("quant_algo") or "").upper() or None), spec.get("group_size")
        return None, None
    if any(module == p or fnmatch.fnmatchcase(module, p) for p in d.exclude):
        return None, None
    return algo, d.group_size


# ---------------------------------------------------------------------------- tensor side

def _infer_format(roles: dict[str, TensorInfo], method: str) -> str:
    """The weight format the tensors are in (independent of the declared quant_algo)."""
    if "qweight" in roles:
        return "autoawq" if method == "awq" else "gptq"
    w, ws = roles.get("weight"), roles.get("weight_scale")
    if w is None:
        return "bf16"
    if w.dtype in ("F8_E4M3", "F8_E5M2"):
        if "weight_scale_inv" in roles:
            return "fp8-block"
        if ws is None or _is_scalar(ws):
            return "fp8"
        return "fp8-block" if len(ws.shape) == 4 else "fp8-rowwise"
    if w.dtype == "U8":
        if ws is not None and ws.dtype == "F8_E4M3":
            return "nvfp4"
        if ws is not None and ws.dtype == "U8":
            return "mxfp4"
        return "int4-awq"
    return "bf16"


def _features(fmt: str, roles: dict[str, TensorInfo]) -> tuple[int, int]:
    if fmt in ("gptq", "autoawq"):
        qw = roles["qweight"].shape
        if len(qw) != 2:
            return 0, 0
        return (qw[1], qw[0] * 8) if fmt == "gptq" else (qw[1] * 8, qw[0])
    w = roles["weight"].shape
    if len(w) != 2:
        return 0, 0
    if fmt in ("nvfp4", "mxfp4"):
        return w[0], w[1] * 2
    if fmt == "int4-awq":
        ws = roles.get("weight_scale")
        return (ws.shape[0] if ws is not None and ws.shape else w[0] * 2), w[1]
    return w[0], w[1]


def _shape_ok(shape: tuple[int, ...], want) -> bool:
    if want is None:
        return True
    if want == "scalar":
        return shape in ((), (1,))
    if want and isinstance(want[0], tuple):
        return any(_shape_ok(shape, w) for w in want)
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def _fmt_shape(want) -> str:
    if want == "scalar":
        return "a scalar"
    if want and isinstance(want[0], tuple):
        return " or ".join(_fmt_shape(w) for w in want)
    return "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"


def _validate(spec: LinearSpec, roles: dict[str, TensorInfo], block, bad) -> None:
    dims = {"o": spec.out_features, "i": spec.in_features, "g": spec.group_size, "bo": block[0], "bi": block[1]}
    req = registry.expected_tensors(spec.format, spec.activation, spec.fp8_weight_stage, roles.keys(), dims)
    label = registry.weight_format(spec.format).label
    for role, (dtypes, shape, optional) in req.items():
        t = roles.get(role)
        if t is None:
            if not optional:
                bad(f"{spec.module}.{role}: missing ({label} layer needs it)")
            continue
        if t.dtype not in dtypes:
            bad(f"{t.name}: dtype {t.dtype} contradicts {label} (expected {' or '.join(dtypes)})")
        elif not _shape_ok(t.shape, shape):
            bad(f"{t.name}: shape {list(t.shape)} contradicts {label} (expected {_fmt_shape(shape)})")
    for role, t in roles.items():
        if role not in req:
            bad(f"{t.name}: unexpected {role} tensor for a {label} layer")


def _group_from_tensors(fmt: str, roles: dict[str, TensorInfo], in_f: int) -> int | None:
    ws = roles.get("weight_scale")
    if fmt in ("nvfp4", "mxfp4", "int4-awq") and ws is not None and len(ws.shape) == 2 and ws.shape[1]:
        return in_f // ws.shape[1] if in_f % ws.shape[1] == 0 else None
    if fmt == "fp8-block":
        return 128
    return None


def _linear(module: str, roles: dict[str, TensorInfo], d: _Declared, bad, notes) -> tuple[LinearSpec, bool]:
    """The spec of one linear and whether the config leaves it unquantized."""
    fmt = _infer_format(roles, d.method)
    declared_algo, declared_group, default_group = None, None, None
    activation, stage, excluded = None, False, False
    if d.method == "modelopt":
        declared_algo, declared_group = _modelopt_module(d, module, bad)
        if declared_algo is None:
            excluded = True
            if fmt != "bf16":
                bad(f"{module}: tensors are {fmt} but the config leaves it unquantized")
        elif (layer := registry.quant_algo_layer(declared_algo)) is None:
            bad(f"{module}: quant_algo {declared_algo} is not a format qtool reads")
        else:
            want_fmt, activation, default_group, stage = (layer.format, layer.activation, layer.group_size,
                                                          layer.fp8_weight_stage)
            if fmt == "bf16" and "weight" in roles:      # left unquantized although the config says otherwise
                bad(f"{module}.weight: unquantized {roles['weight'].dtype} tensor but the config declares "
                    f"{declared_algo} ({want_fmt})")
                activation, stage = None, False
            else:                                       # validate against the declared layout, tensor by tensor
                fmt = want_fmt
    elif d.method in ("gptq", "awq"):
        declared_group = d.group_size if isinstance(d.group_size, int) else None
        if fmt == "bf16":
            excluded = True
        if fmt not in ("bf16", "gptq", "autoawq"):
            bad(f"{module}: tensors are {fmt} in a {d.method.upper()} checkpoint")
    elif d.method == "fp8":
        if fmt == "bf16":
            excluded = True
        elif fmt != "fp8-block" or "weight_scale_inv" not in roles:
            bad(f"{module}: tensors are {fmt}, not DeepSeek FP8 block (weight + weight_scale_inv)")
    elif fmt != "bf16":
        bad(f"{module}: tensors are {fmt} but the checkpoint declares no quantization")
    if activation is None:
        activation = registry.weight_format(fmt).default_activation("input_scale" in roles)
    if fmt == "int4-awq" and d.method != "modelopt":
        stage = "weight_scale_2" in roles
    if not ({"weight", "qweight"} & roles.keys()):
        bad(f"{module}: has {', '.join(sorted(roles))} but no weight")
        return LinearSpec(module, fmt, activation, None, 0, 0, {r: t.name for r, t in roles.items()}, stage), excluded
    out_f, in_f = _features(fmt, roles)
    group = _group_from_tensors(fmt, roles, in_f)
    if fmt in ("gptq", "autoawq"):
        group = in_f if declared_group in (None, -1, 0) else declared_group
    elif group is not None and declared_group and group != declared_group and fmt != "fp8-block":
        bad(f"{roles['weight_scale'].name}: group size {group} from the shape, config declares {declared_group}")
    elif group is None and fmt in ("nvfp4", "mxfp4", "int4-awq"):
        group = declared_group or default_group      # shapes did not tell (the scale is reported as a problem)
    if d.method == "fp8" and fmt == "fp8-block":
        group = d.qcfg.get("weight_block_size", [128, 128])[-1]
    spec = LinearSpec(module, fmt, activation, group, out_f, in_f, {r: t.name for r, t in roles.items()}, stage)
    if fmt in ("nvfp4", "mxfp4") and activation == "fp8" and "input_scale" not in roles:
        notes.append(module)
    return spec, excluded


def _kv(files: CheckpointFiles, d: _Declared, kv_tensors: dict[str, TensorInfo], bad):
    algo = d.kv_algo
    kv_format = "bf16"
    if algo:
        kv_format = registry.kv_algo_recipe(algo)
        if kv_format is None:
            bad(f"kv_cache_quant_algo {algo!r} is not a KV-cache format qtool reads (FP8, NVFP4)")
            kv_format = "bf16"
    found: dict[int, list[str | None]] = {}
    for name, t in kv_tensors.items():
        m = LAYER_RE.search(name)
        if m is None:
            bad(f"{name}: KV scale outside a numbered layer")
            continue
        if not (_is_scalar(t) and t.dtype in ("F32", "BF16", "F16")):
            bad(f"{name}: KV scale must be a float scalar, found {t.dtype} {list(t.shape)}")
        slot = found.setdefault(int(m.group(1)), [None, None])
        slot[0 if name.endswith(".k_scale") else 1] = name
    if kv_format == "bf16":
        for name in kv_tensors:
            bad(f"{name}: unexpected KV scale in a checkpoint without a quantized KV cache")
        return kv_format, {}
    n = num_layers(files.config)
    top = 1 + max((int(m.group(1)) for t in files.tensors if (m := LAYER_RE.search(t))), default=-1)
    layers = range(min(n, top)) if n else sorted(found)      # bounded by the layers present (a config may say 1e9)
    return kv_format, {i: tuple(found.get(i, [None, None])) for i in layers}


def layer_recipes(linears: dict[str, LinearSpec]) -> list[str] | None:
    """The qtool recipes of the quantized linears (sorted, unique), or None when one has no recipe."""
    out = set()
    for s in linears.values():
        if s.format == "bf16":
            continue
        r = registry.layer_recipe(s.format, s.activation, s.fp8_weight_stage)
        if r is None:
            return None
        out.add(r)
    return sorted(out)


def _recipe(d: _Declared, linears: dict[str, LinearSpec]) -> str | None:
    algo = (d.algo or "").upper()
    if d.method == "modelopt" and algo != "MIXED_PRECISION":
        return registry.quant_algo_recipe(algo)
    if d.method == "none":
        return None
    found = layer_recipes(linears)
    return found[0] if found and len(found) == 1 else None


def describe(files: CheckpointFiles, strict: bool = True) -> CheckpointScheme:
    """Per-layer formats of a checkpoint; CheckpointError when config and tensors disagree."""
    bad = _Collector(strict)
    d = _declared(files, bad)
    _check_method_params(d, bad)
    modules, kv_tensors = _group_tensors(files.tensors)
    block = tuple(d.qcfg.get("weight_block_size") or (128, 128)) if d.method == "fp8" else (128, 128)
    linears: dict[str, LinearSpec] = {}
    excluded: list[str] = []
    notes: list[str] = []
    used: set[str] = set(kv_tensors)
    for module in sorted(modules, key=_natural_key):
        roles = modules[module]
        if not _is_linear(module, roles):
            if d.method == "modelopt" and any(module == p or fnmatch.fnmatchcase(module, p) for p in d.exclude):
                excluded.append(module)
            continue
        spec, was_excluded = _linear(module, roles, d, bad, notes)
        if spec.out_features:
            _validate(spec, roles, block, bad)
        linears[module] = spec
        used.update(t.name for t in roles.values())
        if was_excluded:
            excluded.append(module)
    if d.method != "none" and not any(s.format != "bf16" for s in linears.values()):
        bad(f"the config declares {d.method} quantization but no linear layer is quantized")
    if notes:
        notes = [f"{len(notes)} FP8-activation linear(s) have no input_scale (e.g. {notes[0]}): activations are "
                 "scaled dynamically per tensor"]
    kv_format, kv_scales = _kv(files, d, kv_tensors, bad)
    other = [n for n in files.tensors if n not in used]
    return CheckpointScheme(
        producer=d.producer, quant_method=d.method, quant_algo=d.algo, recipe=_recipe(d, linears),
        kv_format=kv_format, kv_scales=kv_scales, linears=linears, excluded=excluded, other_tensors=other,
        kv_algo=d.kv_algo, problems=bad.problems, notes=notes)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
