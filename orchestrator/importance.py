"""What the search learned: each searched parameter's importance for each optimized metric,
by fANOVA (Hutter, Hoos and Leyton-Brown 2014) through Optuna's evaluator, over the
full-budget trials' validation figures.

The trials' values are put in an in-memory Optuna study whatever the search algorithm was
(grid and random search keep none), with each parameter's distribution read from the values
the trials drew: numbers as a float range, anything else as a category. A parameter that took
one value in every trial explains nothing and is left out.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna

__all__ = ["importances", "plot_importances", "MIN_TRIALS"]

# fewer trials than this leave a random forest nothing to split on
MIN_TRIALS = 4


def _distributions(rows: Sequence[dict[str, Any]], names: Sequence[str]
                   ) -> dict[str, optuna.distributions.BaseDistribution]:
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if any(v is None for v in values) or len({repr(v) for v in values}) < 2:
            continue  # conditional (another objective's own) or never varied
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[name] = optuna.distributions.FloatDistribution(float(min(values)),
                                                               float(max(values)))
        else:
            out[name] = optuna.distributions.CategoricalDistribution(
                sorted({str(v) for v in values}))
    return out


def importances(rows: Sequence[dict[str, Any]], params: Sequence[str],
                optimize: dict[str, str], seed: int = 0) -> dict[str, dict[str, float]]:
    """{metric: {param: importance (summing to 1 per metric)}} over ``rows`` (one per
    trial: its searched values by name and its figures); {} with fewer than ``MIN_TRIALS``
    rows or no parameter that varied; a metric with one value in every trial is left out."""
    rows = [row for row in rows if all(isinstance(row.get(m), (int, float))
                                       and not math.isnan(row[m]) for m in optimize)]
    distributions = _distributions(rows, params)
    if len(rows) < MIN_TRIALS or not distributions:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study made
    study = optuna.create_study(directions=["maximize" if d == "max" else "minimize"
                                            for d in optimize.values()])
    for row in rows:
        values = {name: (float(row[name]) if isinstance(dist, optuna.distributions.
                                                        FloatDistribution) else str(row[name]))
                  for name, dist in distributions.items()}
        study.add_trial(optuna.trial.create_trial(
            params=values, distributions=distributions,
            values=[float(row[m]) for m in optimize]))
    out = {}
    for index, metric in enumerate(optimize):
        if len({float(row[metric]) for row in rows}) < 2:
            continue  # one value in every trial: no variance for any parameter to explain
        with warnings.catch_warnings():  # the experimental-feature notices
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
                target=lambda trial, i=index: trial.values[i])
        out[metric] = {name: float(found.get(name, 0.0)) for name in distributions}
    return out


def plot_importances(table: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """One group of horizontal bars per parameter, a bar per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(table)
    params = sorted(table[metrics[0]], key=lambda p: -max(table[m][p] for m in metrics))
    height = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(params) * len(metrics)))
    for i, metric in enumerate(metrics):
        ax.barh([p + i * height for p in range(len(params))],
                [table[metric][name] for name in params], height=height, label=metric)
    ax.set_yticks([p + height * (len(metrics) - 1) / 2 for p in range(len(params))],
                  params)
    ax.invert_yaxis()
    ax.set_xlabel("importance (fANOVA, share of the variance explained)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
