"""LESCI's (k, m) surface: every vote of a trial from one k_max-nearest-neighbour search.

For one embedding space, the decision at every neighbourhood size k <= k_max and every threshold
follows from each query's k_max nearest neighbours in order (SPEC.md section 1.8): the first k
give the vote at k, and for a given k only the thresholds m/k (m = 1..k) change the outcome,
"project iff at least m of the k neighbours share the majority label". So one search evaluates
the whole surface exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["SurfacePoint", "surface_points", "vote_counts", "surface_decisions",
           "surface_metrics", "THRESHOLD_SLACK", "min_votes_for"]

# Vote fractions are count / k; this slack makes "exactly at the threshold" project despite the
# float rounding of thresholds like 0.3 (SPEC: project iff o / k >= threshold). The one
# tolerance of the threshold rule: the decision (defenses.lesci), the surface's points and a
# space's thresholds all use it.
THRESHOLD_SLACK = 1e-6


def min_votes_for(threshold: float, k: int) -> int:
    """The rule "vote fraction >= threshold" at ``k`` neighbours as "at least m of the k votes":
    the smallest m with m / k >= threshold - THRESHOLD_SLACK, at least 1 (a threshold <= 0
    always projects, as m = 1 does), at most k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if threshold <= 0:
        return 1
    return min(k, max(1, math.ceil(k * (threshold - THRESHOLD_SLACK))))


@dataclass(frozen=True, order=True)
class SurfacePoint:
    """One LESCI operating point: ``k`` neighbours, project iff at least ``min_votes`` agree."""

    k: int
    min_votes: int

    @property
    def threshold(self) -> float:
        """The vote fraction that is the same rule: ``min_votes / k``."""
        return self.min_votes / self.k


def surface_points(ks: Sequence[int], threshold_range: tuple[float, float] | None = None
                   ) -> list[SurfacePoint]:
    """Every (k, m) of the given ks, m = 1..k, whose threshold m/k lies in ``threshold_range``
    (inclusive; None: every m). Sorted by k, then m.

    m = 1 always projects (the majority has at least one vote), which is also what a negative
    threshold means; a range reaching below 1/k keeps it.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    low, high = threshold_range if threshold_range is not None else (-math.inf, 1.0)
    if low > high:
        raise ValueError(f"threshold range [{low}, {high}] is inverted")
    points = [SurfacePoint(k, m) for k in ks for m in range(1, k + 1)
              if low - THRESHOLD_SLACK <= m / k <= high + THRESHOLD_SLACK]
    if not points:
        raise ValueError(f"no (k, m) point of ks {ks} has a threshold m/k in [{low}, {high}]")
    return points


@torch.no_grad()
def vote_counts(neighbour_labels: torch.Tensor, ks: Sequence[int], num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority label and its count among the first k neighbours, for each k of ``ks``.

    Args:
        neighbour_labels: [q, k_max] labels of each query's neighbours, most similar first.
        ks: neighbourhood sizes, each in 1..k_max.

    Returns:
        (majority [q, len(ks)] long, count [q, len(ks)] long): ties go to the lowest label.
    """
    q, k_max = neighbour_labels.shape
    if any(not 1 <= k <= k_max for k in ks):
        raise ValueError(f"every k must be in 1..{k_max}, got {list(ks)}")
    columns = torch.tensor([k - 1 for k in ks], device=neighbour_labels.device)
    # counts[:, j, c]: votes for c among the first j + 1 neighbours
    counts = torch.nn.functional.one_hot(neighbour_labels[:, :max(ks)], num_classes).cumsum(1)
    top, majority = counts[:, columns].max(dim=2)  # first maximum: the lowest label on ties
    return majority, top


@torch.no_grad()
def surface_decisions(neighbour_labels: torch.Tensor, model_prediction: torch.Tensor,
                      points: Sequence[SurfacePoint], num_classes: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction [q, P] long, projected [q, P] bool) of LESCI at every point."""
    ks = sorted({p.k for p in points})
    majority, count = vote_counts(neighbour_labels, ks, num_classes)
    column = {k: i for i, k in enumerate(ks)}
    cols = torch.tensor([column[p.k] for p in points], device=neighbour_labels.device)
    m = torch.tensor([p.min_votes for p in points], device=neighbour_labels.device)
    projected = count[:, cols] >= m
    prediction = torch.where(projected, majority[:, cols], model_prediction[:, None])
    return prediction, projected


def surface_metrics(labels: torch.Tensor, prediction: torch.Tensor, projected: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """The four LESCI metrics of SPEC.md, one value per point ([P] float64 each); an empty
    group's accuracy is NaN (nothing to be right about)."""
    correct = (prediction == labels[:, None]).double()
    proj = projected.double()
    n = max(labels.shape[0], 1)
    n_proj, n_id = proj.sum(0), (1 - proj).sum(0)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return {
        "accuracy": correct.sum(0) / n,
        "projection_rate": n_proj / n,
        "accuracy_projected": torch.where(n_proj > 0, (correct * proj).sum(0)
                                          / n_proj.clamp(min=1), nan),
        "accuracy_identity": torch.where(n_id > 0, (correct * (1 - proj)).sum(0)
                                         / n_id.clamp(min=1), nan),
    }
