"""Issue #14 items 1-10: faults that lost data or gave silent garbage, each a case that failed before the fix.

Data lost: an output that is / contains / lies inside the input model; --force over a folder that is no
qtool output; two writers of one output (lock); a target appearing during the run; a run racing a replace
(one snapshot); stale staging folders of killed runs; outputs ignoring the umask. Silent garbage: a
quantized input; NaN/Inf/zero/negative scales; KV scales substituted without a warning; zero layers,
overlapping tensor offsets, a missing linear weight, a missing hidden_size, a non-integer layer count, a
config.json / hf_quant_config.json KV contradiction; config values that would allocate without bound.
Tiny random checkpoints only (tests/tiny_models.py); the CLI runs in-process through typer's runner.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli import app
from packers import modelopt_ckpt  # noqa: F401 - fixture (a ModelOpt export of the tiny llama)
from qtool.errors import Failure, UsageError

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
                "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 384, "max_position_embeddings": 512}


def cli(*args):
    r = runner.invoke(app, list(args))
    out = r.stdout + (r.stderr or "")
    assert "Traceback" not in out, out
    return r, [ln for ln in (r.stderr or "").splitlines() if ln.startswith("error:")]


def fake_model(path: Path, config: dict | None = None) -> Path:
    """A model folder whose weights are garbage: a request that got past the checks would fail loading."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ 1. output vs input

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_overlapping_the_input_is_refused_even_with_force(tmp_path, where):
    models = tmp_path / "models"
    src = fake_model(models / "m")
    (models / "sibling").mkdir()
    (models / "sibling" / "keep.txt").write_text("theirs")
    (src / "qtool.json").write_text("{}")            # even a folder that looks like a qtool output
    out = {"same": src, "parent": models, "inside": src / "sub"}[where]
    before = listing(models)
    r, errs = cli("quantize", "--model", str(src), "-o", str(out), "--force", "--quant", "fp8", "--gpu", "sm90")
    assert r.exit_code == 2, r.stdout + (r.stderr or "")
    assert len(errs) == 1 and "input model" in errs[0]
    assert listing(models) == before


def test_force_replaces_only_a_qtool_output_or_an_empty_folder(tmp_path):
    from qtool.quantize.output import check_target, staged
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.jpg").write_bytes(b"jpg")
    with pytest.raises(UsageError, match="not a qtool output"):
        check_target(mine, force=True)
    with pytest.raises(UsageError, match="not a qtool output"):
        with staged(mine, force=True):
            pass
    assert listing(mine) == {"a.jpg": b"jpg"}
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "qtool.json").write_text("{}")
    with staged(prev, force=True) as tmp:
        (tmp / "qtool.json").write_text('{"new": 1}')
    assert listing(prev) == {"qtool.json": b'{"new": 1}'}
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged(empty, force=False) as tmp:
        (tmp / "x").write_text("x")
    assert listing(empty) == {"x": b"x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "photos", "prev"]    # no lock or staging left


# ------------------------------------------------------------------------------------------------ 2. locking, races

HOLDER = """
import sys, time
from pathlib import Path
from qtool.quantize.output import staged
with staged(Path(sys.argv[1]), force=False) as tmp:
    (tmp / "model.safetensors").write_bytes(b"partial")
    print("ready", flush=True)
    time.sleep(60)
"""


def _holder(target: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_second_writer_of_one_output_fails_while_the_first_runs(tmp_path):
    from qtool.quantize.output import staged
    target = tmp_path / "out"
    p = _holder(target)
    try:
        with pytest.raises(Failure, match=rf"another qtool process \(pid {p.pid}\) is writing"):
            with staged(target, force=False) as tmp:
                (tmp / "second").write_text("second")
        assert not target.exists()
    finally:
        p.kill()
        p.wait()


def test_quantize_to_an_output_being_written_fails_before_loading(tmp_path):
    src = fake_model(tmp_path / "m")
    target = tmp_path / "out"
    p = _holder(target)
    try:
        r, errs = cli("quantize", "--model", str(src), "-o", str(target), "--quant", "fp8", "--gpu", "sm90",
                      "--calib-size", "1")
        assert r.exit_code == 1 and len(errs) == 1 and f"pid {p.pid}" in errs[0]
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_replace_swaps_the_whole_folder(tmp_path, monkeypatch, exchange):
    from qtool.quantize import output
    if not exchange:             # a file system without renameat2: old aside, new in, old deleted
        monkeypatch.setattr(output, "_renameat2", lambda src, dst, flags: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "qtool.json").write_text('{"id": "old"}')
    (target / "old.safetensors").write_bytes(b"old")
    with output.staged(target, force=True) as tmp:
        (tmp / "qtool.json").write_text('{"id": "new"}')
    assert listing(target) == {"qtool.json": b'{"id": "new"}'}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(UsageError, match="changed while quantizing"):
        with output.staged(tmp_path / "new", force=False) as tmp:
            (tmp / "x").write_text("ours")
            (tmp_path / "new").mkdir()
            (tmp_path / "new" / "y").write_text("theirs")
    assert listing(tmp_path / "new") == {"y": b"theirs"}


def test_target_appearing_during_the_run_is_not_replaced(tmp_path):
    from qtool.quantize.output import staged
    target = tmp_path / "out"
    with pytest.raises(UsageError, match="changed while quantizing"):
        with staged(target, force=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"ours")
            target.mkdir()                                   # someone else's run finished first
            (target / "model.safetensors").write_bytes(b"theirs")
    assert listing(target) == {"model.safetensors": b"theirs"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_staging_folder_of_a_killed_run_is_cleaned(tmp_path):
    from qtool.quantize.output import staged
    target = tmp_path / "out"
    p = _holder(target)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert any(".qtool-tmp-" in q.name for q in tmp_path.iterdir())     # what SIGKILL leaves behind
    with staged(target, force=False) as tmp:
        (tmp / "x").write_text("x")
    assert [q.name for q in tmp_path.iterdir()] == ["out"]


def test_outputs_respect_the_umask(tmp_path):
    from qtool.quantize.output import staged
    old = os.umask(0o022)
    try:
        with staged(tmp_path / "out", force=False) as tmp:
            fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)   # as safetensors writes it
            os.close(fd)
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)     # noqa: E731
    assert mode(tmp_path / "out") == 0o755
    assert mode(tmp_path / "out" / "sub") == 0o755
    assert mode(tmp_path / "out" / "model.safetensors") == 0o644


def test_qtool_json_carries_a_fresh_random_id():
    from qtool.quantize.manifest import MANIFEST_KEYS, build_manifest
    facts = {k: None for k in MANIFEST_KEYS if k not in ("schema", "tool", "qtool_version")}
    a, b = build_manifest(**facts)["id"], build_manifest(**facts)["id"]
    assert a != b and len(a) == 32 and int(a, 16) >= 0


# ------------------------------------------------------------------------------------------------ checkpoints for 3-10

def fp8_checkpoint(src: Path, dst: Path, kv: str | None = "FP8", kv_scales: bool = True) -> Path:
    """An FP8 per-tensor checkpoint (ModelOpt layout, docs/numerics.md) of a tiny bf16 llama, written here."""
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            scale = t.float().abs().max() / 448.0
            out[name] = (t.float() / scale).to(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "weight_scale"] = scale.reshape(()).float()
            out[name[: -len("weight")] + "input_scale"] = torch.tensor(0.05)
        else:
            out[name] = t
    layers = json.loads((dst / "config.json").read_text())["num_hidden_layers"]
    for i in range(layers if kv and kv_scales else 0):
        out[f"model.layers.{i}.self_attn.k_proj.k_scale"] = torch.tensor(0.02)
        out[f"model.layers.{i}.self_attn.v_proj.v_scale"] = torch.tensor(0.03)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.47.0"},
         "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": kv, "exclude_modules": ["lm_head"]}}))
    return dst


@pytest.fixture(scope="module")
def fp8_ckpt(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    cache = {}

    def get(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = fp8_checkpoint(tiny_models("llama"), root / f"c{len(cache)}", **kw)
        return cache[key]
    return get


def edit_tensors(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_config(folder: Path, fn, name: str = "config.json") -> None:
    cfg = json.loads((folder / name).read_text())
    fn(cfg)
    (folder / name).write_text(json.dumps(cfg))


def copy_of(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ 2/3. one snapshot

def _versions(tiny_models, tmp_path):
    """A qtool output at `target` (version a) and version b: other weights and another rope_theta."""
    a = copy_of(tiny_models("llama"), tmp_path / "a")
    (a / "qtool.json").write_text(json.dumps({"id": "a" * 32}))
    b = copy_of(a, tmp_path / "b")
    edit_tensors(b, lambda sd: sd.update({k: (v.float() * 2).to(v.dtype) for k, v in sd.items()}))
    edit_config(b, lambda c: c.update(rope_theta=20000.0))
    (b / "qtool.json").write_text(json.dumps({"id": "b" * 32}))
    return copy_of(a, tmp_path / "target"), a, b


def _replace_with(target: Path, version: Path) -> None:
    import shutil
    from qtool.quantize.output import staged
    with staged(target, force=True) as tmp:
        for f in version.iterdir():
            shutil.copy(f, tmp / f.name)


def test_loader_never_mixes_versions_of_a_folder_replaced_while_loading(tiny_models, tmp_path, monkeypatch):
    import torch
    import qtool.checkpoint.scheme as scheme
    from qtool.errors import CheckpointError
    from qtool.runtime.loader import load_model_weights
    target, a, b = _versions(tiny_models, tmp_path)
    real = scheme.describe

    def describe_then_replace(files, strict=True):      # config.json and headers read: now the folder changes
        out = real(files, strict)
        if not (target / "qtool.json").read_text().count("b"):
            _replace_with(target, b)
        return out
    monkeypatch.setattr(scheme, "describe", describe_then_replace)
    with pytest.raises(CheckpointError, match="replaced while it was being loaded"):
        load_model_weights(str(target), progress=False)
    monkeypatch.setattr(scheme, "describe", real)
    w = load_model_weights(str(target), progress=False)          # afterwards: all of version b
    from safetensors.torch import load_file
    assert w.config.rope_theta == 20000.0
    assert torch.equal(w.embed, load_file(str(b / "model.safetensors"))["model.embed_tokens.weight"])


def test_run_never_mixes_tokenizer_and_config_with_replaced_weights(tiny_models, tmp_path, monkeypatch):
    import qtool.runtime.chat as chat
    target, a, b = _versions(tiny_models, tmp_path)
    real = chat.load_tokenizer

    def tokenizer_then_replace(folder, *args, **kw):     # config + tokenizer read; the weights are next
        tok = real(folder, *args, **kw)
        _replace_with(target, b)
        return tok
    monkeypatch.setattr(chat, "load_tokenizer", tokenizer_then_replace)
    r, errs = cli("run", str(target), "hi", "--max-new-tokens", "1", "--backend", "torch", "--json")
    assert r.exit_code == 1 and len(errs) == 1 and "replaced while it was being loaded" in errs[0]


# ------------------------------------------------------------------------------------------------ 6. quantized input

@pytest.mark.parametrize("variant,needle", [("modelopt", "ModelOpt FP8 checkpoint"),
                                            ("tensors only", "F8_E4M3 tensors"),
                                            ("config only", "config.json quantization_config")])
def test_quantizing_a_quantized_checkpoint_is_refused(fp8_ckpt, tmp_path, variant, needle):
    src = copy_of(fp8_ckpt(), tmp_path / "in")
    if variant != "modelopt":
        (src / "hf_quant_config.json").unlink()
    if variant == "config only":
        edit_tensors(src, lambda sd: sd.update({k: v.float().to(__import__("torch").bfloat16) for k, v in sd.items()}))
        edit_tensors(src, lambda sd: [sd.pop(k) for k in [k for k in sd if k.endswith(("_scale",))]])
        edit_config(src, lambda c: c.update(quantization_config={"quant_method": "fp8",
                                                                 "weight_block_size": [128, 128]}))
    r, errs = cli("quantize", "--model", str(src), "-o", str(tmp_path / "out"), "--quant", "fp8", "--gpu", "sm90",
                  "--calib-size", "1", "--calib-seq-len", "8")
    assert r.exit_code == 2, r.stdout + (r.stderr or "")
    assert len(errs) == 1 and "already quantized" in errs[0] and needle in errs[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ 7, 9. one validator

def _set(name, value):
    import torch
    return lambda sd: sd.__setitem__(name, torch.tensor(value, dtype=sd[name].dtype))


def _overlap(folder: Path) -> None:
    """Point layer 1's input_layernorm at the bytes of layer 0's (same dtype and shape)."""
    import struct
    raw = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    head["model.layers.1.input_layernorm.weight"]["data_offsets"] = head["model.layers.0.input_layernorm.weight"][
        "data_offsets"]
    new = json.dumps(head).encode()
    new += b" " * (-len(new) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _nvfp4_block_scale(code: int):
    """Set one E4M3 block scale of layer 0's q_proj (an NVFP4 layer) to `code` (0x7f: NaN, 0xb8: -1.0)."""
    def edit(sd):
        import torch
        ws = sd[Q0 + ".weight_scale"].view(torch.uint8).clone()
        ws[3, 2] = code
        sd[Q0 + ".weight_scale"] = ws.view(torch.float8_e4m3fn)
    return edit


Q0 = "model.layers.0.self_attn.q_proj"
# name -> (base checkpoint, mutation, the text both inspect and run must name); q_proj has 256 x 256/16 block scales
CASES = {
    "nan weight_scale": (True, lambda d: edit_tensors(d, _set(Q0 + ".weight_scale", float("nan"))),
                         Q0 + ".weight_scale: scale is NaN"),
    "inf input_scale": (True, lambda d: edit_tensors(d, _set(Q0 + ".input_scale", float("inf"))),
                        Q0 + ".input_scale: scale is Inf"),
    "zero weight_scale": (True, lambda d: edit_tensors(d, _set("model.layers.1.mlp.down_proj.weight_scale", 0.0)),
                          "model.layers.1.mlp.down_proj.weight_scale: scale is zero"),
    "negative k_scale": (True, lambda d: edit_tensors(d, _set("model.layers.1.self_attn.k_proj.k_scale", -0.5)),
                         "model.layers.1.self_attn.k_proj.k_scale: scale is negative"),
    "nan v_scale": (True, lambda d: edit_tensors(d, _set("model.layers.0.self_attn.v_proj.v_scale", float("nan"))),
                    "model.layers.0.self_attn.v_proj.v_scale: scale is NaN"),
    "kv contradiction": (True, lambda d: edit_config(d, lambda c: c.update(quantization_config={
        "quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_scheme": "NVFP4"})),
        "kv_cache_scheme says a nvfp4 KV cache but hf_quant_config.json kv_cache_quant_algo says fp8"),
    "zero layers": (False, lambda d: edit_config(d, lambda c: c.update(num_hidden_layers=0)),
                    "num_hidden_layers is 0: the model has no layers"),
    "string num_hidden_layers": (False, lambda d: edit_config(d, lambda c: c.update(num_hidden_layers="2")),
                                 "num_hidden_layers '2' is not an integer"),
    "float num_hidden_layers": (False, lambda d: edit_config(d, lambda c: c.update(num_hidden_layers=2.0)),
                                "num_hidden_layers 2.0 is not an integer"),
    "nan nvfp4 block scale": ("nvfp4", lambda d: edit_tensors(d, _nvfp4_block_scale(0x7F)),
                              Q0 + ".weight_scale: scale is 1 of 4096 NaN (a scale must be finite and >= 0)"),
    "negative nvfp4 block scale": ("nvfp4", lambda d: edit_tensors(d, _nvfp4_block_scale(0xB8)),
                                   Q0 + ".weight_scale: scale is 1 of 4096 negative"),
    "missing hidden_size": (False, lambda d: edit_config(d, lambda c: c.pop("hidden_size")), "hidden_size"),
    "missing linear weight": (False,
                              lambda d: edit_tensors(d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight")),
                              "model.layers.1.mlp.down_proj.weight: missing"),
    "overlapping offsets": (False, _overlap, "model.layers.0.input_layernorm.weight and "
                                             "model.layers.1.input_layernorm.weight overlap"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_and_run_both_refuse(case, fp8_ckpt, tiny_models, modelopt_ckpt, tmp_path):
    from qtool.errors import CheckpointError
    from qtool.runtime.loader import load_model_weights
    base, mutate, needle = CASES[case]
    src = {True: fp8_ckpt, False: lambda: tiny_models("llama"), "nvfp4": lambda: modelopt_ckpt("nvfp4_kvnvfp4")}[base]
    ckpt = copy_of(src(), tmp_path / "ckpt")
    mutate(ckpt)
    r, _ = cli("inspect", str(ckpt), "--json")
    assert r.exit_code == 1, r.stdout
    doc = json.loads(r.stdout)
    assert any(needle in p for p in doc.get("problems", [doc.get("error", {}).get("message", "")])), doc.get("problems")
    with pytest.raises(CheckpointError, match=__import__("re").escape(needle)):
        load_model_weights(str(ckpt), progress=False)


def test_run_on_a_nan_scale_exits_1_naming_the_tensor(fp8_ckpt, tmp_path):
    ckpt = copy_of(fp8_ckpt(), tmp_path / "ckpt")
    CASES["nan weight_scale"][1](ckpt)
    r, errs = cli("run", str(ckpt), "hi", "--max-new-tokens", "2", "--backend", "torch")
    assert r.exit_code == 1 and len(errs) == 1 and Q0 + ".weight_scale: scale is NaN" in errs[0]


# ------------------------------------------------------------------------------------------------ 8. KV scales 1.0

def test_zero_nvfp4_block_scale_is_valid(modelopt_ckpt, tmp_path):
    """An all-zero block has scale 0: not a problem (unlike a per-tensor scale of 0)."""
    from qtool.runtime.loader import load_model_weights
    ckpt = copy_of(modelopt_ckpt("nvfp4_kvnvfp4"), tmp_path / "ckpt")
    edit_tensors(ckpt, _nvfp4_block_scale(0x00))
    r, _ = cli("inspect", str(ckpt), "--json")
    assert r.exit_code == 0, json.loads(r.stdout)["problems"]
    assert load_model_weights(str(ckpt), progress=False).layers[0].qkv is not None


def test_missing_kv_scales_are_warned_and_recorded(fp8_ckpt):
    r, _ = cli("run", str(fp8_ckpt(kv_scales=False)), "hi", "--max-new-tokens", "1", "--backend", "torch", "--json")
    assert r.exit_code == 0, r.stdout + (r.stderr or "")
    warnings = json.loads(r.stdout)["warnings"]
    assert [w for w in warnings if "k_scale/v_scale in layer(s) 0-1 of 2" in w and "scale 1.0" in w], warnings
    assert "k_scale/v_scale in layer(s) 0-1 of 2" in r.stderr


# ------------------------------------------------------------------------------------------------ 10. bounded

def test_inspect_bounds_work_by_the_tensors_present(tiny_models, tmp_path):
    ckpt = copy_of(tiny_models("llama"), tmp_path / "ckpt")
    edit_config(ckpt, lambda c: c.update(num_hidden_layers=10**9))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from qtool.cli import app; sys.argv = ['qtool', 'inspect', sys.argv[1], '--json']; app()")
    p = subprocess.run([sys.executable, "-c", code, str(ckpt)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "model.layers.2-999999999: no tensors, but config.json num_hidden_layers is 1000000000" in \
        json.loads(p.stdout)["problems"]
