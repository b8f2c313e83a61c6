#!/usr/bin/env python
"""Does qtool's embedded default calibration corpus calibrate as well as ordinary text?

Contract: quantizes the built-in SmolLM2-135M-Instruct (bf16, dequantized from the shipped Q4_1 GGUF)
with ModelOpt on CPU -- FP8_DEFAULT_CFG and INT4_AWQ_CFG (block 64: SmolLM2's in_features 576 is
not a multiple of 128) -- calibrated on (a) qtool's default corpus, (b) ordinary English text that
qtool does not ship (the prose paragraphs of the README long descriptions in the installed Python
packages' METADATA files) and (c) uniformly random token ids as a control; then measures perplexity
of the fake-quantized model (HF transformers forward) on qtool/data/heldout_en.txt, which is in none
of the calibration sets. Prints a Markdown table; ``--write docs/calibration.md`` replaces the text
between the results markers there (with date, commit and settings). Runs in a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "qtool" / "data" / "heldout_en.txt"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def ordinary_text_file(out: Path, min_chars: int = 200) -> Path:
    """Prose paragraphs from installed packages' README long descriptions (METADATA bodies)."""
    import importlib.metadata as md
    seen, paras = set(), []
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        meta = dist.read_text("METADATA") or ""
        body = meta.split("\n\n", 1)[1] if "\n\n" in meta else ""
        for p in re.split(r"\n\s*\n", body):
            p = " ".join(p.split())
            letters = sum(c.isalpha() or c == " " for c in p)
            if (len(p) >= min_chars and letters / len(p) > 0.9 and not p.startswith(("#", "|", "[", "<", "!", "..", ">>>"))
                    and "http" not in p and "WARRANT" not in p.upper() and "Licensed under" not in p and p not in seen):
                seen.add(p)
                paras.append(p)
    out.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return out


def heldout_ppl(model, tok, window: int = 512) -> tuple[float, int]:
    """Perplexity on the held-out text: non-overlapping windows, mean token NLL."""
    import torch
    ids = tok(HELDOUT.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll += loss.item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count), count


def awq_cfg(block: int) -> dict:
    import modelopt.torch.quantization as mtq
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:
        bs = (entry.get("cfg") or {}).get("block_sizes") if isinstance(entry.get("cfg"), dict) else None
        if bs is not None and entry["quantizer_name"] == "*weight_quantizer":
            key = -1 if -1 in bs else "-1"
            bs[key] = block
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib-size", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--write", type=Path, help="Markdown file whose results section to replace")
    args = ap.parse_args()

    import torch
    import modelopt
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers
    from qtool.calibration import calibration_batches, calibration_texts
    from qtool.sources import resolve_model_source

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    t_all = time.time()
    src = resolve_model_source("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src.path)
    base = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.bfloat16).eval()

    tmp = Path(tempfile.mkdtemp(prefix="qtool-evalcal-"))
    sources = {}
    texts, desc = calibration_texts(None, args.calib_size)
    sources["default corpus"] = (calibration_batches(tok, texts, args.seq_len, args.batch_size), desc)
    texts, desc = calibration_texts(ordinary_text_file(tmp / "readmes.txt"), args.calib_size)
    sources["ordinary text (package READMEs)"] = (calibration_batches(tok, texts, args.seq_len, args.batch_size),
                                                 "prose paragraphs of installed packages' README descriptions: " + desc.split(": ", 1)[1])
    gen = torch.Generator().manual_seed(0)
    rand = [{"input_ids": torch.randint(0, len(tok), (args.batch_size, args.seq_len), generator=gen),
             "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long)}
            for _ in range(math.ceil(args.calib_size / args.batch_size))]
    sources["random token ids (control)"] = (rand, f"{args.calib_size} rows of uniformly random token ids")
    for name, (batches, desc) in sources.items():
        n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
        print(f"[calib] {name}: {desc}; {n_tok} tokens", file=sys.stderr)

    ppl_bf16, n_eval = heldout_ppl(base, tok)
    print(f"[eval] bf16: ppl {ppl_bf16:.3f} on {n_eval} held-out tokens", file=sys.stderr)
    recipes = {"FP8 (FP8_DEFAULT_CFG)": lambda: copy.deepcopy(mtq.FP8_DEFAULT_CFG),
               "INT4 AWQ block 64 (INT4_AWQ_CFG)": lambda: awq_cfg(64)}
    rows = []
    for recipe, make_cfg in recipes.items():
        for name, (batches, _) in sources.items():
            model = copy.deepcopy(base)

            def forward_loop(m, batches=batches):
                with torch.no_grad():
                    for b in batches:
                        m(**b)
            t0 = time.time()
            mtq.quantize(model, make_cfg(), forward_loop)
            t_cal = time.time() - t0
            ppl, _ = heldout_ppl(model, tok)
            rows.append((recipe, name, ppl, t_cal))
            print(f"[eval] {recipe} / {name}: ppl {ppl:.3f} (calibration {t_cal:.0f} s)", file=sys.stderr)
            del model

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    lines = [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC at commit `{commit}` by "
             f"`scripts/eval_calibration.py --calib-size {args.calib_size} --seq-len {args.seq_len} "
             f"--batch-size {args.batch_size}` on CPU ({platform.machine()}, {torch.get_num_threads()} threads; "
             f"torch {torch.__version__}, transformers {transformers.__version__}, ModelOpt {modelopt.__version__}); "
             f"total {time.time() - t_all:.0f} s.",
             "",
             f"Model: {src.label}. Held-out text: `qtool/data/heldout_en.txt`, {n_eval} scored tokens, windows of 512.",
             "",
             "| recipe | calibration data | held-out perplexity | vs bf16 | calibration time |",
             "|---|---|---:|---:|---:|",
             f"| bf16 (not quantized) | - | {ppl_bf16:.3f} | - | - |"]
    for recipe, name, ppl, t_cal in rows:
        lines.append(f"| {recipe} | {name} | {ppl:.3f} | {100 * (ppl / ppl_bf16 - 1):+.2f}% | {t_cal:.0f} s |")
    lines += ["", "Calibration sets:"] + [f"- {name}: {desc}" for name, (_, desc) in sources.items()]
    table = "\n".join(lines)
    print(table)
    if args.write:
        doc = args.write.read_text(encoding="utf-8")
        if START not in doc or END not in doc:
            print(f"error: {args.write} has no {START} ... {END} section", file=sys.stderr)
            return 2
        head, rest = doc.split(START, 1)
        args.write.write_text(f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
