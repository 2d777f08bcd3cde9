"""Does racing LESCI's attacks (``scheduler: mo_asha`` on a LESCI space) keep the front, and
what does it save? Every trial of a grid space, attacked both ways, side by side in one run.

Each trial's surface (its stages, shared through the stage cache under ``--cache``, as in a
sweep) is attacked twice by ``orchestrator.lesci_trial.lesci_surface``, as the sweep calls it:
once with the whole suite on every attack sample, once raced (``defenses.racing``, decisions
by ``orchestrator.racing.SurfaceRace`` against every earlier trial's published race, as in a
sweep running one trial at a time; trials that run side by side see less of each other). The
report: the attacked (point, sample) pairs and the attacks' wall time, raced over full; the
validation front of each (the front of the raced sweep is chosen among the points attacked on
every sample, as the sweep chooses it), its hypervolume, and whether the two fronts are the
same points.

    python -m benchmarks.lesci_race                   # the demo, rungs 30, 60, 120, 180
    python -m benchmarks.lesci_race --space lesci --smoke-test --grace 8
    python -m benchmarks.lesci_race --grace 60 --reduction 3

CPU, one thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.distributions import Grid
from orchestrator.lesci_trial import lesci_decision, lesci_surface
from orchestrator.loading import load_space
from orchestrator.pareto import front_of
from orchestrator.params import resolve
from orchestrator.racing import SurfaceRace
from orchestrator.stages import StageCache
from orchestrator.storage import Storage


def grid_configs(spec) -> list[dict]:
    """Every trial of a space whose searched params are grids, in grid order."""
    searched = spec.searched()
    if not all(isinstance(v, Grid) for v in searched.values()):
        raise SystemExit("lesci_race: the space's searched params must all be grids")
    keys = list(searched)
    return [dict(zip(keys, values)) for values in itertools.product(
        *(searched[k].grid for k in keys))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="demo")
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--grace", type=int, default=30,
                        help="attack samples of the first rung (default: %(default)s)")
    parser.add_argument("--reduction", type=int, default=2, help="default: %(default)s")
    parser.add_argument("--cache", default=None, help="stage cache folder (default: a temp)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_space(args.space, smoke_test=args.smoke_test, check_model=False)
    raced_spec = spec.model_copy(update={"scheduler": spec.scheduler.model_copy(update={
        "name": "mo_asha", "grace_period": args.grace, "reduction_factor": args.reduction})})
    splits = spec.dataset.load()
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        cache_dir = Path(args.cache or folder) / "stages"
        cache = StageCache(Storage(str(cache_dir)), None, owner="benchmark",
                           log=lambda _: None)
        race_storage = Storage(str(Path(folder) / "race"))
        full_rows, raced_rows, seconds, pairs = [], [], {"full": 0.0, "raced": 0.0}, [0, 0]
        run_samples = [0, 0]  # APGD runs x their samples: raced, full
        lines: list[str] = []
        configs = grid_configs(spec)
        compared = len(configs) * spec.defense.largest_surface(spec)
        for number, config in enumerate(configs):
            trial = resolve(spec, config)
            points = spec.defense.surface_points(spec, len(trial.params.depths))
            stages, decision, _ = lesci_decision(spec, trial, splits, device, cache,
                                                 lambda _: None, max(p.k for p in points))
            attacks = stages.attacks("val")
            label = trial.params.depth
            start = time.perf_counter()
            full, budget = lesci_surface(spec, decision, points, splits.val, attacks, device)
            seconds["full"] += time.perf_counter() - start
            race = SurfaceRace(race_storage, f"trial{number}", label,
                               json.dumps(config, sort_keys=True, default=str), points,
                               spec.optimize, {}, args.grace,
                               args.reduction, log=lines.append, points_compared=compared)
            start = time.perf_counter()
            raced, raced_budget = lesci_surface(raced_spec, decision, points, splits.val,
                                                attacks, device, race=race)
            seconds["raced"] += time.perf_counter() - start
            pairs[0] += raced_budget["point_samples"]
            pairs[1] += raced_budget["full_point_samples"]
            run_samples[0] += raced_budget["apgd_run_samples"]
            run_samples[1] += budget["apgd_run_samples"]
            for rows, metrics in ((full_rows, full), (raced_rows, raced)):
                rows.extend({"depth": label, "k": p.k, "min_votes": p.min_votes,
                             **{m: v[i] for m, v in metrics.items()}}
                            for i, p in enumerate(points))
            print(f"{label}: full {budget['point_samples']} point-samples; raced "
                  f"{raced_budget['point_samples']} ({sum(raced['raced_out']):.0f} of "
                  f"{len(points)} points stopped)", flush=True)
    for line in lines:
        print(line)
    kept = [row for row in raced_rows if not row["raced_out"]]
    full_mask, full_volume = front_of(full_rows, spec.optimize)
    raced_mask, raced_volume = front_of(kept, spec.optimize)
    key = lambda row: (row["depth"], row["k"], row["min_votes"])  # noqa: E731
    full_front = {key(r) for r, on in zip(full_rows, full_mask) if on}
    raced_front = {key(r) for r, on in zip(kept, raced_mask) if on}
    stopped_front = {key(r) for r in raced_rows if r["raced_out"]} & full_front
    print(f"\n{spec.name}{' (smoke test)' if args.smoke_test else ''}: "
          f"{len(full_rows)} surface points, {len(splits.val)} val samples, attack samples "
          f"{spec.attack.samples or len(splits.val)}, rungs grace {args.grace} x "
          f"{args.reduction}")
    print(f"attacked (point, sample) pairs: raced {pairs[0]} of {pairs[1]} "
          f"({pairs[0] / pairs[1]:.0%})")
    print(f"APGD run-samples (runs x the samples each attacks): raced {run_samples[0]} of "
          f"{run_samples[1]} ({run_samples[0] / run_samples[1]:.0%})")
    print(f"attack wall time: full {seconds['full']:.1f} s, raced {seconds['raced']:.1f} s "
          f"(ratio {seconds['raced'] / seconds['full']:.2f})")
    print(f"val front: full {len(full_front)} points, hypervolume {full_volume:.4f}; raced "
          f"{len(raced_front)} points, hypervolume {raced_volume:.4f} "
          f"(ratio {raced_volume / full_volume:.4f})")
    print(f"same front points: {full_front == raced_front}; full-front points the race "
          f"stopped: {sorted(stopped_front) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
