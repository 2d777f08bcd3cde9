"""Pareto front and hypervolume of a set of trials' objective values (pure functions)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["pareto_mask", "hypervolume", "front_of", "BASE_METRICS"]

# the bare model under the suite's PGD and APGD-CE, reported beside LESCI's figures
BASE_METRICS = ("base_accuracy", "base_robust_accuracy")


def _as_minimisation(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(maximize):
        raise ValueError(f"values must be [n, {len(maximize)}], got {values.shape}")
    return np.where(np.asarray(maximize, dtype=bool), -values, values)


def pareto_mask(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Which rows of ``values`` [n, m] no other row dominates (duplicates all stay on the front).

    Row a dominates row b when a is at least as good in every objective and better in one.
    Rows with a NaN are never on the front.
    """
    v = _as_minimisation(values, maximize)
    finite = ~np.isnan(v).any(axis=1)
    mask = finite.copy()
    for i in np.flatnonzero(finite):
        others = v[finite]
        dominated = np.all(others <= v[i], axis=1) & np.any(others < v[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def hypervolume(values: np.ndarray, maximize: Sequence[bool], reference: Sequence[float]) -> float:
    """Volume dominated by ``values`` [n, m] and bounded by ``reference`` (the worst corner).

    Exact, by slicing along the last objective (fine for the tens to hundreds of trials of a
    sweep and 2-3 objectives). Points not strictly better than the reference add nothing.
    """
    v = _as_minimisation(values, maximize)
    ref = _as_minimisation(np.asarray(reference, dtype=np.float64)[None], maximize)[0]
    v = v[~np.isnan(v).any(axis=1)]
    v = v[np.all(v < ref, axis=1)]
    return float(_hv(v[pareto_mask(v, [False] * v.shape[1])], ref)) if len(v) else 0.0


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    order = np.argsort(points[:, -1])
    points = points[order]
    volume = 0.0
    for i in range(len(points)):
        upper = points[i + 1, -1] if i + 1 < len(points) else ref[-1]
        if upper > points[i, -1]:
            front = points[: i + 1, :-1]
            volume += _hv(front[pareto_mask(front, [False] * front.shape[1])], ref[:-1]) * (
                upper - points[i, -1])
    return volume


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
