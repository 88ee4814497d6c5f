"""Which samples of a scored collection a rule keeps, and why each other one is removed.

The rule's parts apply in this order, each to what the previous ones kept, and a removed sample carries the
first reason that removed it:
1. bounds on columns (`--min COLUMN=VALUE`, `--max COLUMN=VALUE`; `--min-score` and the caption-length bounds
   are bounds on clip_score and caption_length); a missing value (no caption: NaN score) fails a bound;
2. `--top-fraction F`: the ceil(F * N) samples of the whole collection (N samples) with the highest score,
   ties by name, whatever the bounds removed, so the cut is a fixed score wherever the bounds fall;
3. `--dedup T`: near-duplicate groups (cosine >= T) among what is left; each keeps its highest-scoring member,
   ties by name (`dedup.keeper`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from clipkit.curate.dedup import duplicate_groups, keeper
from clipkit.curate.score import ScoredCollection
from clipkit.errors import ClipkitError

SCORE_COLUMN = "clip_score"
NEIGHBOUR_COLUMN = "neighbour_score"  # clipkit.curate.neighbours


@dataclass(frozen=True)
class Bound:
    column: str
    lower: bool  # True: value >= limit; False: value <= limit
    limit: float

    @property
    def reason(self) -> str:
        return f"{self.column} {'<' if self.lower else '>'} {self.limit:g}"


@dataclass(kw_only=True)
class Rule:
    bounds: list[Bound] = field(default_factory=list)
    top_fraction: float | None = None
    dedup: float | None = None
    dedup_center: bool = False  # compare embeddings less the collection's mean (`dedup.centered`)
    neighbours: int | None = None  # K of the neighbour score (the column is added before selection)
    score_column: str = field(init=False)  # what --top-fraction and --dedup's keeper rank by

    def __post_init__(self) -> None:
        self.score_column = SCORE_COLUMN if self.neighbours is None else NEIGHBOUR_COLUMN

    def columns(self) -> list[str]:
        named = [b.column for b in self.bounds]
        return (
            [*named, self.score_column] if self.top_fraction is not None or self.dedup is not None else named
        )

    def check(self, available: list[str]) -> None:
        """One line naming a column the rule needs that the scores do not have."""
        for column in self.columns():
            if column not in available:
                raise ClipkitError(
                    f"the rule names column '{column}', which the scores do not have; columns: {', '.join(available)}"
                )
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ClipkitError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        if not self.bounds and self.top_fraction is None and self.dedup is None:
            raise ClipkitError(
                "no rule given: name at least one of --top-fraction, --min-score, --dedup, --min/--max COLUMN=VALUE, "
                "--min-caption-length, --max-caption-length"
            )


@dataclass(kw_only=True)
class Selection:
    kept: np.ndarray  # (N,) bool
    reasons: list[str | None]  # per sample: why it was removed, None if kept
    groups: list[
        list[int]
    ]  # near-duplicate groups among what the bounds and the cut kept, the kept row first
    cut: float | None  # the lowest score --top-fraction keeps

    def removed_by(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.reasons:
            if reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
        return counts


def numeric_column(collection: ScoredCollection, name: str) -> np.ndarray:
    values = collection.columns[name]
    if values.dtype == object:
        try:
            return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            raise ClipkitError(
                f"column '{name}' is not numeric; a rule bounds numeric columns only"
            ) from None
    return values.astype(np.float64)


def select(collection: ScoredCollection, rule: Rule) -> Selection:
    rule.check(list(collection.columns))
    count = len(collection)
    names = collection.uris
    reasons: list[str | None] = [None] * count
    kept = np.ones(count, dtype=bool)
    for bound in rule.bounds:
        values = numeric_column(collection, bound.column)
        with np.errstate(invalid="ignore"):
            passes = values >= bound.limit if bound.lower else values <= bound.limit  # NaN fails
        for i in np.flatnonzero(kept & ~passes):
            reasons[i] = bound.reason
        kept &= passes
    cut = None
    scores = numeric_column(collection, rule.score_column) if rule.columns() else np.zeros(count)
    if rule.top_fraction is not None:
        keep_count = math.ceil(rule.top_fraction * count)
        ranked = sorted(
            range(count), key=lambda i: (-(scores[i] if np.isfinite(scores[i]) else -np.inf), names[i])
        )
        top = np.zeros(count, dtype=bool)
        top[ranked[:keep_count]] = True
        cut = float(scores[ranked[keep_count - 1]]) if keep_count else None
        reason = f"not in the top {rule.top_fraction:g} by {rule.score_column}"
        for i in np.flatnonzero(kept & ~top):
            reasons[i] = reason
        kept &= top
    groups: list[list[int]] = []
    if rule.dedup is not None:
        survivors = np.flatnonzero(kept)
        local = duplicate_groups(collection.image_vectors[survivors], rule.dedup, center=rule.dedup_center)
        groups = [[int(survivors[i]) for i in group] for group in local]
        reason = f"near-duplicate (cosine >= {rule.dedup:g}) of a kept sample"
        for group in groups:
            best = keeper(group, scores, names)
            group.sort(key=lambda i: i != best)  # the kept member first
            for i in group[1:]:
                kept[i] = False
                reasons[i] = reason
    return Selection(kept=kept, reasons=reasons, groups=groups, cut=cut)
