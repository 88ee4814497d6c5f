"""Write a model in open_clip's local-dir layout, so `local-dir:DIR` loads it anywhere open_clip runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch

from clipkit.files import check_output_dir
from clipkit.models.factory import OPEN_CLIP_CONFIG_NAME, ModelBundle

WEIGHTS_NAME = "open_clip_model.safetensors"


def export_model(
    bundle: ModelBundle,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `open_clip_config.json` + `open_clip_model.safetensors` (+ HF tokenizer files) to `out_dir`.

    The files are written into a temporary sibling directory that is renamed to `out_dir` when complete,
    so an interrupted export never leaves a half-written model behind. `state_dict` replaces the
    bundle's model weights (e.g. gathered from a sharded model); its names must be the model's own.
    """
    out_dir = Path(out_dir)
    # Weights given in memory (a training run's) no longer need the files the bundle was read from.
    check_export_target(
        out_dir, overwrite=overwrite, sources=local_sources(bundle) if state_dict is None else ()
    )
    with staged_directory(out_dir) as staging:
        # .contiguous(): safetensors stores dense buffers; views (e.g. from transposes) must be copied.
        if state_dict is None:
            state_dict = bundle.model.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        safetensors.torch.save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        preprocess_cfg = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in bundle.preprocess_cfg.items()
        }
        config = {"model_cfg": bundle.model_cfg, "preprocess_cfg": preprocess_cfg}
        (staging / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if hasattr(bundle.tokenizer, "save_pretrained"):  # HF tokenizers travel with the model
            bundle.tokenizer.save_pretrained(str(staging))
    return out_dir


def check_export_target(out_dir: Path, *, overwrite: bool, sources: tuple[str | Path, ...] = ()) -> None:
    """`out_dir` may receive an export: absent, empty, or (overwrite) an earlier export, and holding no source."""
    check_output_dir(
        out_dir, overwrite=overwrite, written_by_clipkit=is_export_dir, kind="model export", sources=sources
    )


# What clipkit's exports hold: open_clip's layout, or a transformers model (both flat directories).
_EXPORT_MANIFESTS = (
    (OPEN_CLIP_CONFIG_NAME, WEIGHTS_NAME),
    ("config.json", "model.safetensors", "preprocessor_config.json"),
)


def is_export_dir(directory: Path) -> bool:
    """A directory `export_model` or `export_transformers` wrote: its manifest files present, no sub-directories
    (a run, a project or a checkpoint holding an export is never one)."""
    entries = list(directory.iterdir())
    names = {p.name for p in entries}
    return all(p.is_file() and not p.is_symlink() for p in entries) and any(
        set(manifest) <= names for manifest in _EXPORT_MANIFESTS
    )


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir` to write into: when the block completes it becomes `out_dir` (with
    the permissions a plain mkdir would give), when it fails it is removed. An interrupted export never
    leaves a half-written model behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield staging
        _apply_umask(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def local_sources(bundle: ModelBundle) -> tuple[Path, ...]:
    """The files the bundle's weights were read from, when local: an export must not replace them."""
    source = Path(bundle.weights_source) if bundle.weights_source else None
    return (source,) if source is not None and source.exists() else ()


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes 0700 directories; give the result the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing `target` is moved aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
