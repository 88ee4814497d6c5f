"""Bootstrap intervals for evaluation metrics, paired comparisons of two models, McNemar's test.

Every metric here is a ratio of per-sample sums, `sum_i w_i a_i / sum_i w_i b_i`, evaluated with weights
`w` = how often each test sample is drawn in a bootstrap resample (1 for the observed set):
top-1 accuracy (a = correct, b = 1), recall@k over captions (a = hits among an image's captions,
b = its number of captions), mean per-class recall (one ratio per class, averaged: resampled within
each class, i.e. stratified, so every class keeps its size). A few-shot probe's per-sample score is its
correctness averaged over the seeds. Resamples are drawn from a seed, so intervals are reproducible,
and the same seed draws the same resamples for two models on the same samples: that makes the
comparison paired (the difference is computed per resample).

Intervals are percentile intervals (2.5 and 97.5 percentiles of the resampled metric). They express
the test set's sampling noise only, not a probe's training randomness or the choice of prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(kw_only=True)
class SampleScores:
    """A metric as per-sample numbers: the metric is sum(w * numerator) / sum(w * denominator),
    averaged over strata (classes) when `strata` is given (each stratum resampled on its own)."""

    numerator: torch.Tensor  # (N,) float64
    denominator: torch.Tensor  # (N,) float64
    strata: torch.Tensor | None = None  # (N,) int64 class of each sample, for per-class-stratified metrics

    def value(self) -> float:
        return float(self.resampled(torch.ones(1, len(self.numerator), dtype=torch.float64))[0])

    def resampled(self, weights: torch.Tensor) -> torch.Tensor:
        """(B,) the metric under each row of sample weights (B, N)."""
        if self.strata is None:
            return (weights @ self.numerator) / (weights @ self.denominator).clamp(min=1e-300)
        per_class = []
        for label in torch.unique(self.strata):
            members = self.strata == label
            w = weights[:, members]
            per_class.append(
                (w @ self.numerator[members]) / (w @ self.denominator[members]).clamp(min=1e-300)
            )
        return torch.stack(per_class).mean(dim=0)


def accuracy_scores(correct: torch.Tensor) -> SampleScores:
    """correct (N,) bool/float, or (S, N) for S seeds (averaged per sample)."""
    correct = correct.double()
    if correct.dim() == 2:
        correct = correct.mean(dim=0)
    return SampleScores(numerator=correct, denominator=torch.ones_like(correct))


def per_class_recall_scores(correct: torch.Tensor, labels: torch.Tensor) -> SampleScores:
    """Mean per-class recall (scikit-learn's balanced accuracy) over the classes present, stratified."""
    scores = accuracy_scores(correct)
    scores.strata = labels.long().cpu()
    return scores


def grouped_hit_scores(hits: torch.Tensor, group: torch.Tensor, num_groups: int) -> SampleScores:
    """Recall over queries grouped by the sample they belong to (captions of one image): hits (T,), group (T,)."""
    numerator = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, hits.double())
    denominator = torch.zeros(num_groups, dtype=torch.float64).index_add_(
        0, group, torch.ones_like(hits, dtype=torch.float64)
    )
    return SampleScores(numerator=numerator, denominator=denominator)


def resample_weights(
    num_samples: int,
    *,
    resamples: int,
    seed: int,
    strata: torch.Tensor | None = None,
) -> torch.Tensor:
    """(resamples, N) float64 counts of each sample in `resamples` draws of N with replacement.

    With `strata`, each stratum's samples are drawn from that stratum only, as many as it has.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = torch.zeros(resamples, num_samples, dtype=torch.float64)
    groups = [torch.arange(num_samples)] if strata is None else [
        torch.nonzero(strata == label).flatten() for label in torch.unique(strata)
    ]  # fmt: skip
    for members in groups:
        draws = members[torch.randint(len(members), (resamples, len(members)), generator=generator)]
        weights.scatter_add_(1, draws, torch.ones(draws.shape, dtype=torch.float64))
    return weights


@dataclass(kw_only=True)
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def percentile_interval(value: float, replicates: torch.Tensor, confidence: float = CONFIDENCE) -> Interval:
    tail = (1 - confidence) / 2
    low, high = torch.quantile(replicates.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return Interval(value=value, low=float(low), high=float(high))


def replicates(scores: SampleScores, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> torch.Tensor:
    """(resamples,) the metric over seeded resamples (stratified when `scores` has strata)."""
    weights = resample_weights(len(scores.numerator), resamples=resamples, seed=seed, strata=scores.strata)
    return scores.resampled(weights)


def bootstrap_interval(
    scores: SampleScores, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> Interval:
    """The metric with its percentile bootstrap interval."""
    return percentile_interval(scores.value(), replicates(scores, resamples=resamples, seed=seed), confidence)


@dataclass(kw_only=True)
class Comparison:
    difference: Interval  # metric(B) - metric(A), with its paired bootstrap interval
    p_value: float  # two-sided: paired bootstrap, or McNemar's exact test for accuracies
    test: str  # "mcnemar" | "paired_bootstrap"

    @property
    def significant(self) -> bool:
        return not (self.difference.low <= 0.0 <= self.difference.high)

    def as_dict(self) -> dict[str, object]:
        return {
            "difference": self.difference.as_dict(),
            "p_value": self.p_value,
            "test": self.test,
            "significant": self.significant,
        }


def paired_comparison(
    a: SampleScores,
    b: SampleScores,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    correct_a: torch.Tensor | None = None,
    correct_b: torch.Tensor | None = None,
) -> Comparison:
    """B - A on the same test samples: the paired bootstrap interval of the difference, and a p-value.

    With per-sample correctness (`correct_a`, `correct_b`, (N,) bool) the p-value is McNemar's exact test;
    otherwise the paired bootstrap's (twice the smaller share of resampled differences on one side of 0).
    """
    if len(a.numerator) != len(b.numerator):
        raise ValueError(
            f"a paired comparison needs the same samples: {len(a.numerator)} vs {len(b.numerator)}"
        )
    weights = resample_weights(len(a.numerator), resamples=resamples, seed=seed, strata=a.strata)
    differences = b.resampled(weights) - a.resampled(weights)  # (B,)
    interval = percentile_interval(b.value() - a.value(), differences)
    if correct_a is not None and correct_b is not None:
        return Comparison(difference=interval, p_value=mcnemar_exact(correct_a, correct_b), test="mcnemar")
    one_side = min((differences <= 0).double().mean().item(), (differences >= 0).double().mean().item())
    return Comparison(difference=interval, p_value=min(1.0, 2 * one_side), test="paired_bootstrap")


def mcnemar_exact(correct_a: torch.Tensor, correct_b: torch.Tensor) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the samples exactly one model gets right."""
    a_only = int((correct_a.bool() & ~correct_b.bool()).sum())
    b_only = int((~correct_a.bool() & correct_b.bool()).sum())
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mean_interval(
    per_dataset: Sequence[tuple[SampleScores, int]], *, resamples: int = DEFAULT_RESAMPLES
) -> tuple[Interval, torch.Tensor]:
    """The unweighted mean over (scores, seed) pairs, one per dataset, with its interval (each dataset
    resampled independently, from its own seed), and the (resamples,) replicates of the mean: two
    models' replicates drawn with the same seeds pair up, for comparing their means."""
    stacked = torch.stack(
        [replicates(scores, resamples=resamples, seed=seed) for scores, seed in per_dataset]
    )
    value = sum(scores.value() for scores, _ in per_dataset) / len(per_dataset)
    means = stacked.mean(dim=0)  # (B,)
    return percentile_interval(value, means), means
