"""fANOVA importances of a sweep's searched parameters (orchestrator.importance)."""

import numpy as np

from orchestrator.importance import importances, plot_importances


def _rows(n=12):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 1), rng.uniform(0, 1), str(rng.choice(["x", "y"]))
        rows.append({"a": a, "b": b, "c": c, "fixed": 1,
                     "m1": a + 0.01 * b, "m2": 1.0 - ((c == "x") + 0.01 * a)})
    return rows


def test_each_metric_is_explained_by_the_parameter_it_depends_on(tmp_path):
    table = importances(_rows(), ["a", "b", "c", "fixed", "absent"],
                        {"m1": "max", "m2": "min"})
    assert set(table) == {"m1", "m2"}
    assert set(table["m1"]) == {"a", "b", "c"}  # one value everywhere, or not drawn: left out
    assert table["m1"]["a"] > 0.9 and table["m2"]["c"] > 0.9
    assert abs(sum(table["m1"].values()) - 1) < 1e-6
    plot_importances(table, tmp_path / "i.png", "t")
    assert (tmp_path / "i.png").stat().st_size > 1000


def test_too_few_trials_or_nothing_varied_gives_nothing():
    assert importances(_rows(3), ["a", "b"], {"m1": "max"}) == {}
    assert importances(_rows(), ["fixed"], {"m1": "max"}) == {}


def test_a_metric_with_one_value_in_every_trial_is_left_out():
    rows = [{**row, "m3": 1.0} for row in _rows()]  # e.g. every trial's PGD accuracy 1.0
    table = importances(rows, ["a", "b", "c"], {"m1": "max", "m3": "max"})
    assert list(table) == ["m1"] and table["m1"]["a"] > 0.9
    assert importances(rows, ["a", "b", "c"], {"m3": "max"}) == {}
