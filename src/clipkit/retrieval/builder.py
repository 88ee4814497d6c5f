"""Build an index from a collection, append to one, and open one with the model that built it."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipkit.errors import ClipkitError
from clipkit.models import ModelBundle, build_model, warn_if_random_weights
from clipkit.models.sources import LOCAL_DIR_PREFIX
from clipkit.retrieval.embed import embed_items
from clipkit.retrieval.encoder import Encoder, model_fingerprint
from clipkit.retrieval.index_choice import (
    DEFAULT_MAX_MEMORY,
    caption_queries,
    choose_index,
    params_for,
    parse_memory,
    tune_search,
)
from clipkit.retrieval.parts import (
    JOB_NAME,
    foreign_parts,
    read_foreign_part,
    read_job,
    row_location,
    row_uri,
)
from clipkit.retrieval.sources import ImageItem, list_images, warn_damaged_shards
from clipkit.retrieval.store import (
    INDEX_KINDS,
    ImageRecord,
    IndexTransaction,
    RetrievalIndex,
    create_vector_index,
    is_index_dir,
    read_manifest,
    writer_files,
)

log = logging.getLogger(__name__)

ModelSpec = str | Path | ModelBundle
MAX_CAPTIONS_KEPT = 100_000  # distinct captions an index build keeps for its tuning queries


@dataclass(kw_only=True)
class IndexReport:
    """What a build or an append did."""

    index_dir: Path
    count: int  # images in the index now
    added: int
    duplicates: int  # images skipped because their content was already indexed
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason): damaged shards, bad images


def load_encoder(
    model: ModelSpec, *, pretrained: str | Path | None = None, device: str = "cpu", precision: str = "fp32"
) -> tuple[Encoder, dict[str, Any]]:
    """The encoder for `model` and its identity as an index records it (source, name, fingerprint, dim)."""
    bundle = (
        model if isinstance(model, ModelBundle) else build_model(model, pretrained=pretrained, device=device)
    )
    warn_if_random_weights(bundle)
    identity = {
        # Where `clipkit serve` finds the model again when no --model is given (None: a bundle in memory).
        "source": None if isinstance(model, ModelBundle) else _absolute_if_path(str(model)),
        "pretrained": None if pretrained is None else _absolute_if_path(str(pretrained)),
        "name": bundle.name,
        "fingerprint": model_fingerprint(bundle),
        "embed_dim": int(bundle.model_cfg["embed_dim"]),
    }
    return Encoder(bundle, device=device, precision=precision), identity


def build_index(
    source: str | Path,
    out_dir: str | Path,
    *,
    model: ModelSpec,
    pretrained: str | Path | None = None,
    kind: str = "auto",
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    target_recall: float = 0.95,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    image_column: str = "image",
    caption_column: str = "caption",
    overwrite: bool = False,
    progress: bool = False,
) -> IndexReport:
    """Embed every image `source` names and write an index to `out_dir` (see `clipkit.retrieval.store`).

    `kind` is "auto" (chosen for the collection's size and `max_memory`, see `clipkit.retrieval.index_choice`),
    "flat" (exact inner product), "hnsw", "ivf" or "ivfpq" (approximate, for large collections); the search
    setting of an approximate index is tuned to `target_recall` recall@10. Images with the same content are
    indexed once.
    """
    _check_index_options(kind, target_recall)
    out_dir = Path(out_dir)
    _check_build_target(out_dir, overwrite=overwrite)
    listing = list_images(source, image_column=image_column, caption_column=caption_column)
    warn_damaged_shards(listing)
    items = listing.items
    encoder, identity = load_encoder(model, pretrained=pretrained, device=device, precision=precision)
    with IndexTransaction(out_dir) as transaction:
        db = transaction.open_staged_metadata(fresh=True)
        try:
            vectors, report = _ingest(db, items, encoder, start_id=0, batch_size=batch_size, workers=workers,
                                      progress=progress)  # fmt: skip
        finally:
            db.close()
        report.skipped[:0] = listing.skipped
        if report.added == 0:
            raise ClipkitError(f"none of the {len(items)} image(s) in {source} could be read and decoded")
        chosen = write_vector_index(
            transaction, vectors, kind=kind, max_memory=max_memory, target_recall=target_recall,
            text_queries=lambda: caption_queries(encoder, [item.caption for item in items]),
        )  # fmt: skip
        now = _now()
        transaction.commit(
            {
                **chosen,
                "dim": encoder.embed_dim,
                "count": report.added,
                "model": identity,
                "created_at": now,
                "updated_at": now,
                "sources": [_source_entry(source, report, now)],
            }
        )
    report.index_dir, report.count = out_dir, report.added
    return report


def add_to_index(
    index_dir: str | Path,
    source: str | Path,
    *,
    model: ModelSpec | None = None,
    pretrained: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    image_column: str = "image",
    caption_column: str = "caption",
    progress: bool = False,
) -> IndexReport:
    """Append the images of `source` that the index does not hold yet (by content hash).

    `model` defaults to the one the index records; any model given must be that same model.
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    listing = list_images(source, image_column=image_column, caption_column=caption_column)
    warn_damaged_shards(listing)
    items = listing.items
    encoder, identity = load_index_model(
        manifest, index_dir, model=model, pretrained=pretrained, device=device, precision=precision
    )
    with IndexTransaction(index_dir) as transaction:
        manifest = transaction.previous  # re-read under the lock
        db = transaction.open_staged_metadata(fresh=False)
        try:
            vectors, report = _ingest(db, items, encoder, start_id=manifest["count"], batch_size=batch_size,
                                      workers=workers, progress=progress)  # fmt: skip
        finally:
            db.close()
        report.skipped[:0] = listing.skipped
        report.index_dir, report.count = index_dir, manifest["count"] + report.added
        if report.added == 0:
            return report  # nothing new: the committed index stays as it is
        vector_index = faiss.read_index(str(index_dir / manifest["vectors_file"]))
        retrained = _outgrown_clusters(manifest, report.count)
        if retrained:
            retrained_entries = _retrain(transaction, vector_index, vectors, manifest,
                                         lambda: caption_queries(encoder, [item.caption for item in items]))  # fmt: skip
            manifest = {**manifest, **retrained_entries}
        else:
            vector_index.add(vectors)
            faiss.write_index(vector_index, str(transaction.staged_vectors))
        now = _now()
        transaction.commit(
            {
                **{
                    k: v
                    for k, v in manifest.items()
                    if k not in ("generation", "vectors_file", "metadata_file")
                },
                "count": report.count,
                "updated_at": now,
                "sources": [*manifest.get("sources", []), _source_entry(source, report, now)],
            }
        )
    return report


def build_index_from_embeddings(
    embeddings_dir: str | Path,
    out_dir: str | Path,
    *,
    model: ModelSpec | None = None,
    pretrained: str | Path | None = None,
    kind: str = "auto",
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    target_recall: float = 0.95,
    overwrite: bool = False,
) -> IndexReport:
    """An index of the embeddings in `embeddings_dir`, without embedding anything again: the parts `clipkit
    embed` wrote (either layout version), or what `clip-retrieval inference` wrote (no embeddings.json).

    The index records the model the embeddings name; `model`, if given, must be that model (it is loaded
    only to check its fingerprint). clip-retrieval's output names no model: `model` is required, and its
    dimension must be the embeddings'. Images with the same content are indexed once.
    """
    _check_index_options(kind, target_recall)
    embeddings_dir, out_dir = Path(embeddings_dir), Path(out_dir)
    if not (embeddings_dir / JOB_NAME).is_file() and (embeddings_dir / "img_emb").is_dir():
        return _build_from_clip_retrieval(embeddings_dir, out_dir, model=model, pretrained=pretrained, kind=kind,
                                          max_memory=max_memory, target_recall=target_recall, overwrite=overwrite)  # fmt: skip
    job = read_job(embeddings_dir)
    if not job.complete:
        raise ClipkitError(
            f"{embeddings_dir} is an unfinished `clipkit embed` job; rerun the same command to finish it first"
        )
    identity = job.manifest["model"]
    encoder = None  # the recorded model is loaded only if the index is tuned (text queries)
    if model is not None:
        encoder, _ = load_index_model({"model": identity}, embeddings_dir, model=model,
                                      pretrained=pretrained, device="cpu", precision="fp32")  # fmt: skip
    _check_build_target(out_dir, overwrite=overwrite)
    parts = ((vectors, [_record_fields(row) for row in rows]) for vectors, rows, _ in job.iter_parts())
    return _index_parts(
        parts, embeddings_dir, out_dir, identity=identity, dim=int(job.manifest["dim"]),
        encoder=lambda: encoder or _recorded_encoder(identity, embeddings_dir), source=job.manifest["source"],
        skipped=[tuple(entry) for entry in job.manifest.get("skipped", [])], kind=kind, max_memory=max_memory,
        target_recall=target_recall,
    )  # fmt: skip


def _build_from_clip_retrieval(
    embeddings_dir: Path, out_dir: Path, *, model: ModelSpec | None, pretrained, kind, max_memory, target_recall,
    overwrite: bool,
) -> IndexReport:  # fmt: skip
    """`build_index_from_embeddings` of a folder `clip-retrieval inference` wrote."""
    if model is None:
        raise ClipkitError(
            f"{embeddings_dir} has no {JOB_NAME} (clip-retrieval inference output does not say which model made "
            "it): name that model with --model"
        )
    pairs = foreign_parts(embeddings_dir)
    encoder, identity = load_encoder(model, pretrained=pretrained)
    _check_build_target(out_dir, overwrite=overwrite)

    def parts():
        for npy, parquet in pairs:
            vectors, rows = read_foreign_part(npy, parquet, encoder.embed_dim)
            yield (
                vectors,
                [
                    _foreign_record_fields(row, vectors[i], f"{parquet.name}#{i}")
                    for i, row in enumerate(rows)
                ],
            )

    return _index_parts(
        parts(), embeddings_dir, out_dir, identity=identity, dim=encoder.embed_dim, encoder=lambda: encoder,
        source=str(embeddings_dir.resolve()), skipped=[], kind=kind, max_memory=max_memory,
        target_recall=target_recall,
    )  # fmt: skip


def _index_parts(
    parts, embeddings_dir: Path, out_dir: Path, *, identity: dict[str, Any], dim: int,
    encoder: Callable[[], Encoder | None], source: str, skipped: list, kind: str, max_memory, target_recall: float,
) -> IndexReport:  # fmt: skip
    """Write an index of `parts`: (vectors (n, D), n `ImageRecord` fields without the id) per part."""
    report = IndexReport(index_dir=out_dir, count=0, added=0, duplicates=0, skipped=skipped)
    captions: set[str] = set()  # distinct, for the tuning queries (bounded: a sample is enough)

    def text_queries() -> np.ndarray | None:
        found = encoder()
        return None if found is None else caption_queries(found, captions)

    with IndexTransaction(out_dir) as transaction:
        db = transaction.open_staged_metadata(fresh=True)
        vectors = []
        try:
            known: set[str] = set()
            for part_vectors, fields in parts:
                keep, records = [], []
                for i, row in enumerate(fields):
                    if row["sha256"] in known:
                        report.duplicates += 1
                        continue
                    known.add(row["sha256"])
                    if len(captions) < MAX_CAPTIONS_KEPT and row.get("caption"):
                        captions.add(row["caption"])
                    records.append(ImageRecord(id=report.added + len(records), **row).to_row())
                    keep.append(i)
                db.executemany(f"INSERT INTO images VALUES ({','.join('?' * 11)})", records)
                vectors.append(np.ascontiguousarray(part_vectors[keep], dtype=np.float32))  # (n, D)
                report.added += len(records)
            db.commit()
        finally:
            db.close()
        if report.added == 0:
            raise ClipkitError(f"{embeddings_dir} holds no embeddings (every image was skipped)")
        stacked = np.concatenate(vectors)  # (N, D)
        del vectors
        chosen = write_vector_index(
            transaction, stacked, kind=kind, max_memory=max_memory, target_recall=target_recall,
            text_queries=text_queries,
        )  # fmt: skip
        now = _now()
        transaction.commit(
            {
                **chosen,
                "dim": dim,
                "count": report.added,
                "model": identity,
                "created_at": now,
                "updated_at": now,
                "sources": [
                    {**_source_entry(source, report, now), "embeddings": str(embeddings_dir.resolve())}
                ],
            }
        )
    report.count = report.added
    return report


def write_vector_index(
    transaction: IndexTransaction,
    vectors: np.ndarray,
    *,
    kind: str,
    max_memory: str | int,
    target_recall: float,
    text_queries: Callable[[], np.ndarray | None] | None = None,
) -> dict[str, Any]:
    """Choose, build, tune and stage the FAISS index of `vectors` (N, D); the manifest entries that describe it:
    kind, params (build settings and the tuned efSearch / nprobe) and tuning (measured recall and latency).
    `text_queries()` gives the tuning's text queries (M, D), the collection's captions encoded by its model
    (`caption_queries`), or None; it is called only for an index that has a search setting to tune."""
    count, dim = vectors.shape
    budget = parse_memory(max_memory)
    if kind == "auto":
        choice = choose_index(count, dim, max_memory=budget)
        kind, params = choice.kind, dict(choice.params)
        log.info("index: %s %s for %d vectors of %d within %s (about %.1f MB)", kind, params, count, dim,
                 max_memory, choice.estimated_bytes / 1e6)  # fmt: skip
    else:
        params = params_for(kind, count, dim)
    started = time.perf_counter()
    index = create_vector_index(kind, dim, vectors, params)
    build_seconds = time.perf_counter() - started
    queries = text_queries() if text_queries is not None and kind != "flat" else None
    searched, tuning = tune_search(index, kind, vectors, target_recall=target_recall, text_queries=queries)
    params.update(searched)
    tuning["build_seconds"] = round(build_seconds, 2)
    faiss.write_index(index, str(transaction.staged_vectors))
    tuning["index_bytes"] = transaction.staged_vectors.stat().st_size
    return {"kind": kind, "params": params, "tuning": tuning}


def _outgrown_clusters(manifest: dict[str, Any], new_count: int) -> bool:
    """An IVF index's clusters were sized for the count it was trained on (about 4 sqrt(N)); once the
    collection is 4 times that, twice as many clusters are due and each list is 4 times as long."""
    if manifest["kind"] not in ("ivf", "ivfpq"):
        return False
    trained_on = manifest["params"].get("trained_on", manifest["count"])
    return new_count >= 4 * trained_on


def _retrain(
    transaction: IndexTransaction,
    vector_index: faiss.Index,
    new_vectors: np.ndarray,
    manifest: dict[str, Any],
    text_queries: Callable[[], np.ndarray | None],
) -> dict[str, Any]:
    """Rebuild an outgrown IVF index with clusters for its new size, from its stored vectors and `new_vectors`."""
    if manifest["kind"] == "ivfpq":
        # Its stored codes are lossy: retraining from them would compound the loss.
        log.warning(
            "%s has grown to 4x the collection its clusters were trained on, but an ivfpq index keeps only "
            "compressed vectors; rebuild it with `clipkit index build --from-embeddings` to retrain",
            transaction.index_dir,
        )
        vector_index.add(new_vectors)
        faiss.write_index(vector_index, str(transaction.staged_vectors))
        return {}
    faiss.extract_index_ivf(vector_index).make_direct_map()
    stored = vector_index.reconstruct_n(0, vector_index.ntotal)  # (N_old, D), exact for IVF-Flat
    vectors = np.concatenate([stored, new_vectors])
    target = manifest.get("tuning", {}).get("target_recall", 0.95)
    log.info("retraining %s: %d vectors outgrew clusters trained on %d", transaction.index_dir, len(vectors),
             manifest["params"].get("trained_on", manifest["count"]))  # fmt: skip
    chosen = write_vector_index(transaction, vectors, kind="ivf", max_memory=0, target_recall=target,
                                text_queries=text_queries)  # fmt: skip
    chosen["params"]["mmap"] = manifest["params"].get("mmap", False)
    return chosen


def _record_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The `ImageRecord` fields (but the id) of a `clipkit embed` metadata row, either layout version."""
    return {
        "uri": row_uri(row),
        "path": row_location(row),
        "offset": row["offset"],
        "length": row["length"],
        "sha256": row["sha256"],
        "media_type": row["media_type"],
        "width": row["width"],
        "height": row["height"],
        "caption": row["caption"],
        "metadata": json.loads(row["metadata"]),
    }


def _foreign_record_fields(row: dict[str, Any], vector: np.ndarray, where: str) -> dict[str, Any]:
    """The `ImageRecord` fields of a clip-retrieval metadata row. Its image is served when `image_path` names a
    readable image file (hashed now, as the server checks it); otherwise the record keeps no path, and its
    content hash is the embedding's, so identical embeddings are indexed once. `where`: its name otherwise."""
    image_path = row.get("image_path") if isinstance(row.get("image_path"), str) else None
    caption = row.get("caption") if isinstance(row.get("caption"), str) else None
    metadata = {k: v for k, v in row.items() if k not in ("image_path", "caption") and v is not None}
    found = _image_file(image_path) if image_path else None
    if found is None:
        digest = hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()
        found = {
            "path": "",
            "length": 0,
            "sha256": f"embedding:{digest}",
            "media_type": "",
            "width": 0,
            "height": 0,
        }
    uri = image_path or (metadata["url"] if isinstance(metadata.get("url"), str) else where)
    return {"uri": uri, "offset": None, "caption": caption, "metadata": metadata, **found}


def _image_file(image_path: str) -> dict[str, Any] | None:
    """Where and what the image file `image_path` is (resolved from the working directory), or None when it is
    not a readable image: the server then serves nothing for it."""
    from PIL import Image

    from clipkit.data.images import is_image_file

    path = Path(image_path).expanduser().resolve()
    if not is_image_file(path):
        return None
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            media_type = Image.MIME.get(image.format or "", "application/octet-stream")
            width, height = image.size
    except Exception:  # noqa: BLE001 (PIL raises many types for what it cannot read)
        return None
    return {"path": str(path), "length": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "media_type": media_type, "width": width, "height": height}  # fmt: skip


def _check_index_options(kind: str, target_recall: float) -> None:
    if kind != "auto" and kind not in INDEX_KINDS:
        raise ClipkitError(f"--index {kind} is not one of auto, {', '.join(INDEX_KINDS)}")
    if not 0 < target_recall <= 1:
        raise ClipkitError(f"--target-recall must be in (0, 1], got {target_recall}")


def open_index(
    index_dir: str | Path,
    *,
    model: ModelSpec | None = None,
    pretrained: str | Path | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    search_params: dict[str, int] | None = None,
) -> tuple[RetrievalIndex, Encoder]:
    """The index and an encoder for its model (the recorded one, or `model`, which must match it).

    `search_params` trades recall for speed without a rebuild: {"ef_search": N} (hnsw), {"nprobe": N} (ivf).
    """
    index = RetrievalIndex(index_dir, search_params=search_params)
    try:
        encoder, _ = load_index_model(
            index.manifest,
            index.index_dir,
            model=model,
            pretrained=pretrained,
            device=device,
            precision=precision,
        )
    except BaseException:
        index.close()
        raise
    return index, encoder


def _recorded_encoder(identity: dict[str, Any], embeddings_dir: Path) -> Encoder | None:
    """The model embeddings were made with, from where they say it lives, to encode tuning queries; None (the
    tuning then goes without text queries) when it cannot be loaded as it was."""
    if identity.get("source") is None:
        return None
    try:
        encoder, _ = load_index_model({"model": identity}, embeddings_dir, model=None, pretrained=None,
                                      device="cpu", precision="fp32")  # fmt: skip
    except ClipkitError as e:
        log.info("tuning without text queries: the embeddings' model did not load (%s)", e)
        return None
    return encoder


def load_index_model(
    manifest: dict[str, Any],
    index_dir: Path,
    *,
    model: ModelSpec | None,
    pretrained: str | Path | None,
    device: str,
    precision: str,
) -> tuple[Encoder, dict[str, Any]]:
    recorded = manifest["model"]
    if model is None:
        if recorded.get("source") is None:
            raise ClipkitError(
                f"{index_dir} was built from a model in memory and does not say where it lives; pass --model"
            )
        model, pretrained = recorded["source"], recorded.get("pretrained")
    encoder, identity = load_encoder(model, pretrained=pretrained, device=device, precision=precision)
    if identity["fingerprint"] != recorded["fingerprint"]:
        shown = model.name if isinstance(model, ModelBundle) else model
        if identity["source"] is not None and identity["source"] == recorded.get("source"):
            why = "the same source now gives other weights (its files changed, or it has none and starts random)"
        else:
            why = "its embeddings would not match"
        raise ClipkitError(
            f"model {shown} (fingerprint {identity['fingerprint'][:12]}) is not the model {index_dir} was built "
            f"with ({recorded.get('source') or recorded.get('name')}, fingerprint {recorded['fingerprint'][:12]}): "
            f"{why}; use that model, or build a new index with this one"
        )
    return encoder, identity


def _ingest(
    db,
    items: list[ImageItem],
    encoder: Encoder,
    *,
    start_id: int,
    batch_size: int,
    workers: int,
    progress: bool,
) -> tuple[np.ndarray, IndexReport]:
    """Embed `items` into the staged metadata table; the new vectors (N, D) in id order."""
    known = {row[0] for row in db.execute("SELECT sha256 FROM images")}
    report = IndexReport(index_dir=Path(), count=0, added=0, duplicates=0)
    vectors = []
    next_id = start_id
    for batch in embed_items(
        items,
        encoder,
        batch_size=batch_size,
        workers=workers,
        known_hashes=frozenset(known),
        progress=progress,
    ):
        rows, keep = [], []
        for row_index, image in enumerate(batch.images):
            if image.sha256 in known:  # the same content twice within this source
                report.duplicates += 1
                continue
            known.add(image.sha256)
            item = items[image.position]
            record = ImageRecord(
                id=next_id,
                uri=item.uri,
                path=item.path,
                offset=item.offset,
                length=image.length,
                sha256=image.sha256,
                media_type=image.media_type,
                width=image.width,
                height=image.height,
                caption=item.caption,
                metadata=item.metadata,
            )
            rows.append(record.to_row())
            keep.append(row_index)
            next_id += 1
        db.executemany(f"INSERT INTO images VALUES ({','.join('?' * 11)})", rows)
        vectors.append(batch.vectors[keep])  # (b, D)
        report.duplicates += len(batch.duplicates)
        for position, reason in batch.skipped:
            log.warning("skipped %s: %s", items[position].uri, reason)
            report.skipped.append((items[position].uri, reason))
    db.commit()
    report.added = next_id - start_id
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, encoder.embed_dim), np.float32)
    return np.ascontiguousarray(stacked, dtype=np.float32), report


def _check_build_target(out_dir: Path, *, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ClipkitError(f"--out {out_dir} is a file; give a folder for the index")
    if is_index_dir(out_dir):
        if not overwrite:
            raise ClipkitError(
                f"{out_dir} already holds an index; pass --overwrite to replace it, or add images to it with "
                "`clipkit index add`"
            )
        return
    others = set(out_dir.iterdir()) - set(writer_files(out_dir))
    if others:
        raise ClipkitError(
            f"--out {out_dir} is not empty ({sorted(p.name for p in others)[:3]} ...); choose a new folder"
        )


def _source_entry(source: str | Path, report: IndexReport, now: str) -> dict[str, Any]:
    return {
        "source": _absolute_if_path(str(source)),
        "added": report.added,
        "duplicates": report.duplicates,
        "skipped": len(report.skipped),
        "at": now,
    }


def _absolute_if_path(text: str) -> str:
    prefix = LOCAL_DIR_PREFIX if text.startswith(LOCAL_DIR_PREFIX) else ""
    path = Path(text[len(prefix) :])
    return prefix + str(path.resolve()) if path.exists() else text


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
