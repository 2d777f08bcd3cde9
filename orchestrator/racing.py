"""A LESCI trial's side of the attack race (``scheduler: mo_asha`` on a LESCI space).

``defenses.racing.race_surface`` attacks a trial's surface slice by slice; after each rung
this decides which points stop. The rule is ``defenses.racing.dominated`` over every point the
sweep has published so far: the trial's own, and those of the trials that ran or run beside
it (each trial writes its counts to ``race/<trial>.json`` in the sweep's storage after every
rung), so a depth whose whole surface another depth dominates stops as a whole. The bounds are
Bonferroni-corrected over every bound the sweep's race can look at: each point of each trial,
at each rung that decides (fixed from the space before the sweep).

A trial run again (a driver killed and resumed before the trial's result was stored) keeps the
decisions it had taken: a point stopped at a rung before is stopped at that rung again.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from defenses.racing import RaceCounts, dominated, rungs_of
from defenses.surface import SurfacePoint
from orchestrator.storage import Storage

__all__ = ["SurfaceRace", "ALPHA", "RACED_METRIC", "POOL_METRICS"]

# the family-wise error of the race's decisions: with probability at least 1 - ALPHA no
# stopped point would have been on the front under the full attack
ALPHA = 0.05
# the one figure the attacks decide (every other LESCI metric is exact before any attack)
RACED_METRIC = "robust_accuracy"
# figures of a pool set, judged on every sample before the race (``RaceCounts.pool``)
POOL_METRICS = {"transfer_robust_accuracy": "transfer"}


def _name(depth: str, point: SurfacePoint, trial: str = "") -> str:
    return f"{depth} k {point.k} m {point.min_votes}" + (f" of trial {trial}" if trial else "")


def _well_formed(record: dict[str, Any]) -> bool:
    """A record with a value of each count and each exact metric for each of its points."""
    try:
        n = len(record["points"])
        return (all(len(record["counts"][k]) == n for k in (
                    "attacked", "robust", "standing_attacked", "standing"))
                and all(len(v) == n for v in record["exact"].values())
                and isinstance(record["rung"], int) and isinstance(record["depth"], str))
    except (KeyError, TypeError):
        return False


class SurfaceRace:
    """The decisions of one trial's race (``decide`` for ``race_surface``).

    Args:
        optimize: the space's metrics and directions.
        key: what the trial's figures depend on (its parameters): another trial's record
            with the same key measures the same points (a sweep started afresh under new
            trial ids) and is not compared.
        exact: each optimized metric but the robust accuracy, one value per point (on the
            whole split, before any attack); those not known yet come with ``measured``.
        points_compared: the points the whole sweep can compare (its trials times the
            largest surface; default: this trial's), fixed before the sweep, so that the
            Bonferroni correction covers every decision of every trial.
    """

    def __init__(self, storage: Storage, trial_id: str, depth: str, key: str,
                 points: list[SurfacePoint], optimize: dict[str, str],
                 exact: dict[str, list[float]], grace: int, reduction: int,
                 log: Callable[[str], None] = print, points_compared: int | None = None):
        self.storage, self.trial_id, self.depth, self.key = storage, trial_id, depth, key
        self.points, self.optimize, self.log = points, optimize, log
        self.exact = {m: list(map(float, exact.get(m, []))) for m in optimize
                      if m != RACED_METRIC}
        self.grace, self.reduction = grace, reduction
        self.points_compared = max(points_compared or len(points), len(points))
        self.path = f"race/{trial_id}.json"
        earlier = self._read(self.path) or {}
        # decisions a run of this trial took before: they stand (and stay in its record until
        # this run takes them again)
        self.forced = {tuple(key): at for key, at in earlier.get("stopped", [])}
        self.stopped: list[tuple[list[int], int]] = []

    def _read(self, path: str) -> dict[str, Any] | None:
        found = self.storage.read_bytes(path)
        try:
            record = json.loads(found) if found else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        return record if isinstance(record, dict) else None

    def confidence(self, total: int) -> float:
        """Each bound's confidence: Bonferroni over every bound the sweep's race can look at
        (each point it can compare, at each rung that decides)."""
        looks = self.points_compared * max(len(self.rungs(total)) - 1, 1)
        return 1 - ALPHA / looks

    def measured(self, metrics: dict[str, list[float]]) -> None:
        """The trial's figures known before any attack (its clean surface): those of them
        the space optimizes become the race's exact figures."""
        self.exact.update({m: [float(v) for v in metrics[m]] for m in self.exact
                           if m in metrics})

    def rungs(self, total: int) -> list[int]:
        return rungs_of(total, self.grace, self.reduction)

    def _publish(self, counts: RaceCounts, done: bool) -> None:
        record = {"trial": self.trial_id, "depth": self.depth, "key": self.key,
                  "total": counts.total,
                  "rung": counts.rung, "done": done,
                  "points": [[p.k, p.min_votes, p.depths] for p in self.points],
                  "exact": self.exact,
                  "counts": {name: getattr(counts, name).tolist() for name in (
                      "attacked", "robust", "standing_attacked", "standing")},
                  "stopped": self.stopped + [
                      [list(key), at] for key, at in self.forced.items()
                      if not any(tuple(k) == key for k, _ in self.stopped)]}
        self.storage.write_bytes(self.path, json.dumps(record).encode())

    def _others(self, total: int) -> list[dict[str, Any]]:
        records = []
        for name in self.storage.list("race"):
            if not name.endswith(".json") or name == f"{self.trial_id}.json":
                continue
            record = self._read(f"race/{name}")  # unreadable: left out
            if (record and record.get("total") == total and record.get("key") != self.key
                    and set(record.get("exact", {})) == set(self.exact)
                    and _well_formed(record)):
                records.append(record)
        return records

    def progress(self, counts: RaceCounts) -> None:
        """``race_surface``'s progress: one console line per rung; the last rung's counts
        published."""
        racing = int(counts.racing.sum())
        self.log(f"attacks on the vote at {self.depth}: {counts.rung} of {counts.total} "
                 f"samples, {racing} of {len(self.points)} points attacked on them")
        if counts.rung == counts.total:
            self._complete(counts)
            self._publish(counts, done=True)

    def _complete(self, counts: RaceCounts) -> None:
        # the figures of a pool set are exact before the race; what is still unknown (a
        # metric measured after the attacks) is NaN, and no point stops by it
        for metric, name in POOL_METRICS.items():
            if metric in self.exact and name in counts.pool:
                self.exact[metric] = [float(v) for v in counts.pool[name]]
        for metric, values in self.exact.items():
            if len(values) != len(self.points):
                self.exact[metric] = [float("nan")] * len(self.points)

    def __call__(self, counts: RaceCounts) -> dict[int, str]:
        """The points of this trial to stop after ``counts.rung`` samples, with why."""
        self._complete(counts)
        self._publish(counts, done=False)
        others = self._others(counts.total)
        groups = [("", self.depth, self.points, self.exact, counts)]
        for record in others:
            c = record["counts"]
            points = [SurfacePoint(*p) for p in record["points"]]
            trial = record.get("trial", "?")
            groups.append((trial, record["depth"], points, record["exact"], RaceCounts(
                points, counts.total, record["rung"], *(np.array(c[k]) for k in (
                    "attacked", "robust", "standing_attacked", "standing")),
                np.ones(len(points), bool))))
        confidence = self.confidence(counts.total)
        metrics = list(self.optimize)
        lows, highs, names = [], [], []
        for trial, depth, points, exact, c in groups:
            low, high = c.bounds(confidence)
            for i, point in enumerate(points):
                lows.append([low[i] if m == RACED_METRIC else exact[m][i] for m in metrics])
                highs.append([high[i] if m == RACED_METRIC else exact[m][i] for m in metrics])
                names.append(_name(depth, point, trial))
        by = dominated(np.array(lows), np.array(highs),
                       [mode == "max" for mode in self.optimize.values()])
        column = metrics.index(RACED_METRIC) if RACED_METRIC in metrics else None
        stops: dict[int, str] = {}
        for i, point in enumerate(self.points):
            if not counts.racing[i]:
                continue
            key = (point.k, point.min_votes)
            if self.forced.get(key) == counts.rung:
                stops[i] = "stopped here in an earlier run of this trial"
            elif by[i] >= 0:
                j = int(by[i])
                bounds = ("" if column is None else
                          f" (robust accuracy at most {highs[i][column]:.3f}; "
                          f"{names[j]}'s at least {lows[j][column]:.3f})")
                stops[i] = f"dominated by {names[j]}{bounds}"
        for i, why in stops.items():
            point = self.points[i]
            self.stopped.append(([point.k, point.min_votes], counts.rung))
            self.log(f"  race: {_name(self.depth, point)} stopped after {counts.rung} of "
                     f"{counts.total} attack samples: {why}")
        if stops:  # the record names its stops before they take effect
            self._publish(counts, done=False)
        return stops

