"""Robust training at eps 0.1 on the two embedded real datasets: for each training objective,
nominal accuracy, PGD-20, each attack of the suite (APGD-CE, APGD-T, Square), their per-sample
worst case (``robust_accuracy``) and IBP-verified accuracy; and the per-layer interval bound
widths of a normally vs an IBP-trained small CNN.

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
from defenses.ibp import layer_bound_widths
from defenses.models import build_model
from defenses.objectives import make_objective
from defenses.trainer import TrainConfig, Trainer

EPS = 0.1
# the suite's budget: AttackSuite's defaults (README states them beside the table)
SUITE = AttackSuite()


def methods(dataset: str) -> dict[str, tuple[str, dict, dict]]:
    """name -> (objective, its parameters, TrainConfig fields). The IBP rows use the schedule
    of the shipped spaces (search_spaces/ibp_digits.yaml, ibp_mnist5k.yaml) at one point."""
    if dataset == "digits":  # 1,437 training digits
        plain = {"epochs": 20, "batch_size": 64}
        ibp = ({"eps_train": 0.12, "warmup": 300, "rampup": 1500, "kappa_final": 0.5},
               {"epochs": 150, "batch_size": 50, "lr_schedule": "step",
                "lr_milestones": [2900, 3770]})
    else:  # mnist5k: 4,000 training digits
        plain = {"epochs": 20, "batch_size": 100}
        ibp = ({"eps_train": 0.15, "warmup": 100, "rampup": 600, "kappa_final": 0.5},
               {"epochs": 40, "batch_size": 100, "lr_schedule": "step",
                "lr_milestones": [1100, 1400]})
    return {
        "standard": ("standard", {}, plain),
        "FGSM 50/50": ("fgsm", {"eps": EPS}, plain),
        "fast FGSM, random start": ("fast_fgsm", {"eps": EPS}, plain),
        "PGD-7": ("pgd", {"eps": EPS, "alpha": 0.025, "steps": 7}, plain),
        "adversarial regularisation": ("adv_reg", {}, plain),
        "IBP": ("ibp", *ibp),
    }


def run(dataset: str, smoke_test: bool, suite: AttackSuite) -> tuple[list[dict], dict]:
    splits = load_dataset(dataset)
    val = splits.val
    if smoke_test:
        from torch.utils.data import Subset

        val = Subset(splits.val, range(64))
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
        start = time.perf_counter()
        metrics = evaluate_robustness(model, val, EPS, verify=True, suite=suite)
        rows.append({"dataset": dataset, "method": name, "epochs": training["epochs"],
                     "train_seconds": round(seconds, 1),
                     "eval_seconds": round(time.perf_counter() - start, 1),
                     **{k: round(v, 4) for k, v in metrics.items()}})
        models[name] = model
        print(json.dumps(rows[-1]), flush=True)
    return rows, models


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
        print(f"\n{dataset}\n| training | epochs | nominal | PGD-{suite.steps} | APGD-CE | APGD-T "
              "| Square | worst case | verified | train s |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['epochs']} | {r['nominal_accuracy']:.3f} | "
                  f"{r['pgd_accuracy']:.3f} | {r['apgd_ce_accuracy']:.3f} | "
                  f"{r['apgd_t_accuracy']:.3f} | {r['square_accuracy']:.3f} | "
                  f"{r['robust_accuracy']:.3f} | {r['verified_accuracy']:.3f} | "
                  f"{r['train_seconds']} |")
        (args.out / f"robust_{dataset}.json").write_text(json.dumps(rows, indent=2))
        if dataset == "digits":
            splits = load_dataset(dataset)
            x = splits.val.images[:256]
            curves = {name: layer_bound_widths(models[name], x, EPS)
                      for name in ("standard", "IBP")}
            (args.out / "bound_widths.json").write_text(json.dumps(curves, indent=2))
            plot_bound_widths({"normally trained": curves["standard"],
                               "IBP-trained": curves["IBP"]}, args.out / "bound_widths.png", EPS)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
