"""qtool's PTQ pipeline around NVIDIA ModelOpt 0.47 (used by `qtool quantize`).

Contract: `plan` (pre-load checks on a model's config), `configs` (recipe → ModelOpt config),
`ptq` (load + calibrate), `export` (HF checkpoint + tokenizer), `gptq_layout` (GPTQ tensors),
`manifest` (qtool.json) and `output` (atomic output folder). Only `ptq`, `export` and
`gptq_layout` import torch / transformers / modelopt, and only inside functions.
"""
