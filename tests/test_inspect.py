"""Tests of `qtool inspect` through the CLI (typer CliRunner), against independent references.

References: the independent packers of tests/packers.py (expected bits per weight and byte
counts), real ModelOpt exports, the safetensors library, the hardware matrix CSV read here with
the csv module, and a local fake hub server (range requests counted). Every malformed input must
give exit 1, one `error:` line (or one `problem:` line naming the tensor) and no traceback.
"""
from __future__ import annotations

import csv
import hashlib
import http.server
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from packers import modelopt_ckpt, packed_ckpt  # noqa: F401 - fixtures
from qtool.cli import app

REPO = Path(__file__).resolve().parent.parent


def run(*args, env=None):
    r = CliRunner().invoke(app, ["inspect", *map(str, args)], env=env)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    return r


def run_json(*args, env=None):
    r = run(*args, "--json", env=env)
    return r, json.loads(r.stdout)


def assert_fails_one_line(r, needle: str):
    assert r.exit_code == 1, (r.stdout, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr


def assert_problem(r, *needles: str):
    assert r.exit_code == 1, r.stdout
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("problem:")]
    for needle in needles:
        assert any(needle in ln for ln in lines), (needle, lines)


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(folder: Path, edit) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))


def rewrite_header(folder: Path, edit) -> None:
    p = folder / "model.safetensors"
    b = p.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    edit(h)
    raw = json.dumps(h).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b[8 + n:])


def read_matrix(name: str) -> dict[str, dict[str, str]]:
    with open(REPO / "recipes" / f"{name}_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    return {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[1:] if r}


# ------------------------------------------------------------------ what it reports

@pytest.mark.parametrize("name,recipe,method", [("gptq", "w4a16-gptq", "gptq"), ("gptq_w4a8", "w4a8-gptq", "gptq"),
                                                ("autoawq", "w4a16-awq", "awq"),
                                                ("deepseek_fp8", "fp8-block", "fp8")])
def test_packed_report(name, recipe, method, packed_ckpt, tiny_models):
    info = packed_ckpt(name)
    r, doc = run_json(info.path)
    assert r.exit_code == 0 and doc["ok"] and doc["problems"] == [], doc["problems"]
    rec = doc["recipe"]
    assert (rec["name"], rec["quant_method"], rec["group_size"], rec["kv_cache"]) == (recipe, method, 128, "bf16")
    s = doc["sizes"]
    assert s["bits_per_weight_quantized"] == pytest.approx(info.bits_quantized)
    assert s["bits_per_weight"] == pytest.approx(info.bits_all)
    assert s["bytes_on_disk"] == (info.path / "model.safetensors").stat().st_size
    original = load_file(str(tiny_models("llama") / "model.safetensors"))
    assert s["parameters"] == sum(t.numel() for t in original.values())
    assert s["size_vs_bf16"] == pytest.approx(s["bytes_on_disk"] / (2 * s["parameters"]))
    groups = {g["modules"]: g for g in doc["layer_groups"]}
    assert groups["lm_head"]["format"] == "bf16" and groups["lm_head"]["excluded"]
    q = groups["model.layers.*.self_attn.q_proj"]
    assert (q["layers"], q["count"], q["group_size"]) == ("0-1", 2, 128)
    assert doc["model"]["family_rows"] and doc["runtime"]["torch"]["can_run"]


@pytest.mark.parametrize("case,recipe,kv", [("fp8_kvfp8", "fp8", "fp8"), ("nvfp4_kvnvfp4", "nvfp4", "nvfp4"),
                                            ("w4a8_awq", "w4a8-awq", None), ("fp8_block", "fp8-block", None),
                                            ("mxfp4", "mxfp4", None)])
def test_modelopt_report_and_verdict(case, recipe, kv, modelopt_ckpt):
    r, doc = run_json(modelopt_ckpt(case), "--context", 2048, "--batch", 2)
    assert r.exit_code == 0 and doc["problems"] == [], doc["problems"]
    assert doc["recipe"]["name"] == recipe and doc["support"]["kv"] == kv
    hw, mm = read_matrix("hardware"), read_matrix("model")
    cols = [{"fp8": "FP8(per tensor)", "nvfp4": "NVFP4", "w4a8-awq": "W4A8 AWQ", "fp8-block": "FP8(block scaling)",
             "mxfp4": "MXFP4"}[recipe]] + ([{"fp8": "FP8 KV Cache", "nvfp4": "NVFP4 KV Cache"}[kv]] if kv else [])
    for key, a in doc["support"]["architectures"].items():
        hw_ok = all(hw[a["row"]][c] == "Y" for c in cols)
        rule_ok = not (kv == "nvfp4" and recipe != "fp8")          # NVFP4 KV needs FP8 weights (recipes.toml)
        model_ok = all(any(mm[row][c] == "Y" for row in doc["model"]["family_rows"]) for c in cols)
        assert a["supported"] == (hw_ok and rule_ok and model_ok), (key, a)
    # KV bytes at context 2048 x batch 2: 2 (K,V) * layers 2 * kv_heads 2 * head_dim 64 * tokens * bytes/element
    per_elem = {None: 2, "fp8": 1, "nvfp4": 0.5 + 1 / 16}[kv]
    assert doc["sizes"]["kv_cache_bytes"] == int(2 * 2 * 2 * 64 * 2048 * 2 * per_elem)
    assert doc["sizes"]["memory_bytes"] == doc["sizes"]["tensor_bytes"] + doc["sizes"]["kv_cache_bytes"]


def test_rich_output_mentions_everything(modelopt_ckpt):
    r = run(modelopt_ckpt("fp8_kvfp8"))
    assert r.exit_code == 0
    out = r.stdout
    for needle in ("LlamaForCausalLM", "LLaMA", "parameters", "fp8", "KV cache fp8", "k/v scales calibrated",
                   "model.layers.*.mlp.down_proj", "bits/weight", "of bf16", "context 4096 x batch 1", "sm90",
                   "torch reference", "no problems found"):
        assert needle in out, needle


def test_kv_scales_absent_is_a_note_not_a_problem(tmp_path, modelopt_ckpt):
    out = copy_ckpt(modelopt_ckpt("fp8_kvfp8"), tmp_path / "cast")
    rewrite_tensors(out, lambda sd: [sd.pop(k) for k in list(sd) if k.endswith(("k_scale", "v_scale"))])
    r, doc = run_json(out)
    assert r.exit_code == 0 and doc["recipe"]["kv_scales"] == "absent"
    assert any("scale 1.0" in n for n in doc["notes"])


def test_default_path_imports_no_torch(modelopt_ckpt):
    code = ("import sys; from typer.testing import CliRunner; from qtool.cli import app; "
            f"r = CliRunner().invoke(app, ['inspect', {str(modelopt_ckpt('fp8_kvfp8'))!r}]); "
            "assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('torch', 'safetensors', 'transformers', 'modelopt', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_json_schema_is_documented(modelopt_ckpt):
    _, doc = run_json(modelopt_ckpt("fp8_kvfp8"))
    text = (REPO / "docs" / "inspect.md").read_text()
    for key in doc:
        assert f'"{key}"' in text, key
    for section in ("recipe", "sizes", "support", "runtime", "model", "files"):
        for key in doc[section]:
            assert f'"{key}"' in text, f"{section}.{key}"
    for key in doc["layer_groups"][0]:
        assert f'"{key}"' in text, f"layer_groups.{key}"


# ------------------------------------------------------------------ malformed inputs: exit 1, one line, no traceback

def test_missing_folder(tmp_path):     # a path that does not exist is a usage error (exit 2), as for every command
    r = run(tmp_path / "does-not-exist")
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "not found" in r.stderr.splitlines()[0]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_fails_one_line(run(tmp_path / "empty"), "is empty")


def test_corrupt_header(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "c")
    p = out / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[8:20] = b"not a header"
    p.write_bytes(bytes(b))
    assert_fails_one_line(run(out), "corrupt safetensors header")


def test_header_length_beyond_file(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "h")
    p = out / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[:8] = struct.pack("<Q", len(b) * 2)
    p.write_bytes(bytes(b))
    assert_fails_one_line(run(out), "corrupt safetensors header")


def test_truncated_file(tmp_path, modelopt_ckpt):
    out = copy_ckpt(modelopt_ckpt("fp8_kvfp8"), tmp_path / "t")
    p = out / "model.safetensors"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 4096)
    r = run(out)
    assert_problem(r, "truncated")
    names = json.loads(run(out, "--json").stdout)["problems"]
    assert len(names) == 1 and re.search(r"tensor \S+: data ends at byte \d+ but the file has \d+ bytes", names[0])


def test_unknown_dtype(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "d")
    rewrite_header(out, lambda h: h["model.norm.weight"].update(dtype="BF17"))
    assert_problem(run(out), "model.norm.weight: unknown dtype 'BF17'")


def test_dtype_contradicting_format(tmp_path, modelopt_ckpt):
    out = copy_ckpt(modelopt_ckpt("fp8_kvfp8"), tmp_path / "d")
    rewrite_tensors(out, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.weight_scale": torch.tensor(0.1).half(),
                                               "model.layers.1.mlp.up_proj.weight":
                                                   sd["model.layers.1.mlp.up_proj.weight"].to(torch.uint8)}))
    assert_problem(run(out), "model.layers.0.self_attn.q_proj.weight_scale: dtype F16 contradicts fp8",
                   "model.layers.1.mlp.up_proj.weight: dtype U8 contradicts fp8")


def test_config_not_json(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "j")
    (out / "config.json").write_text('{"model_type": "llama",')
    assert_fails_one_line(run(out), "config.json is not valid JSON")


def test_config_not_object(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "j")
    (out / "config.json").write_text("[1, 2]")
    assert_fails_one_line(run(out), "not a JSON object")


def test_hf_quant_config_not_json(tmp_path, modelopt_ckpt):
    out = copy_ckpt(modelopt_ckpt("fp8_kvfp8"), tmp_path / "q")
    (out / "hf_quant_config.json").write_text("quant_algo: FP8")
    assert_fails_one_line(run(out), "hf_quant_config.json is not valid JSON")


def test_no_safetensors(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "n")
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    assert_fails_one_line(run(out), "no *.safetensors files")


def test_unknown_quant_method(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "u")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (out / "config.json").write_text(json.dumps(cfg))
    assert_fails_one_line(run(out), "'bitsandbytes' is not a format qtool reads")


def hub_offline(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))


def test_hub_offline_fails_fast(tmp_path, monkeypatch):
    hub_offline(monkeypatch, tmp_path / "cache")
    assert_fails_one_line(run("acme/not-cached-anywhere"), "cannot reach the Hugging Face hub")


# ------------------------------------------------------------------ soundness problems, one line naming the tensor

def test_missing_and_unexpected_scales(tmp_path, modelopt_ckpt):
    out = copy_ckpt(modelopt_ckpt("nvfp4_kvnvfp4"), tmp_path / "s")

    def edit(sd):
        del sd["model.layers.0.mlp.gate_proj.weight_scale_2"]
        sd["model.layers.1.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 2)
        del sd["model.layers.1.self_attn.v_proj.v_scale"]
    rewrite_tensors(out, edit)
    r = run(out)
    assert_problem(r, "model.layers.0.mlp.gate_proj.weight_scale_2: missing",
                   "model.layers.1.self_attn.o_proj.weight_scale_inv: unexpected",
                   "model.layers.1.self_attn.v_proj.v_scale: missing")
    assert len([ln for ln in r.stdout.splitlines() if "problem:" in ln]) == 3


def test_config_disagrees_with_tensors(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "cfg")
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_size"] = 512
    cfg["num_hidden_layers"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    assert_problem(run(out), "model.embed_tokens.weight: width 256 but config.json hidden_size is 512",
                   "model.layers.2: no tensors, but config.json num_hidden_layers is 3",
                   "model.layers.0.self_attn.q_proj.weight: layer is [256 out, 256 in]")


def test_group_size_disagrees(tmp_path, modelopt_ckpt):
    out = copy_ckpt(modelopt_ckpt("int4_awq"), tmp_path / "g")
    hq = json.loads((out / "hf_quant_config.json").read_text())
    hq["quantization"]["group_size"] = 64
    (out / "hf_quant_config.json").write_text(json.dumps(hq))
    assert_problem(run(out), "group size 128 from the shape, config declares 64")


def test_missing_tokenizer(tmp_path, tiny_models):
    out = copy_ckpt(tiny_models("llama"), tmp_path / "tok")
    for f in out.glob("tokenizer*"):
        f.unlink()
    assert_problem(run(out), "tokenizer: missing")


# ------------------------------------------------------------------ --deep

def test_deep_finds_value_problems(tmp_path, modelopt_ckpt):
    out = copy_ckpt(modelopt_ckpt("nvfp4_kvnvfp4"), tmp_path / "v")

    def edit(sd):
        w = sd["lm_head.weight"].clone()
        w[3, 5] = float("nan")
        w[4, 6] = float("inf")
        sd["lm_head.weight"] = w
        sd["model.layers.0.self_attn.q_proj.weight_scale_2"] = torch.tensor(0.0)
        sd["model.layers.1.self_attn.k_proj.k_scale"] = torch.tensor(-1.0)
        q = sd["model.layers.0.mlp.up_proj.weight"].clone()
        q[7, 8:16] = 0                                   # one NVFP4 block of 16 codes, all zero
        sd["model.layers.0.mlp.up_proj.weight"] = q
    rewrite_tensors(out, edit)
    r, doc = run_json(out)                               # without --deep: the small scales only (validate.py)
    assert r.exit_code == 1 and sorted(doc["problems"]) == sorted([
        "model.layers.0.self_attn.q_proj.weight_scale_2: scale is zero (a scale must be finite and > 0)",
        "model.layers.1.self_attn.k_proj.k_scale: scale is negative (a scale must be finite and > 0)"])
    r, doc = run_json(out, "--deep")
    assert r.exit_code == 1
    assert sorted(doc["deep"]["problems"]) == sorted([
        "lm_head.weight: 1 NaN value(s)", "lm_head.weight: 1 Inf value(s)",
        "model.layers.0.self_attn.q_proj.weight_scale_2: 1 zero scale(s)",
        "model.layers.1.self_attn.k_proj.k_scale: 1 negative scale(s)",
        "model.layers.0.mlp.up_proj.weight: 1 all-zero block(s) of 16 weights"])
    stats = {s["name"]: s for s in doc["deep"]["stats"]}
    emb = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].float()
    assert stats["model.embed_tokens.weight"]["max"] == pytest.approx(float(emb.max()))


def test_deep_clean_checkpoint(packed_ckpt):
    r, doc = run_json(packed_ckpt("deepseek_fp8").path, "--deep")
    assert r.exit_code == 0 and doc["deep"]["problems"] == [] and doc["deep"]["tensors_read"] > 0


def test_bad_context_is_usage_error(modelopt_ckpt):
    r = run(modelopt_ckpt("fp8_kvfp8"), "--context", 0)
    assert r.exit_code == 2 and "--context" in r.stderr


# ------------------------------------------------------------------ hub ids

class FakeHub:
    """Serves a folder as hub repo `repo_id` (model_info + resolve with HTTP ranges); counts bytes sent."""

    def __init__(self, folder: Path, repo_id: str):
        self.folder, self.repo_id, self.sent = folder, repo_id, {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _file(self):
                m = re.match(rf"^/{re.escape(hub.repo_id)}/resolve/[^/]+/(.+)$", self.path.split("?")[0])
                return hub.folder / m.group(1) if m and (hub.folder / m.group(1)).is_file() else None

            def _head(self, f, length, status, extra=()):
                self.send_response(status)
                self.send_header("ETag", '"%s"' % hashlib.sha1(f.name.encode()).hexdigest())
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("Content-Length", str(length))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                f = self._file()
                if f is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self._head(f, f.stat().st_size, 200)

            def do_GET(self):
                if self.path.startswith(f"/api/models/{hub.repo_id}"):
                    body = json.dumps({"id": hub.repo_id, "sha": "a" * 40,
                                       "siblings": [{"rfilename": p.name} for p in hub.folder.iterdir()]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                f = self._file()
                if f is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = f.read_bytes()
                a, b = 0, len(data) - 1
                m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("range", ""))
                if m:
                    a, b = int(m.group(1)), min(int(m.group(2) or b), b)
                    self._head(f, b + 1 - a, 206, [("Content-Range", f"bytes {a}-{b}/{len(data)}")])
                else:
                    self._head(f, len(data), 200)
                hub.sent[f.name] = hub.sent.get(f.name, 0) + (b + 1 - a)
                self.wfile.write(data[a:b + 1])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hubs = []

    def make(folder: Path, repo_id: str) -> FakeHub:
        hub = FakeHub(folder, repo_id)
        hubs.append(hub)
        import huggingface_hub.constants as c
        monkeypatch.setattr(c, "ENDPOINT", hub.url)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        return hub
    yield make
    for h in hubs:
        h.server.shutdown()


def _comparable(doc: dict) -> dict:
    doc = dict(doc)
    for k in ("source", "path", "remote"):
        doc.pop(k)
    return doc


def test_hub_id_reads_headers_only(tmp_path, modelopt_ckpt, fake_hub):
    # pad the data so the file is much larger than the first 100 kB range
    folder = copy_ckpt(modelopt_ckpt("fp8_kvfp8"), tmp_path / "repo")
    rewrite_tensors(folder, lambda sd: sd.update(pad=torch.zeros(1_000_000, dtype=torch.uint8)))
    hub = fake_hub(folder, "acme/tiny-fp8")
    r, doc = run_json("acme/tiny-fp8")
    assert r.exit_code == 0, r.stderr
    assert doc["remote"] and doc["source"] == "acme/tiny-fp8"
    size = (folder / "model.safetensors").stat().st_size
    assert hub.sent["model.safetensors"] <= 100_000 < size
    _, local = run_json(folder)
    assert _comparable(doc) == _comparable(local)
    r = run("acme/tiny-fp8", "--deep")
    assert_fails_one_line(r, "--deep reads tensor data")


def test_hub_unknown_repo(fake_hub, tmp_path, tiny_models):
    fake_hub(tiny_models("llama"), "acme/exists")
    assert_fails_one_line(run("acme/does-not-exist"), "acme/does-not-exist")


def test_hub_cache_snapshot_used_offline(tmp_path, modelopt_ckpt, monkeypatch):
    cache = tmp_path / "cache"
    snap = cache / "models--acme--cached" / "snapshots" / ("b" * 40)
    shutil.copytree(modelopt_ckpt("w4a8_awq"), snap)
    (cache / "models--acme--cached" / "refs").mkdir(parents=True)
    (cache / "models--acme--cached" / "refs" / "main").write_text("b" * 40)
    hub_offline(monkeypatch, cache)
    r, doc = run_json("acme/cached")
    assert r.exit_code == 0, r.stderr
    assert doc["source"] == "acme/cached" and doc["recipe"]["name"] == "w4a8-awq"


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3"])
def test_other_families_are_sound(family, tiny_models):
    """q/k/v bias (qwen2), per-head q/k norms (qwen3) and llama3 rope config read without problems."""
    r, doc = run_json(tiny_models(family))
    assert r.exit_code == 0 and doc["problems"] == [], doc["problems"]
    assert doc["recipe"]["name"] is None and doc["recipe"]["weights"] == ["bf16"]
    cfg = json.loads((tiny_models(family) / "config.json").read_text())
    assert doc["model"]["model_type"] == cfg["model_type"] and doc["model"]["family_rows"]
    original = load_file(str(tiny_models(family) / "model.safetensors"))
    assert doc["sizes"]["parameters"] == sum(t.numel() for t in original.values())
    assert doc["sizes"]["bits_per_weight"] == 16


def test_sharded_truncated_shard_names_tensor(tmp_path, tiny_models):
    import transformers as tf
    out = tmp_path / "sharded"
    tf.AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.bfloat16).save_pretrained(
        out, max_shard_size="600KB")
    for f in tiny_models("llama").iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    r, doc = run_json(out)
    shards = sorted(out.glob("*.safetensors"))
    assert r.exit_code == 0 and len(doc["files"]["shards"]) == len(shards) > 1
    assert doc["sizes"]["bytes_on_disk"] == sum(p.stat().st_size for p in shards)
    last = shards[-1]
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 100)
    r, doc = run_json(out)
    assert r.exit_code == 1 and len(doc["problems"]) == 1
    assert doc["problems"][0].startswith(f"{last.name}: tensor ") and "truncated" in doc["problems"][0]


def test_runtime_model_types_match_the_model_code():
    """The model_types in recipes/runtime_support.toml are exactly those qtool/runtime/families/ has code for."""
    from qtool.runtime.families import supported_families
    from qtool.support.data import runtime_model_types
    assert sorted(runtime_model_types()) == sorted(supported_families())


def test_mixed_precision_verdict_needs_every_recipe(modelopt_ckpt, tmp_path, tiny_models):
    out = copy_ckpt(modelopt_ckpt("mixed"), tmp_path / "mixed")
    r, doc = run_json(out)
    assert r.exit_code == 0, doc["problems"]
    assert doc["recipe"]["name"] is None and doc["recipe"]["weights"] == ["fp8", "nvfp4"]
    assert doc["support"]["recipes"] == ["fp8", "nvfp4"]
    hw, mm = read_matrix("hardware"), read_matrix("model")
    for key, a in doc["support"]["architectures"].items():
        want = all(hw[a["row"]][c] == "Y" and any(mm[row][c] == "Y" for row in doc["model"]["family_rows"])
                   for c in ("FP8(per tensor)", "NVFP4"))
        assert a["supported"] == want, key
    groups = [(g["modules"], g["layers"], g["format"]) for g in doc["layer_groups"]]
    assert ("model.layers.*.self_attn.o_proj", "1", "bf16") in groups
    assert ("model.layers.*.self_attn.o_proj", "0", "fp8") in groups
