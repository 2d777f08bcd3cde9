"""A sweep: the space to a ``tune.Tuner`` (``orchestrator.searchers``), MLflow tracking, the
shared-stage coordinator, resume with ``Tuner.restore``, and the Pareto front at the end
(``orchestrator.reporting.report_front``)."""

from __future__ import annotations

import json
import time

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.reporting import SweepResult, report_front, surface_columns
from orchestrator.searchers import param_space, tune_config
from orchestrator.space import Family, SpaceError, SweepSpec
from orchestrator.stages import StageCoordinator, coordinator_name
from orchestrator.storage import Storage, redact
from orchestrator.tracking import (MLflowTracking, ensure_experiment, ensure_parent_run,
                                   tracking_client)
from orchestrator.trainables import make_trainable

__all__ = ["run_sweep"]

SPACE_FILE = "space.json"


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

    client = tracking_client(mlflow_uri)
    experiment_id = ensure_experiment(client, name)
    parent_run_id = ensure_parent_run(
        client, experiment_id, name,
        params={"space": spec.name, "family": spec.family.value,
                "dataset": spec.dataset.name, "model": spec.model.name,
                "optimize": json.dumps(spec.optimize),
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
        surfaces = ((sweep_storage.uri, surface_columns(spec))
                    if spec.family is Family.LESCI else None)
        callback = MLflowTracking(mlflow_uri, experiment_id, parent_run_id, name, spec,
                                  surfaces)
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec), tune_config=tune_config(spec),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_root.uri,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[callback], verbose=1))
    start = time.perf_counter()
    grid = tuner.fit()
    log(f"sweep {name!r}: trials ran for {time.perf_counter() - start:.1f} s")
    return report_front(spec, name, grid, client, experiment_id, parent_run_id, sweep_storage,
                        log)
