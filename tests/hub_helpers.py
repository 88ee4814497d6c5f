"""A Hugging Face hub cache laid out on disk, as `hf download` leaves it, for tests that must run offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub.constants

REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds


def hub_cache_dir(hf_home: Path) -> Path:
    return hf_home / "hub"


def put_in_hub_cache(
    hf_home: Path, repo_id: str, files: dict[str, Path], *, revision: str = REVISION
) -> Path:
    """HF_HOME/hub/models--ORG--NAME/{blobs/SHA, snapshots/REV/NAME -> blob, refs/main}; returns the snapshot."""
    repo = hub_cache_dir(hf_home) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def use_hub_cache(monkeypatch, hf_home: Path) -> None:
    """Point this process (and its children) at `hf_home`, offline."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the cache location once at import; hf_hub_download looks it up per call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache_dir(hf_home)))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
