"""MLflow tracking of a sweep: one experiment, one parent run, one child run per Ray trial.

Ray's stock ``MLflowLoggerCallback`` keeps its trial-to-run map in memory and has no parent run,
so a restored sweep would open second runs. Here child runs are keyed by the ``ray_trial_id``
tag and found again on resume (the map is also saved with the experiment through
``get_state``/``set_state``); the parent is found again by its ``sweep`` tag.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

__all__ = ["MLflowTracking", "TrackingError", "check_tracking_uri", "ensure_experiment",
           "ensure_parent_run", "child_run_name"]


class TrackingError(ValueError):
    """The MLflow tracking URI is unusable (unreachable server, unwritable file)."""


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before any Ray work, on a tracking URI that cannot be used."""
    import os

    from orchestrator.storage import redact

    if uri.startswith(("http://", "https://")):
        # one quick request of our own (MLflow's client would retry for minutes; its retry
        # settings are process-wide environment variables, left untouched here)
        import urllib.error
        import urllib.request

        probe = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(probe, timeout=10) as response:
                json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise TrackingError(f"--mlflow-uri {redact(uri)}: the server answered HTTP "
                                f"{exc.code} ({exc.reason}); is it an MLflow tracking server?"
                                ) from None
        except (OSError, ValueError) as exc:
            reason = redact(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            raise TrackingError(f"--mlflow-uri {redact(uri)}: unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise TrackingError(f"--mlflow-uri {uri}: folder {folder} is missing or unwritable")

# Values Tune adds to every result: bookkeeping, not the trial's metrics.
_TUNE_KEYS = {"done", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s",
              "pid", "time_since_restore", "iterations_since_restore", "timesteps_total",
              "episodes_total", "timesteps_since_restore", "warmup_time", "should_checkpoint"}


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(name)


def ensure_parent_run(client: MlflowClient, experiment_id: str, sweep: str,
                      params: dict[str, str], tags: dict[str, str]) -> str:
    """The sweep's parent run: found by its ``sweep`` tag, created once."""
    for run in client.search_runs([experiment_id], filter_string=f"tags.sweep = '{sweep}'"):
        if "mlflow.parentRunId" not in run.data.tags:
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    run = client.create_run(experiment_id, run_name=sweep, tags={"sweep": sweep, **tags})
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    return run.info.run_id


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
        self.family = spec.family.value
        self.searched = spec.searched_names()
        self.metric_names = spec.metric_names
        self._spec = spec
        self._runs: dict[str, str] = {}
        # last step logged per trial: a trial re-reported after a restore is not logged twice
        self._logged_step: dict[str, int] = {}
        # trials whose run this process has read back from MLflow (not saved: after a restore
        # the saved state may be older than the runs, so each run is read again once)
        self._checked: set[str] = set()
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:  # the client does not pickle; it is rebuilt
        state = dict(self.__dict__)
        state["_client"] = None
        state["_checked"] = set()
        state["_spec"] = None
        return state

    def used(self, trial) -> dict[str, Any]:
        """Every value the trial runs with, by its one name (its typed parameters)."""
        from orchestrator.params import resolve
        from orchestrator.space import SweepSpec

        if self._spec is None:
            self._spec = SweepSpec(**self.spec_json)
        return resolve(self._spec, dict(trial.config)).logged()

    def get_state(self) -> dict[str, Any]:
        return {"runs": dict(self._runs), "logged_step": dict(self._logged_step)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._runs = dict(state.get("runs", {}))
        self._logged_step = dict(state.get("logged_step", {}))
        self._checked = set()

    def run_id(self, trial) -> str:
        """The trial's child run: from the map, else found by tag, else created."""
        trial_id = trial.trial_id
        if trial_id in self._checked:
            return self._runs[trial_id]
        if trial_id in self._runs:
            found_id: str | None = self._runs[trial_id]
        else:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=(f"tags.ray_trial_id = '{trial_id}' and "
                               f"tags.mlflow.parentRunId = '{self.parent_run_id}'"))
            found_id = found[0].info.run_id if found else None
        if found_id is not None:
            run_id = found_id
            # the saved state may be older than the run: read back what it already holds
            history = self.client.get_metric_history(run_id, self.metric_names[0])
            self._logged_step[trial_id] = max([self._logged_step.get(trial_id, -1),
                                               *(m.step for m in history)])
        else:
            used = self.used(trial)
            run = self.client.create_run(
                self.experiment_id, run_name=child_run_name(self.family, used, self.searched),
                tags={"mlflow.parentRunId": self.parent_run_id, "ray_trial_id": trial_id,
                      "sweep": self.sweep, "family": self.family})
            run_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in sorted(used.items())]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start:start + 100])
        self._runs[trial_id] = run_id
        self._checked.add(trial_id)
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        self.client.update_run(run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_id(trial)
        # training trials report their epoch; LESCI trials report once (step 1)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self._logged_step.get(trial.trial_id, -1):
            return
        self._logged_step[trial.trial_id] = step
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in result.items()
                   if key not in _TUNE_KEYS and isinstance(value, (int, float))
                   and not isinstance(value, bool) and not math.isinf(float(value))]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

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
        self.client.set_terminated(run_id, status="FINISHED")

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
