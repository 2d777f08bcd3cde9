"""MLflow tracking of a sweep: one experiment, one parent run, one child run per Ray trial.

Ray's stock ``MLflowLoggerCallback`` keeps its trial-to-run map in memory and has no parent run,
so a restored sweep would open second runs. Here child runs are keyed by the ``ray_trial_id``
tag and found again on resume (the map is also saved with the experiment through
``get_state``/``set_state``); the parent is found again by its ``sweep`` tag. Every MLflow call
goes through the retrying client of ``orchestrator.mlflow_client``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray import tune

from orchestrator.mlflow_client import TrackingClient, TrackingError, tracking_client

__all__ = ["MLflowTracking", "child_run_name"]

# Values Tune adds to every result: bookkeeping, not the trial's metrics.
_TUNE_KEYS = {"done", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s",
              "pid", "time_since_restore", "iterations_since_restore", "timesteps_total",
              "episodes_total", "timesteps_since_restore", "warmup_time", "should_checkpoint"}


def child_run_name(family: str, used: dict[str, Any], searched: list[str]) -> str:
    """``lesci depth=layer1`` or ``adversarial objective=pgd steps=5 lr=0.05``: the family and
    the values the trial drew (``used``: the trial's params by name)."""
    parts = [family]
    for key in searched:
        if key not in used:
            continue  # another objective's own parameter
        value = used.get(key)
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class MLflowTracking(tune.Callback):
    """Logs each trial to its own child run under the sweep's parent run, idempotently."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str,
                 spec, surfaces: tuple[str, list[str]] | None = None):
        """``surfaces``: (the sweep's storage URI, the surface.csv columns) for LESCI sweeps:
        a finished trial's stored surface goes to its run as ``surface.csv``/``surface.png``
        at once (the end of the sweep logs any that are missing)."""
        self.tracking_uri = tracking_uri
        self.surfaces = surfaces
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.spec_json = spec.as_dict()  # plain data: the callback is saved with Tune's state
        self.family = spec.family
        self.searched = spec.searched_names()
        self.metric_names = spec.metric_names
        self._spec = spec
        self._runs: dict[str, str] = {}
        # last step logged per trial: a trial re-reported after a restore is not logged twice
        self._logged_step: dict[str, int] = {}
        # trials whose run this process has read back from MLflow (not saved: after a restore
        # the saved state may be older than the runs, so each run is read again once)
        self._checked: set[str] = set()
        self._client: TrackingClient | None = None

    @property
    def client(self) -> TrackingClient:
        if self._client is None:
            self._client = tracking_client(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:  # the client does not pickle; it is rebuilt
        state = dict(self.__dict__)
        state["_client"] = None
        state["_checked"] = set()
        state["_spec"] = None
        return state

    @property
    def spec(self):
        from orchestrator.space import SweepSpec

        if self._spec is None:
            self._spec = SweepSpec(**self.spec_json)
        return self._spec

    def used(self, trial) -> dict[str, Any]:
        """Every value the trial runs with, by its one name (its typed parameters)."""
        from orchestrator.params import resolve

        return resolve(self.spec, dict(trial.config)).logged()

    def _log_budget(self, run_id: str, trial) -> None:
        """Under early stopping: whether the trial was stopped (``stopped_early``), at which
        budget (``stopped_at``), and the budget it used (metric ``budget_used``)."""
        spec = self.spec
        family = spec.defense
        if spec.scheduler.name == "none" or family.budget_unit is None:
            return
        result = trial.last_result or {}
        used = family.budget_used(spec, result)
        stopped = not family.full_budget_reached(spec, result)
        tags = [RunTag("stopped_early", "true" if stopped else "false")]
        if stopped:
            tags.append(RunTag("stopped_at", family.stopped_at(spec, result)))
        metric = Metric("budget_used", used, int(time.time() * 1000), 0)
        self.client.log_batch(run_id, metrics=[metric], tags=tags)

    def get_state(self) -> dict[str, Any]:
        return {"runs": dict(self._runs), "logged_step": dict(self._logged_step)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._runs = dict(state.get("runs", {}))
        self._logged_step = dict(state.get("logged_step", {}))
        self._checked = set()

    def _find_run(self, client, trial_id: str) -> str | None:
        """The trial's child run by its tag. Should there be more than one (a create whose
        answer was lost, landing after the run was created again), the one in use, else one
        with metrics, else the earliest is kept, and the others, empty, are deleted."""
        found = client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.ray_trial_id = '{trial_id}' and "
                           f"tags.mlflow.parentRunId = '{self.parent_run_id}'"),
            order_by=["attributes.start_time ASC"])
        if not found:
            return None
        in_use = self._runs.get(trial_id)
        keep = next((r for r in found if r.info.run_id == in_use), None) or next(
            (r for r in found if r.data.metrics), found[0])
        for run in found:
            if run is not keep and not run.data.metrics:
                client.delete_run(run.info.run_id)
        return keep.info.run_id

    def run_id(self, trial) -> str:
        """The trial's child run: from the map, else found by tag, else created."""
        trial_id = trial.trial_id
        if trial_id in self._checked:
            return self._runs[trial_id]
        if trial_id in self._runs:
            found_id: str | None = self._runs[trial_id]
        else:
            found_id = self._find_run(self.client, trial_id)
        if found_id is not None:
            run_id = found_id
            # the saved state may be older than the run: read back what it already holds
            history = self.client.get_metric_history(run_id, self.metric_names[0])
            self._logged_step[trial_id] = max([self._logged_step.get(trial_id, -1),
                                               *(m.step for m in history)])
            # a driver killed between the run's create and its params left it without them
            self._log_params(run_id, trial, self.client.get_run(run_id).data.params)
        else:
            used = self.used(trial)
            tags = {"mlflow.parentRunId": self.parent_run_id, "ray_trial_id": trial_id,
                    "sweep": self.sweep, "family": self.family}
            # a create retried after its answer was lost finds the run instead of a second one
            run_id = self.client.retrying(
                lambda raw: raw.create_run(
                    self.experiment_id, tags=tags,
                    run_name=child_run_name(self.family, used, self.searched)).info.run_id,
                find=lambda raw: self._find_run(raw, trial_id))
            self._log_params(run_id, trial, {})
        self._runs[trial_id] = run_id
        self._checked.add(trial_id)
        return run_id

    def _log_params(self, run_id: str, trial, logged: dict[str, str]) -> None:
        """The values the trial used, as params of its run, but those ``logged`` already."""
        params = [Param(k, str(v)[:6000]) for k, v in sorted(self.used(trial).items())
                  if k not in logged]
        for start in range(0, len(params), 100):  # the same values again: idempotent
            self.client.log_batch(run_id, params=params[start:start + 100])

    def _drop_duplicates(self, trial_id: str) -> None:
        """Delete empty duplicates of the trial's run that a lost create left behind."""
        try:
            self._find_run(self.client, trial_id)
        except (TrackingError, MlflowException):
            pass  # housekeeping: never worth failing the sweep

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        self.client.update_run(run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_id(trial)
        # training trials report their epoch; LESCI trials report once (step 1)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self._logged_step.get(trial.trial_id, -1):
            return
        now = int(time.time() * 1000)
        # built once: a retried log_batch sends the same (key, value, step, timestamp), which
        # MLflow's SQL store keeps once
        metrics = [Metric(key, float(value), now, step) for key, value in result.items()
                   if key not in _TUNE_KEYS and isinstance(value, (int, float))
                   and not isinstance(value, bool) and not math.isinf(float(value))]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self._logged_step[trial.trial_id] = step  # only once MLflow has it

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        if self.surfaces is not None:
            from orchestrator.reporting import log_surface
            from orchestrator.storage import Storage

            uri, columns = self.surfaces
            found = Storage(uri).get_verified(f"results/{trial.trial_id}.json")
            if found is not None:
                title = child_run_name(self.family, self.used(trial), self.searched)
                log_surface(self.client, run_id, json.loads(found[0])["surface"], columns,
                            f"{self.sweep}: {title}")
        self._log_budget(run_id, trial)
        self.client.set_terminated(run_id, status="FINISHED")
        self._drop_duplicates(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        error = ""
        if getattr(trial, "error_file", None):
            try:
                with open(trial.error_file) as fh:
                    error = fh.read()
            except OSError:
                error = ""
        lines = [line for line in error.strip().splitlines() if line.strip()]
        self.client.log_batch(run_id, tags=[RunTag("error", (lines[-1] if lines else
                                                             "trial failed")[:5000])])
        self.client.set_terminated(run_id, status="FAILED")
        self._drop_duplicates(trial.trial_id)
