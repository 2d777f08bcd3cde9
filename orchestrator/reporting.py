"""Pareto reporting of a sweep to MLflow: the front's CSV and plot, each LESCI trial's surface,
and the end-of-sweep report (``report_front``).

The math is in ``orchestrator.pareto``; this module writes what a person reads in the UI.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mlflow.tracking import MlflowClient

from orchestrator.params import resolve
from orchestrator.pareto import hypervolume, pareto_mask
from orchestrator.space import FAMILY_METRICS, Family, SweepSpec
from orchestrator.storage import Storage

__all__ = ["front_of", "write_csv", "plot_front", "plot_surface", "log_surface",
           "report_front", "surface_columns", "SweepResult", "BASE_METRICS", "SURFACE_COLUMNS"]

# the bare model under the suite's PGD and APGD-CE, logged beside LESCI's figures
BASE_METRICS = ("base_accuracy", "base_robust_accuracy")
# surface.csv: the trial's point, the (k, m) point, then the metrics
SURFACE_COLUMNS = ("depth", "n_components", "embedding_size", "center", "k", "min_votes",
                   "threshold")


def front_of(rows: list[dict[str, Any]], optimize: dict[str, str]) -> tuple[np.ndarray, float]:
    """(on-front mask, hypervolume) of the rows' values of the metrics in ``optimize``.

    Hypervolume reference: 0 for maximised and 1 for minimised metrics (all of this
    project's metrics are accuracies or rates in [0, 1]).
    """
    if not rows:
        return np.zeros(0, dtype=bool), 0.0
    values = np.array([[row[m] for m in optimize] for row in rows], dtype=float)
    maximize = [mode == "max" for mode in optimize.values()]
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


def plot_front(rows: list[dict[str, Any]], on_front: Sequence[bool], optimize: dict[str, str],
               path: Path, title: str) -> None:
    """The first two optimized metrics against each other, the third as colour, the front circled."""
    plt = _pyplot()
    metrics = list(optimize)
    fig, ax = plt.subplots(figsize=(7, 5))
    if rows:
        x = [row[metrics[0]] for row in rows]
        y = [row[metrics[1]] if len(metrics) > 1 else i for i, row in enumerate(rows)]
        colour = [row[metrics[2]] for row in rows] if len(metrics) > 2 else None
        shade = {"c": colour, "cmap": "viridis"} if colour else {"color": "lightgray"}
        points = ax.scatter(x, y, s=30, edgecolors="gray", label="all points", **shade)
        if colour:
            fig.colorbar(points, ax=ax, label=metrics[2])
        front = [(a, b) for a, b, on in zip(x, y, on_front) if on]
        if front:
            fx, fy = zip(*sorted(front))
            ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="red", linewidths=2,
                       label="Pareto front")
            if len(metrics) == 2:
                ax.plot(fx, fy, color="red", alpha=0.5)
    ax.set_xlabel(f"{metrics[0]} ({optimize[metrics[0]]})")
    ax.set_ylabel(f"{metrics[1]} ({optimize[metrics[1]]})" if len(metrics) > 1 else "trial")
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


@dataclass
class SweepResult:
    name: str
    # one per finished trial (LESCI: per point of every finished trial's surface): trial_id,
    # run_id, params, metrics, pareto_optimal
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    hypervolume: float
    failed: int
    experiment_id: str
    parent_run_id: str


def report_front(spec: SweepSpec, name: str, grid, client: MlflowClient, experiment_id: str,
                 parent_run_id: str, sweep_storage: Storage, log=print) -> SweepResult:
    """The end of a sweep: every finished trial (LESCI: every point of its surface) to the
    parent run's ``pareto_front.csv``/``.png``, its hypervolume and the bare model's figures;
    each child tagged ``pareto_optimal``; failed trials counted (an error, or a required
    metric missing or NaN)."""
    log(f"sweep {name!r}: every trial ended; logging the Pareto front to MLflow")
    runs = {run.data.tags.get("ray_trial_id"): run for run in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10_000)}
    lesci = spec.family is Family.LESCI
    required = ["hypervolume"] if lesci else spec.metric_names
    rows, failed, trial_runs = [], 0, {}
    searched = spec.searched_names()
    parent_metrics: dict[str, float] = {}
    budget: dict[str, Any] = {}
    failures: list[str] = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(str(result.path)).name
        reason = _failure(result.error, metrics, required)
        if reason is not None:
            failed += 1
            failures.append(f"{trial_id}: {reason}")
            continue
        run = runs.get(trial_id)
        run_id = run.info.run_id if run else ""
        trial_runs[trial_id] = run_id
        used = resolve(spec, result.config).logged()
        base = {"trial_id": trial_id, "run_id": run_id, **{k: used.get(k) for k in searched}}
        if not lesci:
            rows.append({**base, **{m: float(metrics[m]) for m in spec.metric_names}})
            continue
        stored = sweep_storage.get_verified(f"results/{trial_id}.json")
        if stored is None:
            failed += 1
            failures.append(f"{trial_id}: its stored surface is missing or corrupt")
            continue
        trial = json.loads(stored[0])
        budget = trial.get("budget") or budget
        for key in BASE_METRICS:
            if key in trial["report"]:
                parent_metrics[key] = trial["report"][key]
        if run_id:
            log_surface(client, run_id, trial["surface"], surface_columns(spec),
                        f"{name}: {run.info.run_name}")
        rows.extend({**base, **point} for point in trial["surface"])
    rows.sort(key=lambda r: (r["trial_id"], r.get("k", 0), r.get("min_votes", 0)))
    mask, volume = front_of(rows, spec.optimize)
    for row, on in zip(rows, mask):
        row["pareto_optimal"] = bool(on)
    for trial_id, run_id in trial_runs.items():
        if run_id:
            on = any(r["pareto_optimal"] for r in rows if r["trial_id"] == trial_id)
            client.set_tag(run_id, "pareto_optimal", "true" if on else "false")
    front = [row for row in rows if row["pareto_optimal"]]
    with tempfile.TemporaryDirectory() as folder:
        csv_path = Path(folder) / "pareto_front.csv"
        columns = ["trial_id", "run_id", *searched,
                   *(surface_columns(spec) if lesci else spec.metric_names), "pareto_optimal"]
        write_csv(rows, list(dict.fromkeys(columns)), csv_path)
        png_path = Path(folder) / "pareto_front.png"
        unit = "surface points" if lesci else "trials"
        plot_front(rows, mask, spec.optimize, png_path,
                   f"{name}: {len(front)} of {len(rows)} {unit} on the front")
        client.log_artifact(parent_run_id, str(csv_path))
        client.log_artifact(parent_run_id, str(png_path))
    client.log_metric(parent_run_id, "hypervolume", volume)
    client.log_metric(parent_run_id, "finished_trials", len(trial_runs))
    client.log_metric(parent_run_id, "failed_trials", failed)
    if failures:  # why, on the parent run and in the console
        client.set_tag(parent_run_id, "failures", "\n".join(failures)[:5000])
        for line in failures:
            log(f"  failed: {line}")
    if lesci:
        client.log_metric(parent_run_id, "surface_points", len(rows))
    for key, value in parent_metrics.items():
        client.log_metric(parent_run_id, key, value)
    if not lesci and spec.attack is not None:  # which attacks ran, at what budget
        budget = {"eps": spec.attack.eps, **spec.attack.attack_suite().described(),
                  "robust_accuracy": "per-sample worst case of the suite, after the last epoch"}
    if budget:
        logged = client.get_run(parent_run_id).data.params
        for key, value in budget.items():
            if f"attack.{key}" not in logged:
                client.log_param(parent_run_id, f"attack.{key}", str(value)[:6000])
    client.set_terminated(parent_run_id, status="FINISHED")
    log(f"sweep {name!r}: {len(trial_runs)} finished, {failed} failed; Pareto front of "
        f"{len(front)} of {len(rows)} {'surface points' if lesci else 'trials'}, hypervolume "
        f"{volume:.4f}")
    return SweepResult(name, rows, front, volume, failed, experiment_id, parent_run_id)


def _failure(error: BaseException | None, metrics: dict[str, Any],
             required: list[str]) -> str | None:
    """Why a trial counts as failed, or None: it raised, or a metric it must report (the
    searcher's: a LESCI trial's hypervolume, a training trial's optimized metrics) is missing
    or NaN. Any other undefined metric (accuracy_projected when nothing is projected) is not
    a failure."""
    if error is not None:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"raised {type(error).__name__}: {lines[-1] if lines else ''}"[:300]
    for metric in required:
        value = metrics.get(metric)
        if not isinstance(value, (int, float)):
            return f"did not report {metric}"
        if math.isnan(value):
            return f"reported {metric} = NaN"
    return None


def surface_columns(spec: SweepSpec) -> list[str]:
    metrics = [m for m in FAMILY_METRICS[Family.LESCI]
               if spec.attack is not None or "robust" not in m]
    return [*SURFACE_COLUMNS, *metrics]
