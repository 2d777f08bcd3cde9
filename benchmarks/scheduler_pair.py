"""Early stopping, measured: one space's sweep run twice, with its ``scheduler: mo_asha`` and
with ``scheduler: none`` (every trial to its full budget), the same trials and seeds, side by
side in one process: epochs trained, wall time, the front's hypervolume on validation and on
test, and whether any stopped trial reached the front.

    python -m benchmarks.scheduler_pair --space benchmarks/spaces/ibp_digits_8.yaml
    python -m benchmarks.scheduler_pair --space ibp_mnist5k --num-samples 18 --out pair
    python -m benchmarks.scheduler_pair --smoke-test        # a minute: 4 trials of 3 epochs

Hypervolumes are point figures over the fronts' metrics (each front point's figures carry
their own 95% intervals in the sweeps' ``pareto_front.csv``).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SPACE = HERE / "spaces" / "ibp_digits_8.yaml"


def _sweep(space: str, scheduler: dict | str | None, name: str, root: Path,
           smoke_test: bool, num_samples: int | None = None) -> tuple[object, float]:
    from orchestrator.loading import load_space
    from orchestrator.storage import Storage
    from orchestrator.sweep import run_sweep

    overrides = {} if scheduler is None else {"scheduler": scheduler}
    if num_samples is not None:
        overrides["search"] = {"num_samples": num_samples}
    if smoke_test:
        overrides.update({"training": {"epochs": 3}, "params": {"eps_train": 0.1},
                          "attack": {"eps": 0.1, "steps": 2, "suite": {
                              "apgd_steps": 3, "targets": 1, "square_queries": 10}}})
    spec = load_space(space, overrides=overrides)
    print(f"{name}: {spec.trial_count} trials, scheduler {spec.scheduler.name} ...", flush=True)
    start = time.perf_counter()
    result = run_sweep(spec, name, Storage.from_uri(str(root / "sweeps")),
                       f"sqlite:///{root / 'mlflow.db'}",
                       log=lambda line: print(f"  [{name}] {line}", flush=True))
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(DEFAULT_SPACE),
                        help="a space with scheduler: mo_asha (default: %(default)s)")
    parser.add_argument("--out", help="folder for the sweeps and their MLflow store "
                                      "(default: a temporary one)")
    parser.add_argument("--num-samples", type=int,
                        help="trials of a sampled space (default: the space's num_samples)")
    parser.add_argument("--smoke-test", action="store_true", help="3 epochs, 4 trials")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's heading and hints: not here
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.out or temporary)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        early, early_s = _sweep(args.space, None, f"mo-asha-{stamp}", root, args.smoke_test,
                                args.num_samples)
        full, full_s = _sweep(args.space, "none", f"full-{stamp}", root, args.smoke_test,
                              args.num_samples)
    print(f"{'sweep':<12} {'trials':>6} {'stopped':>7} {'compute':>8} {'wall s':>7} "
          f"{'front':>5} {'HV val':>7} {'HV test':>7}")
    for label, result, seconds, fraction in (
            ("mo_asha", early, early_s, early.compute_fraction),
            ("full budget", full, full_s, 1.0)):
        trials = len({row["trial_id"] for row in result.rows}) + result.stopped
        print(f"{label:<12} {trials:>6} {result.stopped:>7} {fraction:>8.2f} {seconds:>7.0f} "
              f"{len(result.front):>5} {result.hypervolume:>7.4f} "
              f"{result.test_hypervolume:>7.4f}")
    print(f"hypervolume kept: {early.hypervolume / full.hypervolume:.3f} (val), "
          f"{early.test_hypervolume / full.test_hypervolume:.3f} (test) at compute fraction "
          f"{early.compute_fraction:.2f}, wall time ratio {early_s / full_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
