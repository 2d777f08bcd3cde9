"""A finished sweep read back for an analysis after the fact (``benchmarks.scheduler_replay``,
``benchmarks.verify``): its space from the storage, its MLflow experiment, and a trial's final
model from its newest checkpoint."""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["open_sweep", "final_model"]


def open_sweep(name: str, mlflow_uri: str, storage_uri: str) -> tuple[Any, Any, Any, str]:
    """(spec, storage, MLflow client, experiment id) of sweep ``name``; ``SystemExit`` with one
    line naming what is missing."""
    from mlflow.tracking import MlflowClient

    from orchestrator.space import SweepSpec
    from orchestrator.storage import Storage
    from orchestrator.sweep import SPACE_FILE

    storage = Storage.from_uri(storage_uri)
    stored = storage.read_bytes(SPACE_FILE)
    if stored is None:
        raise SystemExit(f"--storage {storage_uri}: no sweep there (no {SPACE_FILE})")
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"--name {name}: no such experiment in {mlflow_uri}")
    return SweepSpec(**json.loads(stored)), storage, client, experiment.experiment_id


def final_model(spec, splits, storage, trial_id: str) -> torch.nn.Module:
    """Trial ``trial_id``'s model (its first seed's) from its newest intact checkpoint, on the
    CPU."""
    from orchestrator.training_trial import newest_checkpoint, trial_models

    folder = next((f for f in storage.list("") if f"_{trial_id}_" in f), None)
    state = newest_checkpoint(storage.child(folder)) if folder else None
    if state is None:
        raise SystemExit(f"--storage {storage.uri}: no checkpoint of trial {trial_id}")
    return trial_models(spec, splits, state[0], torch.device("cpu"))[0]
