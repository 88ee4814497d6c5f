"""Near-duplicate groups in embedding space, with FAISS.

Two images are near-duplicates when the cosine similarity of their (L2-normalised) embeddings is at least
`threshold`; groups are the connected components of that relation. Up to `exact_limit` images every pair is
compared (an exact range search over a flat inner-product index); above it, SemDeDup's approach: k-means into
about sqrt(N) clusters, then the exact range search within each cluster only, so the cost is about N * N / k
instead of N * N and a pair split across two clusters is missed (rare above the thresholds used, which sit far
inside a cluster's radius).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EXACT_LIMIT = 50_000


def near_duplicate_pairs(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """(P, 2) index pairs i < j with cosine(vectors[i], vectors[j]) >= threshold, all of them. vectors: (N, D)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    # faiss's range search keeps scores > radius; nudge so that == threshold counts too.
    lims, _, found = index.range_search(vectors, float(np.nextafter(np.float32(threshold), np.float32(-1))))
    rows = np.repeat(np.arange(len(vectors)), np.diff(lims).astype(np.int64))
    keep = rows < found
    return np.stack([rows[keep], found[keep]], axis=1).astype(np.int64)


def clustered_pairs(
    vectors: np.ndarray, threshold: float, *, clusters: int | None = None, seed: int = 0
) -> np.ndarray:
    """`near_duplicate_pairs` within k-means clusters only (SemDeDup): (P, 2) pairs i < j."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count = len(vectors)
    k = clusters or max(1, int(round(np.sqrt(count))))
    k = min(k, max(1, count // 2))
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(vectors)
    _, assigned = kmeans.index.search(vectors, 1)  # (N, 1) nearest centroid
    assigned = assigned[:, 0]
    pairs = []
    for cluster in np.unique(assigned):
        members = np.flatnonzero(assigned == cluster)  # ascending
        local = near_duplicate_pairs(vectors[members], threshold)
        pairs.append(members[local])
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def centered(vectors: np.ndarray) -> np.ndarray:
    """The rows less their mean, L2-normalised again: (N, D) -> (N, D). A model trained on few kinds of captions
    puts every image in a narrow cone (cosines near 1 for all pairs); centring spreads them so a threshold
    separates copies from look-alikes."""
    moved = vectors.astype(np.float32) - vectors.mean(axis=0, dtype=np.float64).astype(np.float32)
    return moved / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)


def duplicate_groups(
    vectors: np.ndarray,
    threshold: float,
    *,
    exact_limit: int = EXACT_LIMIT,
    clusters: int | None = None,
    center: bool = False,
) -> list[list[int]]:
    """Groups (connected components, two or more members, each sorted) of near-duplicate rows of `vectors`
    (with `center`, compared after `centered`)."""
    if not -1.0 <= threshold <= 1.0:
        from clipkit.errors import ClipkitError

        raise ClipkitError(f"--dedup is a cosine similarity in [-1, 1], got {threshold}")
    if center:
        vectors = centered(vectors)
    if len(vectors) <= exact_limit:
        pairs = near_duplicate_pairs(vectors, threshold)
    else:
        pairs = clustered_pairs(vectors, threshold, clusters=clusters)
    parent = np.arange(len(vectors))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in np.unique(pairs):
        groups.setdefault(root(int(i)), []).append(int(i))
    return [sorted(members) for _, members in sorted(groups.items()) if len(members) > 1]


def keeper(group: Sequence[int], scores: np.ndarray, names: Sequence[str]) -> int:
    """The member a group keeps: the highest score (NaN lowest), ties broken by the smallest name."""
    return min(group, key=lambda i: (-(scores[i] if np.isfinite(scores[i]) else -np.inf), names[i]))
