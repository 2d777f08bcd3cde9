"""Pareto reporting of a sweep to MLflow: the front's CSV and plot, each LESCI trial's surface,
and the end-of-sweep report (``report_front``).

The math is in ``orchestrator.pareto``; this module writes what a person reads in the UI.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from mlflow.tracking import MlflowClient

from orchestrator.params import resolve
from orchestrator.pareto import BASE_METRICS, front_of
from orchestrator.space import SweepSpec
from orchestrator.storage import Storage

__all__ = ["write_csv", "plot_front", "plot_surface", "log_surface", "report_front",
           "surface_columns", "metric_columns", "reported_metrics", "selection_gaps",
           "SweepResult", "SURFACE_COLUMNS", "TEST_PREFIX"]

# the final evaluation's figures: test_<metric>
TEST_PREFIX = "test_"
# surface.csv: the trial's point, the (k, m) point, then the metrics
# (votes: k at each depth; credibility: Deep k-NN's p-value of min_votes, from the calibration
# split, NaN without one)
SURFACE_COLUMNS = ("depth", "n_components", "embedding_size", "center", "k", "min_votes",
                   "votes", "threshold", "credibility")


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


def _error(rows: list[dict[str, Any]], metric: str, prefix: str = "") -> list[list[float]] | None:
    """matplotlib's [lower, upper] error lengths of a metric, from its interval (None if the
    rows have none)."""
    lows = [row.get(f"{prefix}{metric}_ci_low") for row in rows]
    if not rows or any(v is None or v != v for v in lows):
        return None
    values = [row[f"{prefix}{metric}"] for row in rows]
    highs = [row[f"{prefix}{metric}_ci_high"] for row in rows]
    return [[max(0.0, v - lo) for v, lo in zip(values, lows)],
            [max(0.0, hi - v) for v, hi in zip(values, highs)]]


def plot_front(rows: list[dict[str, Any]], on_front: Sequence[bool], optimize: dict[str, str],
               path: Path, title: str) -> None:
    """The first two optimized metrics against each other, the third as colour, the front
    circled with its 95% intervals as error bars; where the front was evaluated on the test
    split, each front point's test figure (a triangle, with its interval) joined to its
    validation figure."""
    plt = _pyplot()
    metrics = list(optimize)
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    if rows:
        one = len(metrics) == 1
        x = [row[metrics[0]] for row in rows]
        y = [i if one else row[metrics[1]] for i, row in enumerate(rows)]
        colour = [row[metrics[2]] for row in rows] if len(metrics) > 2 else None
        shade = {"c": colour, "cmap": "viridis"} if colour else {"color": "lightgray"}
        points = ax.scatter(x, y, s=30, edgecolors="gray", label="all points (val)", **shade)
        if colour:
            fig.colorbar(points, ax=ax, label=f"{metrics[2]} (val)")
        front = [row for row, on in zip(rows, on_front) if on]
        if front:
            fx = [row[metrics[0]] for row in front]
            fy = [i if one else row[metrics[1]] for i, row in enumerate(front)]
            ax.errorbar(fx, fy, xerr=_error(front, metrics[0]),
                        yerr=None if one else _error(front, metrics[1]), fmt="o", ms=10,
                        mfc="none", mec="red", mew=2, ecolor="red", elinewidth=1, capsize=2,
                        label="Pareto front (val, 95% CI)")
            tested = [row for row in front if TEST_PREFIX + metrics[0] in row]
            if tested:
                tx = [row[TEST_PREFIX + metrics[0]] for row in tested]
                ty = [i if one else row[TEST_PREFIX + metrics[1]]
                      for i, row in enumerate(tested)]
                ax.errorbar(tx, ty, xerr=_error(tested, metrics[0], TEST_PREFIX),
                            yerr=None if one else _error(tested, metrics[1], TEST_PREFIX),
                            fmt="^", ms=8, color="black", ecolor="black", elinewidth=1,
                            capsize=2, label="the front on test (95% CI)")
                for row, a, b in zip(tested, tx, ty):
                    ax.plot([row[metrics[0]], a],
                            [b if one else row[metrics[1]], b], color="black", alpha=0.3,
                            linewidth=0.8)
    ax.set_xlabel(f"{metrics[0]} ({optimize[metrics[0]]})")
    ax.set_ylabel(f"{metrics[1]} ({optimize[metrics[1]]})" if len(metrics) > 1 else "trial")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
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
    # run_id, params, metrics with their intervals, pareto_optimal; front rows also test_*
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    hypervolume: float
    failed: int
    experiment_id: str
    parent_run_id: str
    tested: bool = False  # the front was evaluated on the test split
    test_hypervolume: float = math.nan
    selection_gap: dict[str, tuple[float, float]] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)  # LESCI: the bare model, val and test
    # a grid of objectives compared: each objective's own front among its trials (val), its
    # rows read on test too; empty otherwise
    objective_fronts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # early stopping: trials stopped short of their full budget (not on the front), and the
    # budget all trials used over what they would have used at full budget
    stopped: int = 0
    compute_fraction: float = math.nan
    # LESCI's attack race: the surface points it stopped (not on the front)
    raced_points: int = 0


def objective_fronts(spec: SweepSpec, rows: list[dict[str, Any]]
                     ) -> dict[str, list[dict[str, Any]]]:
    """Under a grid of several objectives (a comparison: ``num_samples`` trials of each), each
    objective's own Pareto front on the validation split, its rows marked ``objective_front``;
    empty for any other space. The overall front can leave an objective out entirely; these
    fronts are what tells each objective's best from the others' on the test split."""
    space = spec.objective_space()
    if space is None or space.kind != "grid" or len(space.branches) < 2:
        return {}
    fronts: dict[str, list[dict[str, Any]]] = {}
    for name in space.names:
        mine = [row for row in rows if row.get("objective") == name]
        mask, _ = front_of(mine, spec.optimize)
        for row, on in zip(mine, mask):
            row["objective_front"] = bool(on)
        fronts[name] = [row for row, on in zip(mine, mask) if on]
    return fronts


def selection_gaps(front: list[dict[str, Any]], metrics: Sequence[str]
                   ) -> dict[str, tuple[float, float]]:
    """Per metric: (mean, largest) of val minus test over the front's points."""
    gaps: dict[str, tuple[float, float]] = {}
    for metric in metrics:
        diffs = [row[metric] - row[TEST_PREFIX + metric] for row in front
                 if TEST_PREFIX + metric in row
                 and not math.isnan(row[metric]) and not math.isnan(row[TEST_PREFIX + metric])]
        if diffs:
            gaps[metric] = (float(np.mean(diffs)), float(max(diffs)))
    return gaps


def log_front_artifacts(client: MlflowClient, run_id: str, artifacts: dict[str, bytes],
                        log: Callable[[str], None] = print) -> None:
    """A front trial's final models, each saved with MLflow's PyTorch flavour as the artifact
    folder of its name (``mlflow.pytorch.load_model("runs:/<run>/model")``; ``model_seed1``,
    ... for further seeds; pickled, so loading needs this project, and a user model's factory
    package, installed), and its files (``verification.npz``). Once: a resumed sweep finds
    the tag ``model_logged``. A model that cannot be saved costs one console line, never the
    report; nothing global (tracking URI, active run) is touched."""
    if not artifacts or client.get_run(run_id).data.tags.get("model_logged") == "true":
        return
    import io
    import logging

    import torch

    quiet = logging.getLogger("mlflow")
    level = quiet.level
    with tempfile.TemporaryDirectory() as folder:
        for name, data in artifacts.items():
            path = Path(folder) / name
            try:
                if "." in name:  # a file
                    path.write_bytes(data)
                    client.log_artifact(run_id, str(path))
                    continue
                import mlflow.pytorch

                quiet.setLevel(logging.ERROR)  # pickling's and the missing signature's warnings
                model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
                mlflow.pytorch.save_model(
                    model, str(path), serialization_format="pickle",
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
                client.log_artifacts(run_id, str(path), artifact_path=name)
            except Exception as exc:  # noqa: BLE001  (the front is reported regardless)
                log(f"  run {run_id}: {name} not logged ({type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})")
            finally:
                quiet.setLevel(level)
    client.set_tag(run_id, "model_logged", "true")


def _log_metrics(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, key, float(value))


def report_front(spec: SweepSpec, name: str, grid, client: MlflowClient, experiment_id: str,
                 parent_run_id: str, sweep_storage: Storage, log=print,
                 evaluate_test: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
                 ) -> SweepResult:
    """The end of a sweep.

    Every trial that ran its full budget (LESCI: every point of its surface) goes to the
    parent run's ``pareto_front.csv``/``.png``, with its hypervolume and the bare model's
    figures; each child is tagged ``pareto_optimal``; failed trials are counted (an error, or
    a required metric missing or NaN); trials an early-stopping scheduler stopped are counted
    (``stopped_trials``, ``compute_fraction``) and never on the front. With
    ``evaluate_test`` (``orchestrator.holdout.evaluate_front``), the front, chosen on the
    validation split, is evaluated once on the test split: its
    points get ``test_*`` figures (the CSV, the plot, the front trials' child runs), the
    parent run ``test_hypervolume`` and each optimized metric's selection gap (val minus
    test over the front: ``selection_gap_<metric>_mean`` and ``_max``). Under a grid of
    objectives, each objective's own front (``objective_fronts``) is read on test as well.
    """
    log(f"sweep {name!r}: every trial ended; its Pareto front on the validation split")
    runs = {run.data.tags.get("ray_trial_id"): run for run in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10_000)}
    family = spec.defense
    surface = family.surface  # a trial's rows are its surface's points, else the trial
    required = family.required_metrics(spec)
    rows, failed, trial_runs = [], 0, {}
    searched = spec.searched_names()
    parent_metrics: dict[str, float] = {}
    budget: dict[str, Any] = {}
    failures: list[str] = []
    stops = spec.scheduler.name != "none" and family.budget_unit is not None
    stopped, used_budget, full_budget, raced = 0, [], [], 0
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
        if stops:
            used_budget.append(family.budget_used(spec, metrics))
            full_budget.append(family.trial_full_budget(spec, metrics))
            raced += int(metrics.get("raced_points", 0))  # LESCI's attack race
        if stops and not family.full_budget_reached(spec, metrics):
            stopped += 1  # stopped early: its figures are a shorter run's, never the front's
            if run_id:
                client.set_tag(run_id, "pareto_optimal", "false")
                stored = (sweep_storage.get_verified(f"results/{trial_id}.json") if surface
                          else None)
                if stored is not None:  # its surface, each point on what it was attacked on
                    log_surface(client, run_id, json.loads(stored[0])["surface"],
                                surface_columns(spec), f"{name}: {run.info.run_name}")
            continue
        trial_runs[trial_id] = run_id
        used = resolve(spec, result.config).logged()
        base = {"trial_id": trial_id, "run_id": run_id, "config": result.config,
                "trial_dir": Path(str(result.path)).name, **{k: used.get(k) for k in searched}}
        if not surface:
            rows.append({**base, **{m: float(metrics[m]) for m in metric_columns(spec)
                                    if isinstance(metrics.get(m), (int, float))}})
            continue
        stored = sweep_storage.get_verified(f"results/{trial_id}.json")
        if stored is None:
            failed += 1
            failures.append(f"{trial_id}: its stored surface is missing or corrupt")
            continue
        trial = json.loads(stored[0])
        budget = trial.get("budget") or budget
        for key, value in trial["report"].items():
            if key.startswith(BASE_METRICS):
                parent_metrics[key] = value
        if run_id:
            log_surface(client, run_id, trial["surface"], surface_columns(spec),
                        f"{name}: {run.info.run_name}")
        # a point the attack race stopped (LESCI under mo_asha) keeps its figures on the
        # trial's own surface; it is never on the front
        rows.extend({**base, **point} for point in trial["surface"] if not point.get("raced_out"))
    rows.sort(key=lambda r: (r["trial_id"], *(r[k] for k in family.point_keys)))
    mask, volume = front_of(rows, spec.optimize)
    for row, on in zip(rows, mask):
        row["pareto_optimal"] = bool(on)
    front = [row for row in rows if row["pareto_optimal"]]
    outcome = SweepResult(name, rows, front, volume, failed, experiment_id, parent_run_id,
                          base={k: v for k, v in parent_metrics.items()},
                          objective_fronts=objective_fronts(spec, rows))
    # the rows read on test: the front, and each compared objective's own front
    chosen = [row for row in rows if row["pareto_optimal"] or row.get("objective_front")]
    front_artifacts: dict[str, dict[str, bytes]] = {}
    if evaluate_test is not None and chosen:
        test = evaluate_test(chosen)
        front_artifacts = test.get("artifacts") or {}
        for row in chosen:
            found = test["rows"].get(family.row_key(row), {})
            for key in [*metric_columns(spec), *family.test_metrics(spec)]:
                if key in found:
                    row[TEST_PREFIX + key] = found[key]
        outcome.tested = True
        _, outcome.test_hypervolume = front_of(
            [{m: row[TEST_PREFIX + m] for m in spec.optimize} for row in front], spec.optimize)
        outcome.selection_gap = selection_gaps(front, spec.optimize)
        parent_metrics.update({TEST_PREFIX + k: v for k, v in test.get("base", {}).items()})
        outcome.base = dict(parent_metrics)
        if test.get("budget"):
            budget = {**budget, "test_samples": test["budget"].get("samples")}
    for trial_id, run_id in trial_runs.items():
        if not run_id:
            continue
        mine = [row for row in front if row["trial_id"] == trial_id]
        client.set_tag(run_id, "pareto_optimal", "true" if mine else "false")
        tested = [row for row in chosen if row["trial_id"] == trial_id
                  and any(k.startswith(TEST_PREFIX) for k in row)]
        if tested:  # with a surface: the trial's best front point, by its operating-point rule
            row = max(tested, key=lambda r: (sum(r[m] if d == "max" else 1 - r[m]
                                                 for m, d in spec.optimize.items()),
                                             *(-r[k] for k in family.point_keys)))
            values = {k: v for k, v in row.items() if k.startswith(TEST_PREFIX)}
            values.update({f"test_point_{key}": row[key] for key in family.point_keys})
            _log_metrics(client, run_id, values)
            log_front_artifacts(client, run_id, front_artifacts.get(trial_id, {}), log)
    with tempfile.TemporaryDirectory() as folder:
        csv_path = Path(folder) / "pareto_front.csv"
        tested_columns = ([f"{TEST_PREFIX}{c}" for c in (*metric_columns(spec),
                                                         *family.test_metrics(spec))]
                          if outcome.tested else [])
        columns = ["trial_id", "run_id", *searched,
                   *(surface_columns(spec) if surface else metric_columns(spec)),
                   *tested_columns, "pareto_optimal",
                   *(["objective_front"] if outcome.objective_fronts else [])]
        write_csv(rows, list(dict.fromkeys(columns)), csv_path)
        png_path = Path(folder) / "pareto_front.png"
        plot_front(rows, mask, spec.optimize, png_path,
                   f"{name}: {len(front)} of {len(rows)} {family.unit} on the front"
                   + (" (val; test: triangles)" if outcome.tested else ""))
        client.log_artifact(parent_run_id, str(csv_path))
        client.log_artifact(parent_run_id, str(png_path))
        if not surface:
            _log_importances(spec, name, rows, searched, client, parent_run_id, Path(folder),
                             log)
    client.log_metric(parent_run_id, "hypervolume", volume)
    client.log_metric(parent_run_id, "finished_trials", len(trial_runs))
    client.log_metric(parent_run_id, "failed_trials", failed)
    if stops:  # the budget the trials used, of what they would have used at full budget
        outcome.stopped = stopped
        outcome.compute_fraction = (sum(used_budget) / sum(full_budget)
                                    if sum(full_budget) > 0 else math.nan)
        client.log_metric(parent_run_id, "stopped_trials", stopped)
        client.log_metric(parent_run_id, "compute_fraction", outcome.compute_fraction)
        if family.stops_in_trial:
            outcome.raced_points = raced
            client.log_metric(parent_run_id, "raced_points", raced)
    if outcome.tested:
        client.log_metric(parent_run_id, "test_hypervolume", outcome.test_hypervolume)
        for metric, (mean, largest) in outcome.selection_gap.items():
            client.log_metric(parent_run_id, f"selection_gap_{metric}_mean", mean)
            client.log_metric(parent_run_id, f"selection_gap_{metric}_max", largest)
    client.set_tag(parent_run_id, "test_split", "evaluated" if outcome.tested else "not read")
    if failures:  # why, on the parent run and in the console
        client.set_tag(parent_run_id, "failures", "\n".join(failures)[:5000])
        for line in failures:
            log(f"  failed: {line}")
    if surface:
        client.log_metric(parent_run_id, "surface_points", len(rows))
    _log_metrics(client, parent_run_id, parent_metrics)
    budget = family.attack_budget(spec) or budget  # which attacks ran, at what budget
    if budget:
        logged = client.get_run(parent_run_id).data.params
        for key, value in budget.items():
            if key in PER_TRIAL_BUDGET:  # a trial's own work (its child run's budget_used)
                continue
            if f"attack.{key}" not in logged and value is not None:
                client.log_param(parent_run_id, f"attack.{key}", str(value)[:6000])
    client.set_terminated(parent_run_id, status="FINISHED")
    if stops and family.stops_in_trial:
        log(f"sweep {name!r}: the attack race stopped {raced} surface point(s) "
            f"({stopped} trial(s) wholly); the attacks used {outcome.compute_fraction:.0%} of "
            "the full attack's (point, sample) pairs")
    elif stops:
        log(f"sweep {name!r}: {stopped} trial(s) stopped early by scheduler "
            f"{spec.scheduler.name}; the trials used {outcome.compute_fraction:.0%} of their "
            f"full budget")
    log(f"sweep {name!r}: {len(trial_runs)} finished, {failed} failed; Pareto front of "
        f"{len(front)} of {len(rows)} {family.unit}, hypervolume "
        f"{volume:.4f}" + (f" (val), {outcome.test_hypervolume:.4f} (test)"
                           if outcome.tested else " (val)"))
    return outcome


def _log_importances(spec: SweepSpec, name: str, rows: list[dict[str, Any]],
                     searched: list[str], client: MlflowClient, parent_run_id: str,
                     folder: Path, log) -> None:
    """Each searched parameter's fANOVA importance for each optimized metric over the
    full-budget trials (validation figures): ``importances.csv`` and ``.png`` on the parent
    run, a line per metric in the console."""
    from orchestrator.importance import MIN_TRIALS, importances, plot_importances

    try:
        table = importances(rows, searched, spec.optimize)
    except (RuntimeError, ValueError) as exc:  # an analysis beside the front: never its end
        log(f"sweep {name!r}: parameter importances not computed ({exc})")
        return
    if not table:
        if searched:
            log(f"sweep {name!r}: parameter importances need {MIN_TRIALS} full-budget trials, "
                "a parameter that varied and a metric that did; not computed")
        return
    params = list(next(iter(table.values())))
    path = folder / "importances.csv"
    write_csv([{"param": p, **{m: round(table[m][p], 4) for m in table}} for p in params],
              ["param", *table], path)
    client.log_artifact(parent_run_id, str(path))
    plot_importances(table, folder / "importances.png",
                     f"{name}: what each parameter explains ({len(rows)} trials, val)")
    client.log_artifact(parent_run_id, str(folder / "importances.png"))
    for metric, values in table.items():
        ranked = sorted(values.items(), key=lambda kv: -kv[1])
        log(f"  importance for {metric} (fANOVA, val): "
            + ", ".join(f"{p} {v:.2f}" for p, v in ranked))


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


# what one trial's attacks did (they differ from trial to trial under the attack race), not the
# sweep's attack settings: not logged as the parent's attack.* params
PER_TRIAL_BUDGET = ("point_samples", "full_point_samples", "apgd_run_samples", "race_rungs")


def surface_columns(spec: SweepSpec) -> list[str]:
    """surface.csv: the point, each metric with its interval, the gain over the bare model
    (with an attack) and the sample counts behind the intervals; under the attack race,
    whether the point was raced out (``raced_out``)."""
    raced = spec.scheduler.name != "none" and spec.defense.stops_in_trial
    return [*SURFACE_COLUMNS, *metric_columns(spec), *(["raced_out"] if raced else [])]


def reported_metrics(spec: SweepSpec) -> list[str]:
    """The figures a trial reports with intervals (``DefenseFamily.reported_metrics``)."""
    return spec.defense.reported_metrics(spec)


def metric_columns(spec: SweepSpec, prefix: str = "") -> list[str]:
    """Each reported figure, then its 95% interval (and, with ``search.repeats``, its spread
    across seeds), then the sample counts."""
    columns = []
    spread = spec.search.repeats > 1  # search.repeats: the spread across seeds too
    for name in reported_metrics(spec):
        columns += [f"{prefix}{name}", f"{prefix}{name}_ci_low", f"{prefix}{name}_ci_high"]
        columns += [f"{prefix}{name}_seed_std"] if spread else []
    counts = spec.defense.counts()
    return columns + [f"{prefix}{c}" for c in counts]
