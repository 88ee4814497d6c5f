"""Before training: build generated datasets that are missing, and check every shard spec."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from clipkit.data.config import DataConfig, split_sources
from clipkit.data.shards import is_local, local_path, resolve_sources
from clipkit.data.writer import CLASSNAMES_FILE, INFO_FILE
from clipkit.errors import ClipkitError

log = logging.getLogger(__name__)


def generators() -> dict[str, Callable[..., dict[str, int]]]:
    """The datasets clipkit can generate, by name: writer(out_dir, **options)."""
    from clipkit.data.digits import write_digits_dataset
    from clipkit.data.synthetic import write_synthetic_dataset

    return {"synthetic": write_synthetic_dataset, "digits": write_digits_dataset}


def prepare_data(cfg: DataConfig) -> DataConfig:
    """The config with generated datasets in place and concrete shard lists (`train_sources`, `val_sources`).

    Idempotent and safe to call from every process: a generated dataset is built once, under a lock, in
    a temporary directory renamed into place when complete; the others wait for it and then find it.
    The usual pattern is the main process first, then the others after a barrier. Raises ClipkitError,
    naming the spec, when a shard spec matches no file.
    """
    cfg = dataclasses.replace(cfg)
    if cfg.generate is not None:
        ensure_generated(cfg.generate)
    if cfg.train_shards:
        sources = resolve_sources(split_sources(cfg.train_shards), what="data.train_shards")
        if cfg.weights is not None:
            if len(cfg.weights) != len(sources):
                raise ClipkitError(
                    f"data.weights has {len(cfg.weights)} entries but data.train_shards has {len(sources)} "
                    "sources (joined with '::'); give one weight per source (an unquoted brace range "
                    "that the shell expanded arrives as one source per shard: quote it)"
                )
        elif len(sources) > 1:
            # Without weights the sources are one dataset: one pass sees each of their samples once.
            sources = [[url for source in sources for url in source]]
        cfg.train_sources = sources
    if cfg.val_shards:
        cfg.val_sources = resolve_sources(split_sources(cfg.val_shards), what="data.val_shards")
    if cfg.zeroshot_dataset:
        cfg.zeroshot_dataset = str(check_zeroshot_dataset(cfg.zeroshot_dataset))
    return cfg


def check_zeroshot_dataset(directory: str) -> Path | str:
    if not is_local(directory):
        return directory
    path = local_path(directory)
    for required in (path / "test" / "nshards.txt", path / CLASSNAMES_FILE):
        if not required.is_file():
            raise ClipkitError(
                f"data.zeroshot_dataset '{directory}' is not a zero-shot dataset: {required} is missing "
                "(write one with `clipkit shards CLASS_FOLDER --out DIR`, or set zeroshot_dataset: null)"
            )
    return path


def ensure_generated(generate: Mapping[str, Any]) -> Path:
    """Build the generated dataset `generate` describes ({name, dir, ...options}) unless already there."""
    options = {k: v for k, v in generate.items() if k not in ("name", "dir")}
    name, target = generate["name"], local_path(str(generate["dir"]))
    writers = generators()
    if name not in writers:
        raise ClipkitError(
            f"data.generate.name '{name}' is not a generated dataset; choose one of {sorted(writers)}"
        )
    recorded = {"name": name, "options": json.loads(json.dumps(options))}
    defaults = _option_defaults(writers[name])
    if _generated_matches(target, recorded, defaults):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(f".{target.name}.lock")):
        if _generated_matches(target, recorded, defaults):  # another process built it while this one waited
            return target
        log.info("generating the %s dataset into %s (once; later runs reuse it)", name, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            try:
                writers[name](staging, **options)
            except TypeError as e:
                raise ClipkitError(
                    f"data.generate: options {sorted(options)} do not fit '{name}' ({e})"
                ) from None
            info_path = staging / "train" / INFO_FILE
            info = json.loads(info_path.read_text(encoding="utf-8"))
            info["generator"] = recorded
            info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _option_defaults(writer: Callable[..., Any]) -> dict[str, Any]:
    """The writer's keyword options and their defaults: an option left out means its default."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(writer).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def _same_dataset(found: Any, recorded: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether a recorded generator equals the wanted one, options compared with the writer's defaults filled
    in: a dataset written before an option existed (or by a caller that left it at its default) matches."""
    if not isinstance(found, dict) or found.get("name") != recorded["name"]:
        return False
    found_options = found.get("options")
    if not isinstance(found_options, dict):
        return False
    full = json.loads(json.dumps(defaults, default=str))
    return {**full, **found_options} == {**full, **recorded["options"]}


def _generated_matches(target: Path, recorded: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """True if `target` holds the dataset `recorded` describes; an error if it holds something else."""
    if not target.exists():
        return False
    info_path = target / "train" / INFO_FILE
    try:
        generator = json.loads(info_path.read_text(encoding="utf-8")).get("generator")
    except (OSError, json.JSONDecodeError):
        generator = None
    if not _same_dataset(generator, recorded, defaults):
        raise ClipkitError(
            f"{target} exists but does not hold the generated dataset {recorded} (found {generator}); "
            "delete it or point data.generate.dir elsewhere"
        )
    return True


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """A lock file other processes (on this machine or a shared filesystem with flock) wait on."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one process at a time is the caller's job
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
