"""The neighbour score: a caption's CLIP score against its image and the images most like it.

A scorer trained on the very pairs it scores (the usual case: no clean model of the domain exists) has
memorised many of them, a wrong caption with its image included, so the plain CLIP score ranks those wrong
pairs high. Their neighbours' images it has not memorised with that caption: averaged over the image and its K
nearest images (cosine of the image embeddings), a wrong caption scores like a wrong caption again, and a true
caption on an unusual image is carried by the typical images near it. With K = 0 it is the CLIP score.

    neighbour_score[i] = (t_i . v_i + sum over j in knn(i) of t_i . v_j) / (K + 1)

t: caption embeddings, v: image embeddings (both L2-normalised, as `clipkit score` writes them); knn(i): the K
images nearest v_i other than i itself. The search is exact (FAISS flat inner product) up to `exact_limit`
images; above it, an inverted-file index over about sqrt(N) k-means cells, `probe` of them searched per query
(approximate: a missed neighbour is replaced by the next nearest found).
"""

from __future__ import annotations

import math

import numpy as np

from clipkit.curate.dedup import EXACT_LIMIT
from clipkit.curate.select import NEIGHBOUR_COLUMN
from clipkit.errors import ClipkitError

_CHUNK = 8192  # rows per block of the neighbour sum


def nearest_images(
    vectors: np.ndarray, k: int, *, exact_limit: int = EXACT_LIMIT, probe: int = 16, seed: int = 0
) -> np.ndarray:
    """(N, k) indices of each row's k nearest other rows by inner product, nearest first (0 < k < N)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if count <= exact_limit:
        index = faiss.IndexFlatIP(dim)
    else:
        cells = max(1, int(round(math.sqrt(count))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
        index.nprobe = min(probe, cells)
    index.add(vectors)
    _, found = index.search(vectors, k + 1)  # (N, k + 1): usually the row itself first
    rows = np.arange(count)[:, None]
    valid = (found != rows) & (found >= 0)  # not the row itself, and filled (IVF may leave -1)
    first = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # the first k valid slots, in order
    picked = np.take_along_axis(found, first, axis=1)
    # Fewer than k found in the probed cells: the row itself stands in (its own score counts again).
    return np.where(np.take_along_axis(valid, first, axis=1), picked, rows).astype(np.int64)


def neighbour_scores(
    image_vectors: np.ndarray, text_vectors: np.ndarray, k: int, *, exact_limit: int = EXACT_LIMIT
) -> np.ndarray:
    """(N,) float64: each caption's mean cosine with its image and that image's k nearest images; NaN where
    the caption is missing (a zero text embedding, as `clipkit score` writes it)."""
    images = np.asarray(image_vectors, dtype=np.float32)
    texts = np.asarray(text_vectors, dtype=np.float32)
    if images.shape != texts.shape:
        raise ClipkitError(f"image and caption embeddings differ in shape: {images.shape} vs {texts.shape}")
    if not 0 <= k < len(images):
        raise ClipkitError(
            f"--neighbours must be between 0 and the collection's size less one ({len(images) - 1}), got {k}"
        )
    own = np.einsum("nd,nd->n", images, texts, dtype=np.float64)
    if k == 0:
        total = own
    else:
        neighbours = nearest_images(images, k, exact_limit=exact_limit)  # (N, k)
        total = own.copy()
        for start in range(0, len(images), _CHUNK):  # (chunk, k, D) at a time, not (N, k, D)
            rows = slice(start, start + _CHUNK)
            total[rows] += np.einsum("nkd,nd->n", images[neighbours[rows]], texts[rows], dtype=np.float64)
    scores = total / (k + 1)
    scores[~np.any(texts != 0, axis=1)] = np.nan
    return scores


def add_neighbour_score(collection, k: int) -> None:
    """Add the `neighbour_score` column to a ScoredCollection (its caption embeddings read from text_emb/)."""
    from clipkit.curate.score import read_text_vectors

    collection.columns[NEIGHBOUR_COLUMN] = neighbour_scores(
        collection.image_vectors, read_text_vectors(collection), k
    )
