"""Early stopping replayed on a finished full-budget sweep: what MO-ASHA would have kept, and
what random search would have found with the same compute, over many arrival orders.

Every trial of the sweep ran every epoch, so its per-epoch validation figures (MLflow) say
what the scheduler would have seen at each rung in any order. For each of ``--orders``
random orders of the trials, asynchronous successive halving with one worker is replayed
(each trial runs until ``orchestrator.schedulers.MultiObjectiveASHA`` stops it or it ends,
then the next begins; with more workers a result meets fewer earlier ones at its rung and
fewer trials stop): the epochs it trains, and the front of the trials that ran their whole
budget. Random search at equal compute takes the same order's trials at full budget until
that many epochs are spent. Each front's hypervolume is computed on validation (which chose
it) and on test: the test figures of every trial's final model (its newest checkpoint in the
sweep's storage) are measured here, once, for this analysis only.

    python -m benchmarks.scheduler_replay --name SWEEP --storage sweeps/SWEEP
        [--mlflow-uri sqlite:///mlflow.db] [--orders 100] [--reduction-factor 3]
        [--grace-period 1]
    python -m benchmarks.scheduler_replay --smoke-test     # made-up curves, seconds

The ranges are the 2.5th and 97.5th percentiles over the orders (the spread due to arrival
order; the figures of each trial are fixed).
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from ray.tune.schedulers import TrialScheduler

from orchestrator.pareto import front_of
from orchestrator.schedulers import DECISION_LOG, MultiObjectiveASHA

__all__ = ["Curves", "replay", "summarise"]

_QUIET = "scheduler-replay"


@dataclass
class Curves:
    """A full-budget sweep's figures: per trial, its validation figures at each epoch
    (``val[trial][epoch - 1] = {metric: value}``) and its final model's test figures."""

    optimize: dict[str, str]
    val: dict[str, list[dict[str, float]]]
    test: dict[str, dict[str, float]]
    steps_per_epoch: int = 1
    ramp_steps: int = 0

    @property
    def epochs(self) -> int:
        return len(next(iter(self.val.values())))


def _hypervolumes(curves: Curves, trials: Sequence[str]) -> tuple[float, float]:
    """(val, test) hypervolume of the front the trials' final validation figures choose."""
    if not trials:
        return 0.0, 0.0
    rows = [curves.val[t][-1] for t in trials]
    mask, volume = front_of(rows, curves.optimize)
    chosen = [curves.test[t] for t, on in zip(trials, mask) if on]
    return volume, front_of(chosen, curves.optimize)[1]


def replay(curves: Curves, order: Sequence[str], reduction_factor: int, grace_period: int
           ) -> dict[str, float]:
    """One arrival order: MO-ASHA's epochs and front, random search's at equal compute."""
    DECISION_LOG[_QUIET] = lambda line: None
    metrics = list(curves.optimize)
    scheduler = MultiObjectiveASHA(metrics, list(curves.optimize.values()), curves.epochs,
                                   grace_period, reduction_factor,
                                   min_step=curves.ramp_steps, sweep=_QUIET,
                                   type="stopping")  # one worker: nothing to wait for
    used, full = 0, []
    for trial in order:
        for epoch, figures in enumerate(curves.val[trial], start=1):
            used += 1
            result = {**figures, "epoch": float(epoch),
                      "optimizer_steps": float(epoch * curves.steps_per_epoch)}
            if scheduler.decide(trial, result) == TrialScheduler.STOP:
                break
        else:
            full.append(trial)
    total = curves.epochs * len(order)
    early_val, early_test = _hypervolumes(curves, full)
    # random search with the same epochs: whole trials of the same order
    taken = order[:max(1, used // curves.epochs)]
    random_val, random_test = _hypervolumes(curves, taken)
    return {"compute": used / total, "early_val": early_val, "early_test": early_test,
            "random_val": random_val, "random_test": random_test,
            "random_compute": len(taken) * curves.epochs / total}


def summarise(curves: Curves, orders: int, reduction_factor: int, grace_period: int,
              seed: int = 0) -> dict[str, Any]:
    """Every figure of ``replay`` over ``orders`` random orders: mean and 95% range, beside
    the whole sweep's."""
    rng = random.Random(seed)
    trials = sorted(curves.val)
    runs = []
    for _ in range(orders):
        order = trials[:]
        rng.shuffle(order)
        runs.append(replay(curves, order, reduction_factor, grace_period))
    full_val, full_test = _hypervolumes(curves, trials)
    out: dict[str, Any] = {"trials": len(trials), "epochs": curves.epochs, "orders": orders,
                           "full_val": full_val, "full_test": full_test}
    for key in runs[0]:
        values = np.array([r[key] for r in runs])
        out[key] = (float(values.mean()), float(np.percentile(values, 2.5)),
                    float(np.percentile(values, 97.5)))
    kept = np.array([r["early_test"] / full_test if full_test else math.nan for r in runs])
    out["orders_keeping_95pct_test"] = float(np.mean(kept >= 0.95))
    return out


def _table(summary: dict[str, Any]) -> str:
    def cell(key: str) -> str:
        mean, low, high = summary[key]
        return f"{mean:.4f} ({low:.4f}-{high:.4f})"

    lines = [f"{summary['trials']} trials x {summary['epochs']} epochs, "
             f"{summary['orders']} arrival orders (mean, 95% range over orders)",
             f"{'':<22} {'compute':>22} {'HV val':>24} {'HV test':>24}",
             f"{'full budget':<22} {'1.0000':>22} {summary['full_val']:>24.4f} "
             f"{summary['full_test']:>24.4f}",
             f"{'MO-ASHA':<22} {cell('compute'):>22} {cell('early_val'):>24} "
             f"{cell('early_test'):>24}",
             f"{'random, equal compute':<22} {cell('random_compute'):>22} "
             f"{cell('random_val'):>24} {cell('random_test'):>24}",
             f"MO-ASHA kept >= 95% of the full test hypervolume in "
             f"{summary['orders_keeping_95pct_test']:.0%} of the orders"]
    return "\n".join(lines)


def _from_sweep(name: str, mlflow_uri: str, storage_uri: str) -> Curves:
    """A finished full-budget sweep's curves (MLflow) and its trials' test figures (their
    final checkpoints in ``storage_uri``)."""
    from benchmarks.stored import final_model, open_sweep
    from orchestrator.training_trial import evaluate_training

    spec, storage, client, experiment_id = open_sweep(name, mlflow_uri, storage_uri)
    if spec.defense.budget_unit is None:
        raise SystemExit(f"--storage {storage_uri}: family {spec.family!r} has no budget "
                         "unit to replay")
    children = [r for r in client.search_runs([experiment_id], max_results=10_000)
                if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
    epochs = spec.training.epochs
    splits = spec.dataset.load()
    val, test = {}, {}
    for child in children:
        trial_id = child.data.tags["ray_trial_id"]
        histories = {m: {h.step: h.value for h in client.get_metric_history(
            child.info.run_id, m)} for m in spec.optimize}
        if any(len(h) < epochs for h in histories.values()):
            raise SystemExit(f"trial {trial_id} ran {min(map(len, histories.values()))} of "
                             f"{epochs} epochs: the replay needs a sweep without early "
                             "stopping")
        val[trial_id] = [{m: histories[m][e] for m in spec.optimize}
                         for e in range(1, epochs + 1)]
        model = final_model(spec, splits, storage, trial_id)
        final = any(m not in ("nominal_accuracy", "pgd_accuracy", "verified_accuracy",
                              "verified_ibp_accuracy", "verified_crown_accuracy")
                    for m in spec.optimize)
        test[trial_id] = evaluate_training(spec, model, splits.test, seed=0, final=final)
        print(f"  {trial_id}: test " + ", ".join(f"{m} {test[trial_id][m]:.3f}"
                                                 for m in spec.optimize), flush=True)
    steps = math.ceil(len(splits.train) / spec.training.batch_size)
    return Curves(dict(spec.optimize), val, test, steps, spec.defense.ramp_steps(spec))


def _made_up(trials: int = 12, epochs: int = 9, seed: int = 0) -> Curves:
    """Curves that rise to a trial's own plateau, with noise: the smoke test's sweep."""
    rng = np.random.default_rng(seed)
    val, test = {}, {}
    for t in range(trials):
        top = rng.uniform(0.3, 0.9, size=2)
        rate = rng.uniform(0.2, 1.0)
        val[f"t{t}"] = [{"a": float(top[0] * (1 - math.exp(-rate * e)) + rng.normal(0, .01)),
                         "b": float(top[1] * (1 - math.exp(-rate * e)) + rng.normal(0, .01))}
                        for e in range(1, epochs + 1)]
        test[f"t{t}"] = {k: v - 0.01 for k, v in val[f"t{t}"][-1].items()}
    return Curves({"a": "max", "b": "max"}, val, test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="the finished full-budget sweep (MLflow experiment)")
    parser.add_argument("--storage", help="its storage folder (sweeps/NAME)")
    parser.add_argument("--mlflow-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--orders", type=int, default=100)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--smoke-test", action="store_true", help="made-up curves, seconds")
    args = parser.parse_args(argv)
    if args.smoke_test:
        curves = _made_up()
    elif not (args.name and args.storage):
        parser.error("give --name and --storage of a finished sweep (or --smoke-test)")
    else:
        curves = _from_sweep(args.name, args.mlflow_uri, args.storage)
    summary = summarise(curves, args.orders, args.reduction_factor, args.grace_period)
    print(f"reduction_factor {args.reduction_factor}, grace_period {args.grace_period}")
    print(_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
