"""Linear probes on frozen features, as CLIP_benchmark's `clip_benchmark.metrics.linear_probe` trains them.

A logistic regression (one `torch.nn.Linear` + cross-entropy) trained with AdamW, a cosine learning-rate
schedule without warm-up, `epochs` passes over shuffled mini-batches. Its weight decay is searched on a
validation split as CLIP_benchmark searches it (after the CLIP paper, A.3): 97 values log-spaced over
[1e-6, 1e2]; 7 evenly spaced first, then around the best so far with spans 8, 4, 2, 1. The final probe
trains on train + validation (all shots) or on the k-shot train set only (few-shot), with the chosen
weight decay. Few-shot training sets take the first k samples of each class in a seeded permutation.

Random draws (the few-shot permutation, the probe's initialisation, batch order) come from `seed` in a
forked RNG, in CLIP_benchmark's order, so the same features and seed give CLIP_benchmark's probe; the
caller's global RNG is left as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from clipkit.errors import ClipkitError

WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
# CLIP_benchmark picks the first round's values by exact float equality with logspace(-6, 2, 7); the
# same expression gives the same (possibly fewer than 7) positions.
INITIAL_SEARCH = [i for i, value in enumerate(WEIGHT_DECAYS) if value in np.logspace(-6, 2, num=7).tolist()]


@dataclass(kw_only=True)
class LinearProbeConfig:
    lr: float = 0.1  # CLIP_benchmark's --fewshot_lr
    epochs: int = 10  # --fewshot_epochs
    batch_size: int = 64  # --batch_size
    val_proportion: float = 0.2  # of train held out for the search when a dataset has no val split


@dataclass(kw_only=True)
class LinearProbeResult:
    logits: torch.Tensor  # (N_test, C) the probe's logits on the test features
    weight_decay: float
    fewshot_k: int  # -1: all training samples
    seed: int


def fewshot_indices(labels: torch.Tensor, k: int, *, seed: int) -> torch.Tensor:
    """Positions of the first `k` samples of each class in a permutation drawn from `seed` (k < 0: all).

    CLIP_benchmark draws `torch.randperm(N)` from the global RNG seeded with the run's seed; a generator
    seeded the same draws the same permutation.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    if k < 0:
        return order
    taken: dict[int, int] = {}
    chosen = []
    for position in order.tolist():
        label = int(labels[position])
        if taken.get(label, 0) < k:
            taken[label] = taken.get(label, 0) + 1
            chosen.append(position)
    short = {label: n for label, n in taken.items() if n < k}
    if short:
        label, n = next(iter(short.items()))
        raise ClipkitError(
            f"{k}-shot linear probe: class {label} has only {n} training samples; lower k or drop the task"
        )
    return torch.tensor(chosen, dtype=torch.long)


def train_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float,
    config: LinearProbeConfig,
    seed: int,
    device: str | torch.device = "cpu",
) -> torch.nn.Linear:
    """One probe: CLIP_benchmark's `train` (AdamW, cosine schedule, shuffled batches) from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(features.shape[1], num_classes).to(device)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=weight_decay)
        batches = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(features, labels), batch_size=config.batch_size, shuffle=True
        )
        total_steps = config.epochs * len(batches)
        for epoch in range(config.epochs):
            for i, (x, y) in enumerate(batches):
                step = i + epoch * len(batches)
                for group in optimizer.param_groups:  # cosine from lr to 0, no warm-up
                    group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total_steps)) * config.lr
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(probe(x.to(device)), y.to(device))
                loss.backward()
                optimizer.step()
    return probe


@torch.no_grad()
def probe_logits(probe: torch.nn.Linear, features: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
    device = probe.weight.device
    return torch.cat(
        [
            probe(features[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(features), batch_size)
        ]
    )


def search_weight_decay(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    config: LinearProbeConfig,
    seed: int,
    device: str | torch.device = "cpu",
) -> float:
    """CLIP_benchmark's coarse-to-fine search: the weight decay with the best validation top-1."""

    def best_of(candidates: list[int]) -> int:
        best, best_accuracy = 0, 0.0
        for index in candidates:
            probe = train_probe(
                *train,
                num_classes,
                weight_decay=WEIGHT_DECAYS[index],
                config=config,
                seed=seed,
                device=device,
            )
            accuracy = (probe_logits(probe, val[0]).argmax(dim=1) == val[1]).double().mean().item()
            if best_accuracy < accuracy:  # strictly better, as CLIP_benchmark's find_peak
                best, best_accuracy = index, accuracy
        return best

    peak = best_of(INITIAL_SEARCH)
    span = 8
    while span > 0:
        peak = best_of([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[peak]


def validation_split(num_samples: int, proportion: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, validation positions): a seeded random `proportion` held out for the search."""
    if not 0 < proportion < 1:
        raise ClipkitError(f"linear probe val_proportion must be between 0 and 1, got {proportion}")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    held_out = max(1, round(num_samples * proportion))
    return order[held_out:], order[:held_out]


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    test_features: torch.Tensor,
    num_classes: int,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    fewshot_k: int = -1,
    seed: int = 0,
    config: LinearProbeConfig | None = None,
    device: str | torch.device = "cpu",
) -> LinearProbeResult:
    """CLIP_benchmark's `linear_probe.evaluate` on given features: train (N, D) + labels (N,), test (M, D).

    With `val` (features, labels) the weight decay is searched; without, it is 0 (as CLIP_benchmark).
    """
    config = config or LinearProbeConfig()
    features, labels = train
    chosen = fewshot_indices(labels, fewshot_k, seed=seed)
    fewshot = (features[chosen], labels[chosen])
    if val is not None:
        weight_decay = search_weight_decay(fewshot, val, num_classes, config=config, seed=seed, device=device)
        # All shots: the final probe also learns from the validation split; few-shot: k per class only.
        final = (
            fewshot if fewshot_k >= 0 else (torch.cat([fewshot[0], val[0]]), torch.cat([fewshot[1], val[1]]))
        )
    else:
        weight_decay, final = 0.0, fewshot
    probe = train_probe(
        *final, num_classes, weight_decay=weight_decay, config=config, seed=seed, device=device
    )
    return LinearProbeResult(
        logits=probe_logits(probe, test_features), weight_decay=weight_decay, fewshot_k=fewshot_k, seed=seed
    )
