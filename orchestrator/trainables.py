"""What every trial function shares: binding a family's trial function to the space and its
resources (``make_trainable``), a trial's setup (the space, the data, the device, its share of
the CPU threads), seeds (``search.repeats``) and their mean, and the trial's console.

Each family's trial function (``orchestrator.lesci_trial``, ``orchestrator.training_trial``) is
a plain ``fn(config, spec_json, storage_uri)`` that calls ``tune.report``; ``make_trainable``
binds the validated space and the sweep's storage with ``tune.with_parameters`` and its
resources with ``tune.with_resources``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import numpy as np
import ray
import threadpoolctl
import torch
from ray import tune

from defenses.data import Splits
from orchestrator.params import Trial
from orchestrator.space import SweepSpec
from orchestrator.stages import coordinator_name
from orchestrator.storage import Storage

# sample counts behind a figure's interval: the same for every seed
COUNTS = ("samples", "attacked_samples", "calibration_samples")

__all__ = ["make_trainable", "limit_threads", "repeat_trials", "over_seeds", "COUNTS",
           "console", "sweep_coordinator", "setup"]


def make_trainable(spec: SweepSpec, sweep_storage: Storage):
    bound = tune.with_parameters(spec.defense.trainable(), spec_json=spec.as_dict(),
                                 storage_uri=sweep_storage.uri)
    return tune.with_resources(bound, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _device(spec: SweepSpec) -> torch.device:
    return torch.device("cuda" if spec.resources.gpu > 0 and torch.cuda.is_available() else "cpu")


def limit_threads(cpus: float) -> int:
    """Size this process's thread pools to the cores a trial reserved (at least one): torch's
    intra-op pool and, through threadpoolctl, every BLAS and OpenMP runtime loaded (numpy's
    and faiss's OpenBLAS, torch's and faiss's OpenMP). Two trials on two cores then run one
    thread each instead of fighting over both. Returns the thread count.

    OpenMP's limit holds for the calling thread: call it from the thread that computes (a Tune
    function trainable runs in a thread of its own)."""
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    threadpoolctl.threadpool_limits(threads)
    return threads


def repeat_trials(spec: SweepSpec, trial: Trial) -> list[Trial]:
    """The trial once per seed of ``search.repeats``: training.seed, training.seed + 1, ..."""
    return [dataclasses.replace(trial, training=trial.training.model_copy(
        update={"seed": trial.training.seed + r})) for r in range(spec.search.repeats)]


def _is_figure(key: str) -> bool:
    return not (key.endswith(("_ci_low", "_ci_high", "_seed_std")) or key in COUNTS)


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's figures over its seeds (``search.repeats``): each figure's mean
    and, with more than one seed, its spread ``<figure>_seed_std`` (the standard deviation
    across seeds); each interval bound the mean of the seeds' (every seed measures the same
    samples, so this is the sampling interval of the mean); sample counts as they are.
    Values are numbers (a training trial's) or lists of one per surface point (LESCI's)."""
    if len(runs) == 1:
        return dict(runs[0])
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = np.array([run[key] for run in runs], dtype=float)  # [seeds] or [seeds, P]
        if key in COUNTS:
            out[key] = first
            continue
        with warnings.catch_warnings():  # a NaN in every seed (nothing projected) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
            spread = np.nanstd(values, axis=0, ddof=1)
        out[key] = mean.tolist() if values.ndim > 1 else float(mean)
        if _is_figure(key):
            out[f"{key}_seed_std"] = spread.tolist() if values.ndim > 1 else float(spread)
    return out


def setup(spec_json: dict[str, Any]) -> tuple[SweepSpec, Splits, torch.device]:
    spec = SweepSpec(**spec_json)
    limit_threads(spec.resources.cpu)
    splits = spec.dataset.load()
    return spec, splits, _device(spec)


def sweep_coordinator(storage: Storage):
    """The sweep's coordinator actor (from the sweep's storage), or None when the trial runs
    outside a sweep driver."""
    sweep = storage.uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        return ray.get_actor(coordinator_name(sweep))
    except ValueError:
        return None


def console(storage: Storage, name: str | None = None) -> Callable[[str], None]:
    """A trial's (or ``name``'s) console lines: sent to the driver through the sweep's
    coordinator (printed by ``orchestrator.progress.ConsoleProgress``), or printed outside a
    sweep."""
    coordinator = sweep_coordinator(storage)
    name = name or tune.get_context().get_trial_id() or "trial"

    def log(message: str) -> None:
        line = f"{name}: {message}"
        if coordinator is None:
            print(line, flush=True)
        else:
            coordinator.note.remote(line)

    return log
