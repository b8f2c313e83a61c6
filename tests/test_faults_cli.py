"""Issue 14 items 11-17: one-line errors with the right exit code and JSON when asked; the conveniences.

Each case was written to fail on the code before the fix: Click/Typer usage errors printed a boxed panel with
no `error:` line and no JSON; inspect said 1 for a missing path and run said 2 for a broken config.json;
non-UTF-8 prompts raised a TypeError; Ctrl-C under --json printed no JSON; prompts could not come from stdin;
generation_config.json was ignored.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cli_helpers import REPO, run_qtool
from qtool.cli import app

runner = CliRunner()


def _invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def _error_lines(r):
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def assert_one_line(r, code: int, needle: str = "", json_mode: bool = False):
    """`error: …` (+ optional `hint: …`) on stderr, nothing else; the exit code; the JSON error under --json."""
    lines = _error_lines(r)
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert lines and lines[0].startswith("error:"), r.stderr
    assert len(lines) <= 2 and all(ln.startswith(("error:", "hint:")) for ln in lines), r.stderr
    assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert "╭" not in r.stderr and "Traceback" not in r.stderr
    if json_mode:
        doc = json.loads(r.stdout)
        assert doc["ok"] is False and doc["error"]["exit_code"] == code and doc["error"]["message"]
        return doc


# ---------------------------------------------------------------- item 11: usage errors from Click/Typer
USAGE_CASES = [
    (["quantize", "--quant", "fp9", "-o", "/tmp/cliux-never"], "--quant"),
    (["run", "M", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", "M", "hi", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["run", "M", "hi", "--max-new-tokens", "abc"], "--max-new-tokens"),
    (["run", "M", "hi", "--temperature", "-1"], "--temperature"),
    (["run", "M", "hi", "--top-p", "2"], "--top-p"),
    (["quantize", "--quant", "fp8", "--calib-size", "0", "-o", "/tmp/cliux-never"], "--calib-size"),
    (["run", "M", "hi", "--bogus"], "--bogus"),
    (["inspect", "P", "--nope"], "--nope"),
    (["quantize", "--quant", "fp8"], "--output"),
    (["inspect"], "PATH"),
    (["nosuchcommand"], "nosuchcommand"),
]


@pytest.mark.parametrize("args,needle", USAGE_CASES)
@pytest.mark.parametrize("json_mode", [False, True])
def test_click_usage_errors_are_one_line_exit_2(args, needle, json_mode):
    r = _invoke(*args, *(["--json"] if json_mode else []))
    doc = assert_one_line(r, 2, needle, json_mode and args[0] != "nosuchcommand")
    if doc:
        assert doc["error"]["code"] == "usage"


def test_usage_error_real_process_json():
    r = run_qtool("run", "M", "hi", "--top-p", "2", "--json", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "╭" not in r.stderr
    assert json.loads(r.stdout)["error"]["code"] == "usage"


@pytest.mark.parametrize("cmd", ["matrix", "quantize", "inspect", "run", "chat"])
def test_help_works_with_examples(cmd):
    r = _invoke(cmd, "--help")
    assert r.exit_code == 0 and "Usage" in r.stdout and "Examples" in r.stdout, r.stdout


def test_root_help_and_completion_options():
    r = _invoke("--help")
    assert r.exit_code == 0 and "--install-completion" in r.stdout and "--show-completion" in r.stdout
    # the shell named explicitly: auto-detection (shellingham) fails when no shell is among the ancestors (a daemonised runner)
    r = run_qtool("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
                  timeout=120)
    assert r.returncode == 0 and "complete" in r.stdout and "qtool" in r.stdout.lower()


# ---------------------------------------------------------------- item 12: exit codes
@pytest.mark.parametrize("args", [["inspect", "/no/such/ckpt"], ["run", "/no/such/ckpt", "hi"],
                                  ["chat", "/no/such/ckpt"], ["quantize", "--model", "/no/such/ckpt", "--quant", "fp8",
                                                             "-o", "/tmp/cliux-never"]])
def test_missing_path_is_2_everywhere(args):
    assert_one_line(_invoke(*args), 2, "not found")


@pytest.fixture
def broken_config(tiny_models, tmp_path):
    import shutil
    dst = tmp_path / "broken"
    shutil.copytree(tiny_models("llama"), dst)
    (dst / "config.json").write_text('{"model_type": "llama", ')
    return dst


@pytest.mark.parametrize("cmd", ["inspect", "run", "chat", "quantize"])
def test_unparsable_config_is_1_everywhere(cmd, broken_config, tmp_path):
    args = {"inspect": ["inspect", broken_config], "run": ["run", broken_config, "hi"], "chat": ["chat", broken_config],
            "quantize": ["quantize", "--model", broken_config, "--quant", "fp8", "-o", tmp_path / "out"]}[cmd]
    r = _invoke(*args)
    assert_one_line(r, 1, "config.json")
    assert "tokenizer" not in r.stderr.lower()


def test_device_map_nonsense_is_2_before_loading(tmp_path):
    t = time.perf_counter()
    r = _invoke("quantize", "--quant", "fp8", "--device-map", "nonsense", "-o", tmp_path / "o", "--json")
    assert_one_line(r, 2, "--device-map", json_mode=True)
    assert time.perf_counter() - t < 5
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- item 13: bad bytes, Ctrl-C, template, one-liners
def test_non_utf8_prompt_argument_names_argument_and_offset(tiny_models):
    r = subprocess.run([sys.executable, "-m", "qtool", "run", str(tiny_models("llama")), b"ab\xffcd", "--json"],
                       cwd=REPO, capture_output=True, timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.decode()
    assert err.startswith("error:") and "PROMPT" in err and "byte 2" in err and "Traceback" not in err
    assert json.loads(r.stdout)["error"]["code"] == "usage"


def test_non_utf8_prompts_file_names_file_line_and_offset(tiny_models, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"first prompt\nsec\xc3(ond\n")
    r = _invoke("run", tiny_models("llama"), "--prompts", f)
    assert_one_line(r, 2, "p.txt")
    assert "byte 16" in r.stderr and "line 2" in r.stderr


def test_non_utf8_system_argument():
    r = subprocess.run([sys.executable, "-m", "qtool", "run", "M", "hi", "--system", b"\xfe"],
                       cwd=REPO, capture_output=True, timeout=300)
    assert r.returncode == 2 and b"--system" in r.stderr and b"byte 0" in r.stderr


def test_ctrl_c_under_json_prints_interrupted(tiny_models):
    env = {**os.environ}
    # prompts from a stdin that stays open: the run is still waiting when Ctrl-C comes, however fast the machine
    # (a fixed prompt let the tiny model finish its answer before the signal on an idle CI machine)
    p = subprocess.Popen([sys.executable, "-m", "qtool", "run", str(tiny_models("llama")), "--prompts", "-", "--json",
                          "--max-new-tokens", "400", "--backend", "torch"], cwd=REPO, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # a runner started in the background (bash without job control) ignores SIGINT, and a
                         # child whose SIGINT is ignored at start keeps it ignored: restore Ctrl-C as a terminal has it
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p.stdin.write('{"prompt": "hi"}\n')
    p.stdin.flush()
    time.sleep(6)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out, err)
    doc = json.loads(out)
    assert doc["ok"] is False and doc["error"]["code"] == "interrupted" and doc["error"]["exit_code"] == 130
    assert err.strip().splitlines()[-1].startswith("error:") or "error: interrupted" in err


def test_missing_chat_template_falls_back_with_warning(tiny_models, tmp_path):
    import shutil
    dst = tmp_path / "notemplate"
    shutil.copytree(tiny_models("llama"), dst)
    for f in dst.glob("chat_template*"):
        f.unlink()
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = _invoke("run", dst, "Hello", "--max-new-tokens", 2, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert any("chat template" in w for w in doc["warnings"]) and "chat template" in r.stderr
    from qtool.runtime.chat import load_tokenizer
    assert doc["completions"][0]["prompt_tokens"] == len(load_tokenizer(dst).encode("Hello"))


def test_truncated_safetensors_is_specific(tiny_models, tmp_path):
    import shutil
    dst = tmp_path / "trunc"
    shutil.copytree(tiny_models("llama"), dst)
    st = next(dst.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:5])
    r = _invoke("run", dst, "hi")
    assert_one_line(r, 1, st.name)
    assert "SafetensorError" not in r.stderr


def test_permission_denied_is_specific(tiny_models, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    import shutil
    dst = tmp_path / "perm"
    shutil.copytree(tiny_models("llama"), dst)
    (dst / "tokenizer.json").chmod(0)
    r = _invoke("run", dst, "hi")
    assert_one_line(r, 1, "permission denied")
    assert "tokenizer.json" in r.stderr and "PermissionError" not in r.stderr


@pytest.mark.parametrize("value", ["0=70GiB,cpu", "=", "0=lots"])
def test_max_memory_malformed_is_specific(value, tmp_path):
    r = _invoke("quantize", "--quant", "fp8", "--device-map", "auto", "--max-memory", value, "-o", tmp_path / "o")
    assert_one_line(r, 2, "--max-memory")
    assert "unpack" not in r.stderr


# ---------------------------------------------------------------- item 15: prompts from stdin
def test_prompt_from_stdin_equals_argument(tiny_models):
    path = tiny_models("llama")
    a = _invoke("run", path, "Water boils at", "--max-new-tokens", 4, "--json")
    b = _invoke("run", path, "--max-new-tokens", 4, "--json", input="Water boils at\n")
    assert a.exit_code == 0 and b.exit_code == 0, b.stderr
    ca, cb = json.loads(a.stdout)["completions"], json.loads(b.stdout)["completions"]
    assert [c["text"] for c in ca] == [c["text"] for c in cb] and cb[0]["prompt"] == "Water boils at"


def test_prompts_dash_reads_lines_from_stdin(tiny_models):
    r = _invoke("run", tiny_models("llama"), "--prompts", "-", "--max-new-tokens", 2, "--json",
                input="one\n\n{\"prompt\": \"two\"}\n")
    assert r.exit_code == 0, r.stderr
    assert [c["prompt"] for c in json.loads(r.stdout)["completions"]] == ["one", "two"]


def test_empty_stdin_is_usage_error(tiny_models):
    assert_one_line(_invoke("run", tiny_models("llama"), input=""), 2, "prompt")


def test_stdin_real_pipe(tiny_models):
    r = subprocess.run([sys.executable, "-m", "qtool", "run", str(tiny_models("llama")), "--max-new-tokens", "2",
                        "--json"], cwd=REPO, input="hi\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completions"][0]["prompt"] == "hi"


# ---------------------------------------------------------------- item 16: generation_config.json defaults
@pytest.fixture
def gen_config_model(tiny_models, tmp_path):
    import shutil
    dst = tmp_path / "genconf"
    shutil.copytree(tiny_models("llama"), dst)
    gc = json.loads((dst / "generation_config.json").read_text()) if (dst / "generation_config.json").exists() else {}
    gc.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    (dst / "generation_config.json").write_text(json.dumps(gc))
    return dst


def test_generation_config_defaults_and_overrides(gen_config_model, tiny_models):
    r = _invoke("run", gen_config_model, "hi", "--max-new-tokens", 2, "--seed", 1, "--json")
    doc = json.loads(r.stdout)
    s = doc["sampling"]
    assert (s["temperature"], s["top_p"], s["top_k"]) == (0.7, 0.8, 20)
    assert s["source"] == {"temperature": "generation_config.json", "top_p": "generation_config.json",
                           "top_k": "generation_config.json"}
    r = _invoke("run", gen_config_model, "hi", "--max-new-tokens", 2, "--temperature", 0, "--top-k", 5, "--json")
    s = json.loads(r.stdout)["sampling"]
    assert (s["temperature"], s["top_p"], s["top_k"]) == (0.0, 0.8, 5)
    assert s["source"]["temperature"] == "flag" and s["source"]["top_k"] == "flag"
    r = _invoke("run", tiny_models("llama"), "hi", "--max-new-tokens", 2, "--json")
    s = json.loads(r.stdout)["sampling"]
    assert (s["temperature"], s["top_p"], s["top_k"]) == (0.0, 1.0, 0) and s["source"]["temperature"] == "default"


def test_generation_config_sampling_is_used(gen_config_model):
    """The config's temperature actually reaches the sampler: seeded runs equal a run with the same flags."""
    base = ["run", gen_config_model, "The capital", "--max-new-tokens", 8, "--seed", 3, "--json"]
    a = json.loads(_invoke(*base).stdout)["completions"][0]["text"]
    b = json.loads(_invoke(*base, "--temperature", 0.7, "--top-p", 0.8, "--top-k", 20).stdout)["completions"][0]["text"]
    assert a == b


def test_permission_error_anywhere_is_specific(tiny_models, monkeypatch):
    """The last-resort handler names the file for a PermissionError the code did not expect (works as root too)."""
    from qtool.runtime import tokenizer

    def deny(folder):
        raise PermissionError(13, "Permission denied", f"{folder}/tokenizer.json")
    monkeypatch.setattr(tokenizer.Tokenizer, "from_folder", staticmethod(deny))
    r = _invoke("run", tiny_models("llama"), "hi", "--json")
    doc = assert_one_line(r, 1, "permission denied", json_mode=True)
    assert "tokenizer.json" in doc["error"]["message"] and "PermissionError" not in r.stderr
