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
