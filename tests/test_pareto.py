"""Pareto front and hypervolume on hand-made points."""

import numpy as np
import pytest

from orchestrator.pareto import hypervolume, pareto_mask


def test_front_of_two_maximised_objectives():
    # (accuracy, projection_rate)
    points = np.array([[0.9, 0.1], [0.8, 0.5], [0.7, 0.5], [0.6, 0.9], [0.5, 0.2], [0.8, 0.5]])
    assert pareto_mask(points, [True, True]).tolist() == [True, True, False, True, False, True]


def test_mixed_directions_and_nan():
    points = np.array([[1.0, 0.5], [2.0, 1.0], [0.5, 6.0], [np.nan, 0.0]])
    # maximise the first, minimise the second
    assert pareto_mask(points, [True, False]).tolist() == [True, True, False, False]


def test_hypervolume_by_hand():
    points = np.array([[0.5, 0.5]])
    assert hypervolume(points, [True, True], [0.0, 0.0]) == pytest.approx(0.25)
    # union of [0,1]x[0,0.5] and [0,0.5]x[0,1]: 0.5 + 0.5 - 0.25
    points = np.array([[1.0, 0.5], [0.5, 1.0], [0.4, 0.4]])
    assert hypervolume(points, [True, True], [0.0, 0.0]) == pytest.approx(0.75)
    # three objectives: two boxes 1x1x2 and 2x1x1 overlap in 1x1x1
    points = np.array([[1.0, 1.0, 2.0], [2.0, 1.0, 1.0]])
    assert hypervolume(points, [True, True, True], [0, 0, 0]) == pytest.approx(3.0)
    # minimisation with a reference above the points; a point beyond the reference adds nothing
    points = np.array([[1.0, 1.0], [3.0, 0.0]])
    assert hypervolume(points, [False, False], [2.0, 2.0]) == pytest.approx(1.0)
