"""A sweep: the space to a ``tune.Tuner`` (``orchestrator.searchers``), MLflow tracking, the
shared-stage coordinator, resume with ``Tuner.restore``, and the Pareto front at the end
(``orchestrator.reporting.report_front``)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import time
from typing import Iterator

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.holdout import evaluate_front
from orchestrator.progress import ConsoleProgress
from orchestrator.reporting import SweepResult, report_front, surface_columns
from orchestrator.schedulers import DECISION_LOG
from orchestrator.searchers import param_space, scheduler_of, tune_config
from orchestrator.space import SpaceError, SweepSpec
from orchestrator.stages import StageCoordinator, coordinator_name
from orchestrator.storage import Storage, redact
from orchestrator.mlflow_client import ensure_experiment, ensure_parent_run, tracking_client
from orchestrator.tracking import MLflowTracking
from orchestrator.trainables import make_trainable

__all__ = ["SweepInterrupted", "run_sweep"]


# sweep name -> trials ended (finished or failed) after Tune's last step in this process; Tune
# pickles its callbacks with the experiment and a restore brings back its own copies, so they
# report here rather than to an instance the driver holds
_ENDED_AFTER_STEP: dict[str, int] = {}


class TrialsEnded(tune.Callback):
    """Counts the trials that have ended after each step of Tune's loop. Tune catches Ctrl-C,
    saves its state and then stops the live trials, which marks them TERMINATED like finished
    ones; what the loop's last step saw tells the two apart."""

    def __init__(self, sweep: str):
        self.sweep = sweep

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        _ENDED_AFTER_STEP[self.sweep] = sum(trial.is_finished() for trial in trials)


class RayAuthError(SpaceError):
    """The Ray cluster to attach to wants a token this process does not have."""


class SweepInterrupted(Exception):
    """The search stopped before its trials ended (Ctrl-C, or SIGUSR1, which Tune turns into a
    saved stop): no front is chosen and the test split stays unread; ``--resume`` goes on."""

    def __init__(self, name: str, ended: int, total: int):
        super().__init__(f"sweep {name!r}: interrupted with {ended} of {total} trial(s) ended; "
                         "Tune saved its state, nothing is lost")

SPACE_FILE = "space.json"


def _init_ray(verbose: bool) -> None:
    if ray.is_initialized():
        return
    # No resource arguments: on a cluster this attaches to the running Ray (ray submit),
    # elsewhere it starts a local one. Unless verbose, Ray's own warnings and the trials'
    # output stay out of the console (the trials send their lines through the coordinator).
    # (a failed trial's reason is printed by ConsoleProgress, without Ray's traceback)
    try:
        ray.init(include_dashboard=False, logging_level="INFO" if verbose else "CRITICAL",
                 log_to_driver=verbose)
    except (ray.exceptions.AuthenticationError, RuntimeError, ConnectionError) as exc:
        causes, link = [], exc
        while link is not None:
            causes.append(link)
            link = link.__cause__ or link.__context__
        if not any(isinstance(c, ray.exceptions.AuthenticationError)
                   or "authentication token" in str(c).lower() for c in causes):
            raise
        # a cluster started with RAY_AUTH_MODE=token (docker/cluster-*.yaml), and this
        # machine without its token or the mode
        raise RayAuthError(
            "Ray: the cluster requires its authentication token: set RAY_AUTH_MODE=token and "
            "put the cluster's token in ~/.ray/auth_token (`ray get-auth-token` on the machine "
            "that ran `ray up` prints it) or in RAY_AUTH_TOKEN") from None


def _same_space(stored: dict, spec: SweepSpec) -> bool:
    """Whether a stored space is ``spec``, read through today's schema (a space stored by an
    earlier release, e.g. ``scheduler: none`` before it became a mapping, is the same)."""
    if stored == spec.as_dict():
        return True
    try:
        return SweepSpec(**stored).as_dict() == spec.as_dict()
    except (ValueError, TypeError):
        return False


def _claim_name(spec: SweepSpec, name: str, storage_root: Storage, resume: bool,
                log) -> bool:
    """Store the sweep's space unless it is there; True if Tune has saved state to restore.

    A sweep killed at any moment can be resumed: before anything was stored, ``--resume``
    simply starts it; after its space was stored but before Tune first saved its state (MLflow
    set-up, Ray's start), ``--resume`` starts its trials afresh."""
    sweep_storage = storage_root.child(name)
    stored = sweep_storage.read_bytes(SPACE_FILE)
    if stored is not None and resume and not _same_space(json.loads(stored), spec):
        raise SpaceError(f"--resume: sweep {name!r} was started with another space (or "
                         f"other --num-samples/--max-concurrent/--smoke-test); resume it "
                         "with the same arguments")
    if stored is not None and not resume:
        raise SpaceError(f"--name {name}: a sweep of that name exists in "
                         f"{redact(storage_root.uri)}; pass --resume to continue it or choose "
                         "another --name")
    if stored is None:
        if resume:
            log(f"sweep {name!r}: nothing was stored yet in {redact(storage_root.uri)}; "
                "starting it")
        storage_root.check_writable()
        sweep_storage.write_bytes(SPACE_FILE, json.dumps(spec.as_dict(), indent=2).encode())
        return False
    restorable = tune.Tuner.can_restore(storage_root.join(name))
    if not restorable:
        log(f"sweep {name!r}: stopped before Ray saved its state; starting its trials")
    return restorable


def _forget_lost_trials(client: MlflowClient, experiment_id: str, parent_run_id: str,
                        storage: str, log) -> None:
    """Delete the child runs of trials that Tune never saved: a sweep stopped before Tune's
    first state save starts its trials afresh, under new trial ids. Only when the parent run
    is this storage's sweep: an experiment of the same name kept elsewhere is left alone."""
    if client.get_run(parent_run_id).data.params.get("storage") != storage:
        return
    lost = client.search_runs([experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000)
    for run in lost:
        client.delete_run(run.info.run_id)
    if lost:
        log(f"MLflow: {len(lost)} run(s) of trials lost before Ray saved its state, removed")


@contextlib.contextmanager
def _lenient_metrics(needed: bool) -> Iterator[None]:
    """While the Tuner runs: the suite's metrics come with a training trial's last epoch only,
    and Tune would reject every earlier result for lacking a searched metric. Restored after."""
    key, before = "TUNE_DISABLE_STRICT_METRIC_CHECKING", os.environ.get(
        "TUNE_DISABLE_STRICT_METRIC_CHECKING")
    if needed:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if needed:
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


def run_sweep(spec: SweepSpec, name: str, storage_root: Storage, mlflow_uri: str,
              resume: bool = False, log=print, verbose: bool = False,
              test: bool = True) -> SweepResult:
    """Run (or, with ``resume``, continue) the sweep ``name`` of ``spec``; then its front,
    chosen on the validation split, is evaluated once on the test split (unless ``test`` is
    False: ``--no-test``)."""
    sweep_storage = storage_root.child(name)
    experiment_path = storage_root.join(name)
    restore = _claim_name(spec, name, storage_root, resume, log)

    def track() -> tuple[MlflowClient, str, str]:
        client = tracking_client(mlflow_uri)
        experiment_id = ensure_experiment(client, name)
        parent_run_id = ensure_parent_run(
            client, experiment_id, name,
            params={"space": spec.name, "family": spec.family,
                    "dataset": spec.dataset.name, "model": spec.model.label,
                    "optimize": json.dumps(spec.optimize),
                    "algorithm": spec.search.algorithm.value,
                    "num_samples": str(spec.search.num_samples),
                    "scheduler": json.dumps(spec.scheduler.model_dump()),
                    "storage": redact(storage_root.uri)},
            tags={"family": spec.family})
        if resume and not restore:
            _forget_lost_trials(client, experiment_id, parent_run_id,
                                redact(storage_root.uri), log)
        log(f"MLflow: experiment {name!r} ({experiment_id}), parent run {parent_run_id}")
        return client, experiment_id, parent_run_id

    # the tracking store's set-up (a new SQLite store migrates its schema) and Ray's start
    # take seconds each: side by side
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tracked = pool.submit(track)
        _init_ray(verbose)
        client, experiment_id, parent_run_id = tracked.result()
    # On the driver's node: losing a worker node must not take the coordinator with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # the handle is held for the whole sweep, so the named actor lives as long as the trials
    coordinator = StageCoordinator.options(name=coordinator_name(name), get_if_exists=True,
                                           scheduling_strategy=here).remote()
    trainable = make_trainable(spec, sweep_storage)
    DECISION_LOG[name] = log  # where the scheduler's stop decisions are printed
    if restore:
        log(f"resuming sweep {name!r} from {redact(experiment_path)}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True,
                                   param_space=param_space(spec))
    else:
        surfaces = ((sweep_storage.uri, surface_columns(spec))
                    if spec.defense.surface else None)
        callbacks = [MLflowTracking(mlflow_uri, experiment_id, parent_run_id, name, spec,
                                    surfaces),
                     ConsoleProgress(name, spec.trial_count, spec.search.max_concurrent,
                                     spec.optimize,
                                     spec.defense.surface, sweep_storage.uri,
                                     coordinator_name(name), log)]
        scheduler = scheduler_of(spec, sweep_storage.uri, name)
        # trials start afresh (under new ids, after a resume before Ray saved its state): so
        # do the rungs, and the attack races of lost trials stop no point of the new ones
        # (LESCI under mo_asha, orchestrator.racing)
        for record in sweep_storage.list("race"):
            sweep_storage.delete(f"race/{record}")
        if hasattr(scheduler, "reset_state"):
            scheduler.reset_state()
            log(f"early stopping: {scheduler.debug_string()}"
                + (f", rungs counted after the longest eps ramp ({scheduler.min_step} "
                   "optimiser steps)" if scheduler.min_step else ""))
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec),
            tune_config=tune_config(spec, scheduler),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_root.uri,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[*callbacks, TrialsEnded(name)], verbose=1 if verbose else 0))
    start = time.perf_counter()
    _ENDED_AFTER_STEP.pop(name, None)
    with _lenient_metrics(spec.defense.lenient_metrics(spec)):
        grid = tuner.fit()
    log(f"sweep {name!r}: trials ran for {time.perf_counter() - start:.1f} s")
    # Tune catches Ctrl-C itself, saves its state, stops the trials (TERMINATED, like finished
    # ones) and returns: a front chosen now would be the front of part of the search, and its
    # test figures would read the test split too early. Without a step (a restore of a search
    # that had ended) the restored trials' states are the saved ones.
    ended = _ENDED_AFTER_STEP.pop(name, None)
    if ended is None:
        ended = grid.num_terminated + grid.num_errors
    if ended < spec.trial_count:
        client.set_terminated(parent_run_id, "KILLED")
        raise SweepInterrupted(name, ended, spec.trial_count)
    evaluate_test = (None if not test else
                     lambda front: evaluate_front(spec, front, name, sweep_storage, log))
    if not test:
        log(f"sweep {name!r}: --no-test: the test split is not read; every figure below is "
            "a validation figure, measured on the samples that chose it")
    result = report_front(spec, name, grid, client, experiment_id, parent_run_id,
                          sweep_storage, log, evaluate_test)
    del coordinator  # the test split's tasks are over too
    return result
