"""``python search.py``: the command-line entry point.

Until the Ray Tune orchestrator lands, this runs the embedded demo directly: train the small
ResNet on scikit-learn's digits, evaluate LESCI at every named depth over a grid of ``k`` and
``threshold``, and print the results with their Pareto front (accuracy vs projection_rate).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np
import torch

from defenses.data import load_dataset
from defenses.lesci import build_embedding_space, collect_votes, fit_pca_at_depth
from defenses.models import build_model, depth_shapes
from defenses.training import TrainConfig, Trainer, accuracy
from orchestrator.pareto import hypervolume, pareto_mask

DEMO_GRID = {"k": (1, 10, 20), "threshold": (0.5, 0.7, 0.9), "n_components": 32}
SMOKE_GRID = {"k": (10,), "threshold": (0.5, 0.9), "n_components": 8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="search.py",
        description="LESCI demo on scikit-learn's bundled digits: train a small ResNet, then "
                    "evaluate the LESCI layer at every named depth over k and threshold and "
                    "print the Pareto front of accuracy vs projection_rate.")
    parser.add_argument("--smoke-test", action="store_true",
                        help="tiny and fast: 3 epochs, two depths, a 2-point grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of training (default 0)")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, flush=True)


def run_demo(smoke_test: bool, seed: int) -> list[dict[str, float | str]]:
    torch.manual_seed(seed)
    grid = SMOKE_GRID if smoke_test else DEMO_GRID
    splits = load_dataset("digits")
    model = build_model("resnet_digits", splits.num_classes, splits.input_shape, splits.mean,
                        splits.std)
    config = TrainConfig(epochs=3 if smoke_test else 15, batch_size=64, lr=3e-3, seed=seed)
    start = time.perf_counter()
    Trainer(model, splits.train, config).fit()
    model.eval()
    log(f"base model: resnet_digits, validation accuracy {accuracy(model, splits.val):.4f} "
        f"after {config.epochs} epochs ({time.perf_counter() - start:.1f} s)")
    depths = list(depth_shapes(model).items())
    if smoke_test:
        depths = [depths[0], depths[-1]]
    rows: list[dict[str, float | str]] = []
    for depth, shape in depths:
        start = time.perf_counter()
        pca = fit_pca_at_depth(model, depth, splits.train, grid["n_components"])
        space = build_embedding_space(model, depth, pca, splits.train)
        for k in grid["k"]:
            votes = collect_votes(model, depth, pca, space, k, splits.val)
            for threshold in grid["threshold"]:
                rows.append({"depth": depth, "dims": int(np.prod(shape)), "k": k,
                             "threshold": threshold, **votes.metrics(threshold)})
        log(f"depth {depth:7s} {int(np.prod(shape)):6d} dims: PCA + embedding space of "
            f"{len(space)} + {len(grid['k'])} votes in {time.perf_counter() - start:.1f} s")
    return rows


def format_table(rows: list[dict[str, float | str]]) -> str:
    header = ("depth", "dims", "k", "threshold", "accuracy", "projection_rate",
              "accuracy_projected", "accuracy_identity")
    lines = ["  ".join(f"{h:>18s}" if i >= 4 else f"{h:>9s}" for i, h in enumerate(header))]
    for row in rows:
        cells = []
        for i, h in enumerate(header):
            value = row[h]
            text = f"{value:.4f}" if isinstance(value, float) and h != "threshold" else str(value)
            cells.append(f"{text:>18s}" if i >= 4 else f"{text:>9s}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run_demo(args.smoke_test, args.seed)
    values = np.array([[r["accuracy"], r["projection_rate"]] for r in rows])
    front = pareto_mask(values, [True, True])
    log(f"\nAll {len(rows)} configurations:\n{format_table(rows)}")
    log(f"\nPareto front (accuracy vs projection_rate, both maximised), {int(front.sum())} "
        f"point(s), hypervolume {hypervolume(values, [True, True], [0.0, 0.0]):.4f}:")
    log(format_table([r for r, on in zip(rows, front) if on]))
    return 0


def entry_point() -> None:
    sys.exit(main())
