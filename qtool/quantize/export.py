"""Write the quantized model as a Hugging Face checkpoint with ModelOpt's exporter.

Contract: `export_checkpoint(model, tokenizer, source_dir, out_dir)` calls
`modelopt.torch.export.export_hf_checkpoint` (config.json, generation_config.json,
hf_quant_config.json, safetensors), then saves the tokenizer (ModelOpt does not) and copies the
source's chat template / generation config when the exporter left them out. Returns the list of
files written. The saved tokenizer.json has no truncation / padding (calibration tokenized with
truncation=True, and the fast tokenizer would otherwise save it: every consumer would cut prompts at
--calib-seq-len tokens). Leaves `model.config.dtype` a torch.dtype (transformers' save_pretrained turns it
into a string, see docs/quantize.md).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from qtool.quantize.ptq import quiet

CARRY_OVER = ("chat_template.jinja", "chat_template.json", "generation_config.json")


def export_checkpoint(model, tokenizer, source_dir: Path, out_dir: Path, debug: bool = False) -> list[str]:
    from modelopt.torch.export import export_hf_checkpoint

    dtype = next(model.parameters()).dtype
    with quiet(debug):
        try:
            export_hf_checkpoint(model, export_dir=str(out_dir))
        finally:
            # transformers' save_pretrained (called by the exporter) stores the STRING 'bfloat16'
            # in the live model.config.dtype; a later `.to(config.dtype)` then fails with
            # "Invalid device string: 'bfloat16'" (docs/quantize.md). Put the torch dtype back.
            model.config.dtype = dtype
        tokenizer.save_pretrained(str(out_dir))
    _drop_truncation(Path(out_dir) / "tokenizer.json")
    for name in CARRY_OVER:
        src, dst = Path(source_dir) / name, Path(out_dir) / name
        if src.is_file() and not dst.exists():
            shutil.copy2(src, dst)
    return sorted(p.name for p in Path(out_dir).iterdir())


def _drop_truncation(path: Path) -> None:
    import json
    if not path.is_file():
        return
    tj = json.loads(path.read_text(encoding="utf-8"))
    if tj.get("truncation") is None and tj.get("padding") is None:
        return
    tj["truncation"] = tj["padding"] = None
    path.write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
