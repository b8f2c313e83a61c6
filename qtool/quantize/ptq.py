"""Load a Hugging Face model and run ModelOpt PTQ (`mtq.quantize`) on calibration batches.

Contract: `load_model(path, device_map, max_memory, offload_dir)` → (model, tokenizer) in the
checkpoint's dtype, on CUDA when available (or spread by `device_map`, e.g. 'auto': GPU, then CPU
RAM, then disk in `offload_dir`, through accelerate); `calibrate(model, cfg, batches, stages)` runs `mtq.quantize` with a forward loop
over `batches` (progress per sample; a second pass, as GPTQ makes, restarts the bar). ModelOpt's
chatter on stdout is captured (shown with --debug) so `--json` output stays clean. Nothing runs
a fake-quant forward after calibration (NVFP4/MX fake quant has no CPU path). A ModelOpt failure
that means "needs CUDA" becomes a one-line Failure.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

from qtool.errors import Failure, first_line

CUDA_MARKERS = ("must be a CUDA tensor", "CUDA is not available", "Torch not compiled with CUDA",
                "triton", "cuda_ext")


@contextlib.contextmanager
def quiet(show: bool = False):
    """Send library prints to a buffer (or to stderr when `show`), silence warnings and tqdm bars."""
    buf = io.StringIO()
    with warnings.catch_warnings():
        if not show:
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)    # ModelOpt / deepspeed log warnings on stderr
        try:
            with contextlib.redirect_stdout(sys.stderr if show else buf):
                yield buf
        finally:
            if not show:
                logging.disable(logging.NOTSET)


def _quiet_transformers():
    import transformers
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


_SIZE = r"\d+(\.\d+)?\s*([KMGT]i?B|B)?"
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda", "mps")


def parse_device_map(text: str | None) -> str | None:
    """--device-map: one of from_pretrained's names, a device ('cuda:1'), else UsageError (before any loading)."""
    import re
    if text is None or text in DEVICE_MAPS or re.fullmatch(r"cuda:\d+|\d+", text):
        return text
    from qtool.errors import UsageError
    raise UsageError(f"--device-map: unknown value {text!r}",
                     hint=f"use one of {', '.join(DEVICE_MAPS)} or a device such as cuda:1")


def parse_max_memory(text: str | None) -> dict | None:
    """'0=70GiB,cpu=20GiB' → {0: '70GiB', 'cpu': '20GiB'} (accelerate's max_memory)."""
    import re
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, val = (s.strip() for s in part.partition("="))
        if not sep or not re.fullmatch(r"\d+|cpu|disk|mps", key) or not re.fullmatch(_SIZE, val, re.IGNORECASE):
            from qtool.errors import UsageError
            raise UsageError(f"--max-memory: expected DEVICE=SIZE[,DEVICE=SIZE…] (e.g. 0=70GiB,cpu=32GiB), got {text!r}")
        out[int(key) if key.isdigit() else key] = val
    return out


def load_model(path, device_map: str | None = None, max_memory: dict | None = None, offload_dir=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    kwargs = {"dtype": "auto", "low_cpu_mem_usage": True}
    if device_map:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = max_memory
        if offload_dir is not None:
            kwargs["offload_folder"] = str(offload_dir)     # layers that fit nowhere go to disk
    elif torch.cuda.is_available():
        kwargs["device_map"] = "cuda"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise Failure(f"cannot load the model from {path}: {first_line(exc)}") from None
    model.eval()
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]   # export_hf_checkpoint needs it
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def input_device(model):
    import torch
    dev = getattr(model, "device", None)
    if dev is None or str(dev) == "meta":
        dev = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return dev


def calibrate(model, cfg: dict, batches: list[dict], stages, label: str, debug: bool = False):
    import torch
    import modelopt.torch.quantization as mtq

    dev = input_device(model)
    total = sum(int(b["input_ids"].shape[0]) for b in batches)
    passes = [0]

    def forward_loop(m):
        if passes[0] == 0:
            stages.calibration(total, f"calibrating ({label})")
        else:
            stages.new_pass()
        passes[0] += 1
        with torch.no_grad():
            for b in batches:
                m(**{k: v.to(dev) for k, v in b.items()})
                stages.advance(int(b["input_ids"].shape[0]))

    try:
        with quiet(debug):
            mtq.quantize(model, cfg, forward_loop)
    except (AssertionError, RuntimeError, ImportError) as exc:
        msg = first_line(exc)
        if any(k.lower() in msg.lower() for k in CUDA_MARKERS) and not torch.cuda.is_available():
            raise Failure(f"{label}: ModelOpt 0.47's calibration for this recipe needs CUDA ({msg})",
                          hint="run it on a machine with an NVIDIA GPU") from None
        raise
    return passes[0]
