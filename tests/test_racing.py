"""Racing LESCI's attacks (``scheduler: mo_asha`` on a LESCI space): the bounds a point's
final robust accuracy is bracketed by mid-race, the rule that stops a point, and the trials'
shared record of their races."""

import json

import numpy as np
import pytest

from defenses.racing import RaceCounts, dominated, robust_bounds, rungs_of
from defenses.surface import SurfacePoint
from orchestrator.racing import SurfaceRace
from orchestrator.storage import Storage


def test_rungs_are_geometric_and_end_at_every_sample():
    assert rungs_of(180, 30, 2) == [30, 60, 120, 180]
    assert rungs_of(100, 50, 2) == [50, 100]
    assert rungs_of(100, 10, 3) == [10, 30, 90, 100]
    with pytest.raises(ValueError):
        rungs_of(100, 10, 1)


def test_the_bounds_are_the_figure_once_every_sample_is_attacked():
    assert robust_bounds(37, 100, 60, 60, 100, 0.99) == (0.37, 0.37)


def test_the_bounds_hold_what_is_certain():
    # 20 of 40 attacked samples survive; 30 of those 40 and 50 of all 100 were standing
    low, high = robust_bounds(20, 40, 30, 50, 100, 0.99)
    assert 0.20 <= low <= high <= (20 + 50 - 30) / 100
    # nothing standing was attacked yet: only the certain bracket
    assert robust_bounds(0, 10, 0, 40, 100, 0.99) == (0.0, 0.40)


def test_the_bounds_cover_the_final_figure_at_their_confidence():
    """A point's final figure on all N samples falls inside the mid-race bounds at least as
    often as their confidence says, over random orders of the samples."""
    rng = np.random.default_rng(0)
    total, confidence, misses, draws = 400, 0.9, 0, 400
    standing = rng.random(total) < 0.7
    robust = standing & (rng.random(total) < 0.55)
    final = robust.sum() / total
    for _ in range(draws):
        order = rng.permutation(total)
        for rung in (25, 50, 100, 200):
            seen = order[:rung]
            low, high = robust_bounds(int(robust[seen].sum()), rung, int(standing[seen].sum()),
                                      int(standing.sum()), total, confidence)
            misses += not low <= final <= high
    assert misses / (4 * draws) <= 1 - confidence


def test_a_point_stops_only_when_another_is_surely_better_everywhere():
    maximize = [True, True]
    # rows: (accuracy exact, robust bracket)
    low = np.array([[0.9, 0.50], [0.8, 0.30], [0.9, 0.45], [0.95, 0.20]])
    high = np.array([[0.9, 0.60], [0.8, 0.49], [0.9, 0.55], [0.95, 0.40]])
    by = dominated(low, high, maximize)
    assert by[1] == 0  # below in accuracy, and its best robust case under 0's worst
    assert by[2] == -1  # the brackets of 0 and 2 overlap: no decision
    assert by[0] == -1 and by[3] == -1  # 3 has the best accuracy
    # equal in everything: neither dominates the other
    same = np.array([[0.9, 0.5], [0.9, 0.5]])
    assert list(dominated(same, same, maximize)) == [-1, -1]
    # a minimised metric: lower is better
    low = np.array([[0.2, 0.5], [0.3, 0.4]])
    assert list(dominated(low, low, [True, True])) == [-1, -1]
    assert list(dominated(low, low, [False, True])) == [-1, 0]
    assert list(dominated(low, low, [True, False])) == [1, -1]
    # an unknown figure (NaN) decides nothing
    unknown = np.array([[np.nan, 0.5], [0.3, 0.4]])
    assert list(dominated(unknown, unknown, [False, True])) == [-1, -1]


def _counts(points, total, rung, robust, standing_attacked, standing):
    n = len(points)
    return RaceCounts(points, total, rung, np.full(n, rung), np.array(robust),
                      np.array(standing_attacked), np.array(standing), np.ones(n, bool))


def test_trials_race_against_each_other_and_decisions_stand_on_rerun(tmp_path):
    storage = Storage(str(tmp_path))
    optimize = {"accuracy": "max", "robust_accuracy": "max"}
    points = [SurfacePoint(3, 1), SurfacePoint(3, 2)]
    lines = []

    def race(trial, depth, key, accuracy):
        return SurfaceRace(storage, trial, depth, key, points, optimize,
                           {"accuracy": accuracy}, grace=50, reduction=2, log=lines.append)

    strong = race("t1", "layer2", "a", [0.95, 0.90])
    assert strong(_counts(points, 200, 50, [40, 35], [45, 45], [180, 180])) == {}
    weak = race("t2", "layer1", "b", [0.97, 0.80])
    # layer1's point (3, 2): lower accuracy and at most ~0.3 robust; layer2's (3, 1) at least
    # ~0.5: stopped. Its (3, 1) has the best accuracy of all: it races on
    stops = weak(_counts(points, 200, 50, [10, 5], [40, 40], [150, 150]))
    assert list(stops) == [1] and "layer2 k 3 m 1 of trial t1" in stops[1]
    assert any("layer1 k 3 m 2 stopped after 50 of 200 attack samples" in line
               for line in lines)
    record = json.loads(storage.read_bytes("race/t2.json"))
    assert record["stopped"] == [[[3, 2], 50]]
    assert record["counts"]["attacked"] == [50, 50]
    # the trial run again (a resumed driver) keeps its decision, whatever the others did,
    # and keeps it in its record until it takes it again (a second kill loses nothing)
    storage.write_bytes("race/t1.json", b"{}")
    again = race("t2", "layer1", "b", [0.97, 0.80])
    again._publish(_counts(points, 200, 25, [5, 3], [20, 20], [150, 150]), done=False)
    assert json.loads(storage.read_bytes("race/t2.json"))["stopped"] == [[[3, 2], 50]]
    again = race("t2", "layer1", "b", [0.97, 0.80])
    assert list(again(_counts(points, 200, 50, [10, 5], [40, 40], [150, 150]))) == [1]
    assert json.loads(storage.read_bytes("race/t2.json"))["stopped"] == [[[3, 2], 50]]
    # a record of the same configuration (the sweep restarted under new trial ids) is not a
    # rival: it measures the same points
    twin = race("t3", "layer1", "b", [0.97, 0.80])
    assert twin(_counts(points, 200, 50, [10, 5], [40, 40], [150, 150])) == {}


def test_the_bonferroni_bound_widens_with_the_points_the_sweep_compares(tmp_path):
    """Close brackets that one comparison would separate stay undecided when the sweep can
    compare many points (fixed from the space, whatever has been published yet)."""
    optimize = {"accuracy": "max", "robust_accuracy": "max"}
    two = [SurfacePoint(3, 1), SurfacePoint(3, 2)]
    counts = _counts(two, 2000, 400, [260, 200], [400, 400], [2000, 2000])

    def race(folder, compared):
        return SurfaceRace(Storage(str(tmp_path / folder)), "a", "layer1", "a", two, optimize,
                           {"accuracy": [0.9, 0.9]}, 400, 2, log=lambda _: None,
                           points_compared=compared)

    assert 1 in race("one", None)(counts)
    assert 1 not in race("many", 10_000)(counts)
