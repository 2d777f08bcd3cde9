"""Does a vote across several depths beat the best single depth? Each trial's operating point,
chosen on the validation split, measured once on the test split, compared in pairs.

After a sweep of a LESCI space whose ``depth`` mixes single depths and lists of depths
(``search_spaces/lesci_depths.yaml``):

    python search.py --space lesci_depths --name lesci_depths-readme --storage runs
    python -m benchmarks.lesci_depths --storage runs --name lesci_depths-readme

For every trial of the sweep (a depth, or several voting together), its operating point, the
(k, m) the trial reported to the searcher (the largest sum of the optimized metrics on the
validation split), is evaluated on the test split as the sweep's final evaluation evaluates a
front point: accuracy and projection rate on the whole split, and robust accuracy, the
per-sample worst case of the space's suite on the real vote (transfer PGD, the bare model's
APGD-CE, APGD on the exact and on the smoothed margin of the summed vote, targeted APGD), on its
first ``attack.samples``. The trial's stages (base model, each depth's PCA and embedding space,
the bare model's attacks on test) are read from the sweep's storage, so nothing is retrained.

Then each multi-depth vote is compared with each single depth on the same test samples: the
paired difference of each metric with Newcombe's 95% interval. A vote *dominates* a single
depth when no metric is resolved worse (its interval below 0) and at least one is resolved
better (its interval above 0); *unresolved* otherwise, unless it is dominated the other way.
The headline pair is the best multi-depth vote against the best single depth, "best" chosen on
the validation split by the same rule as the operating points.

CPU, one thread per process by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from defenses.intervals import format_interval, paired_difference, rate_interval
from defenses.lesci_attack import attack_surface
from defenses.surface import SurfacePoint
from orchestrator.lesci_stages import split_tensors
from orchestrator.lesci_trial import lesci_decision, operating_point
from orchestrator.loading import load_space
from orchestrator.params import resolve
from orchestrator.stages import StageCache
from orchestrator.storage import Storage

METRICS = ("accuracy", "projection_rate", "robust_accuracy")


def val_score(report: dict[str, Any], optimize: dict[str, str]) -> float:
    """The operating-point rule's score of a trial's reported point (validation split)."""
    return sum(report[m] if d == "max" else 1 - report[m] for m, d in optimize.items())


def evaluate(spec, splits, cache: StageCache, result: dict[str, Any]) -> dict[str, Any]:
    """One trial's operating point on the test split: per-sample outcomes and figures."""
    trial = resolve(spec, result["config"])
    report = result["report"]
    depths = len(trial.params.depths)
    point = SurfacePoint(int(report["operating_k"]), int(report["operating_min_votes"]), depths)
    # the same rule again on the stored surface: the point is the trial's own choice
    chosen = operating_point(result["surface"], spec.optimize)
    assert (chosen["k"], chosen["min_votes"]) == (point.k, point.min_votes)
    start = time.perf_counter()
    stages, decision, _ = lesci_decision(spec, trial, splits, None, cache, lambda _: None,
                                         point.k)
    attacks = stages.attacks("test")
    x, y = split_tensors(splits.test)
    prediction, projected = decision.decide(x, [point])
    x_att, y_att = split_tensors(splits.test, spec.attack.samples)
    suite = attack_surface(decision, x_att, y_att, [point], spec.attack.eps,
                           spec.attack.apgd.vote_suite(),
                           pool={"transfer": attacks["adversarial"],
                                 "base_apgd": attacks["base_apgd"]},
                           starts=("base_apgd", "transfer"),
                           generator=torch.Generator().manual_seed(1))
    outcomes = {"accuracy": (prediction[:, 0] == y).numpy(),
                "projection_rate": projected[:, 0].numpy(),
                "robust_accuracy": suite.robust()[:, 0].numpy()}
    return {"depth": trial.params.depth, "depths": depths, "point": point,
            "val": {m: report[m] for m in METRICS}, "val_score": val_score(report,
                                                                            spec.optimize),
            "outcomes": outcomes, "base_robust": attacks["base_robust"].numpy(),
            "seconds": time.perf_counter() - start}


def figure(values: np.ndarray) -> str:
    rate = float(values.mean())
    return format_interval(rate, *rate_interval(rate, len(values)))


def verdict(differences: dict[str, tuple[float, float, float]]) -> str:
    better = [m for m, (_, low, _) in differences.items() if low > 0]
    worse = [m for m, (_, _, high) in differences.items() if high < 0]
    if better and not worse:
        return f"dominates ({', '.join(better)} resolved better)"
    if worse and not better:
        return f"dominated ({', '.join(worse)} resolved worse)"
    if better and worse:
        return "trade-off (" + ", ".join(better) + " better; " + ", ".join(worse) + " worse)"
    return "unresolved"


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    return {m: paired_difference(a["outcomes"][m], b["outcomes"][m]) for m in METRICS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="the sweep's --storage")
    parser.add_argument("--name", required=True, help="the sweep's name")
    parser.add_argument("--space", default="lesci_depths",
                        help="the sweep's space (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_space(args.space, check_model=False)
    splits = spec.dataset.load()
    storage = Storage.from_uri(args.storage).child(args.name)
    cache = StageCache(storage, None, owner="benchmark", log=lambda _: None)
    results = []
    for name in sorted(storage.list("results")):
        found = storage.get_verified(f"results/{name}")
        if name.endswith(".json") and found is not None:
            data, manifest = found  # the trial's config is in the result's manifest
            results.append(evaluate(spec, splits, cache,
                                    {**json.loads(data), "config": manifest["config"]}))
    if not results:
        print(f"no finished trial in {storage.uri}/results", file=sys.stderr)
        return 2
    print(f"{spec.name}: each trial's operating point (chosen on val), on the "
          f"{len(splits.test)} test samples (robust: the first {spec.attack.samples}, the "
          f"space's suite); 95% intervals")
    print(f"{'depth':<20} {'k':>3} {'m':>3} {'thr':>5}  "
          + "  ".join(f"{m:>18}" for m in METRICS) + f"  {'val robust':>10}  {'s':>5}")
    for r in results:
        p = r["point"]
        print(f"{r['depth']:<20} {p.k:>3} {p.min_votes:>3} {p.threshold:>5.2f}  "
              + "  ".join(f"{figure(r['outcomes'][m]):>18}" for m in METRICS)
              + f"  {r['val']['robust_accuracy']:>10.3f}  {r['seconds']:>5.0f}")
    print(f"the bare model: robust_accuracy {figure(results[0]['base_robust'])}")
    singles = [r for r in results if r["depths"] == 1]
    votes = [r for r in results if r["depths"] > 1]
    print("\npaired differences on the test samples (vote minus single depth), "
          "Newcombe's 95% interval:")
    for v in votes:
        for s in singles:
            diff = compare(v, s)
            cells = "  ".join(f"{m} {format_interval(*diff[m])}" for m in METRICS)
            print(f"  {v['depth']} - {s['depth']}: {cells}: {verdict(diff)}")
    if singles and votes:
        best_single = max(singles, key=lambda r: r["val_score"])
        best_vote = max(votes, key=lambda r: r["val_score"])
        diff = compare(best_vote, best_single)
        print(f"\nbest on val: vote {best_vote['depth']} vs single {best_single['depth']}: "
              + "  ".join(f"{m} {format_interval(*diff[m])}" for m in METRICS)
              + f": {verdict(diff)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
