"""The format registry: everything qtool knows about a recipe or a storage format, from `recipes/` data.

Contract: the only reader of recipes/recipes.toml (recipes: CLI name, matrix column, ModelOpt config,
exported quant_algo / KV algo, the layers a recipe produces) and recipes/formats.toml (weight formats:
label, tensor roles with their dtype / shape rules (`expected_tensors`), default activation, group size,
decode function, kernel code, minimum architecture; activation schemes and KV-cache formats with their
kernel codes; ModelOpt quant_algo -> layer). Every other module asks these functions instead of restating a table. Torch-free (tomllib only); results are cached.
"No KV quantization" is None in every function that takes or returns a KV recipe.
"""
from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parent.parent.parent / "recipes"


def recipes_dir() -> Path:
    """The folder of data files: the source tree's `recipes/`, or the installed package's."""
    if RECIPES_DIR.is_dir():
        return RECIPES_DIR
    import importlib.resources
    return Path(str(importlib.resources.files("recipes")))


def load_toml(filename: str) -> dict:
    with open(recipes_dir() / filename, "rb") as f:
        return tomllib.load(f)


@dataclass(frozen=True)
class Recipe:
    """One quantization recipe: kind is 'weights' or 'kv'; `spec` holds the TOML table."""

    name: str
    kind: str
    column: str
    title: str
    spec: dict = field(hash=False, compare=False)

    def get(self, key, default=None):
        return self.spec.get(key, default)


@dataclass(frozen=True)
class WeightFormat:
    """One storage format of a linear layer's weights (recipes/formats.toml [weight_formats])."""

    name: str
    title: str
    label: str
    activation: str                       # default activation scheme
    activation_with_input_scale: str      # ... when the layer has an input_scale tensor
    group_size: int | None
    decode: str                           # 'module.function' in qtool/formats/
    decode_args: tuple[str, ...]
    kernel: int                           # linear.cu's format code
    kernel_epv: int
    min_arch: str
    tensors: dict = field(hash=False, compare=False)     # role -> TensorRule (recipes/formats.toml)

    def default_activation(self, has_input_scale: bool) -> str:
        return self.activation_with_input_scale if has_input_scale else self.activation


@dataclass(frozen=True)
class TensorRule:
    """What one tensor role of a format must be: dtypes, shape expression, and when it is expected."""

    role: str
    dtypes: tuple[str, ...]
    shape: str
    optional: bool = False
    when: str | None = None
    optional_when: str | None = None
    unless: str | None = None


FLOAT_DTYPES = ("BF16", "F16", "F32")


def _rule(role: str, s: dict) -> TensorRule:
    dtypes = FLOAT_DTYPES if s["dtype"] == "float" else tuple(s["dtype"])
    return TensorRule(role, dtypes, s["shape"], bool(s.get("optional", False)), s.get("when"), s.get("optional_when"),
                      s.get("unless"))


@dataclass(frozen=True)
class Layer:
    """What a ModelOpt quant_algo declares for a layer: format, activation, group size, FP8 weight stage."""

    format: str
    activation: str
    group_size: int | None = None
    fp8_weight_stage: bool = False


@functools.lru_cache(maxsize=None)
def recipes() -> dict[str, dict[str, Recipe]]:
    """{'weights': {cli_name: Recipe}, 'kv': {cli_name: Recipe}} in file order."""
    raw = load_toml("recipes.toml")
    return {kind: {name: Recipe(name, kind, spec["column"], spec["title"], spec)
                   for name, spec in raw[kind].items()} for kind in ("weights", "kv")}


def recipe(kind: str, name: str) -> Recipe:
    return recipes()[kind][name]


def recipe_names(kind: str) -> list[str]:
    return list(recipes()[kind])


@functools.lru_cache(maxsize=None)
def _formats() -> dict:
    return load_toml("formats.toml")


@functools.lru_cache(maxsize=None)
def weight_formats() -> dict[str, WeightFormat]:
    """Weight formats by name, in report order."""
    out = {}
    common = {r: _rule(r, v) for r, v in _formats()["tensor_roles"].items()}
    for name, s in _formats()["weight_formats"].items():
        rules = {**common, **{r: _rule(r, v) for r, v in s["tensors"].items()}}
        out[name] = WeightFormat(name, s["title"], s.get("label", name), s["activation"],
                                 s.get("activation_with_input_scale", s["activation"]), s.get("group_size"),
                                 s["decode"], tuple(s["decode_args"]), s["kernel"], s["kernel_epv"], s["min_arch"],
                                 rules)
    return out


@functools.lru_cache(maxsize=None)
def tensor_roles() -> frozenset[str]:
    """Every tensor role of a linear layer in any format (weight, weight_scale, qweight, bias, ...)."""
    return frozenset(r for f in weight_formats().values() for r in f.tensors)


def _holds(cond: str, activation: str, fp8_weight_stage: bool) -> bool:
    if cond == "activation":
        return activation != "none"
    if cond == "fp8_weight_stage":
        return fp8_weight_stage
    kind, _, value = cond.partition(" ")
    if kind == "activation" and value:
        return activation == value
    raise ValueError(f"recipes/formats.toml: unknown condition {cond!r}")


def _shape(spec: str, env: dict):
    """'scalar', a tuple of dims, or a tuple of alternative tuples. A dim is '?' (any), an int, a name of `env`,
    `a // b` or `cdiv(a, b)`; None (any) where a name is None."""
    if spec == "scalar":
        return "scalar"

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name) and (n.id in env or n.id == "ANY"):
            return env.get(n.id)
        pair = ((n.left, n.right) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.FloorDiv) else
                tuple(n.args) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "cdiv" and len(n.args) == 2
                else None)
        if pair is None:
            raise ValueError(f"recipes/formats.toml: bad shape {spec!r}")
        a, b = ev(pair[0]), ev(pair[1])
        if a is None or not b:
            return None
        return a // b if isinstance(n, ast.BinOp) else -(-a // b)
    alts = [tuple(ev(e) for e in ast.parse(f"({alt.replace('?', 'ANY')},)", mode="eval").body.elts)
            for alt in spec.split("|")]
    return alts[0] if len(alts) == 1 else tuple(alts)


def expected_tensors(fmt: str, activation: str, fp8_weight_stage: bool, present, dims: dict
                     ) -> dict[str, tuple[tuple[str, ...], object, bool]]:
    """role -> (allowed dtypes, shape, optional) of a layer in `fmt` whose tensors have the roles `present`;
    `dims` gives o, i, g (group size or None) and bo, bi (a DeepSeek block)."""
    out = {}
    for role, r in weight_format(fmt).tensors.items():
        if r.when and not _holds(r.when, activation, fp8_weight_stage):
            continue
        if r.unless and r.unless in present:
            continue
        optional = r.optional or bool(r.optional_when and _holds(r.optional_when, activation, fp8_weight_stage))
        out[role] = (r.dtypes, _shape(r.shape, dims), optional)
    return out


def weight_format(name: str) -> WeightFormat:
    fmt = weight_formats().get(name)
    if fmt is None:
        raise ValueError(f"unknown weight format {name!r}; expected one of {', '.join(weight_formats())}")
    return fmt


def activation_codes() -> dict[str, int]:
    """Activation scheme -> act_quant.cuh code ('none' is the unquantized scheme)."""
    return {name: s["kernel"] for name, s in _formats()["activations"].items()}


def activation_title(name: str) -> str:
    s = _formats()["activations"].get(name)
    return s["title"] if s else name


def kv_format_codes() -> dict[str, int]:
    """KV-cache storage format -> kv_cache.cuh code ('bf16' is the unquantized cache)."""
    return {name: s["kernel"] for name, s in _formats()["kv_formats"].items()}


def recipe_min_archs(kind: str, name: str) -> set[str]:
    """The `min_arch` of every format a recipe produces (weights) or stores (kv: its KV-cache format)."""
    if kind == "kv":
        return {_formats()["kv_formats"][name]["min_arch"]}
    return {weight_format(f).min_arch for f in recipe("weights", name).get("formats", ())}


def quant_algo_layer(algo: str) -> Layer | None:
    """The layer a ModelOpt quant_algo declares (case-insensitive), or None when qtool does not read it."""
    s = _formats()["quant_algos"].get(str(algo).upper())
    return None if s is None else Layer(s["format"], s["activation"], s.get("group_size"),
                                        bool(s.get("fp8_weight_stage", False)))


def layer_recipe(fmt: str, activation: str, fp8_weight_stage: bool = False) -> str | None:
    """The weight recipe that produces layers of this format, activation and weight stage, or None."""
    for name, r in recipes()["weights"].items():
        if (fmt in r.get("formats", ()) and r.get("activation") == activation
                and bool(r.get("fp8_weight_stage", False)) == fp8_weight_stage):
            return name
    return None


def quant_algo_recipe(algo: str) -> str | None:
    """The weight recipe of a ModelOpt quant_algo (FP8_BLOCK_SCALES -> fp8-block, NVFP4_AWQ -> nvfp4, ...)."""
    layer = quant_algo_layer(algo)
    return None if layer is None else layer_recipe(layer.format, layer.activation, layer.fp8_weight_stage)


def kv_algo_recipe(algo: str | None) -> str | None:
    """The KV recipe (= KV-cache format) of a kv_cache_quant_algo, None for none/unknown (case-insensitive)."""
    if not algo:
        return None
    for name, r in recipes()["kv"].items():
        if str(r.get("kv_cache_quant_algo", "")).upper() == str(algo).upper():
            return name
    return None
