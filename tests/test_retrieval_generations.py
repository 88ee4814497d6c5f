"""Index generations on disk: readers keep theirs until they close, a reader racing a writer opens the new
one, and id look-ups of any length stay under SQLite's variable limit."""

from __future__ import annotations

import sqlite3
import threading

import faiss
import numpy as np

from clipkit.retrieval import RetrievalIndex, read_manifest
from clipkit.retrieval.store import ImageRecord, IndexTransaction, create_vector_index

DIM = 8


def commit_generation(index_dir, count: int, *, seed: int = 0) -> dict:
    """Commit an index of `count` random unit vectors and their records (no model: the store alone)."""
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with IndexTransaction(index_dir) as transaction:
        db = transaction.open_staged_metadata(fresh=True)
        rows = [
            ImageRecord(id=i, uri=f"img{i}.png", path=f"/images/img{i}.png", offset=None, length=100 + i,
                        sha256=f"{seed}-{i}", media_type="image/png", width=4, height=4, caption=f"caption {i}",
                        metadata={}).to_row()
            for i in range(count)
        ]  # fmt: skip
        db.executemany(f"INSERT INTO images VALUES ({','.join('?' * 11)})", rows)
        db.commit()
        db.close()
        faiss.write_index(create_vector_index("flat", DIM, vectors, {}), str(transaction.staged_vectors))
        return transaction.commit({"kind": "flat", "params": {}, "dim": DIM, "count": count,
                                   "model": {"fingerprint": "f" * 64}})  # fmt: skip


def data_files(index_dir) -> list[str]:
    return sorted(p.name for p in index_dir.iterdir() if p.name.startswith(("vectors.", "metadata.")))


def test_a_generation_stays_on_disk_until_its_last_reader_closes(tmp_path):
    index_dir = tmp_path / "index"
    commit_generation(index_dir, 10, seed=1)
    first = RetrievalIndex(index_dir)
    commit_generation(index_dir, 12, seed=2)
    assert data_files(index_dir) == [
        "metadata.1.sqlite",
        "metadata.2.sqlite",
        "vectors.1.faiss",
        "vectors.2.faiss",
    ]
    assert first.count == 10 and first.records(range(10))[9].caption == "caption 9"  # still answers
    second = RetrievalIndex(index_dir)
    assert second.generation == 2 and second.count == 12
    first.close()
    commit_generation(index_dir, 14, seed=3)  # generation 1 has no reader now; 2 still has one
    assert data_files(index_dir) == [
        "metadata.2.sqlite",
        "metadata.3.sqlite",
        "vectors.2.faiss",
        "vectors.3.faiss",
    ]
    second.close()
    commit_generation(index_dir, 16, seed=4)
    assert data_files(index_dir) == ["metadata.4.sqlite", "vectors.4.faiss"]


def test_readers_racing_a_writer_always_open_a_whole_generation(tmp_path):
    """Readers open and close in a loop while a writer commits generation after generation: each open
    succeeds (a reader that read index.json just before a commit opens the new generation instead)."""
    index_dir = tmp_path / "index"
    commit_generation(index_dir, 5, seed=0)
    writing_done = threading.Event()
    opened, failures = [], []

    def read_until_done():
        while not writing_done.is_set():
            try:
                index = RetrievalIndex(index_dir)
            except Exception as e:  # noqa: BLE001 (collected: the test fails on any)
                failures.append(repr(e))
                continue
            try:
                records = index.records(range(index.count))
                assert len(records) == index.count == index.manifest["count"]
                opened.append(index.manifest["generation"])
            finally:
                index.close()

    readers = [threading.Thread(target=read_until_done) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for generation in range(2, 22):
            commit_generation(index_dir, 5 + generation, seed=generation)
    finally:
        writing_done.set()
        for reader in readers:
            reader.join(timeout=60)
    assert failures == []
    assert len(set(opened)) > 1  # the readers saw several generations come and go
    assert read_manifest(index_dir)["generation"] == 21


def test_looking_up_more_ids_than_sqlite_binds_at_once(tmp_path):
    commit_generation(tmp_path / "index", 5000)
    index = RetrievalIndex(tmp_path / "index")
    # SQLite's variable limit depends on how it was built (999 before 3.32, 32,766 since, Debian: 250,000);
    # set the smallest, which the search of a 64-query batch at k=1000 would exceed in one statement.
    index._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    records = index.records(list(range(5000)) + [5000, -1, 5])  # unknown ids are left out
    assert sorted(records) == list(range(5000))
    assert records[4999].uri == "img4999.png" and records[123].length == 223
    index.close()
