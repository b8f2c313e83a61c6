"""GPU architectures: names typed with --gpu, and the local GPU, onto hardware-matrix rows.

Contract: `resolve_gpu(name)` → Arch (key like 'sm90', the matrix row, a title) or UsageError
listing valid names (an ambiguous name such as 'blackwell' lists its candidates).
`local_gpu()` → Arch of CUDA device 0, or None without a GPU; it imports torch only when called.
"""
from __future__ import annotations

from dataclasses import dataclass

from qtool.errors import Unsupported, UsageError
from qtool.support import data


@dataclass(frozen=True)
class Arch:
    key: str            # 'sm90'
    row: str            # 'Hopper' (hardware_matrix.csv row)
    title: str
    capability: str | None = None   # '9.0' when detected from a device
    device_name: str | None = None

    @property
    def label(self) -> str:
        """'Hopper (sm90)', or just 'Blackwell(sm100)' when the row already names the arch."""
        return self.row if self.key in self.row else f"{self.row} ({self.key})"


def archs() -> dict[str, Arch]:
    return {k: Arch(k, v["row"], v["title"]) for k, v in data.gpus()["arch"].items()}


def valid_names() -> list[str]:
    names = []
    for k, v in data.gpus()["arch"].items():
        names += [k] + [n for n in v["names"] if n != k]
    return names + list(data.gpus().get("ambiguous", {}))


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "-").replace("_", "-").replace("nvidia-", "")


def resolve_gpu(name: str) -> Arch:
    key = _norm(name)
    amb = data.gpus().get("ambiguous", {})
    if key in amb:
        opts = amb[key]
        raise UsageError(f"--gpu {name!r} is ambiguous: it could be " + " or ".join(
            f"{o} ({archs()[o].title})" for o in opts), hint="name one: " + ", ".join(opts))
    for k, v in data.gpus()["arch"].items():
        if key == k or key in {_norm(n) for n in v["names"]}:
            return archs()[k]
    raise UsageError(f"unknown GPU {name!r}", hint="valid --gpu values: " + ", ".join(valid_names()))


def arch_for_capability(major: int, minor: int, device_name: str | None = None) -> Arch:
    cap = f"{major}.{minor}"
    for k, v in data.gpus()["arch"].items():
        if cap in v["capabilities"]:
            a = archs()[k]
            return Arch(a.key, a.row, a.title, cap, device_name)
    raise Unsupported(f"GPU {device_name or ''} (compute capability {cap}) is in no hardware-matrix row",
                      hint="supported architectures: " + ", ".join(archs()))


def local_gpu() -> Arch | None:
    """The local CUDA device's architecture, or None when there is no usable GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return arch_for_capability(major, minor, torch.cuda.get_device_name(0))


def target_arch(gpu: str | None, detect_local: bool = True) -> Arch | None:
    """--gpu resolved, or the local GPU when it is None (importing torch only then; None without one)."""
    if gpu:
        return resolve_gpu(gpu)
    return local_gpu() if detect_local else None
