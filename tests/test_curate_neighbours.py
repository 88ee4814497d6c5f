"""The neighbour score (`clipkit filter --neighbours K`): against a float64 brute force, its approximate search
against the exact one, and the case it exists for: a scorer that memorised wrong pairs."""

from __future__ import annotations

import numpy as np
import pytest

from clipkit.curate.neighbours import nearest_images, neighbour_scores
from clipkit.errors import ClipkitError


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered(count: int, dim: int, classes: int, seed: int, spread: float = 0.35):
    """(images, texts, labels): images around their class centre, captions that name their class."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(classes, dim)))
    labels = rng.integers(0, classes, count)
    images = unit(centres[labels] + spread * rng.normal(size=(count, dim)) / np.sqrt(dim))
    texts = unit(centres[labels] + 0.5 * spread * rng.normal(size=(count, dim)) / np.sqrt(dim))
    return images.astype(np.float32), texts.astype(np.float32), labels, centres


def reference(images: np.ndarray, texts: np.ndarray, k: int) -> np.ndarray:
    """float64 brute force: mean of t_i . v_j over j in {i} and the k nearest other images of i."""
    v, t = images.astype(np.float64), texts.astype(np.float64)
    similar = v @ v.T
    np.fill_diagonal(similar, -np.inf)
    scores = []
    for i in range(len(v)):
        nearest = np.argsort(-similar[i], kind="stable")[:k]
        scores.append((t[i] @ v[i] + sum(t[i] @ v[j] for j in nearest)) / (k + 1))
    return np.asarray(scores)


def test_the_neighbour_score_matches_a_float64_brute_force_and_k_0_is_the_clip_score():
    images, texts, _, _ = clustered(200, 16, 5, seed=0)
    texts[7] = 0.0  # a sample without a caption: `clipkit score` writes a zero embedding
    for k in (1, 10):
        got = neighbour_scores(images, texts, k)
        want = reference(images, texts, k)
        assert np.isnan(got[7])
        np.testing.assert_allclose(np.delete(got, 7), np.delete(want, 7), atol=1e-6)
    clip = np.einsum("nd,nd->n", images.astype(np.float64), texts.astype(np.float64))
    np.testing.assert_allclose(
        np.delete(neighbour_scores(images, texts, 0), 7), np.delete(clip, 7), atol=1e-6
    )


def test_an_exact_copy_is_a_neighbour_and_a_row_never_its_own():
    images, _, _, _ = clustered(50, 8, 3, seed=1)
    images[10] = images[3]  # an exact duplicate: both rank first for each other
    nearest = nearest_images(images, 4)
    assert not (nearest == np.arange(50)[:, None]).any()
    assert nearest[3, 0] == 10 and nearest[10, 0] == 3


def test_the_inverted_file_search_above_the_exact_limit_finds_the_exact_neighbours():
    images, texts, _, _ = clustered(3000, 16, 20, seed=2)
    exact = neighbour_scores(images, texts, 10)
    approximate = neighbour_scores(images, texts, 10, exact_limit=1000)  # ~55 cells, 16 probed
    same = np.isclose(exact, approximate, atol=1e-6)
    assert same.mean() > 0.97, same.mean()
    assert np.abs(exact - approximate).max() < 0.05


def test_memorised_wrong_captions_rank_high_by_clip_score_and_low_by_neighbour_score():
    """What a scorer trained on the noisy pairs does. 10 classes; each caption names a class and says something
    particular to its sample (u); 30% name another class. The scorer has memorised each pair: every image
    carries a part of its own caption's particular direction, the wrong pairs (which the class structure
    cannot explain) a larger one. Some images are far from their class (hard). By CLIP score many wrong pairs
    outrank hard true ones; their neighbours (other images of the true class) were memorised with other
    captions, so by neighbour score they fall to the bottom."""
    rng = np.random.default_rng(3)
    count, dim, classes = 1000, 64, 10
    centres = unit(rng.normal(size=(classes, dim)))
    labels = rng.integers(0, classes, count)
    named = labels.copy()
    wrong = rng.choice(count, 300, replace=False)
    named[wrong] = (labels[wrong] + rng.integers(1, classes, 300)) % classes
    true = named == labels
    particular = unit(rng.normal(size=(count, dim)))
    texts = unit(centres[named] + particular)
    hardness = rng.uniform(0.2, 1.5, count)[:, None]
    memorised = np.where(true, 0.5, 3.0)[:, None]
    noise = unit(rng.normal(size=(count, dim)))
    images = unit(centres[labels] + hardness * noise + memorised * particular)

    def purity(scores: np.ndarray) -> float:  # the share of true pairs in the top 60%
        return true[np.argsort(-scores)[:600]].mean()

    by_clip = purity(np.einsum("nd,nd->n", images, texts))
    by_neighbours = purity(neighbour_scores(images.astype(np.float32), texts.astype(np.float32), 10))
    assert by_clip < 0.9, by_clip  # 0.82
    assert by_neighbours > 0.98, by_neighbours  # 0.997


def test_a_neighbour_count_outside_the_collection_is_refused():
    images, texts, _, _ = clustered(20, 8, 2, seed=5)
    for k in (-1, 20):
        with pytest.raises(ClipkitError, match="--neighbours must be between 0 and"):
            neighbour_scores(images, texts, k)
