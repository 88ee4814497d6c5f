"""Bootstrap intervals cover the true value about 95% of the time; paired tests against references."""

from __future__ import annotations

import math

import pytest
import torch

from clipkit.eval.uncertainty import (
    accuracy_scores,
    bootstrap_interval,
    grouped_hit_scores,
    mcnemar_exact,
    mean_interval,
    paired_comparison,
    per_class_recall_scores,
)

TRIALS = 200
RESAMPLES = 400


def coverage(draw, true_value: float) -> float:
    """Share of simulated test sets whose interval contains the true value."""
    covered = 0
    for trial in range(TRIALS):
        interval = bootstrap_interval(
            draw(torch.Generator().manual_seed(trial)), resamples=RESAMPLES, seed=trial
        )
        covered += interval.low <= true_value <= interval.high
    return covered / TRIALS


def test_accuracy_interval_covers_the_true_accuracy_95_percent_of_the_time():
    # A model that is right with probability 0.7 on each of 400 test images.
    def draw(generator):
        return accuracy_scores(torch.rand(400, generator=generator) < 0.7)

    # 200 trials: a true 95% coverage lands in [0.91, 0.985] with probability > 0.99 (2.6 sd).
    assert 0.91 <= coverage(draw, 0.7) <= 0.985


def test_per_class_recall_interval_is_stratified_and_covers():
    # 4 classes of unequal size with recalls 0.9, 0.6, 0.5, 0.3: mean per-class recall 0.575.
    recalls, sizes = torch.tensor([0.9, 0.6, 0.5, 0.3]), [200, 100, 60, 40]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])

    def draw(generator):
        correct = torch.rand(len(labels), generator=generator) < recalls[labels]
        return per_class_recall_scores(correct, labels)

    assert 0.91 <= coverage(draw, 0.575) <= 0.985


def test_retrieval_recall_over_captions_resamples_images_with_their_captions():
    # 300 images with 1-3 captions each; each caption is found with probability 0.4.
    true_value = 0.4

    def draw(generator):
        per_image = torch.randint(1, 4, (300,), generator=generator)
        group = torch.repeat_interleave(torch.arange(300), per_image)
        hits = torch.rand(len(group), generator=generator) < true_value
        scores = grouped_hit_scores(hits, group, 300)
        assert scores.value() == pytest.approx(hits.double().mean().item())  # recall over captions
        return scores

    assert 0.91 <= coverage(draw, true_value) <= 0.985


def test_mcnemar_matches_scipys_exact_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = torch.rand(200, generator=generator) < 0.6
        b = torch.rand(200, generator=generator) < 0.65
        a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
        expected = stats.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
        assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-9)


def test_paired_comparison_finds_a_real_difference_and_not_a_null_one():
    generator = torch.Generator().manual_seed(1)
    base = torch.rand(500, generator=generator) < 0.6
    # B fixes 15% of A's mistakes and breaks nothing: a real, paired +6 points.
    better = base | (torch.rand(500, generator=generator) < 0.15)
    comparison = paired_comparison(
        accuracy_scores(base), accuracy_scores(better), correct_a=base, correct_b=better
    )
    diff = (better.double().mean() - base.double().mean()).item()
    assert comparison.difference.value == pytest.approx(diff)
    assert comparison.significant and comparison.p_value < 1e-6 and comparison.test == "mcnemar"
    assert 0 < comparison.difference.low < diff < comparison.difference.high
    # An identical model: difference 0, interval [0, 0], nothing significant.
    same = paired_comparison(accuracy_scores(base), accuracy_scores(base.clone()))
    assert same.difference.low == same.difference.high == 0 and same.p_value == 1.0
    # Paired is much tighter than the two separate intervals would suggest.
    a, b = bootstrap_interval(accuracy_scores(base)), bootstrap_interval(accuracy_scores(better))
    assert comparison.difference.high - comparison.difference.low < (a.high - a.low) + (b.high - b.low)


def test_intervals_are_seeded_and_the_suite_mean_pairs_across_models():
    generator = torch.Generator().manual_seed(2)
    sets = [accuracy_scores(torch.rand(n, generator=generator) < p) for n, p in ((300, 0.5), (200, 0.8))]
    first, replicates = mean_interval([(s, i) for i, s in enumerate(sets)], resamples=400)
    again, replicates_again = mean_interval([(s, i) for i, s in enumerate(sets)], resamples=400)
    assert first == again and torch.equal(replicates, replicates_again)
    assert first.value == pytest.approx((sets[0].value() + sets[1].value()) / 2)
    # The mean's interval is narrower than either dataset's, as averaging independent noise is.
    widths = [
        bootstrap_interval(s, resamples=400, seed=i).high - bootstrap_interval(s, resamples=400, seed=i).low
        for i, s in enumerate(sets)
    ]
    assert first.high - first.low < min(widths)
    assert math.isclose(replicates.mean().item(), first.value, abs_tol=0.01)
