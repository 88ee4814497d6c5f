"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from clipkit.errors import ClipkitError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary sibling of `path` (not yet created) to write; renamed over `path` when the block completes, and
    removed if it fails, so `path` is always either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named, not created: the writer creates it with the usual permissions (mkstemp's would be 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` written through `atomic_path`, flushed to disk before the rename."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_output_dir(
    out: str | Path,
    *,
    overwrite: bool,
    written_by_clipkit: Callable[[Path], bool],
    kind: str,
    sources: Iterable[str | Path] = (),
) -> None:
    """`out` may be (re)written: it is absent or empty, or `overwrite` is set and `written_by_clipkit(out)`
    recognises it as a `kind` clipkit wrote (its manifest present). Never a directory holding a source, so
    replacing `out` cannot delete what is being read (`--out` equal to or above the input)."""
    out = Path(out)
    resolved = out.resolve()
    for source in sources:
        source_path = Path(source).expanduser()
        if source_path.exists() and (resolved == (r := source_path.resolve()) or resolved in r.parents):
            raise ClipkitError(f"--out {out} holds the source {source}; choose an --out outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise ClipkitError(f"--out {out} is a file, not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ClipkitError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if not written_by_clipkit(out):
        raise ClipkitError(
            f"{out} is not a {kind} clipkit wrote (its files are not all clipkit's); --overwrite replaces "
            "only those: choose another --out, or empty the directory yourself"
        )
