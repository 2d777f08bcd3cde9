"""What the console shows while a sweep runs, instead of Ray's per-trial tables.

- A status line whenever a trial starts, ends or fails, and at least every ``interval``
  seconds: trials done, running, failed and total, the elapsed time, an estimate of the time
  left, and the hypervolume of the front so far.
- The trials' own lines (a stage computing and done, a long stage's progress), which they send
  through the sweep's coordinator actor (``orchestrator.stages``) rather than Ray's log
  forwarding, printed as they come.
- Each failed trial once, with its reason (the last line of its error).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import ray
from ray import tune

from orchestrator.pareto import front_of

__all__ = ["ConsoleProgress", "failure_reason", "format_seconds"]


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def failure_reason(trial) -> str:
    """The last line of a failed trial's error (Tune's error file), or a generic reason."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as fh:
                lines = [line.strip() for line in fh if line.strip()]
            if lines:
                return lines[-1][:300]
        except OSError:
            pass
    return "the trial raised (no error file)"


class ConsoleProgress(tune.Callback):
    """The sweep's console: see the module docstring. Picklable (saved with Tune's state)."""

    def __init__(self, sweep: str, total: int, concurrent: int, optimize: dict[str, str],
                 surface: bool, storage_uri: str, coordinator: str | None,
                 log: Callable[[str], None] = print, interval: float = 60.0):
        self.sweep, self.total, self.optimize, self.surface = sweep, total, optimize, surface
        self.concurrent = concurrent
        self.storage_uri, self.coordinator, self.log = storage_uri, coordinator, log
        self.interval = interval
        self._start = time.time()
        self._last_status = 0.0
        self._last_drain = 0.0
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._announced_failures: set[str] = set()
        self._handle = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def setup(self, **info) -> None:
        self._start = time.time()  # a resumed sweep counts from its own start
        self._last_status = self._start

    # -- the trials' lines, through the coordinator ----------------------------------------

    def _drain(self) -> None:
        if self.coordinator is None:
            return
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self.coordinator)
            lines = ray.get(self._handle.drain.remote(), timeout=5)
        except Exception:  # the coordinator is not up yet or has gone: nothing to show
            return
        for line in lines:
            self.log(f"  {line}")

    # -- the status line -------------------------------------------------------------------

    def _status(self, trials, ending=None, status: str = "") -> None:
        """``ending``: the trial whose end is being reported (Tune updates its status after
        the callbacks), counted as ``status``."""
        counts = {"TERMINATED": 0, "RUNNING": 0, "ERROR": 0, "PAUSED": 0}
        durations = []
        for trial in trials:
            now = status if trial is ending else trial.status
            if now in counts:
                counts[now] += 1
            if now == "TERMINATED" and trial.last_result:
                durations.append(float(trial.last_result.get("time_total_s", 0.0)))
        done, running, failed = counts["TERMINATED"], counts["RUNNING"], counts["ERROR"]
        # resting at a rung of a promoting scheduler (orchestrator.schedulers)
        paused = f", {counts['PAUSED']} paused" if counts["PAUSED"] else ""
        elapsed = time.time() - self._start
        ended = done + failed
        left = ""
        if durations and ended < self.total:
            # the trials still to start, and half of those running, at the mean duration
            # of the finished ones, spread over the concurrent slots
            mean = sum(durations) / len(durations)
            waiting = self.total - ended - running
            estimate = (waiting + 0.5 * running) * mean / max(1, min(self.concurrent,
                                                                     self.total - ended))
            left = f", about {format_seconds(estimate)} left"
        rows = [row for trial_rows in self._rows.values() for row in trial_rows]
        volume = f", front hypervolume {front_of(rows, self.optimize)[1]:.4f}" if rows else ""
        self.log(f"[{format_seconds(elapsed)}] trials: {done} done, {running} running"
                 f"{paused}, {failed} failed, of {self.total}{left}{volume}")
        self._last_status = time.time()

    def _record(self, trial, result: dict[str, Any] | None) -> None:
        if self.surface:  # a trial's rows: its stored surface
            from orchestrator.storage import Storage

            found = Storage(self.storage_uri).get_verified(f"results/{trial.trial_id}.json")
            if found is not None:  # (a point the attack race stopped is never on the front)
                self._rows[trial.trial_id] = [row for row in json.loads(found[0])["surface"]
                                              if not row.get("raced_out")]
            return
        if result and all(isinstance(result.get(m), (int, float)) for m in self.optimize):
            row = {m: float(result[m]) for m in self.optimize}
            if not any(math.isnan(v) for v in row.values()):
                self._rows[trial.trial_id] = [row]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a sweep saved before the flag was named for what it means (``lesci``) resumes too
        if "surface" not in state:
            state["surface"] = state.pop("lesci", False)
        self.__dict__.update(state)

    # -- Tune's hooks ----------------------------------------------------------------------

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.time()
        if now - self._last_drain >= 0.25:
            self._last_drain = now
            self._drain()
        if now - self._last_status >= self.interval:
            self._status(trials)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._drain()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._drain()
        self._record(trial, trial.last_result)
        self._status(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._drain()
        if trial.trial_id not in self._announced_failures:
            self._announced_failures.add(trial.trial_id)
            self.log(f"  trial {trial.trial_id} failed: {failure_reason(trial)}")
        self._status(trials, trial, "ERROR")

    def on_experiment_end(self, trials, **info) -> None:
        self._drain()


class ProgressLine:
    """A long stage's progress for the console, at most one line per ``every`` seconds:
    ``what: done/total unit, rate/s, about m:ss left``."""

    def __init__(self, what: str, total: int, unit: str, log: Callable[[str], None],
                 every: float = 30.0):
        self.what, self.total, self.unit, self.log, self.every = what, total, unit, log, every
        self._start = time.perf_counter()
        self._last = self._start

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self._last < self.every or done >= self.total:
            return
        self._last = now
        rate = done / max(now - self._start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = f", about {format_seconds(left)} left" if math.isfinite(left) else ""
        self.log(f"{self.what}: {done:,}/{self.total:,} {self.unit}, {rate:,.1f}/s{eta}")
