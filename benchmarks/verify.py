"""Complete verification of a finished sweep's front, after the fact: each front trial's final
model (its newest checkpoint in the sweep's storage) on the first ``--samples`` test samples,
each sample proved, falsified or undecided within ``--time-limit`` seconds
(``defenses.complete``), beside the incomplete certificate and the attack suite on the same
samples. This reads the test split again, for this analysis only, as ``verify: {complete:
true}`` in the space does during the sweep.

    python -m benchmarks.verify --name SWEEP --storage sweeps/SWEEP
        [--mlflow-uri sqlite:///mlflow.db] [--samples 1000] [--time-limit 10] [--eps 0.1]
    python -m benchmarks.verify --smoke-test     # a tiny IBP model trained here, seconds

Per trial: nominal accuracy, verified accuracy by the best incomplete certificate (IBP or
CROWN), the complete verifier's proved / falsified / undecided rates, the attack suite's worst
case, and the bracket that holds the exact robust accuracy on these samples: from the proved
rate up to the smaller of proved + undecided and the attacked figure (exact when nothing is
undecided). 95% intervals are Wilson's over the samples.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from defenses.complete import verify_complete
from defenses.intervals import format_interval, rate_interval

__all__ = ["verify_model"]


def verify_model(spec, model: torch.nn.Module, data, samples: int, time_limit: float,
                 eps: float) -> dict[str, Any]:
    """One model's figures on the first ``samples`` of ``data``."""
    from orchestrator.lesci_stages import split_tensors
    from orchestrator.training_trial import evaluate_training

    spec = spec.model_copy(update={"attack": spec.attack.model_copy(update={"eps": eps})})
    subset = Subset(data, range(min(samples, len(data))))
    began = time.perf_counter()
    figures = evaluate_training(spec, model, subset, seed=0)
    attack_s = time.perf_counter() - began
    x, y = split_tensors(data, samples)
    began = time.perf_counter()
    result = verify_complete(model, x, y, eps, time_limit=time_limit, seed=0)
    return {"n": len(y), "nominal": figures["nominal_accuracy"],
            "verified": figures.get("verified_accuracy", float("nan")),
            "robust": figures["robust_accuracy"], "proved": result.proved_rate,
            "falsified": result.falsified_rate, "undecided": result.undecided_rate,
            "by": Counter(result.by), "seconds": result.seconds,
            "verify_s": time.perf_counter() - began, "attack_s": attack_s}


def _print(rows: list[tuple[str, dict[str, Any]]], time_limit: float) -> None:
    print("| trial | n | nominal | verified (best incomplete) | proved (complete) | "
          "undecided | falsified | attacked (suite) | exact robust accuracy in | decided by | "
          "seconds per sample: median / max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        n = r["n"]
        cell = lambda v: format_interval(v, *rate_interval(v, n))  # noqa: E731
        high = min(r["proved"] + r["undecided"], r["robust"])
        bracket = (f"{r['proved']:.3f} (exact)" if r["undecided"] == 0
                   else f"[{r['proved']:.3f}, {high:.3f}]")
        by = ", ".join(f"{k} {v}" for k, v in sorted(r["by"].items(), key=lambda kv: -kv[1]))
        print(f"| {label} | {n} | {cell(r['nominal'])} | {cell(r['verified'])} | "
              f"{cell(r['proved'])} | {r['undecided']:.3f} | {r['falsified']:.3f} | "
              f"{cell(r['robust'])} | {bracket} | {by} | "
              f"{np.median(r['seconds']):.2f} / {r['seconds'].max():.2f} |")
    print(f"(time limit {time_limit:g} s per sample; proved <= attacked must hold: "
          f"{all(r['proved'] <= r['robust'] for _, r in rows)}; certificate <= proved <= attacked: "
          f"{_consistent(rows)})")


def _consistent(rows: list[tuple[str, dict[str, Any]]]) -> bool:
    """What soundness requires: no more proved than the attacks leave standing, and no fewer
    than the incomplete certificate proves."""
    return all(r["verified"] <= r["proved"] <= r["robust"] for _, r in rows)


def _from_sweep(name: str, mlflow_uri: str, storage_uri: str, samples: int,
                time_limit: float, eps: float | None) -> list[tuple[str, dict[str, Any]]]:
    from benchmarks.stored import final_model, open_sweep

    spec, storage, client, experiment_id = open_sweep(name, mlflow_uri, storage_uri)
    if spec.defense.surface:
        raise SystemExit(f"--storage {storage_uri}: a {spec.family} sweep; complete "
                         "verification is for the training families")
    front = [r for r in client.search_runs([experiment_id], max_results=10_000)
             if r.data.tags.get("pareto_optimal") == "true"]
    if not front:
        raise SystemExit(f"--name {name}: no trial tagged pareto_optimal (an unfinished sweep?)")
    splits = spec.dataset.load()
    rows = []
    for child in sorted(front, key=lambda r: r.data.tags["ray_trial_id"]):
        trial_id = child.data.tags["ray_trial_id"]
        model = final_model(spec, splits, storage, trial_id)
        objective = child.data.params.get("objective", "")
        print(f"  {trial_id} ({objective}): verifying {samples} test samples ...", flush=True)
        rows.append((f"{trial_id} {objective}".strip(), verify_model(
            spec, model, splits.test, samples, time_limit, eps or spec.attack.eps)))
    return rows


def _smoke(samples: int, time_limit: float) -> list[tuple[str, dict[str, Any]]]:
    """A small IBP-trained CNN on digits, trained here for a few seconds."""
    from defenses.ibp import ibp_loss
    from orchestrator.loading import load_space

    spec = load_space("ibp_digits", overrides={"attack": {"eps": 0.1, "steps": 5, "suite": {
        "apgd_steps": 5, "targets": 1, "square_queries": 10}}})
    splits = spec.dataset.load()
    torch.manual_seed(0)
    model = spec.model.build(splits.num_classes, splits.input_shape, splits.mean, splits.std)
    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    y = torch.tensor([splits.train[i][1] for i in range(len(splits.train))])
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(400):
        rows = torch.randint(0, len(x), (50,))
        loss = ibp_loss(model, x[rows], y[rows], min(0.1, 0.1 * step / 300), 0.5)[0]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    return [("smoke", verify_model(spec, model, splits.test, samples, time_limit, 0.1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="the sweep's name (its MLflow experiment)")
    parser.add_argument("--storage", help="its storage folder (sweeps/NAME)")
    parser.add_argument("--mlflow-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--samples", type=int, default=1000,
                        help="the first N test samples (default %(default)s)")
    parser.add_argument("--time-limit", type=float, default=10.0,
                        help="seconds of programs per sample (default %(default)s)")
    parser.add_argument("--eps", type=float, help="radius (default: the space's attack.eps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--smoke-test", action="store_true", help="a tiny model, 40 samples")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.time_limit <= 0:
        parser.error("--samples must be >= 1 and --time-limit > 0")
    torch.set_num_threads(args.threads)
    if args.smoke_test:
        args.samples, args.time_limit = min(args.samples, 40), min(args.time_limit, 5.0)
        rows = _smoke(args.samples, args.time_limit)
    elif not (args.name and args.storage):
        parser.error("give --name and --storage of a finished sweep (or --smoke-test)")
    else:
        rows = _from_sweep(args.name, args.mlflow_uri, args.storage, args.samples,
                           args.time_limit, args.eps)
    _print(rows, args.time_limit)
    return 0 if _consistent(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
