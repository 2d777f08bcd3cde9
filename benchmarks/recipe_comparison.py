"""The certified recipes of a comparison sweep, side by side on the test split.

A sweep of the ``ibp`` family whose objective is a grid of recipes (``crown_ibp_mnist5k``:
``ibp``, ``crown_ibp``, ``fast_ibp``, each with its schedule drawn ``num_samples`` times) reads
each recipe's own Pareto front on the test split. This picks each recipe's operating point
**on the validation split** (the highest verified accuracy among its trials whose nominal
accuracy is at least ``--min-nominal``; ties by nominal accuracy) and prints its test figures
with 95% intervals: nominal accuracy, the attack suite's worst case, verified by IBP, by
CROWN-IBP and by the best certificate, the bracket (worst case minus verified: where the true
robust accuracy lies) and its verified accuracy against the baseline recipe's. The test split
chose nothing: the rows come from the sweep's ``pareto_front.csv``.

The difference is Newcombe's interval for two rates, conservative on these shared test
samples; with ``--storage`` (the sweep's folder, e.g. ``sweeps/SWEEP``) each chosen trial's
final model is read back and verified again on the test split, sample by sample (the best
certificate, as the sweep's), and the difference is the paired one (Newcombe's method 10).

    python -m benchmarks.recipe_comparison --name SWEEP [--mlflow-uri sqlite:///mlflow.db]
        [--storage sweeps/SWEEP] [--min-nominal 0.95] [--baseline ibp]
    python -m benchmarks.recipe_comparison --csv pareto_front.csv ...
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

from defenses.intervals import format_interval, independent_difference, paired_difference

SCHEDULE = ("eps_train", "kappa_final", "warmup", "rampup")
COLUMNS = (("nominal_accuracy", "nominal"), ("robust_accuracy", "worst case"),
           ("verified_ibp_accuracy", "verified by IBP"),
           ("verified_crown_accuracy", "by CROWN-IBP"), ("verified_accuracy", "verified (best)"))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def operating_points(rows: list[dict[str, Any]], min_nominal: float
                     ) -> dict[str, dict[str, Any]]:
    """Each objective's chosen row on validation: the most verified among its trials with
    nominal >= ``min_nominal`` (ties: the more nominal); ``{"trials": n, "row": row or None,
    "best_nominal": the highest val nominal, when no trial reaches min_nominal}``."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["objective"] for r in rows):
        mine = [r for r in rows if r["objective"] == name]
        able = [r for r in mine if _number(r["nominal_accuracy"]) >= min_nominal]
        row = max(able, key=lambda r: (_number(r["verified_accuracy"]),
                                       _number(r["nominal_accuracy"])), default=None)
        if row is not None and math.isnan(_number(row.get("test_verified_accuracy"))):
            raise ValueError(f"objective {name}: its chosen trial {row['trial_id']} has no test "
                             "figures; was the sweep's objective a grid, evaluated on test?")
        out[name] = {"trials": len(mine), "row": row,
                     "best_nominal": max(_number(r["nominal_accuracy"]) for r in mine)}
    return out


def _test(row: dict[str, Any], metric: str) -> str:
    return format_interval(_number(row.get(f"test_{metric}")),
                           _number(row.get(f"test_{metric}_ci_low")),
                           _number(row.get(f"test_{metric}_ci_high")))


def table(points: dict[str, dict[str, Any]], min_nominal: float, baseline: str,
          outcomes: dict[str, list[bool]] | None = None) -> str:
    """The markdown table of the chosen points, the baseline's first; with ``outcomes`` (each
    recipe's per-sample verified outcomes on test) the differences are paired."""
    if baseline not in points:
        raise ValueError(f"--baseline {baseline}: not an objective of the sweep "
                         f"({', '.join(points)})")
    header = ["recipe", "trials", "chosen schedule", "val verified / nominal",
              *(title for _, title in COLUMNS), "bracket", f"vs {baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = points[baseline]["row"]
    for name in [baseline, *(n for n in points if n != baseline)]:
        found = points[name]
        row = found["row"]
        if row is None:
            lines.append(f"| {name} | {found['trials']} | no trial at val nominal >= "
                         f"{min_nominal} (best {found['best_nominal']:.3f}) |"
                         + " |" * (len(header) - 3))
            continue
        schedule = ", ".join(f"{k} {_number(row[k]):.3g}" for k in SCHEDULE if k in row)
        chosen = (f"{_number(row['verified_accuracy']):.3f} / "
                  f"{_number(row['nominal_accuracy']):.3f}")
        bracket = (_number(row["test_robust_accuracy"])
                   - _number(row["test_verified_accuracy"]))
        versus = ""
        if name != baseline and base is not None and outcomes:
            versus = format_interval(*paired_difference(outcomes[name], outcomes[baseline]),
                                     signed=True) + " paired"
        elif name != baseline and base is not None:
            n = int(_number(row["test_samples"]))
            versus = format_interval(*independent_difference(
                _number(row["test_verified_accuracy"]), n,
                _number(base["test_verified_accuracy"]), int(_number(base["test_samples"]))),
                signed=True)
        lines.append("| " + " | ".join([name, str(found["trials"]), schedule, chosen,
                                        *(_test(row, m) for m, _ in COLUMNS),
                                        f"{bracket:.3f}", versus]) + " |")
    return "\n".join(lines)


def verified_on_test(storage_uri: str, points: dict[str, dict[str, Any]]
                     ) -> dict[str, list[bool]]:
    """Each chosen trial's final model (its newest checkpoint in the sweep's storage, the
    first seed's) verified on the test split, sample by sample, by the best certificate; the
    count must match the sweep's own ``test_verified_accuracy``."""
    import json

    import torch

    from benchmarks.certified_recipes import verified_outcomes
    from orchestrator.space import SweepSpec
    from orchestrator.storage import Storage
    from orchestrator.sweep import SPACE_FILE
    from orchestrator.training_trial import newest_checkpoint, trial_models

    storage = Storage.from_uri(storage_uri)
    stored = storage.read_bytes(SPACE_FILE)
    if stored is None:
        raise ValueError(f"--storage {storage_uri}: no sweep there (no {SPACE_FILE})")
    spec = SweepSpec(**json.loads(stored))
    splits = spec.dataset.load()
    folders = storage.list("")
    out = {}
    for name, found in points.items():
        row = found["row"]
        if row is None:
            continue
        folder = next((f for f in folders if f"_{row['trial_id']}_" in f), None)
        state = newest_checkpoint(storage.child(folder)) if folder else None
        if state is None:
            raise ValueError(f"--storage {storage_uri}: no checkpoint of trial "
                             f"{row['trial_id']}")
        model = trial_models(spec, splits, state[0], torch.device("cpu"))[0]
        hits = verified_outcomes(model, splits.test, spec.attack.eps)["best"]
        if abs(sum(hits) / len(hits) - _number(row["test_verified_accuracy"])) > 1e-9:
            raise ValueError(f"trial {row['trial_id']}: verified {sum(hits) / len(hits):.4f} "
                             f"on test now, {row['test_verified_accuracy']} in the sweep")
        out[name] = hits
    return out


def _sweep_csv(name: str, uri: str) -> Path:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ValueError(f"--name {name}: no such experiment in {uri}")
    parents = [r for r in client.search_runs([experiment.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise ValueError(f"--name {name}: the experiment has no sweep run in {uri}")
    return Path(client.download_artifacts(parents[0].info.run_id, "pareto_front.csv"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--name", help="the sweep (its MLflow experiment)")
    source.add_argument("--csv", type=Path, help="the sweep's pareto_front.csv")
    parser.add_argument("--mlflow-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--min-nominal", type=float, default=0.95,
                        help="the operating point's least validation nominal accuracy")
    parser.add_argument("--baseline", default="ibp", help="the recipe the others are set against")
    parser.add_argument("--storage", help="the sweep's folder (sweeps/SWEEP): paired differences")
    args = parser.parse_args(argv)
    try:
        path = args.csv if args.csv else _sweep_csv(args.name, args.mlflow_uri)
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "objective" not in rows[0]:
            raise ValueError(f"{path}: no objective column; the sweep compared no recipes")
        points = operating_points(rows, args.min_nominal)
        outcomes = verified_on_test(args.storage, points) if args.storage else None
        print(table(points, args.min_nominal, args.baseline, outcomes))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
