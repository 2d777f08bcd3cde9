"""Early stopping with several objectives: multi-objective asynchronous successive halving
(MO-ASHA; Schmucker et al. 2021, arXiv 2106.12639, on ASHA: Li et al. 2020, arXiv 1810.05934)
as a Ray Tune ``TrialScheduler``.

Rungs sit at ``grace_period * reduction_factor**i`` budget units (epochs) below the full
budget. The first result of a trial at or past a rung is recorded there and ranked among
every result recorded at that rung so far (itself included): by non-dominated sorting over
the space's optimized metrics (front 1, then front 2 of the rest, ...), and inside a front by
an epsilon-net, greedy farthest-point order in objective space normalised over the rung.
What happens next depends on the scheduler's ``type``:

- ``stopping`` (Ray Tune's ASHA): the trial continues iff its rank r (0-based) satisfies
  ``r < n / reduction_factor`` for the n results at the rung, and stops otherwise. A result
  alone at its rung (the first trials of a sweep) always continues.
- ``promotion`` (ASHA as Li et al. state it: a trial is promoted out of a rung while it is
  among the rung's top ``floor(n / reduction_factor)``): a trial that is not pauses at the
  rung (Tune's PAUSE; it resumes from its checkpoint), and every new result at the rung may
  promote a resting one, which then runs before any new trial once a slot is free. A resting
  trial holds no slot of ``search.max_concurrent`` (``RESTING``; ``orchestrator.resumable``),
  so the searcher starts new trials meanwhile. When nothing else can run (the searcher has
  no trial left and none runs), the highest rung that has promoted nobody promotes its best
  resting trial, so that at least one trial reaches the full budget; once no such rung is
  left, every trial still resting stops at its rung. Decisions wait for more results, so the first trials no
  longer run to the end by arriving first; the price is that a model-based searcher hears of
  a resting trial only when it ends (PRUNED, if it never went on).

A rank is a function of the *set* of recorded results, never of the order they arrived in:
every tie (equal distances, equal sums) is broken by the values themselves, and results with
equal values share the better rank. So a result that dominates every earlier one at its rung
is alone in front 1 and always continues, and permuting the history changes no decision.
(Syne Tune's ``NonDominatedPriority`` returns a sort order that its bracket reads as one score
per trial, which makes its decisions depend on arrival order.)

Rungs inside a training schedule's eps ramp would compare trials at different radii: results
count only once the optimiser has taken the longest ramp of the space (``min_step``: the same
epoch for every trial of a sweep), so a rung that falls inside the ramp is taken at the first
epoch past it, with that epoch's figures.

The records live on the instance and in the sweep's storage (``scheduler/rungs.json``), written
before a decision is returned: Tune 2.60 saves the searcher and the callbacks with the
experiment but restores a scheduler from the Tuner's first pickle, so a restored sweep reads
its rungs back from the storage, and decisions taken before a driver died stand.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from orchestrator.pareto import pareto_mask

__all__ = ["rung_levels", "ranking", "rank_of", "MultiObjectiveASHA", "STATE_FILE",
           "DECISION_LOG", "RESTING", "TYPES"]

# in a folder of its own: Tune copies the top-level .json and .pkl files of a restored
# experiment to its staging folder and uploads them back on every save, over newer ones
STATE_FILE = "scheduler/rungs.json"

# sweep name -> where the driver prints a decision (the CLI's console); a restored scheduler
# is unpickled by Tune, so it finds the log here rather than holding one
DECISION_LOG: dict[str, Callable[[str], None]] = {}

# sweep name -> the trials resting at a rung under ``type: promotion`` (paused, not promoted):
# the searcher's concurrency limit does not count them (``orchestrator.resumable``)
RESTING: dict[str, set[str]] = {}

TYPES = ("promotion", "stopping")


def rung_levels(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The rungs below the full budget ``max_t``: grace_period * reduction_factor**i."""
    levels, level = [], grace_period
    while level < max_t:
        levels.append(level)
        level *= reduction_factor
    return levels


def _oriented(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """[n, m] values as minimisation, each objective scaled to [0, 1] over the rows (an
    objective with one value everywhere: 0)."""
    v = np.where(np.asarray(maximize, dtype=bool), -values, values).astype(np.float64)
    low, high = v.min(axis=0), v.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return (v - low) / span


def ranking(values: np.ndarray, maximize: Sequence[bool]) -> list[int]:
    """Row indices of ``values`` [n, m], best first: successive Pareto fronts, each ordered
    by a greedy epsilon-net (farthest point from those already taken, in normalised
    objective space; the first of all, the point with the smallest sum of normalised
    minimisation values). Ties are broken by the values, so the order of the rows never
    matters except between rows with equal values."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return []
    z = _oriented(values, maximize)
    sums = z.sum(axis=1)
    remaining = np.arange(n)
    taken: list[int] = []
    while len(remaining):
        front = remaining[pareto_mask(z[remaining], [False] * z.shape[1])]
        left = list(front)
        while left:
            if taken:
                dist = np.array([np.min(np.linalg.norm(z[taken] - z[i], axis=1))
                                 for i in left])
            else:
                dist = np.zeros(len(left))
            # largest distance, then smallest sum, then lexicographically smallest values
            best = min(range(len(left)),
                       key=lambda j: (-dist[j], sums[left[j]], tuple(z[left[j]])))
            taken.append(int(left.pop(best)))
        remaining = np.array([i for i in remaining if i not in set(front)], dtype=int)
    return taken


def rank_of(values: np.ndarray, maximize: Sequence[bool], index: int) -> int:
    """Row ``index``'s 0-based rank in ``ranking``; rows with equal values share the better
    (smaller) rank."""
    order = ranking(values, maximize)
    mine = values[index]
    return next(position for position, row in enumerate(order)
                if np.array_equal(values[row], mine))


class MultiObjectiveASHA(FIFOScheduler):
    """MO-ASHA over ``metrics`` (directions ``modes``), budget ``time_attr`` up to ``max_t``.

    Args:
        metrics, modes: the space's optimized metrics and their directions ("max"/"min").
        max_t: the full budget (a trial's epochs); no rung at or above it.
        grace_period, reduction_factor: rungs at grace_period * reduction_factor**i.
        time_attr: the result key that counts budget units (``epoch``).
        min_step, step_attr: a rung counts only for results with ``result[step_attr] >=
            min_step`` (the longest eps ramp of the space, in optimiser steps).
        state_uri: the sweep's storage; the rung records are kept in ``scheduler/rungs.json``.
        sweep: the sweep's name (where decisions are printed: ``DECISION_LOG``).
        type: ``promotion`` (pause at a rung until among its top ``floor(n /
            reduction_factor)``) or ``stopping`` (stop unless among its top ``n /
            reduction_factor`` when it arrives); see the module docstring.
        max_concurrent: (promotion) a promoted trial resumes only while fewer trials than
            this run (0: no limit).
    """

    def __init__(self, metrics: Sequence[str], modes: Sequence[str], max_t: int,
                 grace_period: int = 1, reduction_factor: int = 3, time_attr: str = "epoch",
                 min_step: int = 0, step_attr: str = "optimizer_steps",
                 state_uri: str | None = None, sweep: str = "", type: str = "promotion",
                 max_concurrent: int = 0):
        super().__init__()
        if type not in TYPES:
            raise ValueError(f"type must be one of {', '.join(TYPES)}, got {type!r}")
        if reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {reduction_factor}")
        if not 1 <= grace_period < max_t:
            raise ValueError(f"grace_period must be in [1, {max_t}), got {grace_period}")
        self.metrics, self.modes = list(metrics), list(modes)
        self.maximize = [mode == "max" for mode in modes]
        self.max_t, self.grace_period = max_t, grace_period
        self.reduction_factor = reduction_factor
        self.time_attr, self.min_step, self.step_attr = time_attr, min_step, step_attr
        self.milestones = rung_levels(max_t, grace_period, reduction_factor)
        self.state_uri, self.sweep, self.type = state_uri, sweep, type
        self.max_concurrent = max_concurrent
        # rung -> {trial_id: values}; trial_id -> {"rung", "at" (the budget it had then),
        # "rank", "of"}
        self.rungs: dict[int, dict[str, list[float]]] = {}
        self.stopped: dict[str, dict[str, int]] = {}
        # promotion: trials resting at a rung (as ``stopped``), and the rungs each trial was
        # promoted out of
        self.resting: dict[str, dict[str, int]] = {}
        self.promoted: dict[str, list[int]] = {}
        self._loaded = state_uri is None

    # -- state -----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:  # the storage is the truth once a sweep runs
        return {**self.__dict__, "_loaded": self.state_uri is None}

    def _storage(self):
        from orchestrator.storage import Storage

        return Storage.from_uri(self.state_uri)

    def _load(self) -> None:
        if self._loaded:
            return
        raw = self._storage().read_bytes(STATE_FILE)
        if raw:
            state = json.loads(raw)
            self.rungs = {int(k): dict(v) for k, v in state.get("rungs", {}).items()}
            self.stopped = dict(state.get("stopped", {}))
            self.resting = dict(state.get("resting", {}))
            self.promoted = {k: list(v) for k, v in state.get("promoted", {}).items()}
        self._loaded = True
        self._publish()

    def _save(self) -> None:
        self._publish()
        if self.state_uri is not None:
            self._storage().write_bytes(STATE_FILE, json.dumps(
                {"rungs": self.rungs, "stopped": self.stopped, "resting": self.resting,
                 "promoted": self.promoted}, sort_keys=True).encode())

    def _publish(self) -> None:
        if self.type == "promotion":
            RESTING[self.sweep] = set(self.resting)

    def reset_state(self) -> None:
        """Empty rungs, in memory and in the storage (a sweep starting its trials afresh)."""
        self.rungs, self.stopped, self.resting, self.promoted = {}, {}, {}, {}
        self._loaded = True
        self._save()

    # -- decisions -------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """What the parent run logs of the scheduler."""
        return {"name": "mo_asha", "type": self.type, "reduction_factor": self.reduction_factor,
                "grace_period": self.grace_period, "max_t": self.max_t,
                "rungs": self.milestones, "min_step": self.min_step}

    def decide(self, trial_id: str, result: dict[str, Any]) -> str:
        """CONTINUE, STOP or (``promotion``) PAUSE for ``trial_id``'s ``result``; a trial once
        stopped stays stopped, and one resting at a rung rests again (a result reported again
        after a restore gets the same answer)."""
        self._load()
        if trial_id in self.stopped:
            return TrialScheduler.STOP
        budget = result.get(self.time_attr)
        values = [result.get(m) for m in self.metrics]
        if (not isinstance(budget, (int, float)) or any(
                not isinstance(v, (int, float)) or math.isnan(v) for v in values)):
            return TrialScheduler.CONTINUE
        if budget >= self.max_t:
            return TrialScheduler.CONTINUE  # its whole budget is spent: nothing to save
        if result.get(self.step_attr, math.inf) < self.min_step:
            return TrialScheduler.CONTINUE  # inside the eps ramp: not comparable yet
        promotion = self.type == "promotion"
        action, changed, record = TrialScheduler.CONTINUE, False, None
        for milestone in self.milestones:
            if budget < milestone:
                break
            rung = self.rungs.setdefault(milestone, {})
            if trial_id in rung:
                if promotion and trial_id in self.resting:
                    return TrialScheduler.PAUSE  # still resting there (a restarted trial)
                continue  # ranked here before, and it went on
            rung[trial_id] = [float(v) for v in values]
            changed = True
            rank, n = self._rank_at(milestone, trial_id)
            record = {"rung": milestone, "at": budget, "rank": rank, "of": n}
            if promotion:
                self._promote_at(milestone)  # one more result: the top may be wider
                if rank < n // self.reduction_factor:
                    self.promoted.setdefault(trial_id, []).append(milestone)
                    continue
                self.resting[trial_id] = record
                action = TrialScheduler.PAUSE
                break
            if not rank < n / self.reduction_factor:
                self.stopped[trial_id] = record
                action = TrialScheduler.STOP
                break
        if changed:
            self._save()  # before the decision takes effect
        if action != TrialScheduler.CONTINUE:
            self._log(trial_id, record, "paused" if promotion else "stopped")
        return action

    def _log(self, trial_id: str, info: dict[str, Any], verb: str) -> None:
        late = (f" (rung {info['rung']}, taken past the eps ramp)"
                if info["at"] != info["rung"] else "")
        top = (f", where the top {info['of'] // self.reduction_factor} go on"
               if verb == "paused" else "")
        DECISION_LOG.get(self.sweep, print)(
            f"  trial {trial_id} {verb} at {self.time_attr} {info['at']:g}: behind "
            f"{info['rank']} of {info['of']} results at that rung{top}{late}")

    def _rank_at(self, milestone: int, trial_id: str) -> tuple[int, int]:
        """(0-based rank, number of results) of ``trial_id`` at rung ``milestone``."""
        rung = self.rungs[milestone]
        ids = sorted(rung)
        table = np.array([rung[t] for t in ids])
        return rank_of(table, self.maximize, ids.index(trial_id)), len(ids)

    def _promote(self, trial_id: str, why: str) -> None:
        info = self.resting.pop(trial_id)
        self.promoted.setdefault(trial_id, []).append(info["rung"])
        DECISION_LOG.get(self.sweep, print)(
            f"  trial {trial_id} promoted past {self.time_attr} {info['at']:g}: {why}")

    def _promote_at(self, milestone: int) -> None:
        """Promote the trials resting at ``milestone`` that are now in its top
        ``floor(n / reduction_factor)``."""
        for trial_id in sorted(self.resting):
            if self.resting[trial_id]["rung"] != milestone:
                continue
            rank, n = self._rank_at(milestone, trial_id)
            if rank < n // self.reduction_factor:
                self._promote(trial_id, f"now {rank + 1} of {n} results at that rung")

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.decide(trial.trial_id, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        """A trial that failed rests nowhere (it can no longer be promoted)."""
        self._load()
        if self.resting.pop(trial.trial_id, None) is not None:
            self._save()

    def choose_trial_to_run(self, tune_controller):
        """Tune's next trial to start: a promoted one first, then a new one. A trial resting
        at a rung is never chosen. When nothing else can run (``promotion``), ``settle``."""
        from ray.tune.experiment import Trial

        if self.type != "promotion":
            return super().choose_trial_to_run(tune_controller)
        self._load()
        trials = tune_controller.get_trials()
        busy = sum(trial.status in (Trial.RUNNING, Trial.PENDING) for trial in trials)
        for trial in trials:
            if (trial.status == Trial.PAUSED and trial.trial_id not in self.resting
                    and trial.trial_id not in self.stopped
                    and not 0 < self.max_concurrent <= busy):
                return trial
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        paused = {trial.trial_id: trial for trial in trials if trial.status == Trial.PAUSED}
        if paused and not busy and tune_controller.search_alg.is_finished():
            for trial_id in self.settle(paused):
                tune_controller.stop_trial(paused[trial_id])
        return None

    def settle(self, paused) -> list[str]:
        """Nothing else can run: the highest rung that has promoted no trial promotes its best
        resting one (so that some trial reaches the full budget); if there is none, the
        resting trials among ``paused`` stop at their rungs. Returns the trials to stop."""
        self._load()
        paused = set(paused)
        for milestone in reversed(self.milestones):
            waiting = [t for t in sorted(self.resting)
                       if self.resting[t]["rung"] == milestone and t in paused]
            if waiting and not any(milestone in rungs for rungs in self.promoted.values()):
                best = min(waiting, key=lambda t: self._rank_at(milestone, t)[0])
                self._promote(best, "the best of its rung, which no other trial left")
                self._save()
                return []
        stop = sorted(paused & set(self.resting))
        for trial_id in stop:
            info = self.resting.pop(trial_id)
            rank, n = self._rank_at(info["rung"], trial_id)  # among all the rung's results
            self.stopped[trial_id] = {**info, "rank": rank, "of": n}
        if stop:
            self._save()
            for trial_id in stop:
                self._log(trial_id, self.stopped[trial_id], "stopped")
        return stop

    def debug_string(self) -> str:
        return (f"MO-ASHA ({self.type}): rungs {self.milestones} ({self.time_attr}), "
                f"{len(self.stopped)} stopped")
