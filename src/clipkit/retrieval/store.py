"""An index on disk: a FAISS vector index, an SQLite table of what each vector is, and a manifest.

Layout of INDEX_DIR:

    index.json                 the manifest: model identity, counts, and the two data files below
    vectors.<generation>.faiss row i of the FAISS index is image id i
    metadata.<generation>.sqlite  table `images` (id, uri, path, offset, length, sha256, ...)

Writers never modify committed files. A build or an append writes a new generation under temporary
names, renames the finished files into place, and then replaces `index.json` (an atomic rename), so a
reader sees either the old index or the new one, and an interrupted writer leaves the old one intact.
Leftovers of an interrupted writer are removed by the next writer, which holds a lock on the folder.

A reader holds a shared lock (flock) on its generation's vectors file for as long as it is open, and
writers delete an old generation only when they can lock it exclusively, so a generation's files stay
until its last reader closes. A reader that read `index.json` just before a writer committed and removed
that generation finds its files gone, reads `index.json` again and opens the new generation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipkit.errors import ClipkitError
from clipkit.redaction import redact
from clipkit.retrieval.manifests import read_versioned_json

MANIFEST_NAME = "index.json"
FORMAT_NAME = "clipkit-retrieval-index"
FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")
LOCK_NAME = ".lock"
TEMP_PREFIX = ".tmp-"
_DATA_FILE = re.compile(r"^(vectors\.\d+\.faiss|metadata\.\d+\.sqlite)$")
_GENERATION = re.compile(r"^[a-z]+\.(\d+)\.")  # vectors.7.faiss -> 7
ID_CHUNK = 500  # ids bound per SQL statement: below SQLite's variable limit (999 before 3.32, 32766 since)
MAX_IMAGE_ROOTS = 64  # folders recorded in index.json; more are merged into their parents
MAX_IMAGE_BYTES = 256 * 2**20  # the largest image file a row may name (the server reads it whole)
OPEN_ATTEMPTS = 5  # a reader re-reads index.json this often when writers keep replacing what it names

SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,       -- the image's row in the FAISS index
    uri TEXT NOT NULL,            -- how the collection names it: relative path, SHARD#KEY, table value
    path TEXT NOT NULL,           -- file holding the bytes: the image file, or the tar shard
    offset INTEGER,               -- byte offset of a shard member; NULL for a whole file
    length INTEGER NOT NULL,      -- bytes
    sha256 TEXT NOT NULL UNIQUE,  -- content hash: an image is indexed once
    media_type TEXT NOT NULL,     -- image/png, image/jpeg, ...
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    caption TEXT,
    metadata TEXT NOT NULL        -- JSON object: labels, table columns, KEY.json
);
"""
_COLUMNS = (
    "id",
    "uri",
    "path",
    "offset",
    "length",
    "sha256",
    "media_type",
    "width",
    "height",
    "caption",
    "metadata",
)


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One indexed image: a row of the `images` table."""

    id: int
    uri: str
    path: str
    offset: int | None
    length: int
    sha256: str
    media_type: str
    width: int
    height: int
    caption: str | None
    metadata: dict[str, Any]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ImageRecord:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["metadata"] = json.loads(values["metadata"])
        return cls(**values)

    def to_row(self) -> tuple:
        values = [getattr(self, name) for name in _COLUMNS]
        values[-1] = json.dumps(self.metadata, ensure_ascii=False, default=str)
        return tuple(values)


# ---------------------------------------------------------------------------------------------------------
# Vector indexes


def default_index_params(kind: str, count: int) -> dict[str, Any]:
    """Build and search settings for `kind` at `count` vectors (recorded in the manifest)."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"m": 32, "ef_construction": 64, "ef_search": 128}
    if kind == "ivf":
        # FAISS wants >= 39 training points per list; ~4 sqrt(N) lists is its usual guidance.
        nlist = max(1, min(int(4 * math.sqrt(count)), count // 39))
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 16))}
    raise ClipkitError(f"index kind '{kind}' is not one of {', '.join(INDEX_KINDS)}")


def create_vector_index(kind: str, dim: int, vectors: np.ndarray, params: dict[str, Any]) -> faiss.Index:
    """A FAISS inner-product index over L2-normalised `vectors` (N, D): inner product = cosine similarity."""
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    elif kind == "ivf":
        if len(vectors) < 39:
            raise ClipkitError(
                f"an ivf index needs at least 39 images to train its clusters, got {len(vectors)}; "
                "use --index flat (exact) for a collection this small"
            )
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    elif kind == "ivfpq":
        if len(vectors) < 256:
            raise ClipkitError(
                f"an ivfpq index needs at least 256 images to train its codes, got {len(vectors)}; "
                "use --index auto"
            )
        # OPQ rotates the vectors so that the PQ sub-vectors carry equal information (autofaiss's choice).
        code = params["pq"]
        index = faiss.index_factory(
            dim, f"OPQ{code}_{dim},IVF{params['nlist']},PQ{code}x8", faiss.METRIC_INNER_PRODUCT
        )
        # FAISS's default 50 rotation rounds take minutes on a few cores for little recall; 10 get most of it.
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = 10
        # Polysemous training (for Hamming-distance filtering, which searches here never use) is most of the
        # training time.
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        index.train(vectors)
    else:
        raise ClipkitError(f"index kind '{kind}' is not one of {', '.join(INDEX_KINDS)}")
    if len(vectors):
        index.add(vectors)
    return index


def apply_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    if kind == "hnsw" and "ef_search" in params:
        index.hnsw.efSearch = params["ef_search"]
    elif kind in ("ivf", "ivfpq") and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]  # ivfpq: inside the OPQ pre-transform


def _check_search_params(kind: str, params: dict[str, int]) -> dict[str, int]:
    tunable = {"hnsw": ("ef_search",), "ivf": ("nprobe",), "ivfpq": ("nprobe",)}.get(kind, ())
    for key, value in params.items():
        if key not in tunable:
            settable = f"only {tunable[0]}" if tunable else "nothing"
            raise ClipkitError(
                f"{key} does not apply to a {kind} index ({settable} can be set at search time)"
            )
        if not isinstance(value, int) or value < 1:
            raise ClipkitError(f"{key} must be a positive integer, got {value!r}")
    return dict(params)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    index_dir = Path(index_dir)
    path = index_dir / MANIFEST_NAME
    if not path.is_file():
        if not index_dir.is_dir():
            raise ClipkitError(f"index {index_dir} not found; build one with `clipkit index build`")
        raise ClipkitError(
            f"{index_dir} holds no index ({MANIFEST_NAME} is missing; a build that was interrupted leaves "
            "none); build one with `clipkit index build`"
        )
    manifest = read_versioned_json(
        path, format_name=FORMAT_NAME, version=FORMAT_VERSION, kind="retrieval index", fix="rebuild the index"
    )
    for key in ("vectors_file", "metadata_file"):
        # Names only: a manifest never points outside its folder.
        if not _DATA_FILE.match(str(manifest.get(key, ""))):
            raise ClipkitError(f"{path}: '{key}' is not a data file of this index; rebuild the index")
    return manifest


class RetrievalIndex:
    """A committed index opened for reading: vector search and image records. Safe to share across threads."""

    def __init__(self, index_dir: str | Path, *, search_params: dict[str, int] | None = None):
        """`search_params` overrides the recorded search settings: `ef_search` (hnsw) or `nprobe` (ivf)."""
        self.index_dir = Path(index_dir)
        self.manifest, self._hold = _open_current_generation(self.index_dir)
        try:
            self._open_files(search_params)
        except BaseException:
            if hasattr(self, "_db"):
                self._db.close()
            self._hold.close()
            raise

    def _open_files(self, search_params: dict[str, int] | None) -> None:
        self.kind: str = self.manifest["kind"]
        self.dim: int = int(self.manifest["dim"])
        self.search_overrides = _check_search_params(self.kind, search_params or {})  # what the caller set
        self.params = {**self.manifest.get("params", {}), **self.search_overrides}
        # An index built larger than its memory budget is paged in from disk as searches touch it.
        flags = faiss.IO_FLAG_MMAP if self.params.get("mmap") else 0
        self.vectors = faiss.read_index(str(self.index_dir / self.manifest["vectors_file"]), flags)
        apply_search_params(self.vectors, self.kind, self.params)
        # Committed data files never change, so SQLite may skip locking (immutable=1).
        uri = _sqlite_uri(self.index_dir / self.manifest["metadata_file"], "mode=ro&immutable=1")
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._db_lock = threading.Lock()
        stored = self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        if not self.vectors.ntotal == stored == self.manifest["count"]:
            raise ClipkitError(
                f"{self.index_dir}: {self.vectors.ntotal} vectors, {stored} metadata rows and "
                f"{self.manifest['count']} in {MANIFEST_NAME} disagree; rebuild the index"
            )

    @property
    def count(self) -> int:
        return int(self.vectors.ntotal)

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each (Q, k'), k' = min(k, count); best first. Approximate kinds may return
        id -1 (score -inf) where they found fewer than k'."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {queries.shape}")
        k = min(k, self.count)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self.vectors.search(queries, k)

    def records(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """The records of `ids` that exist (unknown ids are left out)."""
        ids = sorted({int(i) for i in ids if 0 <= int(i) < self.count})
        found = {}
        with self._db_lock:
            for start in range(0, len(ids), ID_CHUNK):
                chunk = ids[start : start + ID_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM images WHERE id IN ({marks})", chunk
                )
                found.update((row[0], ImageRecord.from_row(row)) for row in rows.fetchall())
        return found

    def record(self, image_id: int) -> ImageRecord | None:
        return self.records([image_id]).get(image_id)

    def reconstruct(self, image_id: int) -> np.ndarray:
        """The stored vector of one image (D,)."""
        if self.kind in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(self.vectors).make_direct_map()
        return self.vectors.reconstruct(int(image_id))

    @property
    def generation(self) -> int:
        return int(self.manifest.get("generation", 0))

    @property
    def image_roots(self) -> list[str] | None:
        """The folders holding the indexed images, as recorded when the index was written (None: an index
        written before clipkit recorded them)."""
        roots = self.manifest.get("image_roots")
        if not isinstance(roots, list) or not all(
            isinstance(root, str) and root.startswith("/") for root in roots
        ):
            return None
        return roots

    def close(self) -> None:
        self._db.close()
        self._hold.close()  # releases the shared lock: writers may now remove this generation


def _open_current_generation(index_dir: Path):
    """(manifest, held vectors file) of the generation `index.json` names, share-locked so no writer deletes it."""
    for _ in range(OPEN_ATTEMPTS):
        manifest = read_manifest(index_dir)
        path = index_dir / manifest["vectors_file"]
        try:
            return manifest, _hold_file(path)
        except FileNotFoundError:
            if read_manifest(index_dir).get("generation") == manifest.get("generation"):
                raise ClipkitError(
                    f"{path} is missing, though {MANIFEST_NAME} names it; rebuild the index"
                ) from None
            # A writer committed a new generation and removed this one meanwhile: read index.json again.
    raise ClipkitError(
        f"{index_dir} changed {OPEN_ATTEMPTS} times while it was being opened; try again when its writers are done"
    )


def _hold_file(path: Path):
    """`path` opened with a shared flock; FileNotFoundError when a writer removed it before the lock was taken."""
    handle = open(path, "rb")  # noqa: SIM115 (held until the reader closes)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
        if os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:  # removed, and a new file took the name
            raise FileNotFoundError(path)
    except BaseException:
        handle.close()
        raise
    return handle


class ImageUnavailable(Exception):
    """An index row whose bytes are not served; the message says why (for the server's log)."""


def read_record_bytes(
    record: ImageRecord, roots: Sequence[str], *, max_bytes: int = MAX_IMAGE_BYTES
) -> bytes:
    """The bytes of an index row, read only from a regular file under one of `roots` and at most `max_bytes`.

    An index is not trusted: its rows could name /dev/zero, a FIFO, or a file outside the collection.
    Raises ImageUnavailable."""
    if not 0 < record.length <= max_bytes or (record.offset is not None and record.offset < 0):
        raise ImageUnavailable(
            f"row {record.id}: {record.length} bytes at offset {record.offset} is out of range"
        )
    real = os.path.realpath(record.path)
    if not any(_is_within(real, os.path.realpath(root)) for root in roots):
        raise ImageUnavailable(
            f"row {record.id}: {record.path} is outside the index's image folders {list(roots)}"
        )
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the path was resolved above.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageUnavailable(f"row {record.id}: cannot open {record.path} ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageUnavailable(f"row {record.id}: {record.path} is not a regular file")
        offset = record.offset or 0
        if record.offset is None and info.st_size != record.length or offset + record.length > info.st_size:
            raise ImageUnavailable(f"row {record.id}: {record.path} is not the size it was when indexed")
        data = os.pread(fd, record.length, offset)
    finally:
        os.close(fd)
    if len(data) != record.length:
        raise ImageUnavailable(f"row {record.id}: {record.path} is shorter than when it was indexed")
    return data


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _sqlite_uri(path: Path, query: str) -> str:
    """A read URI for SQLite; as_uri() percent-encodes the path, so a '#' or '?' in it stays part of the name."""
    return f"{path.resolve().as_uri()}?{query}"


def _image_roots(metadata_path: Path) -> list[str]:
    """The fewest folders (at most MAX_IMAGE_ROOTS) that hold every file the metadata's rows name."""
    db = sqlite3.connect(_sqlite_uri(metadata_path, "mode=ro"), uri=True)
    try:
        folders = {
            os.path.dirname(os.path.realpath(path))
            for (path,) in db.execute("SELECT DISTINCT path FROM images")
        }
    finally:
        db.close()
    roots = _outermost(folders)
    while len(roots) > MAX_IMAGE_ROOTS:  # a table naming files all over: widen to parents
        roots = _outermost({os.path.dirname(root) for root in roots})
    return roots


def _outermost(folders: set[str]) -> list[str]:
    """`folders` without those inside another of them, sorted."""
    kept: list[str] = []
    for folder in sorted(folders, key=lambda f: f.split("/")):  # by component: /a/c before /a-b
        if not kept or not _is_within(folder, kept[-1]):
            kept.append(folder)
    return kept


# ---------------------------------------------------------------------------------------------------------
# Writing


class IndexTransaction:
    """One writer's change to INDEX_DIR: stage a new generation, then `commit` it atomically.

    Holds an exclusive lock on the folder from construction to `close`, so two writers never interleave;
    removes what an interrupted writer left behind.
    """

    def __init__(self, index_dir: str | Path):
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.index_dir / LOCK_NAME, "a+b")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ClipkitError(
                f"another clipkit process is writing {self.index_dir}; wait for it to finish"
            ) from None
        token = secrets.token_hex(4)
        self.staged_vectors = self.index_dir / f"{TEMP_PREFIX}{token}.faiss"
        self.staged_metadata = self.index_dir / f"{TEMP_PREFIX}{token}.sqlite"
        self._staged_manifest = self.index_dir / f"{TEMP_PREFIX}{token}.json"
        self.previous = read_manifest(self.index_dir) if (self.index_dir / MANIFEST_NAME).is_file() else None
        self.remove_leftovers()

    def remove_leftovers(self) -> None:
        """Temporary files, and data files the manifest does not name (a writer stopped before its commit)."""
        keep = set()
        if self.previous is not None:
            keep = {self.previous["vectors_file"], self.previous["metadata_file"]}
        old_generations: dict[str, list[Path]] = {}
        for path in self.index_dir.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                path.unlink(missing_ok=True)
            elif _DATA_FILE.match(path.name) and path.name not in keep:
                old_generations.setdefault(_GENERATION.match(path.name).group(1), []).append(path)
        for generation, paths in old_generations.items():
            _remove_unread_generation(self.index_dir / f"vectors.{generation}.faiss", paths)

    def open_staged_metadata(self, *, fresh: bool) -> sqlite3.Connection:
        """A writable copy of the committed metadata (or, `fresh`, an empty table) under a temporary name."""
        db = sqlite3.connect(self.staged_metadata)
        if self.previous is not None and not fresh:
            committed = sqlite3.connect(
                _sqlite_uri(self.index_dir / self.previous["metadata_file"], "mode=ro"), uri=True
            )
            try:
                committed.backup(db)
            finally:
                committed.close()
        else:
            db.executescript(SCHEMA)
        # A staged file is discarded if anything fails, so it needs no journal.
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        return db

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Rename the staged files to the next generation and point `index.json` at them."""
        generation = (self.previous or {}).get("generation", 0) + 1
        vectors_file, metadata_file = f"vectors.{generation}.faiss", f"metadata.{generation}.sqlite"
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            **manifest,
            "image_roots": _image_roots(self.staged_metadata),
            "generation": generation,
            "vectors_file": vectors_file,
            "metadata_file": metadata_file,
        }
        for staged in (self.staged_vectors, self.staged_metadata):
            _fsync_file(staged)
        os.replace(self.staged_vectors, self.index_dir / vectors_file)
        os.replace(self.staged_metadata, self.index_dir / metadata_file)
        self._staged_manifest.write_text(json.dumps(redact(manifest), indent=2) + "\n", encoding="utf-8")
        _fsync_file(self._staged_manifest)
        os.replace(self._staged_manifest, self.index_dir / MANIFEST_NAME)  # the commit point
        _fsync_dir(self.index_dir)
        self.previous = manifest
        self.remove_leftovers()  # the old generation
        return manifest

    def close(self) -> None:
        for path in (self.staged_vectors, self.staged_metadata, self._staged_manifest):
            path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.staged_metadata.with_name(self.staged_metadata.name + "-journal").unlink()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def __enter__(self) -> IndexTransaction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def is_index_dir(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def writer_files(path: Path) -> Iterator[Path]:
    """Files in `path` that a clipkit index writer made (so an interrupted build's folder counts as empty)."""
    for child in path.iterdir():
        if child.name in (MANIFEST_NAME, LOCK_NAME) or child.name.startswith(TEMP_PREFIX):
            yield child
        elif _DATA_FILE.match(child.name):
            yield child


def _remove_unread_generation(vectors_path: Path, paths: list[Path]) -> None:
    """Delete one old generation's files unless a reader holds it (its shared lock on the vectors file)."""
    try:
        handle = open(vectors_path, "rb")  # noqa: SIM115
    except FileNotFoundError:  # an interrupted removal: no reader can hold a generation without its vectors
        for path in paths:
            path.unlink(missing_ok=True)
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # still read; the next writer tries again
        for path in sorted(paths, key=lambda p: p == vectors_path):  # the vectors file, the lock holder, last
            path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
