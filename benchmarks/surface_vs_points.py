"""One LESCI trial per depth with its whole (k, m) surface vs one trial per (k, m) point.

On the demo space (``search_spaces/demo.yaml``: digits, ``resnet_digits``, depths stem..pool,
32 PCA components, k in {3, 10}, thresholds m/k in [0.5, 1], i.e. 8 points per depth), this
runs, side by side in one process and sharing the same base model, PCA, embedding space and
bare-model attack pool (transfer PGD and APGD-CE, built once and timed separately):

- ``surface``: what the sweep does now, per depth ONE trial: one k_max-nearest-neighbour
  search per validation input gives the decisions at all 8 points
  (``defenses.surface.surface_decisions``), and ONE ``attack_surface`` call attacks all of
  them (``orchestrator.lesci_trial.lesci_surface`` with every point);
- ``per_point``: a sweep that searched k and the threshold as trials would, per depth and per
  (k, m) point ONE trial: its own kNN search with that k and its own
  ``attack_surface(..., points=[that point])`` with the same budget (``lesci_surface`` with a
  ``LESCIDecision`` of k_max = k and that single point).

The table gives, per mode: trials, kNN searches of the validation set (one per trial), APGD
runs (as ``attack_surface`` counts them in its progress: distinct k among a call's attacked
points x its runs per k, 1 + targets in the original suite, summed over calls), every
``KnnIndex.search`` call including the ones judging attack iterates, the trials' wall time,
the points evaluated, the Pareto front (accuracy, projection_rate, robust_accuracy, all max,
over every depth's points, ``orchestrator.pareto.front_of``) and its hypervolume. Then the
wall-time ratio, whether the clean metrics (accuracy, projection rate: the same decision rule
on the same neighbours, so they must be identical) and their front agree, and the per-point
difference of robust accuracy (it may differ: the two modes run different attacks).

    python -m benchmarks.surface_vs_points                      # all 5 depths, 360 samples
    python -m benchmarks.surface_vs_points --smoke-test         # 2 depths, 64 samples, < 60 s
    python -m benchmarks.surface_vs_points --depths layer2 pool --samples 128

CPU, one thread (``torch.set_num_threads(1)``). Shared machines are noisy: read the ratio.
The two modes alternate depth by depth, so noise hits them alike.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from defenses.data import Splits
from defenses.embedding_space import EmbeddingSpace, build_embedding_space
from defenses.knn import KnnIndex
from defenses.lesci import fit_pca_at_depth
from defenses.lesci_attack import LESCIDecision
from defenses.pca import StreamingPCA
from defenses.surface import SurfacePoint
from orchestrator.pareto import front_of
from orchestrator.loading import load_space
from orchestrator.space import SweepSpec
from orchestrator.lesci_stages import craft_transfer_set, train_base_model
from orchestrator.lesci_trial import lesci_surface

MODES = ("surface", "per_point")
CLEAN = ("accuracy", "projection_rate")
SMOKE_DEPTHS = ["stem", "pool"]


# ------------------------------------------------------------------------------------------------
# setup: the space and the shared stages


def demo_spec(smoke: bool, samples: int | None, apgd_steps: int | None) -> SweepSpec:
    """The demo space; the smoke test keeps its surface (k {3, 10}, 32 components) and only
    shrinks the training and the attack."""
    overrides: dict[str, Any] = {}
    attack: dict[str, Any] = {}
    if smoke:
        overrides["training"] = {"epochs": 3}
        attack = {"steps": 3, "samples": 64, "apgd": {"steps": 5}}
    if samples is not None:
        attack["samples"] = samples
    if apgd_steps is not None:
        attack.setdefault("apgd", {})["steps"] = apgd_steps
    if attack:
        overrides["attack"] = attack
    return load_space("demo", overrides=overrides or None)


@dataclass
class Shared:
    """The stages both modes share, built once (as the sweep's stage cache does)."""

    splits: Splits
    model: torch.nn.Module
    attacks: dict[str, torch.Tensor]
    stages: dict[str, tuple[StreamingPCA, EmbeddingSpace]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def build_shared(spec: SweepSpec, depths: list[str]) -> Shared:
    """Base model, bare-model attack pool, and PCA + embedding space per depth, each timed."""
    splits = spec.dataset.load()
    model, t_model = _timed(lambda: train_base_model(spec, splits, None, spec.training).eval())
    _log(f"base model trained in {t_model:.1f} s")
    stored, t_pool = _timed(lambda: craft_transfer_set(model, splits.val, spec.attack, None))
    _log(f"bare-model attack pool crafted in {t_pool:.1f} s")
    shared = Shared(splits, model, torch.load(io.BytesIO(stored), weights_only=True),
                    seconds={"base model": t_model, "attack pool": t_pool})
    n_components = int(spec.fixed()["n_components"])
    for depth in depths:
        def stage(depth=depth):
            pca = fit_pca_at_depth(model, depth, splits.train, n_components)
            return pca, build_embedding_space(model, depth, pca, splits.train)

        shared.stages[depth], seconds = _timed(stage)
        shared.seconds[f"pca+space {depth}"] = seconds
        _log(f"PCA + embedding space at {depth} in {seconds:.1f} s")
    return shared


# ------------------------------------------------------------------------------------------------
# the two modes


@contextmanager
def counting_searches() -> Iterator[list[int]]:
    """Counts every ``KnnIndex.search`` call (the clean search and every attack iterate's)."""
    original = KnnIndex.search
    count = [0]

    def search(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    KnnIndex.search = search
    try:
        yield count
    finally:
        KnnIndex.search = original


@dataclass
class Trial:
    """One trial's outcome: its points' metric rows and its cost."""

    rows: list[dict[str, Any]]
    seconds: float
    apgd_runs: int
    searches: int
    budget: dict[str, Any]


def run_trial(spec: SweepSpec, shared: Shared, depth: str, points: list[SurfacePoint]
              ) -> Trial:
    """What ``lesci_trial`` does after its stages: a decision with k_max = the largest k of
    ``points``, the clean surface from one search per input, one attack suite over them."""
    pca, space = shared.stages[depth]
    runs = [0]

    def progress(done: int, total: int) -> None:  # attack_surface: after each APGD run
        runs[0] = total

    start = time.perf_counter()
    with counting_searches() as searches:
        decision = LESCIDecision(shared.model, depth, pca, space, max(p.k for p in points),
                                 num_classes=shared.splits.num_classes)
        metrics, budget = lesci_surface(spec, decision, points, shared.splits.val, shared.attacks,
                                        None, progress)
    seconds = time.perf_counter() - start
    rows = [{"depth": depth, "k": p.k, "min_votes": p.min_votes,
             **{name: values[i] for name, values in metrics.items()}}
            for i, p in enumerate(points)]
    return Trial(rows, seconds, runs[0], searches[0], budget)


def run_depth(spec: SweepSpec, shared: Shared, depth: str, points: list[SurfacePoint]
              ) -> dict[str, list[Trial]]:
    """Both modes at one depth: one surface trial, then one trial per point."""
    surface = [run_trial(spec, shared, depth, points)]
    _log(f"{depth}: surface trial {surface[0].seconds:.1f} s")
    per_point = []
    for point in points:
        per_point.append(run_trial(spec, shared, depth, [point]))
        _log(f"{depth}: point k={point.k} m={point.min_votes} {per_point[-1].seconds:.1f} s")
    return {"surface": surface, "per_point": per_point}


# ------------------------------------------------------------------------------------------------
# summary


def summarize(mode: str, trials: list[Trial], objectives: dict[str, str]) -> dict[str, Any]:
    rows = [row for trial in trials for row in trial.rows]
    on_front, volume = front_of(rows, objectives)
    return {"mode": mode, "trials": len(trials), "knn_searches": len(trials),
            "apgd_runs": sum(t.apgd_runs for t in trials),
            "index_searches_all": sum(t.searches for t in trials),
            "wall_sec": sum(t.seconds for t in trials), "points": len(rows),
            "front_points": int(on_front.sum()), "hypervolume": volume}


def _key(row: dict[str, Any]) -> tuple[str, int, int]:
    return row["depth"], row["k"], row["min_votes"]


def compare(by_mode: dict[str, list[dict[str, Any]]], objectives: dict[str, str]
            ) -> dict[str, Any]:
    """Agreement of the two modes, point by point (matched by depth, k, m)."""
    a = sorted(by_mode["surface"], key=_key)
    b = sorted(by_mode["per_point"], key=_key)
    assert [_key(r) for r in a] == [_key(r) for r in b], "the modes evaluated different points"
    clean_diff = max(abs(x[m] - y[m]) for x, y in zip(a, b) for m in CLEAN)
    robust = np.array([x["robust_accuracy"] - y["robust_accuracy"] for x, y in zip(a, b)])
    clean_objectives = {m: objectives[m] for m in CLEAN if m in objectives}
    return {
        "clean_max_abs_diff": clean_diff,
        "clean_front_same": bool((front_of(a, clean_objectives)[0]
                                  == front_of(b, clean_objectives)[0]).all()),
        "full_front_same": bool((front_of(a, objectives)[0] == front_of(b, objectives)[0]).all()),
        "robust_max_abs_diff": float(np.abs(robust).max()),
        "robust_mean_diff": float(robust.mean()),
        "surface_lower": int((robust < 0).sum()), "per_point_lower": int((robust > 0).sum()),
        "robust_equal": int((robust == 0).sum()),
    }


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(f"\n{title}\n| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |")


def point_rows(by_mode: dict[str, list[dict[str, Any]]], trials: dict[str, list[Trial]],
               objectives: dict[str, str]) -> list[dict[str, Any]]:
    """Per point: the clean metrics, each mode's robust accuracy and front membership."""
    fronts = {mode: dict(zip(map(_key, rows), front_of(rows, objectives)[0]))
              for mode, rows in by_mode.items()}
    seconds = {_key(t.rows[0]): t.seconds for t in trials["per_point"]}
    per_point = {_key(r): r for r in by_mode["per_point"]}
    out = []
    for row in by_mode["surface"]:  # run order: depth by depth, then k, then m
        other = per_point[_key(row)]
        out.append({"depth": row["depth"], "k": row["k"], "m": row["min_votes"],
                    "accuracy": row["accuracy"], "projection_rate": row["projection_rate"],
                    "robust_surface": row["robust_accuracy"],
                    "robust_per_point": other["robust_accuracy"],
                    "front_surface": bool(fronts["surface"][_key(row)]),
                    "front_per_point": bool(fronts["per_point"][_key(other)]),
                    "per_point_trial_sec": seconds[_key(row)]})
    return out


def _log(message: str) -> None:
    print(f"[surface_vs_points] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", nargs="+", default=None,
                        help="depths to run (default: the demo's five; smoke test: stem pool)")
    parser.add_argument("--samples", type=int, default=None,
                        help="attack the first N validation samples (default: all 360)")
    parser.add_argument("--apgd-steps", type=int, default=None,
                        help="APGD steps (default: the demo's 100)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="2 depths, 3 epochs, 64 attacked samples, 5 APGD steps: < 60 s")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    total = time.perf_counter()
    spec = demo_spec(args.smoke_test, args.samples, args.apgd_steps)
    depths = args.depths or (SMOKE_DEPTHS if args.smoke_test else list(spec.values_of("depth")))
    points = spec.defense.surface_points(spec)
    objectives = dict(spec.optimize)
    _log(f"depths {depths}; {len(points)} points per depth: "
         + ", ".join(f"({p.k},{p.min_votes})" for p in points))
    shared = build_shared(spec, depths)
    trials: dict[str, list[Trial]] = {mode: [] for mode in MODES}
    for depth in depths:
        for mode, done in run_depth(spec, shared, depth, points).items():
            trials[mode] += done
    by_mode = {mode: [row for t in ts for row in t.rows] for mode, ts in trials.items()}
    summary = [summarize(mode, trials[mode], objectives) for mode in MODES]
    attack = spec.attack
    samples = min(attack.samples or len(shared.splits.val), len(shared.splits.val))
    budget = trials["surface"][0].budget
    print(f"LESCI surface vs trial-per-point: demo space, depths {', '.join(depths)}; "
          f"{len(points)} points per depth; {len(shared.splits.val)} validation samples "
          f"(clean), {samples} attacked; PGD-{attack.steps} transfer; 1 thread\nattack "
          f"budget: " + ", ".join(f"{k}={v}" for k, v in budget.items() if k != "suite")
          + f"\nsuite: {budget.get('suite', '?')}")
    print_table("shared stages (built once, not in the modes' wall time)",
                [{"stage": name, "sec": sec} for name, sec in shared.seconds.items()])
    print_table("points (robust accuracy of each mode)", point_rows(by_mode, trials,
                                                                    objectives))
    print_table("modes", summary)
    agreement = compare(by_mode, objectives)
    print_table("agreement (per point, surface - per_point)", [agreement])
    ratio = summary[1]["wall_sec"] / summary[0]["wall_sec"]
    print(f"\nwall time per_point / surface: {ratio:.2f}x "
          f"({summary[1]['wall_sec']:.1f} s vs {summary[0]['wall_sec']:.1f} s)")
    clean_ok = agreement["clean_max_abs_diff"] == 0.0 and agreement["clean_front_same"]
    print(f"clean metrics identical per point and same clean front: {clean_ok}")
    print(f"robust_accuracy max |surface - per_point| per point: "
          f"{agreement['robust_max_abs_diff']:.4f}")
    print(f"total run time: {time.perf_counter() - total:.1f} s")
    return 0 if clean_ok else 1


if __name__ == "__main__":
    sys.exit(main())
