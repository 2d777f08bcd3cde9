"""LESCI's (k, m) surface: every vote of a trial from one k_max-nearest-neighbour search.

For one embedding space, the decision at every neighbourhood size k <= k_max and every threshold
follows from each query's k_max nearest neighbours in order: the first k
give the vote at k, and for a given k only the thresholds m/k (m = 1..k) change the outcome,
"project iff at least m of the k neighbours share the majority label". So one search evaluates
the whole surface exactly.

Several depths (Deep k-NN, Papernot & McDaniel 2018): the k nearest neighbours at each of L depths
vote together, T(c) = their number labelled c over all depths, and the rule is "project iff the
majority of T has at least m of the L*k votes", m = 1..L*k; one k_max search per depth gives
it. L = 1 is the single-depth surface. A calibration split held out of the embedding spaces
gives each m its credibility (``credibility``): Deep k-NN's p-value of a total of m votes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["SurfacePoint", "surface_points", "vote_counts", "surface_decisions",
           "surface_metrics", "THRESHOLD_SLACK", "min_votes_for", "true_label_totals",
           "credibility"]

# Vote fractions are count / k; this slack makes "exactly at the threshold" project despite the
# float rounding of thresholds like 0.3 (SPEC: project iff o / k >= threshold). The one
# tolerance of the threshold rule: the decision (defenses.lesci), the surface's points and a
# space's thresholds all use it.
THRESHOLD_SLACK = 1e-6


def min_votes_for(threshold: float, k: int) -> int:
    """The rule "vote fraction >= threshold" over ``k`` votes as "at least m of the k votes":
    the smallest m with m / k >= threshold - THRESHOLD_SLACK, at least 1 (a threshold <= 0
    always projects, as m = 1 does), at most k. (Over L depths, pass the L*k votes.)"""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if threshold <= 0:
        return 1
    return min(k, max(1, math.ceil(k * (threshold - THRESHOLD_SLACK))))


@dataclass(frozen=True, order=True)
class SurfacePoint:
    """One LESCI operating point: ``k`` neighbours at each of ``depths`` depths, project iff
    at least ``min_votes`` of the ``depths * k`` votes agree."""

    k: int
    min_votes: int
    depths: int = 1

    @property
    def votes(self) -> int:
        """The votes cast: k at each depth."""
        return self.k * self.depths

    @property
    def threshold(self) -> float:
        """The vote fraction that is the same rule: ``min_votes / votes``."""
        return self.min_votes / self.votes


def surface_points(ks: Sequence[int], threshold_range: tuple[float, float] | None = None,
                   depths: int = 1) -> list[SurfacePoint]:
    """Every (k, m) of the given ks, m = 1..depths*k, whose threshold m/(depths*k) lies in
    ``threshold_range`` (inclusive; None: every m). Sorted by k, then m.

    m = 1 always projects (the majority has at least one vote), which is also what a negative
    threshold means; a range reaching below 1/k keeps it.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    if depths < 1:
        raise ValueError(f"depths must be >= 1, got {depths}")
    low, high = threshold_range if threshold_range is not None else (-math.inf, 1.0)
    if low > high:
        raise ValueError(f"threshold range [{low}, {high}] is inverted")
    points = [SurfacePoint(k, m, depths) for k in ks for m in range(1, depths * k + 1)
              if low - THRESHOLD_SLACK <= m / (depths * k) <= high + THRESHOLD_SLACK]
    if not points:
        votes = "m/k" if depths == 1 else f"m/({depths}k)"
        raise ValueError(f"no (k, m) point of ks {ks} has a threshold {votes} in "
                         f"[{low}, {high}]")
    return points


def _totals(neighbour_labels: torch.Tensor, ks: Sequence[int], num_classes: int) -> torch.Tensor:
    """[q, len(ks), C]: T(c) at each k, the votes for c among the first k neighbours summed
    over the depths. ``neighbour_labels``: [q, k_max] (one depth) or [q, L, k_max]."""
    labels = neighbour_labels if neighbour_labels.ndim == 3 else neighbour_labels[:, None]
    k_max = labels.shape[2]
    if any(not 1 <= k <= k_max for k in ks):
        raise ValueError(f"every k must be in 1..{k_max}, got {list(ks)}")
    columns = torch.tensor([k - 1 for k in ks], device=labels.device)
    # counts[:, l, j, c]: votes for c among the first j + 1 neighbours at depth l
    counts = torch.nn.functional.one_hot(labels[:, :, :max(ks)], num_classes).cumsum(2)
    return counts[:, :, columns].sum(1)


@torch.no_grad()
def vote_counts(neighbour_labels: torch.Tensor, ks: Sequence[int], num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority label and its count among the first k neighbours, for each k of ``ks``.

    Args:
        neighbour_labels: [q, k_max] labels of each query's neighbours, most similar first;
            or [q, L, k_max], those at each of L depths, whose votes are summed.
        ks: neighbourhood sizes, each in 1..k_max.

    Returns:
        (majority [q, len(ks)] long, count [q, len(ks)] long): ties go to the lowest label.
    """
    # first maximum: the lowest label on ties
    top, majority = _totals(neighbour_labels, ks, num_classes).max(dim=2)
    return majority, top


@torch.no_grad()
def true_label_totals(neighbour_labels: torch.Tensor, labels: torch.Tensor, ks: Sequence[int],
                      num_classes: int) -> torch.Tensor:
    """[q, len(ks)] long: T(y), the votes for each sample's own label at each k (the
    calibration scores of Deep k-NN: its nonconformity is L*k - T(y))."""
    totals = _totals(neighbour_labels, ks, num_classes)
    return totals.gather(2, labels.to(totals.device)[:, None, None].expand(-1, len(ks), 1))[..., 0]


def credibility(calibration_totals: torch.Tensor, ks: Sequence[int],
                points: Sequence[SurfacePoint]) -> torch.Tensor:
    """[P] float64: each point's credibility threshold, Deep k-NN's p-value of a prediction
    with a total of m votes at k (Deep k-NN, Papernot & McDaniel 2018).

    With calibration scores A = {L*k - T_i(y_i)}, the p-value of a total t is
    |{a in A : a >= L*k - t}| / |A| = the fraction of calibration samples with T_i(y_i) <= t.
    It is non-decreasing in t, so "answer when credibility >= c" is "answer when
    T(prediction) >= m" for the smallest m whose credibility reaches c: each
    point (k, m) is one such rule, labelled with its credibility (where the p-value is flat
    over several m, one credibility names the lowest of them). ``calibration_totals``:
    [n, len(ks)] of ``true_label_totals``; no calibration sample: NaN."""
    column = {k: i for i, k in enumerate(ks)}
    n = calibration_totals.shape[0]
    if n == 0:
        return torch.full((len(points),), math.nan, dtype=torch.float64)
    return torch.tensor([float((calibration_totals[:, column[p.k]] <= p.min_votes).sum()) / n
                         for p in points], dtype=torch.float64)


@torch.no_grad()
def surface_decisions(neighbour_labels: torch.Tensor, model_prediction: torch.Tensor,
                      points: Sequence[SurfacePoint], num_classes: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction [q, P] long, projected [q, P] bool) of LESCI at every point
    (``neighbour_labels`` as in ``vote_counts``)."""
    depths = neighbour_labels.shape[1] if neighbour_labels.ndim == 3 else 1
    if any(p.depths != depths for p in points):
        raise ValueError(f"points of a vote over {sorted({p.depths for p in points})} depths "
                         f"for neighbours at {depths}")
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
    """The four LESCI metrics (accuracy, projection_rate, accuracy_projected,
    accuracy_identity), one value per point ([P] float64 each); an empty
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
