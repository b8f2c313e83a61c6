"""qtool.json: the record of how a checkpoint was made.

Contract: `build_manifest(**facts)` returns the manifest dict (schema version 1) with the keys
listed in MANIFEST_KEYS plus a random `id` (hex; `qtool run` compares it before and after loading to detect a
checkpoint replaced meanwhile); `write_manifest(dir, manifest)` writes `qtool.json`. Pure data, no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

SCHEMA = 1
MANIFEST_KEYS = ("schema", "tool", "qtool_version", "modelopt_version", "torch_version", "transformers_version",
                 "source", "recipe", "kv_cache", "modelopt", "calibration", "target", "verdict", "forced",
                 "force_warning", "format", "wall_time_s", "peak_memory", "device", "files")


def qtool_version() -> str:
    try:
        from importlib.metadata import version
        return version("qtool")
    except Exception:  # noqa: BLE001
        from qtool import __version__
        return __version__


def build_manifest(**facts) -> dict:
    import uuid
    m = {"schema": SCHEMA, "tool": "qtool quantize", "qtool_version": qtool_version(), "id": uuid.uuid4().hex}
    m.update(facts)
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    return m


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    p = Path(out_dir) / "qtool.json"
    p.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return p
