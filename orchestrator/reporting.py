"""Pareto reporting of a sweep to MLflow: the front's CSV and plot, each LESCI trial's surface.

The math is in ``orchestrator.pareto``; this module writes what a person reads in the UI.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mlflow.tracking import MlflowClient

from orchestrator.pareto import hypervolume, pareto_mask

__all__ = ["front_of", "write_csv", "plot_front", "plot_surface", "log_surface"]


def front_of(rows: list[dict[str, Any]], objectives: dict[str, str]) -> tuple[np.ndarray, float]:
    """(on-front mask, hypervolume) of the rows' objective values.

    Hypervolume reference: 0 for maximised and 1 for minimised objectives (all of this
    project's metrics are accuracies or rates in [0, 1]).
    """
    if not rows:
        return np.zeros(0, dtype=bool), 0.0
    values = np.array([[row[m] for m in objectives] for row in rows], dtype=float)
    maximize = [mode == "max" for mode in objectives.values()]
    reference = [0.0 if up else 1.0 for up in maximize]
    return pareto_mask(values, maximize), hypervolume(values, maximize, reference)


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_front(rows: list[dict[str, Any]], on_front: Sequence[bool], objectives: dict[str, str],
               path: Path, title: str) -> None:
    """The first two objectives against each other, the third as colour, the front circled."""
    plt = _pyplot()
    metrics = list(objectives)
    fig, ax = plt.subplots(figsize=(7, 5))
    if rows:
        x = [row[metrics[0]] for row in rows]
        y = [row[metrics[1]] if len(metrics) > 1 else i for i, row in enumerate(rows)]
        colour = [row[metrics[2]] for row in rows] if len(metrics) > 2 else None
        points = ax.scatter(x, y, c=colour if colour else "lightgray", cmap="viridis", s=30,
                            edgecolors="gray", label="all points")
        if colour:
            fig.colorbar(points, ax=ax, label=metrics[2])
        front = [(a, b) for a, b, on in zip(x, y, on_front) if on]
        if front:
            fx, fy = zip(*sorted(front))
            ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="red", linewidths=2,
                       label="Pareto front")
            if len(metrics) == 2:
                ax.plot(fx, fy, color="red", alpha=0.5)
    ax.set_xlabel(f"{metrics[0]} ({objectives[metrics[0]]})")
    ax.set_ylabel(f"{metrics[1]} ({objectives[metrics[1]]})" if len(metrics) > 1 else "trial")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_surface(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """A trial's surface: projection rate against accuracy, one curve per k (m along it),
    robust accuracy as colour where it was measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    robust = "robust_accuracy" in rows[0] if rows else False
    all_robust = [r["robust_accuracy"] for r in rows] if robust else []
    lo, hi = (min(all_robust), max(all_robust)) if all_robust else (0, 1)
    scatter = None
    for k in sorted({r["k"] for r in rows}):
        line = sorted((r for r in rows if r["k"] == k), key=lambda r: r["min_votes"])
        xs = [r["projection_rate"] for r in line]
        ys = [r["accuracy"] for r in line]
        ax.plot(xs, ys, color="gray", alpha=0.5, linewidth=1)
        scatter = ax.scatter(xs, ys, c=[r["robust_accuracy"] for r in line] if robust else None,
                             cmap="viridis", vmin=lo, vmax=hi, s=25, edgecolors="gray")
        ax.annotate(f"k={k}", (xs[0], ys[0]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if robust and scatter is not None:
        fig.colorbar(scatter, ax=ax, label="robust_accuracy (worst case of the suite)")
    ax.set_xlabel("projection_rate")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_surface(client: MlflowClient, run_id: str, rows: list[dict[str, Any]],
                columns: Sequence[str], title: str) -> None:
    """``surface.csv`` and ``surface.png`` on a child run, once (a resumed sweep skips runs
    that have them)."""
    if {a.path for a in client.list_artifacts(run_id)} >= {"surface.csv", "surface.png"}:
        return
    with tempfile.TemporaryDirectory() as folder:
        csv_path, png_path = Path(folder) / "surface.csv", Path(folder) / "surface.png"
        write_csv(rows, columns, csv_path)
        plot_surface(rows, png_path, title)
        client.log_artifact(run_id, str(csv_path))
        client.log_artifact(run_id, str(png_path))
