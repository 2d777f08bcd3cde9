"""Robust training on digits at eps 0.1: nominal, PGD-20 and IBP-verified accuracy per method,
and the per-layer interval bound widths of a normally vs an IBP-trained small CNN.

    python -m benchmarks.robust_digits [--out benchmarks/results]

Writes ``robust_digits.json`` and ``bound_widths.png`` to ``--out``.
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
from defenses.ibp import layer_bound_widths
from defenses.models import build_model
from defenses.evaluation import evaluate_robustness
from defenses.objectives import make_objective
from defenses.trainer import TrainConfig, Trainer

EPS = 0.1


def methods(steps_per_epoch: int) -> dict[str, tuple[str, dict, int]]:
    """name -> (objective, parameters, epochs)."""
    return {
        "standard": ("standard", {}, 20),
        "fgsm": ("fgsm", {"eps": EPS}, 20),
        "fast_fgsm": ("fast_fgsm", {"eps": EPS}, 20),
        "pgd7": ("pgd", {"eps": EPS, "alpha": 0.025, "steps": 7}, 20),
        "adv_reg": ("adv_reg", {}, 20),
        "ibp": ("ibp", {"eps_train": 1.1 * EPS, "warmup": 2 * steps_per_epoch,
                        "rampup": 15 * steps_per_epoch}, 40),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke-test", action="store_true", help="2 epochs per method")
    args = parser.parse_args(argv)
    splits = load_dataset("digits")
    batch_size = 64
    steps = -(-len(splits.train) // batch_size)
    rows, models = [], {}
    for name, (objective, params, epochs) in methods(steps).items():
        epochs = 2 if args.smoke_test else epochs
        torch.manual_seed(0)
        model = build_model("ibp_small", splits.num_classes, splits.input_shape, splits.mean,
                            splits.std, padding="same")
        start = time.perf_counter()
        Trainer(model, splits.train, TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3),
                make_objective(objective, **params)).fit()
        seconds = time.perf_counter() - start
        metrics = evaluate_robustness(model.eval(), splits.val, EPS, steps=20, verify=True)
        rows.append({"method": name, "epochs": epochs, "train_seconds": round(seconds, 1),
                     **{k: round(v, 4) for k, v in metrics.items()}})
        models[name] = model
        print(json.dumps(rows[-1]), flush=True)
    print("\n| method | nominal | PGD-20 | verified | train s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['nominal_accuracy']:.3f} | {r['pgd_accuracy']:.3f} | "
              f"{r['verified_accuracy']:.3f} | {r['train_seconds']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robust_digits.json").write_text(json.dumps(rows, indent=2))
    x = splits.val.images[:256]
    curves = {name: layer_bound_widths(models[name], x, EPS) for name in ("standard", "ibp")}
    (args.out / "bound_widths.json").write_text(json.dumps(curves, indent=2))
    plot_bound_widths({"normally trained": curves["standard"], "IBP-trained": curves["ibp"]},
                      args.out / "bound_widths.png", EPS)
    print(f"\nwrote {args.out / 'robust_digits.json'} and {args.out / 'bound_widths.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
