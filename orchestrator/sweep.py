"""A sweep: the space to a ``tune.Tuner`` (Optuna or grid/random search), MLflow tracking, the
shared-stage coordinator, resume with ``Tuner.restore``, and the Pareto front at the end."""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.reporting import front_of, log_surface, plot_front, write_csv
from orchestrator.space import (Algorithm, Choice, Family, IntRange, LogUniform, SpaceError,
                                SweepSpec, Uniform)
from orchestrator.stages import StageCoordinator, coordinator_name
from orchestrator.storage import Storage, redact
from orchestrator.tracking import MLflowTracking, ensure_experiment, ensure_parent_run
from orchestrator.trainables import BASE_METRICS, SURFACE_COLUMNS, make_trainable

__all__ = ["SweepResult", "param_space", "run_sweep"]

SPACE_FILE = "space.json"


@dataclass
class SweepResult:
    name: str
    # one per finished trial (LESCI: per point of every finished trial's surface): trial_id,
    # run_id, params, metrics, pareto_optimal
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    hypervolume: float
    failed: int
    experiment_id: str
    parent_run_id: str


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: fixed values as constants, each distribution as a Tune domain."""
    space: dict[str, Any] = dict(spec.fixed())
    grids = spec.grid_values()
    for key, dist in spec.searched().items():
        if key in grids:
            space[key] = tune.grid_search(grids[key])
        elif isinstance(dist, Choice):
            space[key] = tune.choice(list(dist.choice))
        elif isinstance(dist, Uniform):
            space[key] = tune.uniform(*dist.uniform)
        elif isinstance(dist, LogUniform):
            space[key] = tune.loguniform(*dist.loguniform)
        elif isinstance(dist, IntRange):
            low, high = dist.int
            space[key] = tune.lograndint(low, high + 1) if dist.log else tune.randint(low, high + 1)
    return space


def _tune_config(spec: SweepSpec) -> tune.TuneConfig:
    metrics, modes = spec.search_metrics
    single = len(metrics) == 1
    search_alg = None
    if spec.search.algorithm in (Algorithm.TPE, Algorithm.NSGA2) and spec.searched():
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = (optuna.samplers.TPESampler(seed=spec.search.seed)
                   if spec.search.algorithm is Algorithm.TPE
                   else optuna.samplers.NSGAIISampler(seed=spec.search.seed))
        # metric/mode go to the searcher only: TuneConfig's would make it single-objective
        search_alg = OptunaSearch(metric=metrics[0] if single else metrics,
                                  mode=modes[0] if single else modes, sampler=sampler)
    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        epochs = int(spec.training.get("epochs", 20))
        # rungs by epoch, not by report: a trial resumed after a crash reports its last
        # epoch again
        scheduler = ASHAScheduler(time_attr="epoch", metric=metrics[0], mode=modes[0],
                                  max_t=epochs,
                                  grace_period=max(1, epochs // 8))
    # reuse_actors: a trial's process serves the next trial (no new process importing torch
    # for every trial: 0.17 s of overhead per trial instead of 2.7 s, benchmarks/run.py)
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, reuse_actors=True,
                           num_samples=1 if spec.grid_only else spec.search.num_samples,
                           max_concurrent_trials=spec.search.max_concurrent)


def _init_ray() -> None:
    if ray.is_initialized():
        return
    # No resource arguments: on a cluster this attaches to the running Ray (ray submit),
    # elsewhere it starts a local one.
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=True)


def run_sweep(spec: SweepSpec, name: str, storage_root: Storage, mlflow_uri: str,
              resume: bool = False, log=print) -> SweepResult:
    """Run (or, with ``resume``, continue) the sweep ``name`` of ``spec``."""
    sweep_storage = storage_root.child(name)
    experiment_path = storage_root.join(name)
    stored = sweep_storage.read_bytes(SPACE_FILE)
    exists = tune.Tuner.can_restore(experiment_path) if stored is not None else False
    if resume:
        if not exists:
            raise SpaceError(f"--resume: no sweep named {name!r} in {redact(storage_root.uri)}")
        if json.loads(stored) != spec.as_dict():
            raise SpaceError(f"--resume: sweep {name!r} was started with another space (or "
                             f"other --num-samples/--max-concurrent/--smoke-test); resume it "
                             "with the same arguments")
    elif stored is not None:
        raise SpaceError(f"--name {name}: a sweep of that name exists in "
                         f"{redact(storage_root.uri)}; pass --resume to continue it or choose "
                         "another --name")
    else:
        storage_root.check_writable()
        sweep_storage.write_bytes(SPACE_FILE, json.dumps(spec.as_dict(), indent=2).encode())

    client = MlflowClient(mlflow_uri)
    experiment_id = ensure_experiment(client, name)
    parent_run_id = ensure_parent_run(
        client, experiment_id, name,
        params={"space": spec.name, "family": spec.family.value,
                "dataset": spec.dataset.name, "model": spec.model.name,
                "objectives": json.dumps(spec.objectives),
                "algorithm": spec.search.algorithm.value,
                "num_samples": str(spec.search.num_samples),
                "storage": redact(storage_root.uri)},
        tags={"family": spec.family.value})
    log(f"MLflow: experiment {name!r} ({experiment_id}), parent run {parent_run_id}")

    _init_ray()
    # On the driver's node: losing a worker node must not take the coordinator with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # the handle is held for the whole sweep, so the named actor lives as long as the trials
    _coordinator = StageCoordinator.options(name=coordinator_name(name), get_if_exists=True,
                                           scheduling_strategy=here).remote()
    trainable = make_trainable(spec, sweep_storage)
    if resume:
        log(f"resuming sweep {name!r} from {redact(experiment_path)}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True,
                                   param_space=param_space(spec))
    else:
        surfaces = ((sweep_storage.uri, _surface_columns(spec))
                    if spec.family is Family.LESCI else None)
        callback = MLflowTracking(mlflow_uri, experiment_id, parent_run_id, name,
                                  spec.family.value, sorted(spec.searched()), spec.metric_names,
                                  surfaces)
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec), tune_config=_tune_config(spec),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_root.uri,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[callback], verbose=1))
    start = time.perf_counter()
    grid = tuner.fit()
    log(f"sweep {name!r}: trials ran for {time.perf_counter() - start:.1f} s")
    return _finish(spec, name, grid, client, experiment_id, parent_run_id, log, sweep_storage)


def _finish(spec: SweepSpec, name: str, grid, client: MlflowClient, experiment_id: str,
            parent_run_id: str, log, sweep_storage: Storage) -> SweepResult:
    log(f"sweep {name!r}: every trial ended; logging the Pareto front to MLflow")
    runs = {run.data.tags.get("ray_trial_id"): run for run in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10_000)}
    lesci = spec.family is Family.LESCI
    required = ["hypervolume"] if lesci else spec.metric_names
    rows, failed, trial_runs = [], 0, {}
    searched = sorted(spec.searched())
    parent_metrics: dict[str, float] = {}
    budget: dict[str, Any] = {}
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id")
        if result.error is not None or any(
                not isinstance(metrics.get(m), (int, float)) or math.isnan(metrics[m])
                for m in required):
            failed += 1
            continue
        run = runs.get(trial_id)
        run_id = run.info.run_id if run else ""
        trial_runs[trial_id] = run_id
        base = {"trial_id": trial_id, "run_id": run_id,
                **{k: result.config.get(k) for k in searched}}
        if not lesci:
            rows.append({**base, **{m: float(metrics[m]) for m in spec.metric_names}})
            continue
        stored = sweep_storage.get_verified(f"results/{trial_id}.json")
        if stored is None:
            failed += 1
            continue
        trial = json.loads(stored[0])
        budget = trial.get("budget") or budget
        for key in BASE_METRICS:
            if key in trial["report"]:
                parent_metrics[key] = trial["report"][key]
        if run_id:
            log_surface(client, run_id, trial["surface"], _surface_columns(spec),
                        f"{name}: {run.info.run_name}")
        rows.extend({**base, **point} for point in trial["surface"])
    rows.sort(key=lambda r: (r["trial_id"], r.get("k", 0), r.get("min_votes", 0)))
    mask, volume = front_of(rows, spec.objectives)
    for row, on in zip(rows, mask):
        row["pareto_optimal"] = bool(on)
    for trial_id, run_id in trial_runs.items():
        if run_id:
            on = any(r["pareto_optimal"] for r in rows if r["trial_id"] == trial_id)
            client.set_tag(run_id, "pareto_optimal", "true" if on else "false")
    front = [row for row in rows if row["pareto_optimal"]]
    with tempfile.TemporaryDirectory() as folder:
        csv_path = Path(folder) / "pareto_front.csv"
        columns = ["trial_id", "run_id", *searched,
                   *(_surface_columns(spec) if lesci else spec.metric_names), "pareto_optimal"]
        write_csv(rows, list(dict.fromkeys(columns)), csv_path)
        png_path = Path(folder) / "pareto_front.png"
        unit = "surface points" if lesci else "trials"
        plot_front(rows, mask, spec.objectives, png_path,
                   f"{name}: {len(front)} of {len(rows)} {unit} on the front")
        client.log_artifact(parent_run_id, str(csv_path))
        client.log_artifact(parent_run_id, str(png_path))
    client.log_metric(parent_run_id, "hypervolume", volume)
    client.log_metric(parent_run_id, "finished_trials", len(trial_runs))
    client.log_metric(parent_run_id, "failed_trials", failed)
    if lesci:
        client.log_metric(parent_run_id, "surface_points", len(rows))
    for key, value in parent_metrics.items():
        client.log_metric(parent_run_id, key, value)
    if budget:
        logged = client.get_run(parent_run_id).data.params
        for key, value in budget.items():
            if f"attack.{key}" not in logged:
                client.log_param(parent_run_id, f"attack.{key}", str(value)[:6000])
    client.set_terminated(parent_run_id, status="FINISHED")
    log(f"sweep {name!r}: {len(trial_runs)} finished, {failed} failed; Pareto front of "
        f"{len(front)} of {len(rows)} {'surface points' if lesci else 'trials'}, hypervolume "
        f"{volume:.4f}")
    return SweepResult(name, rows, front, volume, failed, experiment_id, parent_run_id)


def _surface_columns(spec: SweepSpec) -> list[str]:
    from orchestrator.space import FAMILY_METRICS

    metrics = [m for m in FAMILY_METRICS[Family.LESCI]
               if spec.attack is not None or "robust" not in m]
    return [*SURFACE_COLUMNS, *metrics]


