"""Contract tests: what `qtool quantize --for X` writes is what X's loader expects, recipe by recipe.

Every recipe × target cell (TensorRT-LLM, vLLM, qtool) is either exported here and checked, or refused up front
(`test_every_cell_is_exported_or_refused`). For an exported cell the test checks, against recipes/consumers.toml
(each entry cites the consumer's file and version):
- the config file the consumer reads first and its keys (the loaders' key lookups are written out below, cited),
- every quantized linear's tensor names, dtypes and shapes (read from the safetensors headers),
- the weights decoded with independent decoders written from the published formulas (GPTQ v1: GPTQModel's
  `_dequantize_from_codes`; AutoAWQ gemm: AutoAWQ `dequantize_gemm`) equal qtool's reference decoders, and
  AutoAWQ's layout equals ModelOpt's from the same calibration after decode (pre_quant_scale folded);
- the transformers-4.57 config keys (rules in tests/test_consumers.py).
Exports run `qtool quantize` on tiny random models (calibration 8 × 64 tokens), two processes at a time.
"""
from __future__ import annotations

import json
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import modelopt_decode as md
from cli_helpers import run_qtool
from qtool.support import consumers
from test_consumers import read_like_transformers_457, tokenizer_class_resolves_in_457

CALIB = ["--calib-size", "8", "--calib-seq-len", "64"]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# (id, model, recipe, kv, --for, extra args). "mha": 4 query heads and 4 KV heads (AutoAWQ fold exact everywhere);
# "llama": tiny GQA llama (4 heads, 2 KV heads). --family / --force only pass the support matrices (the tensors do
# not depend on them).
RUNS = [
    ("fp8-kvfp8", "llama", "fp8", "fp8", "all", []),
    ("fp8-kvnvfp4", "llama", "fp8", "nvfp4", "all", []),
    ("fp8-rowwise", "llama", "fp8-rowwise", None, "all", ["--family", "LLaMA 3"]),
    ("fp8-block", "llama", "fp8-block", None, "all", ["--family", "DeepSeek-R1"]),
    ("nvfp4", "llama", "nvfp4", None, "all", []),
    ("mxfp4", "llama", "mxfp4", None, "qtool", ["--family", "GPT-OSS"]),
    ("awq-trtllm", "mha", "w4a16-awq", None, "trtllm,qtool", []),
    ("awq-vllm", "mha", "w4a16-awq", None, "vllm,qtool", []),
    ("w4a8awq", "llama", "w4a8-awq", None, "trtllm,qtool", []),
    ("gptq", "llama", "w4a16-gptq", None, "all", []),
    ("w4a8gptq", "llama", "w4a8-gptq", None, "qtool", ["--force"]),
]


@pytest.fixture(scope="session")
def exports(tiny_models, tmp_path_factory):
    """{run id: (completed process, output dir, source dir)}."""
    from tiny_models import make_tiny_model
    root = tmp_path_factory.mktemp("contracts")
    models = {"llama": tiny_models("llama"), "mha": make_tiny_model("llama", root / "mha", seed=7, num_key_value_heads=4)}

    def one(run):
        rid, model, quant, kv, target, extra = run
        out = root / rid
        args = ["quantize", "--model", str(models[model]), "--quant", quant, "--for", target, "-o", str(out),
                "--json", *CALIB, *extra] + (["--kv-cache-quant", kv] if kv else [])
        return rid, (run_qtool(*args, env={"OMP_NUM_THREADS": "1"}), out, models[model])
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, RUNS))


def _targets(run) -> tuple[str, ...]:
    t = run[4]
    return consumers.TARGETS if t == "all" else tuple(t.split(","))


CELLS = [(run, t) for run in RUNS for t in _targets(run)]


def test_every_cell_is_exported_or_refused():
    """Acceptance of issue 19: each recipe × target is loadable by a contract tested here, or refused up front."""
    from qtool.support import data
    covered = {(run[2], t) for run, t in CELLS}
    for recipe in data.recipes()["weights"]:
        for t in consumers.TARGETS:
            if (recipe, t) not in covered:
                ch = consumers.choose(recipe, None, (t,), 128 if recipe.startswith("w4") else None)
                assert ch.refused, f"{recipe} for {t}: neither exported by a contract test nor refused"
    for kv in data.recipes()["kv"]:
        assert any(r[3] == kv and r[4] == "all" for r in RUNS), f"kv {kv}: no export for every target"


# ----------------------------------------------------------------------------------- helpers

def header(folder: Path) -> dict:
    """{tensor: (dtype, shape)} from the safetensors headers (8-byte length + JSON), no library involved."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            meta = json.loads(fh.read(n))
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in meta.items() if k != "__metadata__"})
    return out


def eval_shape(spec, out_f: int, in_f: int, g: int | None) -> tuple:
    def one(tok):
        if isinstance(tok, int):
            return tok
        base, _, div = tok.partition("/")
        v = {"out": out_f, "in": in_f}[base]
        return v // (g if div == "g" else int(div)) if div else v
    return tuple(one(t) for t in spec)


def linear_shapes(src: Path) -> dict[str, tuple[int, int]]:
    return {k[: -len(".weight")]: v[1] for k, v in header(src).items()
            if k.endswith(".weight") and any(k.endswith(lin + ".weight") for lin in LINEARS)}


def check_tensors(out: Path, src: Path, expected: dict, group: int | None):
    """Every quantized linear holds exactly the expected roles (optional ones may be absent), dtypes, shapes."""
    h = header(out)
    for mod, (out_f, in_f) in linear_shapes(src).items():
        roles = {k[len(mod) + 1:]: v for k, v in h.items() if k.startswith(mod + ".")}
        want = {r: s for r, s in expected.items() if not s.get("optional")}
        allowed = set(expected) | {"bias", "k_scale", "v_scale"}
        assert set(want) <= set(roles) <= allowed, (mod, sorted(roles), sorted(expected))
        for role, (dtype, shape) in roles.items():
            if role in ("bias", "k_scale", "v_scale"):      # KV scales: checked per attention layer
                continue
            e = expected[role]
            assert dtype == e["dtype"], (mod, role, dtype, e["dtype"])
            assert shape == eval_shape(e["shape"], out_f, in_f, group), (mod, role, shape, e["shape"])


# vLLM's QuantizationConfig.get_from_keys (vllm/model_executor/layers/quantization/base_config.py): the first key
# present wins, else ValueError. AWQConfig.from_config reads ["w_bit", "bits"], ["q_group_size", "group_size"],
# ["zero_point"] (awq.py); GPTQConfig / GPTQMarlinConfig read "bits", "group_size", "desc_act", "sym" (gptq.py,
# gptq_marlin.py, vLLM 0.33.0).
def get_from_keys(cfg: dict, keys: list[str]):
    for k in keys:
        if k in cfg:
            return cfg[k]
    raise ValueError(f"none of {keys} in the quantization config")


def decode_autoawq_published(qweight, qzeros, scales, group_size):
    """AutoAWQ @88e4c76 awq/utils/packing_utils.py: unpack with shifts 0..28, reorder with AWQ_REVERSE_ORDER
    [0,4,1,5,2,6,3,7], W = (iweight - izeros) * scales; returned (out, in)."""
    shifts = torch.arange(0, 32, 4)
    rev = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])

    def unpack(x):
        nib = ((x.to(torch.int64)[:, :, None] >> shifts[None, None, :]) & 0xF)      # [rows, cols, 8] in nibble order
        return nib[:, :, rev].reshape(x.shape[0], -1)                               # column order
    iw, iz = unpack(qweight), unpack(qzeros)
    gi = torch.arange(iw.shape[0]) // group_size
    return ((iw - iz[gi]).to(torch.float64) * scales.to(torch.float64)[gi]).t()


# ----------------------------------------------------------------------------------- the contract per cell

@pytest.mark.parametrize("run,target", CELLS, ids=[f"{r[0]}-{t}" for r, t in CELLS])
def test_export_meets_the_loader_contract(exports, run, target):
    rid, model, quant, kv, _, _ = run
    proc, out, src = exports[rid]
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert target in res["consumers"]["loads_in"]
    ch = consumers.choose(quant, kv, _targets(run), 128 if quant.startswith("w4") else None)
    layout = ch.layout
    assert res["consumers"]["layout"] == layout
    c = consumers.contracts()
    cons = c["consumers"][target]
    entry = c["weights"][quant][target]
    assert layout in entry["layouts"], (quant, target, layout)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    files = {p.name for p in out.iterdir()}
    lay = c["layouts"][layout]
    assert set(lay["files"]) <= files and not set(lay.get("absent_files", [])) & files
    assert qc["quant_method"] == lay["quant_method"]
    group = None
    if layout == "modelopt":
        hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
        # vLLM reads config.json's block first, TensorRT-LLM hf_quant_config.json: they must agree
        assert qc["quant_algo"] == hq["quant_algo"]
        assert consumers.algo_accepted(target, hq["quant_algo"]), (target, hq["quant_algo"])
        group = hq.get("group_size")
        if kv:
            assert hq["kv_cache_quant_algo"] in cons["kv_cache_quant_algos"]
            scheme = qc.get("kv_cache_scheme")
            assert (scheme == "NVFP4") if kv == "nvfp4" else (scheme.get("num_bits") == 8 and scheme.get("type") == "float")
        else:
            assert hq.get("kv_cache_quant_algo") is None
        check_tensors(out, src, c["modelopt_tensors"][quant], group)
        if kv:
            h = header(out)
            n = config["num_hidden_layers"]
            for i in range(n):
                for role, e in c["modelopt_tensors"]["kv"].items():
                    assert h[f"model.layers.{i}.self_attn.{role}"] == (e["dtype"], tuple(e["shape"]))
    else:
        for k, v in lay["config"].items():
            assert qc[k] == v, (k, qc.get(k), v)
        group = qc[lay["group_key"]]
        for k in lay.get("group_keys", []):
            assert qc[k] == group
        if layout == "autoawq-gemm":
            assert (get_from_keys(qc, ["w_bit", "bits"]), get_from_keys(qc, ["q_group_size", "group_size"]),
                    get_from_keys(qc, ["zero_point"])) == (4, group, True)
        else:
            assert (qc["bits"], qc["desc_act"], qc["sym"]) == (4, False, True)
            assert json.loads((out / "quantize_config.json").read_text()) == qc
        expected = {**lay["tensors"], **lay.get("recipe_tensors", {}).get(quant, {})}
        check_tensors(out, src, expected, group)
    if entry.get("group_sizes") and group:
        assert group in entry["group_sizes"]
    # transformers 4.57 (TensorRT-LLM's pin) reads what transformers 5 means
    old = read_like_transformers_457(config)
    assert old["rope_theta"] == config["rope_parameters"]["rope_theta"] and old["torch_dtype"] == config["dtype"]
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_class_resolves_in_457(tok.get("tokenizer_class"))
    # qtool's inspect agrees on where it loads
    r = run_qtool("inspect", str(out), "--json", timeout=120)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["problems"] == [], r.stdout[-1500:]
    assert doc["loads_in"][target]["loads"] is True and doc["loads_in"][target]["layout"] == layout
    assert doc["recipe"]["name"] == quant


@pytest.mark.parametrize("rid", ["gptq", "w4a8gptq"])
def test_gptq_decodes_by_the_published_formula_to_qtools_reference(exports, rid):
    from qtool.formats.int4 import decode_gptq
    proc, out, src = exports[rid]
    assert proc.returncode == 0, proc.stderr[-1500:]
    sd, orig = md.load_tensors(out), md.load_tensors(src)
    g = json.loads((out / "config.json").read_text())["quantization_config"]["group_size"]
    for mod in linear_shapes(src):
        ind = md.gptq(sd, mod)                    # tests/modelopt_decode.py: GPTQModel's formula, float64
        ref = decode_gptq(sd[f"{mod}.qweight"], sd[f"{mod}.qzeros"], sd[f"{mod}.scales"], sd.get(f"{mod}.g_idx"), g)
        assert torch.allclose(ind, ref.double(), rtol=0, atol=1e-6), mod
        assert md.rel_err(ind, md.f64(orig[f"{mod}.weight"])) < 0.25, mod
    if rid == "w4a8gptq":                         # qtool only: vLLM has no input_scale parameter
        assert all(f"{m}.input_scale" in sd for m in linear_shapes(src))


def test_autoawq_equals_modelopt_from_the_same_calibration(exports):
    """vLLM's layout (AutoAWQ gemm) and TensorRT-LLM's (ModelOpt) of one calibration compute the same linear maps:
    AutoAWQ's decode of up_proj / v_proj equals ModelOpt's times the folded pre_quant_scale of down_proj / o_proj,
    every other linear equals ModelOpt's, norms are the same tensors (fp16 scale rounding only)."""
    from qtool.formats.int4 import decode_autoawq
    p1, awq_dir, src = exports["awq-vllm"]
    p2, mo_dir, _ = exports["awq-trtllm"]
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr[-1000:] + p2.stderr[-1000:]
    a, m = md.load_tensors(awq_dir), md.load_tensors(mo_dir)
    g = json.loads((awq_dir / "config.json").read_text())["quantization_config"]["group_size"]
    assert not any(k.endswith("pre_quant_scale") for k in a)
    fold = consumers.contracts()["layouts"]["autoawq-gemm"]["fold_into"]
    feeds = {v: k for k, v in fold.items()}          # feeder suffix -> scaled suffix
    for mod in linear_shapes(src):
        w_awq = decode_autoawq_published(a[f"{mod}.qweight"], a[f"{mod}.qzeros"], a[f"{mod}.scales"], g)
        ref = decode_autoawq(a[f"{mod}.qweight"], a[f"{mod}.qzeros"], a[f"{mod}.scales"], g)
        assert torch.equal(w_awq, ref.double()), f"{mod}: published AutoAWQ decode != qtool's"
        want = md.int4_awq(m, mod)
        suffix = next((s for s in feeds if mod.endswith("." + s)), None)
        scaled = mod[: -len(suffix)] + feeds[suffix] if suffix else None
        if scaled and f"{scaled}.pre_quant_scale" in m:
            want = want * md.f64(m[f"{scaled}.pre_quant_scale"])[:, None]
        err = float((w_awq - want).abs().max() / want.abs().max())
        assert err < 2e-3, f"{mod}: AutoAWQ and ModelOpt layouts differ after decode ({err:.2e})"
    for k, v in m.items():
        if k.endswith("layernorm.weight") or k.endswith("norm.weight"):
            assert torch.equal(a[k], v), k
    rec = json.loads((awq_dir / "qtool.json").read_text())["consumers"]["autoawq"]
    assert rec["requantized"] == [] and len(rec["folded"]) == 2 * json.loads((src / "config.json").read_text())[
        "num_hidden_layers"]


def test_autoawq_under_gqa_requantizes_o_proj_and_says_so(tiny_models, tmp_path):
    """Grouped-query attention: one v_proj row feeds two query heads whose o_proj input scales differ, so that
    fold is not exact; o_proj is re-quantized with the scale folded into its weight and reported."""
    from packers import modelopt_export
    from qtool.quantize.awq_layout import convert_to_autoawq
    src = tiny_models("llama")
    mo = modelopt_export(src, tmp_path / "mo", "INT4_AWQ_CFG")
    awq = tmp_path / "awq"
    shutil.copytree(mo, awq)
    rec = convert_to_autoawq(awq, 128, "test")
    m, a = md.load_tensors(mo), md.load_tensors(awq)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert sorted(r["module"] for r in rec["requantized"]) == [f"model.layers.{i}.self_attn.o_proj" for i in range(n)]
    assert rec["folded"] == [f"model.layers.{i}.mlp.down_proj -> model.layers.{i}.mlp.up_proj" for i in range(n)]
    for r in rec["requantized"]:
        mod = r["module"]
        eff = md.int4_awq(m, mod) * md.f64(m[f"{mod}.pre_quant_scale"])[None, :]
        got = decode_autoawq_published(a[f"{mod}.qweight"], a[f"{mod}.qzeros"], a[f"{mod}.scales"], 128)
        rel = md.rel_err(got, eff)
        assert 0 < rel < 0.15 and abs(rel - r["relative_change"]) < 1e-3, (mod, rel, r)
    assert not (awq / "hf_quant_config.json").exists()
    assert rec["modelopt_hf_quant_config"]["quantization"]["quant_algo"] == "W4A16_AWQ"


def test_autoawq_and_modelopt_layouts_give_the_same_logits(exports):
    """The same function end to end: qtool's reference backend (float32) on both layouts of one calibration,
    prefill logits of 24 tokens agree to the fp16 rounding of AutoAWQ's scales."""
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    ids = torch.randint(0, 384, (1, 24), generator=torch.Generator().manual_seed(3))
    out = []
    for rid in ("awq-vllm", "awq-trtllm"):
        proc, ckpt, _ = exports[rid]
        assert proc.returncode == 0, proc.stderr[-1000:]
        model = Model(load_model_weights(str(ckpt), progress=False), TorchRefBackend())
        cache = model.new_cache(1, ids.shape[1], "bf16")
        with torch.no_grad():
            out.append(model.forward(ids, torch.arange(ids.shape[1])[None], cache, all_logits=True)[0].float())
    a, b = out
    assert float((a - b).abs().max() / b.abs().max()) < 1e-2
