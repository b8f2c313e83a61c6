"""Open a checkpoint on the Hugging Face hub by its id, fetching JSON files and safetensors headers only.

Contract: `open_hub(repo_id, strict)` returns the same CheckpointFiles as a local folder. A
complete copy in the local hub cache is used as is (no network). Otherwise the JSON files are
downloaded (cached) and each shard's header is read with HTTP range requests (the first 100 kB,
then the rest of the header if longer); no tensor data is transferred. Every network call has a
short timeout (QTOOL_HUB_TIMEOUT seconds, default 8), so an offline machine fails fast with one
line (Failure); an unknown or gated repository is a Failure naming it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from qtool.checkpoint import files as F
from qtool.errors import Failure

FIRST_RANGE = 100_000


def _timeout() -> float:
    try:
        return float(os.environ.get("QTOOL_HUB_TIMEOUT", "8"))
    except ValueError:
        return 8.0


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local cache snapshot when it holds config.json and every safetensors shard."""
    from huggingface_hub import snapshot_download
    try:
        snap = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and friends)
        return None
    if not (snap / "config.json").exists():
        return None
    index = snap / F.INDEX_NAME
    if index.exists():
        try:
            names = set(F.read_json(index)["weight_map"].values())
        except Exception:  # noqa: BLE001
            return None
    else:
        names = {p.name for p in snap.glob("*.safetensors")}
    return snap if names and all((snap / n).exists() for n in names) else None


def _offline(repo_id: str, exc: Exception) -> Failure:
    why = type(exc).__name__
    return Failure(f"cannot reach the Hugging Face hub to inspect {repo_id} ({why}) and it is not in the local cache",
                   hint="connect to the network, or download it first (huggingface-cli download) and pass the folder")


def _fetch_header(repo_id: str, filename: str, timeout: float) -> tuple[bytes, int]:
    """(header JSON bytes, file size) of one remote safetensors file via range requests."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(repo_id, filename)
    headers = build_hf_headers()
    r = get_session().get(url, headers={**headers, "range": f"bytes=0-{FIRST_RANGE - 1}"}, timeout=timeout,
                          follow_redirects=True)
    hf_raise_for_status(r)
    body = r.content
    m = re.search(r"/(\d+)$", r.headers.get("content-range", ""))
    size = int(m.group(1)) if m else len(body)
    path = Path(filename)
    n = F.header_length(body[:8], path, size)
    if 8 + n <= len(body):
        return body[8:8 + n], size
    r = get_session().get(url, headers={**headers, "range": f"bytes=8-{n + 7}"}, timeout=timeout,
                          follow_redirects=True)
    hf_raise_for_status(r)
    return r.content, size


def open_hub(repo_id: str, strict: bool = True) -> F.CheckpointFiles:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(_timeout())))      # read when huggingface_hub loads
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(_timeout())))
    snap = _cached_snapshot(repo_id)
    if snap is not None:
        return F.open_local(snap, repo_id, strict)
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    timeout = _timeout()
    try:
        info = HfApi().model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        raise Failure(f"hub repository {repo_id} is gated", hint="accept its licence on huggingface.co and log in "
                      "(huggingface-cli login)")
    except RepositoryNotFoundError:
        raise Failure(f"no local folder and no hub repository named {repo_id}",
                      hint="check the spelling, or log in if it is private")
    except Exception as exc:  # noqa: BLE001 - any network failure: offline
        raise _offline(repo_id, exc)
    listing = sorted(s.rfilename for s in (info.siblings or []) if "/" not in s.rfilename)
    root: Path | None = None
    jsons: dict[str, dict | None] = {}
    try:
        for name in F.JSON_NAMES:
            if name in listing:
                local = Path(hf_hub_download(repo_id, name, etag_timeout=timeout))
                root = local.parent
                jsons[name] = F.read_json(local)
            else:
                jsons[name] = None
    except Failure:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _offline(repo_id, exc)
    if jsons.get("config.json") is None:
        raise F.CheckpointError(f"hub repository {repo_id} has no config.json")
    names, _ = F.shard_names(root, jsons.get(F.INDEX_NAME), listing)
    fetched: dict[str, tuple[bytes, int]] = {}
    try:
        for name in names:
            if name in listing:
                fetched[name] = _fetch_header(repo_id, name, timeout)
    except Failure:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _offline(repo_id, exc)

    def reader(name: str, problems):
        raw, size = fetched[name]
        return F.parse_header(raw, root / name, size, problems)

    return F.assemble(root, repo_id, jsons, listing, {n: s for n, (_, s) in fetched.items()}, strict, True, reader)
