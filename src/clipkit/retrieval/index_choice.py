"""Which FAISS index a collection gets, how much memory it takes, and its search setting tuned to a recall.

The rules are autofaiss's (`get_optimal_index_keys_v2`, `get_optimal_nb_clusters`, its memory estimates),
implemented here because autofaiss itself pins NumPy < 2 (installing it would downgrade today's NumPy 2.x,
which torch and faiss-cpu 1.15 use):

- under 1,000 vectors: flat (exact; as fast as anything at that size);
- under 10,000: HNSW with 16 links per node;
- otherwise HNSW with the most links (8..32) whose graph fits the memory budget;
- else IVF-Flat (about 4 sqrt(N) clusters, a power of two) if it fits and N < 1,000,000;
- else OPQ + IVF-PQ with the largest code that fits (compressed: approximate scores);
- else (not even the smallest code fits) IVF-Flat memory-mapped from disk: RAM holds the cluster centroids
  and the pages the operating system keeps.

Two changes from autofaiss: OPQ rotates into min(D, ...) dimensions, a multiple of the code size, rather than
a few more than D (FAISS's OPQ matrix cannot grow the dimension for inner products without changing scores),
and the search setting (efSearch / nprobe) is chosen for a target recall@10 against exact search, where
autofaiss chooses it for a latency.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from clipkit.errors import ClipkitError

log = logging.getLogger(__name__)

FLAT_BELOW = 1_000
SMALL_HNSW_BELOW = 10_000
IVF_FLAT_BELOW = 1_000_000
PQ_CODE_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # bytes per vector
_ID_BYTES = 8  # an IVF list stores each vector's int64 id beside its code
EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
DEFAULT_MAX_MEMORY = "8GiB"
OFF_ANGLE = np.deg2rad(70)  # tuning queries off the collection: about a caption's angle to its image


@dataclass(frozen=True)
class IndexChoice:
    kind: str  # flat | hnsw | ivf | ivfpq
    params: dict[str, Any]  # build settings (m, nlist, pq, mmap, ...)
    estimated_bytes: int  # resident memory of the index


def parse_memory(text: str | int) -> int:
    """Bytes in "512MB", "4GiB", "2G", "1e9" or an int."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ClipkitError(f"--max-memory {text!r} is not a size; write e.g. 512MB, 4GB or 16GiB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    return int(number * (1024 if binary else 1000) ** " KMGT".index(unit or " "))


def ivf_clusters(count: int) -> int:
    """autofaiss's first choice (about 4 sqrt(N), a power of two; 16,384 from 1M), capped so each cluster gets
    the 39 training points FAISS's k-means asks for."""
    wanted = 2 ** round(math.log2(4 * math.sqrt(count))) if count < 1_000_000 else 16_384
    return max(1, min(wanted, count // 39))


def params_for(kind: str, count: int, dim: int, *, max_memory: int | None = None) -> dict[str, Any]:
    """Build settings for an index of `kind` chosen by hand (`--index hnsw` ...)."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"m": 32, "ef_construction": 64, "ef_search": 128}
    if kind == "ivf":
        nlist = ivf_clusters(count)
        return {"nlist": nlist, "nprobe": min(nlist, 16), "trained_on": count}
    if kind == "ivfpq":
        code = next((c for c in PQ_CODE_SIZES if c <= dim // 2 and dim % c == 0), None)
        if code is None:
            raise ClipkitError(f"an ivfpq index needs a dimension with a divisor <= {dim // 2}; got {dim}")
        nlist = ivf_clusters(count)
        return {"nlist": nlist, "nprobe": min(nlist, 16), "pq": code, "trained_on": count}
    raise ClipkitError(f"index kind '{kind}' is not one of flat, hnsw, ivf, ivfpq, auto")


def choose_index(count: int, dim: int, *, max_memory: int) -> IndexChoice:
    """The index for `count` vectors of `dim` within `max_memory` bytes (the rules in the module docstring)."""
    if count < FLAT_BELOW:
        return IndexChoice("flat", {}, estimate_bytes("flat", count, dim, {}))
    if count < SMALL_HNSW_BELOW:
        params = {"m": 16, "ef_construction": 64, "ef_search": 64}
        return IndexChoice("hnsw", params, estimate_bytes("hnsw", count, dim, params))
    links = int((max_memory / (4 * count) - dim) // 2)  # HNSW: 4 (D + 2 M) bytes per vector
    if links >= 8:
        params = {
            "m": min(links, 32),
            "ef_construction": 40,
            "ef_search": 64,
        }  # autofaiss: FAISS's default 40
        return IndexChoice("hnsw", params, estimate_bytes("hnsw", count, dim, params))
    nlist = ivf_clusters(count)
    ivf = {"nlist": nlist, "nprobe": min(nlist, 16), "trained_on": count}
    if count < IVF_FLAT_BELOW and estimate_bytes("ivf", count, dim, ivf) <= max_memory:
        return IndexChoice("ivf", ivf, estimate_bytes("ivf", count, dim, ivf))
    for code in PQ_CODE_SIZES:
        if code > dim // 2 or dim % code:
            continue  # no compression, or OPQ cannot split D into `code` sub-vectors
        params = {**ivf, "pq": code}
        if estimate_bytes("ivfpq", count, dim, params) <= max_memory:
            return IndexChoice("ivfpq", params, estimate_bytes("ivfpq", count, dim, params))
    params = {**ivf, "mmap": True}
    return IndexChoice("ivf", params, estimate_bytes("ivf", count, dim, params))


def estimate_bytes(kind: str, count: int, dim: int, params: dict[str, Any]) -> int:
    """Resident memory of an index (autofaiss's estimates; an mmap'd index holds only its centroids)."""
    if kind == "flat":
        return 4 * dim * count
    if kind == "hnsw":
        return 4 * (dim + 2 * params["m"]) * count
    centroids = 4 * dim * params["nlist"]
    if kind == "ivf":
        return centroids + (0 if params.get("mmap") else (4 * dim + _ID_BYTES) * count)
    if kind == "ivfpq":
        return centroids + 4 * dim * dim + (params["pq"] + _ID_BYTES) * count  # + the OPQ rotation
    raise ClipkitError(f"index kind '{kind}' is not one of flat, hnsw, ivf, ivfpq")


def tune_search(
    index: faiss.Index,
    kind: str,
    vectors: np.ndarray,
    *,
    target_recall: float,
    queries: int = 1000,
    text_queries: np.ndarray | None = None,
    k: int = 10,
    seed: int = 0,
) -> tuple[dict[str, int], dict[str, Any]]:
    """The smallest efSearch / nprobe whose recall@k against exact search reaches `target_recall`.

    Two query sets, half each, and both must reach the target: indexed vectors drawn at random, each held out
    from its own answers (its own row is dropped from both the exact and the approximate top-(k+1), so recall
    measures finding its neighbours, not itself); and text queries: `text_queries` (M, D), the collection's
    own captions encoded by its model (`caption_queries`), when it has enough of them. Without captions, the
    indexed vectors turned 70 degrees in a random direction stand in for them (a text query sits apart from
    the images it finds, CLIP's modality gap: cosines of 0.2 to 0.35 between a caption and its image); a random
    direction is harder than the modality gap's shared one (on 1M grown digit embeddings, recall@10 0.95 took
    efSearch 1536 for them and 192 for the collection's captions), so captions are used when there are enough.
    Returns (search params, a record of the measured recall and per-query latency).
    """
    from clipkit.retrieval.store import apply_search_params

    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)
    near = np.ascontiguousarray(vectors[chosen[: len(chosen) // 2]])  # (Q/2, D)
    if text_queries is not None and len(text_queries) > 0:
        off = np.asarray(text_queries, dtype=np.float32)[: len(chosen) - len(near)]  # (M, D)
        off_name = f"{len(off)} captions of the collection, encoded by its model"
    else:
        sources = vectors[chosen[len(chosen) // 2 :]]
        away = rng.standard_normal(sources.shape).astype(np.float32)
        away -= (away * sources).sum(1, keepdims=True) * sources  # orthogonal to its source
        away /= np.linalg.norm(away, axis=1, keepdims=True)
        off = (
            np.cos(OFF_ANGLE) * sources + np.sin(OFF_ANGLE) * away
        )  # unit vectors, cosine 0.34 to their source
        off_name = "70 degrees off the collection"
    query_vectors = np.ascontiguousarray(np.concatenate([near, off]), dtype=np.float32)  # (Q, D)
    held_out = np.concatenate([chosen[: len(near)], np.full(len(off), -1)])  # -1: no row of its own
    halves = [slice(0, len(near)), slice(len(near), None)]
    exact = _exact_neighbours(vectors, query_vectors, held_out, k)  # (Q, k)
    steps, name = {"hnsw": (EF_SEARCH_STEPS, "ef_search"), "ivf": (NPROBE_STEPS, "nprobe"),
                   "ivfpq": (NPROBE_STEPS, "nprobe")}.get(kind, ((None,), None))  # fmt: skip
    if name == "nprobe":
        steps = [s for s in steps if s < faiss.extract_index_ivf(index).nlist] + [
            faiss.extract_index_ivf(index).nlist
        ]
    tried = []

    def measure(value) -> tuple[float, list[float]]:
        apply_search_params(index, kind, {} if name is None else {name: int(value)})
        _, found = index.search(query_vectors, k + 1)
        recalls = [_recall(found[h], exact[h], held_out[h], k) for h in halves]
        tried.append([value, round(float(min(recalls)), 4)])
        return min(recalls), recalls

    recall, recalls, value, below = 0.0, [0.0, 0.0], None, None
    for value in steps:
        recall, recalls = measure(value)
        if recall >= target_recall:
            break
        below = value
    if name is not None and recall >= target_recall and below is not None:
        # The ladder grows by half at each step: bisect between the last setting short of the target and the
        # first that reaches it, to within 1/16 of the former, so the index runs at (about) the smallest one.
        while value - below > max(1, below // 16):
            middle = (below + value) // 2
            found_recall, found_recalls = measure(middle)
            if found_recall >= target_recall:
                value, recall, recalls = middle, found_recall, found_recalls
            else:
                below = middle
    params = {} if name is None else {name: int(value)}
    apply_search_params(index, kind, params)  # the latency below is at the setting the index will run at
    if recall < target_recall:
        log.warning(
            "a %s index reaches recall@%d %.3f at most (%s=%s), under the target %.3f; give more --max-memory "
            "for a less compressed index", kind, k, recall, name, value, target_recall,
        )  # fmt: skip
    p50, p99 = _latency_ms(index, query_vectors[:200], k)
    record = {
        "target_recall": target_recall,
        f"recall_at_{k}": round(float(recall), 4),  # the lower of the two query sets
        f"recall_at_{k}_by_queries": {
            "indexed, held out": round(float(recalls[0]), 4),
            off_name: round(float(recalls[1]), 4),
        },  # fmt: skip
        "reached": bool(recall >= target_recall),
        "tried": tried if name is not None else [],  # [setting, recall] in the order tried
        "queries": len(query_vectors),
        "latency_ms": {"p50": round(p50, 3), "p99": round(p99, 3), "queries": min(200, len(chosen))},
        "threads": faiss.omp_get_max_threads(),
    }
    return params, record


MIN_CAPTION_QUERIES = 20


def caption_queries(encoder, captions, *, limit: int = 500, seed: int = 0) -> np.ndarray | None:
    """Up to `limit` distinct captions of a collection (drawn with a fixed seed) encoded by its model (M, D), the
    text queries `tune_search` tunes for; None when it has fewer than MIN_CAPTION_QUERIES distinct captions."""
    distinct = sorted({c.strip() for c in captions if c and c.strip()})
    if len(distinct) < MIN_CAPTION_QUERIES:
        return None
    rng = np.random.default_rng(seed)
    drawn = [
        distinct[i] for i in sorted(rng.choice(len(distinct), size=min(limit, len(distinct)), replace=False))
    ]
    encoded = [encoder.encode_texts(drawn[i : i + 128]) for i in range(0, len(drawn), 128)]
    return np.ascontiguousarray(np.concatenate(encoded), dtype=np.float32)


def _exact_neighbours(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, found = exact.search(queries, k + 1)  # (Q, k + 1)
    return _without_self(found, ids, k)


def _without_self(found: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """(Q, k + 1) -> (Q, k): each row without its own query id (or without its last entry if absent)."""
    rows = []
    for row, own in zip(found, ids, strict=True):
        kept = row.tolist()
        if own != -1 and own in kept:
            kept.remove(own)
        rows.append(kept[:k])
    return np.array(rows)


def _recall(found: np.ndarray, exact: np.ndarray, ids: np.ndarray, k: int) -> float:
    found = _without_self(found, ids, k)
    hits = sum(len(set(f.tolist()) & set(e.tolist()) - {-1}) for f, e in zip(found, exact, strict=True))
    return hits / max(1, int((exact != -1).sum()))  # a collection under k + 1 vectors pads with -1


def _latency_ms(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float]:
    times = []
    for query in queries:
        start = time.perf_counter()
        index.search(query[None], k)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))
