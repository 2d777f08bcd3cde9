"""IBP, CROWN-IBP and the fast-IBP recipe at one training budget, and what each step costs.

1. The cost of one optimiser step of the small CNN on 28x28 inputs (batch 100): nominal, IBP,
   CROWN-IBP (beta 1: the backward pass every step), and SABR, MTL-IBP, CC-IBP, Exp-IBP, TAPS
   and STAPS at their defaults (TAPS's cut after the convolutions), measured side by side in
   interleaved rounds on this machine, as ratios to the nominal step (``--costs-only``: this
   part alone).
2. Each recipe trains the small CNN on mnist5k at the same budget (ibp_mnist5k's: 40 epochs of
   30 steps, lr x0.1 late) at one point of the shipped spaces' schedule ranges (not searched
   here; ``search_spaces/crown_ibp_mnist5k*.yaml`` search them), and is evaluated on the test
   split with 95% intervals: nominal accuracy, the attack suite's worst case, verified by IBP, by
   CROWN-IBP and by the best certificate, the bracket (worst case minus verified, where the true
   robust accuracy lies), and each recipe's verified accuracy against IBP's as a paired
   difference (Newcombe) on the same test samples.

    python -m benchmarks.certified_recipes [--eps 0.1 --eps 0.3] [--out DIR] [--smoke-test]
        [--costs-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from defenses.crown import certificates
from defenses.data import load_dataset
from defenses.evaluation import AttackSuite, evaluate_robustness
from defenses.intervals import format_interval, paired_difference, rate_interval
from defenses.models import build_model, eval_mode
from defenses.objectives import make_objective
from defenses.trainer import TrainConfig, Trainer

TRAINING = {"epochs": 40, "batch_size": 100, "lr": 1e-3, "lr_schedule": "step",
            "lr_milestones": [825, 1050]}


def recipes(eps: float) -> dict[str, dict]:
    """name -> the ibp objective's parameters (the schedule of ibp_mnist5k at one point)."""
    schedule = {"eps_train": 1.5 * eps, "warmup": 75, "rampup": 450, "kappa_final": 0.5}
    return {
        "IBP": schedule,
        "CROWN-IBP": {**schedule, "bound": "crown_ibp"},
        "fast IBP (init, BN, regularisers)": {**schedule, "init": "ibp", "batch_norm": True,
                                              "fast_reg": 0.5},
    }


def step_costs(rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per optimiser step of each objective, interleaved rounds."""
    torch.manual_seed(0)
    model = build_model("ibp_small", 10, (1, 28, 28), (0.13,), (0.31,))
    x, y = torch.rand(100, 1, 28, 28), torch.randint(0, 10, (100,))
    objectives = {
        "nominal": make_objective("standard"),
        "IBP": make_objective("ibp", eps_train=0.1, kappa_final=0.5),
        "CROWN-IBP": make_objective("ibp", eps_train=0.1, kappa_final=0.5, bound="crown_ibp",
                                    beta_start=1.0, beta_end=1.0),
        # at their defaults (SABR: PGD of 8 steps; the expressive losses: of 1 step)
        **{name: make_objective(name, eps_train=0.1, batch_norm=False)
           for name in ("sabr", "mtl_ibp", "cc_ibp", "exp_ibp")},
        # TAPS and STAPS cut after the convolutions (latent PGD: 10 steps x 3 restarts)
        **{name: make_objective(name, eps_train=0.1, batch_norm=False,
                                split="layers.relu_conv2") for name in ("taps", "staps")},
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for _ in range(rounds):
        for name, objective in objectives.items():
            start = time.perf_counter()
            for step in range(steps):
                optimizer.zero_grad()
                loss, _ = objective.loss(model, x, y, 10**6, gen)  # after the ramps
                loss.backward()
                optimizer.step()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def verified_outcomes(model, data, eps: float) -> dict[str, list[bool]]:
    found: dict[str, list[bool]] = {"ibp": [], "crown": [], "best": []}
    with eval_mode(model):
        for x, y in DataLoader(data, batch_size=256):
            for name, hit in certificates(model, x, y, eps).items():
                found[name] += hit.tolist()
    return found


def run(eps: float, smoke_test: bool, suite: AttackSuite) -> list[dict]:
    splits = load_dataset("mnist5k")
    test = Subset(splits.test, range(64)) if smoke_test else splits.test
    rows, outcomes = [], {}
    for name, params in recipes(eps).items():
        training = {**TRAINING, "epochs": 1} if smoke_test else TRAINING
        objective = make_objective("ibp", **params)
        torch.manual_seed(0)
        model = build_model("ibp_small", splits.num_classes, splits.input_shape, splits.mean,
                            splits.std, **objective.params.model_options())
        objective.params.prepare(model)
        start = time.perf_counter()
        Trainer(model, splits.train, TrainConfig(**training), objective).fit()
        row = {"eps": eps, "recipe": name, "params": params,
               "train_seconds": round(time.perf_counter() - start, 1), "samples": len(test)}
        model.eval()
        metrics = evaluate_robustness(model, test, eps, verify=False, suite=suite)
        outcomes[name] = verified_outcomes(model, test, eps)
        for key in ("ibp", "crown", "best"):
            metrics[f"verified_{key}_accuracy"] = sum(outcomes[name][key]) / len(test)
        for key, value in metrics.items():
            row[key] = value
            row[f"{key}_ci"] = list(rate_interval(value, len(test)))
        row["bracket"] = metrics["robust_accuracy"] - metrics["verified_best_accuracy"]
        if name != "IBP":
            row["verified_vs_ibp"] = list(paired_difference(outcomes[name]["best"],
                                                            outcomes["IBP"]["best"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _cell(row: dict, key: str) -> str:
    return format_interval(row[key], *row[f"{key}_ci"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", action="append", type=float, help="repeat (default: 0.1, 0.3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke-test", action="store_true",
                        help="1 epoch per recipe, 64 test samples, a tiny attack budget")
    parser.add_argument("--costs-only", action="store_true",
                        help="only the cost of one step of each objective")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = (AttackSuite(steps=2, apgd_steps=3, targets=1, square_queries=10)
             if args.smoke_test else AttackSuite())
    costs = step_costs(1 if args.smoke_test else 5, 1 if args.smoke_test else 5)
    base = costs["nominal"]
    print("seconds per optimiser step (small CNN, 28x28, batch 100), median of interleaved "
          "rounds: " + ", ".join(f"{name} {t * 1000:.0f} ms ({t / base:.1f}x)"
                                 for name, t in costs.items()))
    results = {"step_seconds": costs, "rows": []}
    for eps in [] if args.costs_only else args.eps or [0.1, 0.3]:
        rows = run(eps, args.smoke_test, suite)
        results["rows"] += rows
        print(f"\nmnist5k, eps {eps}, test split ({rows[0]['samples']}), 95% intervals\n"
              "| recipe | nominal | worst case | verified by IBP | by CROWN-IBP | verified (best) "
              "| bracket | verified vs IBP | train s |\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            versus = (format_interval(*r["verified_vs_ibp"], signed=True) if "verified_vs_ibp" in r
                      else "-")
            print(f"| {r['recipe']} | " + " | ".join(_cell(r, k) for k in (
                "nominal_accuracy", "robust_accuracy", "verified_ibp_accuracy",
                "verified_crown_accuracy", "verified_best_accuracy"))
                + f" | {r['bracket']:.3f} | {versus} | {r['train_seconds']} |")
    (args.out / "certified_recipes.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
