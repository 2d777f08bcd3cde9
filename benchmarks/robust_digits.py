"""Robust training at eps 0.1 on the two embedded real datasets: for each training objective,
nominal accuracy, PGD-20, each attack of the suite (APGD-CE, APGD-T, Square), their per-sample
worst case (``robust_accuracy``) and verified accuracy (IBP, CROWN-IBP and the best sound
certificate of the two), on the test split with 95%
intervals (Wilson), and on the validation split beside them (each row is a fixed recipe, not
chosen by its figures, so val and test differ by sampling only); and the per-layer interval
bound widths of a normally vs an IBP-trained small CNN.

    python -m benchmarks.robust_digits [--dataset digits --dataset mnist5k] [--out DIR]

Writes ``robust_<dataset>.json`` per dataset and ``bound_widths.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.plots import plot_bound_widths
from defenses.data import load_dataset
from defenses.evaluation import AttackSuite, evaluate_robustness
from defenses.intervals import format_interval, rate_interval
from defenses.ibp import layer_bound_widths
from defenses.models import build_model
from defenses.objectives import make_objective
from defenses.trainer import TrainConfig, Trainer

EPS = 0.1
# the suite's budget: AttackSuite's defaults (docs/results/training.md states them beside the table)
SUITE = AttackSuite()


def methods(dataset: str) -> dict[str, tuple[str, dict, dict]]:
    """name -> (objective, its parameters, TrainConfig fields). The IBP rows use the schedule
    of the shipped spaces (search_spaces/ibp_digits.yaml, ibp_mnist5k.yaml) at one point."""
    if dataset == "digits":  # 1,077 training digits: 22 steps per epoch in batches of 50
        plain = {"epochs": 20, "batch_size": 64}
        ibp = ({"eps_train": 0.12, "warmup": 230, "rampup": 1140, "kappa_final": 0.5},
               {"epochs": 150, "batch_size": 50, "lr_schedule": "step",
                "lr_milestones": [2200, 2860]})
    else:  # mnist5k: 3,000 training digits, 30 steps per epoch in batches of 100
        plain = {"epochs": 20, "batch_size": 100}
        ibp = ({"eps_train": 0.15, "warmup": 75, "rampup": 450, "kappa_final": 0.5},
               {"epochs": 40, "batch_size": 100, "lr_schedule": "step",
                "lr_milestones": [825, 1050]})
    return {
        "standard": ("standard", {}, plain),
        "FGSM 50/50": ("fgsm", {"eps": EPS}, plain),
        "fast FGSM, random start": ("fast_fgsm", {"eps": EPS}, plain),
        "PGD-7": ("pgd", {"eps": EPS, "alpha": 0.025, "steps": 7}, plain),
        "adversarial regularisation": ("adv_reg", {}, plain),
        "IBP": ("ibp", *ibp),
    }


COLUMNS = ("nominal_accuracy", "pgd_accuracy", "apgd_ce_accuracy", "apgd_t_accuracy",
           "square_accuracy", "robust_accuracy", "verified_ibp_accuracy",
           "verified_crown_accuracy", "verified_accuracy")


def run(dataset: str, smoke_test: bool, suite: AttackSuite) -> tuple[list[dict], dict]:
    splits = load_dataset(dataset)
    parts = {"val": splits.val, "test": splits.test}
    if smoke_test:
        from torch.utils.data import Subset

        parts = {name: Subset(data, range(64)) for name, data in parts.items()}
    padding = {"padding": "same"} if dataset == "digits" else {}
    rows, models = [], {}
    for name, (objective, params, training) in methods(dataset).items():
        if smoke_test:
            training = {**training, "epochs": 1}
        torch.manual_seed(0)
        model = build_model("ibp_small", splits.num_classes, splits.input_shape, splits.mean,
                            splits.std, **padding)
        start = time.perf_counter()
        Trainer(model, splits.train, TrainConfig(lr=1e-3, **training),
                make_objective(objective, **params)).fit()
        seconds = time.perf_counter() - start
        model.eval()
        row = {"dataset": dataset, "method": name, "epochs": training["epochs"],
               "train_seconds": round(seconds, 1)}
        for split, data in parts.items():
            start = time.perf_counter()
            metrics = evaluate_robustness(model, data, EPS, verify=True, suite=suite)
            row[f"{split}_eval_seconds"] = round(time.perf_counter() - start, 1)
            row[f"{split}_samples"] = len(data)
            for key, value in metrics.items():
                low, high = rate_interval(value, len(data))
                row[f"{split}_{key}"] = value
                row[f"{split}_{key}_ci"] = [low, high]
        rows.append(row)
        models[name] = model
        print(json.dumps(row), flush=True)
    return rows, models


def _cell(row: dict, split: str, key: str) -> str:
    low, high = row[f"{split}_{key}_ci"]
    return format_interval(row[f"{split}_{key}"], low, high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", choices=["digits", "mnist5k"],
                        help="repeat for several (default: both)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke-test", action="store_true",
                        help="1 epoch per method, 64 samples, a tiny attack budget")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = (AttackSuite(steps=2, apgd_steps=3, targets=1, square_queries=10)
             if args.smoke_test else SUITE)
    print(f"suite: {json.dumps(suite.described())}, eps {EPS}")
    for dataset in args.dataset or ["digits", "mnist5k"]:
        rows, models = run(dataset, args.smoke_test, suite)
        n = rows[0]["test_samples"]
        print(f"\n{dataset}, test split ({n} samples), 95% intervals\n| training | epochs | "
              f"nominal | PGD-{suite.steps} | APGD-CE | APGD-T | Square | worst case | verified "
              "by IBP | by CROWN-IBP | verified (best) | train s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cells = " | ".join(_cell(r, "test", key) for key in COLUMNS)
            print(f"| {r['method']} | {r['epochs']} | {cells} | {r['train_seconds']} |")
        print(f"\n{dataset}, validation split ({rows[0]['val_samples']} samples): nominal, "
              "worst case, verified")
        for r in rows:
            print(f"| {r['method']} | " + " | ".join(_cell(r, "val", key) for key in (
                "nominal_accuracy", "robust_accuracy", "verified_accuracy")) + " |")
        gaps = [abs(r[f"val_{k}"] - r[f"test_{k}"]) for r in rows for k in COLUMNS]
        print(f"largest |val - test| over the table: {max(gaps):.3f}")
        (args.out / f"robust_{dataset}.json").write_text(json.dumps(rows, indent=2))
        if dataset == "digits":
            splits = load_dataset(dataset)
            x = splits.test.images[:256]
            curves = {name: layer_bound_widths(models[name], x, EPS)
                      for name in ("standard", "IBP")}
            (args.out / "bound_widths.json").write_text(json.dumps(curves, indent=2))
            plot_bound_widths({"normally trained": curves["standard"],
                               "IBP-trained": curves["IBP"]}, args.out / "bound_widths.png", EPS)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
