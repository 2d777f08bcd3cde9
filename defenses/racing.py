"""Racing the attack suite over a LESCI surface: attack every point on a first slice of the
attack samples, then keep attacking only the points that can still be on the Pareto front.

The attacks are where a LESCI trial spends its time, and most points of a surface end
dominated. After each slice (a rung), every point's final robust accuracy on all N attack
samples is bracketed (``robust_bounds``): the clean inputs and the precomputed pool sets
(transfer attacks) are judged on every sample first, so the S samples of a point that nothing
cheap fooled are known exactly, and the final figure is ``S / N`` times the rate at which the
suite's APGD runs leave those samples standing. The slice's s attacked samples of the S are a
random sample of them (the samples' order is the split's, drawn at random), so Clopper and
Pearson's exact interval of that rate, r of s, brackets the rate over all S, conservatively
(the rate over a finite set of S moves less than a fresh rate would). The bracket is also
clipped to what is certain: at least the r samples that already survived, at most r plus every
standing sample not yet attacked.

A point stops when another point is better or equal in every objective *for sure*: its exact
figures (clean accuracy, projection rate, ...: known on the whole split before any attack) at
least as good, its robust lower bound at least the stopped point's upper bound, and one of them
strictly better (``dominated``). Many bounds are looked at, so each is taken at confidence
``1 - alpha / L``, L the bounds looked at (the caller's: ``orchestrator.racing`` counts each
point compared at each rung that decides, for the whole sweep; Bonferroni): with probability
at least 1 - alpha every bound holds, and then no stopped point would have been on the front
under the full attack. (This takes a point's attack on later slices to be as strong as on the
first: the suite attacks the points still racing together, so a point's runs on a later slice
share fewer other points than on the first; the suite attacks each point on its own exact
margin either way.)

A point that is never stopped is attacked on every sample by the same suite as without racing,
run slice by slice over the points still racing (so its figure can differ from an unraced run's
as two runs with different random starts do); a stopped point keeps its figure on the samples it
was attacked on, with that count, and is never on the front.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from defenses.intervals import clopper_pearson
from defenses.lesci_attack import LESCIDecision, VoteSuite, attack_surface
from defenses.models import eval_mode
from defenses.surface import SurfacePoint

__all__ = ["rungs_of", "robust_bounds", "dominated", "RaceCounts", "RaceResult",
           "race_surface"]


def rungs_of(total: int, grace: int, reduction: int) -> list[int]:
    """The attack-sample counts after which the race decides: ``grace * reduction**i`` below
    ``total``, then ``total`` (every sample)."""
    if grace < 1 or reduction < 2:
        raise ValueError(f"need grace >= 1 and reduction >= 2, got {grace} and {reduction}")
    rungs, at = [], grace
    while at < total:
        rungs.append(at)
        at *= reduction
    return rungs + [total]


def robust_bounds(robust: int, attacked: int, standing_attacked: int, standing: int,
                  total: int, confidence: float) -> tuple[float, float]:
    """(low, high) of a point's robust accuracy over all ``total`` attack samples.

    Args:
        robust: samples of the attacked slice the whole suite left right.
        attacked: the slice's size.
        standing_attacked: samples of the slice the clean inputs and pool sets left right
            (what the APGD runs then attacked).
        standing: such samples over all ``total``.
        confidence: of the rate interval (Clopper-Pearson).
    """
    if attacked >= total:  # every sample attacked: the figure itself
        return robust / total, robust / total
    certain_low = robust / total
    certain_high = (robust + standing - standing_attacked) / total
    if standing_attacked == 0:  # nothing to estimate the suite's survival rate from
        return certain_low, certain_high
    low, high = clopper_pearson(robust, standing_attacked, confidence)
    share = standing / total
    return max(certain_low, share * low), min(certain_high, share * high)


def dominated(low: np.ndarray, high: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """For each row i of the bounds [n, m] (an exact figure has low = high): the index of a
    row j that dominates it for sure (at least as good as i's best case in every objective,
    from j's worst case, and strictly better in one), else -1. A row with an unknown (NaN)
    figure neither dominates nor is dominated."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    up = np.asarray(maximize, dtype=bool)
    worst = np.where(up, low, -high)  # oriented: larger is better
    best = np.where(up, high, -low)
    usable = ~np.isnan(worst).any(axis=1)
    out = np.full(len(low), -1)
    for i in range(len(low)):
        if np.isnan(best[i]).any():
            continue
        ge = np.all(worst >= best[i], axis=1) & np.any(worst > best[i], axis=1) & usable
        ge[i] = False
        found = np.flatnonzero(ge)
        if found.size:
            out[i] = int(found[0])
    return out


@dataclass
class RaceCounts:
    """What the race knows of each point after a rung (``decide``'s argument): arrays [P]."""

    points: list[SurfacePoint]
    total: int  # N, the attack samples
    rung: int  # samples attacked by this rung
    attacked: np.ndarray  # samples each point was attacked on (stopped: fewer)
    robust: np.ndarray  # of those, left right by the whole suite
    standing_attacked: np.ndarray  # of those, left right by the clean inputs and pool sets
    standing: np.ndarray  # over all N, left right by the clean inputs and pool sets
    racing: np.ndarray  # bool: still attacked
    # each pool set's accuracy over all N (exact before any APGD run): {name: [P]}
    pool: dict[str, np.ndarray] = field(default_factory=dict)

    def bounds(self, confidence: float) -> tuple[np.ndarray, np.ndarray]:
        """Each point's (low, high) robust accuracy over all N (``robust_bounds``)."""
        pairs = [robust_bounds(int(r), int(a), int(sa), int(s), self.total, confidence)
                 for r, a, sa, s in zip(self.robust, self.attacked, self.standing_attacked,
                                        self.standing)]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@dataclass
class RaceResult:
    """The raced suite's outcome: per point, the samples it was attacked on (a prefix of the
    attack samples) and which of them it got right under the whole suite; and, on every
    sample, what each pool set left right."""

    points: list[SurfacePoint]
    robust: list[torch.Tensor]  # per point: bool [attacked_i]
    pool_correct: dict[str, torch.Tensor]  # name -> [N, P] bool (with "clean")
    stopped: dict[int, int] = field(default_factory=dict)  # point index -> samples at stop
    budget: dict[str, float | int] = field(default_factory=dict)

    def pool_accuracy(self, name: str) -> list[float]:
        """Each point's accuracy on every attack sample under one pool set."""
        return self.pool_correct[name].double().mean(0).tolist()


def race_surface(decision: LESCIDecision, x: torch.Tensor, y: torch.Tensor,
                 points: Sequence[SurfacePoint], eps: float, rungs: Sequence[int],
                 decide: Callable[[RaceCounts], dict[int, str]], suite: VoteSuite = VoteSuite(),
                 pool: dict[str, torch.Tensor] | None = None, starts: Sequence[str] = (),
                 generator: torch.Generator | None = None, batch_size: int = 512,
                 progress: Callable[[RaceCounts], None] | None = None) -> RaceResult:
    """``defenses.lesci_attack.attack_surface`` raced over ``rungs`` (increasing sample
    counts ending at ``len(x)``): the suite runs on each slice of samples for the points
    still racing, and after each rung but the last ``decide(counts)`` names the points to stop
    ({point index: why}; the reason is the caller's to print). Budget: ``point_samples``, the
    (point, sample) pairs attacked, ``full_point_samples``, those of the whole attack, and
    ``apgd_run_samples``, each APGD run's samples summed over the slices (the suite runs one
    per k and one per smoothing group, each over all the slice's samples, so a stopped point
    saves APGD work only once its whole k or group has stopped)."""
    points = list(points)
    total = x.shape[0]
    if not rungs or list(rungs) != sorted(set(rungs)) or rungs[-1] != total or rungs[0] < 1:
        raise ValueError(f"rungs must increase from >= 1 to the {total} samples, got "
                         f"{list(rungs)}")
    pool = dict(pool or {})
    pool_correct: dict[str, torch.Tensor] = {}
    with eval_mode(decision.model):
        for name, inputs in {"clean": x, **pool}.items():
            parts = [decision.decide(inputs[s:s + batch_size], points)[0].cpu()
                     == y[s:s + batch_size, None].cpu() for s in range(0, total, batch_size)]
            pool_correct[name] = torch.cat(parts)
    standing_all = functools.reduce(torch.logical_and, pool_correct.values())  # [N, P]
    pool_accuracy = {name: c.double().mean(0).numpy() for name, c in pool_correct.items()
                     if name != "clean"}
    robust: list[list[torch.Tensor]] = [[] for _ in points]
    racing = np.ones(len(points), bool)
    stopped: dict[int, int] = {}
    budget: dict[str, float | int] = {}
    run_samples, start = 0, 0
    for rung in rungs:
        active = np.flatnonzero(racing)
        if active.size:
            part = attack_surface(decision, x[start:rung], y[start:rung],
                                  [points[i] for i in active], eps, suite,
                                  pool={n: v[start:rung] for n, v in pool.items()},
                                  starts=starts, generator=generator, batch_size=batch_size)
            run_samples += int(part.budget["apgd_runs"]) * (rung - start)
            # the suite's settings (its runs: those over every point, on the first slice)
            budget = budget or {**part.budget, "attacked_points": len(points)}
            survived = part.robust().cpu()
            for column, i in enumerate(active):  # (nothing the pool sets fooled survives)
                robust[i].append(survived[:, column] & standing_all[start:rung, i])
        start = rung
        attacked = np.array([sum(len(t) for t in r) for r in robust])
        counts = RaceCounts(points, total, rung, attacked,
                            np.array([sum(int(t.sum()) for t in r) for r in robust]),
                            np.array([int(standing_all[:a, i].sum())
                                      for i, a in enumerate(attacked)]),
                            standing_all.sum(0).numpy(), racing.copy(), pool_accuracy)
        if progress is not None:
            progress(counts)
        if rung == total:
            break
        for i in decide(counts):
            if racing[i]:
                racing[i] = False
                stopped[i] = rung
    results = [torch.cat(r) if r else torch.zeros(0, dtype=torch.bool) for r in robust]
    budget.update({"point_samples": int(sum(len(r) for r in results)),
                   "apgd_run_samples": run_samples,
                   "full_point_samples": total * len(points),
                   "race_rungs": ",".join(str(r) for r in rungs)})
    return RaceResult(points, results, pool_correct, stopped, budget)
