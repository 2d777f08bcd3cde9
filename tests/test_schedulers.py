"""MO-ASHA (orchestrator.schedulers): ranks on hand-made rungs, order independence, ties,
minimised metrics, the decisions (stopping and promotion), and their records surviving a new
scheduler instance; the searcher's slots under promotion."""

import pickle

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.tune.schedulers import TrialScheduler

from orchestrator.resumable import ResumableVariants
from orchestrator.schedulers import (RESTING, STATE_FILE, MultiObjectiveASHA, rank_of, ranking,
                                     rung_levels)
from orchestrator.searchers import FinalMetricOptunaSearch

CONTINUE, STOP, PAUSE = TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.PAUSE
MAX2 = [True, True]


def test_rungs_are_geometric_below_the_full_budget():
    assert rung_levels(8, 1, 2) == [1, 2, 4]
    assert rung_levels(40, 1, 3) == [1, 3, 9, 27]
    assert rung_levels(9, 3, 3) == [3]


def test_ranking_by_fronts_then_farthest_point():
    # front 1: the three corners-and-middle points; front 2: (0.4, 0.4); front 3: (0.2, 0.2).
    # Inside front 1 every normalised sum ties (1.0): the smallest values first, (0.9, 0.1)
    # (normalised minimisation (0, 1)), then the point farthest from it, (0.1, 0.9), then
    # the middle one.
    values = np.array([[0.5, 0.5], [0.2, 0.2], [0.1, 0.9], [0.4, 0.4], [0.9, 0.1]])
    assert ranking(values, MAX2) == [4, 2, 0, 3, 1]
    assert [rank_of(values, MAX2, i) for i in range(5)] == [2, 4, 1, 3, 0]


def test_minimised_metrics_rank_as_their_negation_maximised():
    values = np.array([[0.3, 0.2], [0.1, 0.5], [0.2, 0.2], [0.6, 0.9]])
    flipped = values * np.array([-1, 1])
    assert ranking(values, [False, True]) == ranking(flipped, MAX2)
    # (0.1, 0.5) is best in both under (min, max): alone on front 1
    assert rank_of(values, [False, True], 1) == 0


def test_equal_results_share_the_better_rank():
    values = np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.3, 0.3]])
    ranks = [rank_of(values, MAX2, i) for i in range(4)]
    assert ranks[0] == ranks[1]
    assert ranks[3] == 3


points = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
                  min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(points, st.randoms(use_true_random=False))
def test_permuting_the_history_never_changes_a_rank(rows, rnd):
    values = np.array(rows)
    order = list(range(len(rows)))
    rnd.shuffle(order)
    shuffled = values[order]
    for i in range(len(rows)):
        assert rank_of(values, [True, False, True], i) == rank_of(
            shuffled, [True, False, True], order.index(i))


@settings(max_examples=60, deadline=None)
@given(points)
def test_a_result_dominating_every_earlier_one_ranks_first(rows):
    values = np.array(rows + [(1.5, -0.5, 1.5)])  # better than all in each (max, min, max)
    assert rank_of(values, [True, False, True], len(rows)) == 0


def _result(epoch, a, b, steps=None):
    out = {"epoch": float(epoch), "nominal_accuracy": a, "verified_accuracy": b}
    if steps is not None:
        out["optimizer_steps"] = float(steps)
    return out


def _scheduler(tmp_path=None, **kw):
    options = {"max_t": 8, "grace_period": 1, "reduction_factor": 2, "type": "stopping", **kw}
    return MultiObjectiveASHA(["nominal_accuracy", "verified_accuracy"], ["max", "max"],
                              state_uri=str(tmp_path) if tmp_path else None, sweep="t",
                              **options)


def test_decisions_on_a_hand_made_rung(capsys):
    s = _scheduler()
    assert s.decide("a", _result(1, 0.5, 0.5)) == CONTINUE  # alone: rank 0 < 1/2
    assert s.decide("b", _result(1, 0.4, 0.4)) == STOP  # dominated: rank 1, not < 2/2
    assert "trial b stopped at epoch 1: behind 1 of 2 results at that rung" in (
        capsys.readouterr().out)
    assert s.decide("c", _result(1, 0.9, 0.9)) == CONTINUE  # dominates both: rank 0
    assert s.decide("d", _result(1, 0.95, 0.1)) == CONTINUE  # front 1 of 4: rank 1 < 2
    # b once stopped stays stopped, whatever it reports
    assert s.decide("b", _result(2, 1.0, 1.0)) == STOP
    # a at epoch 2 is ranked at rung 2 only, where it is alone
    assert s.decide("a", _result(2, 0.6, 0.6)) == CONTINUE
    assert s.rungs[2] == {"a": [0.6, 0.6]}
    # past the last rung (4), nothing more is decided for a trial that passed it
    assert s.decide("c", _result(4, 0.9, 0.9)) == CONTINUE
    assert s.decide("c", _result(7, 0.1, 0.1)) == CONTINUE
    assert s.stopped == {"b": {"rung": 1, "at": 1.0, "rank": 1, "of": 2}}


def test_a_result_past_several_rungs_is_ranked_at_each():
    s = _scheduler()
    for trial, v in (("b", 0.8), ("a", 0.9)):  # each better than those before: both go on
        assert s.decide(trial, _result(1, v, v)) == CONTINUE
        assert s.decide(trial, _result(2, v, v)) == CONTINUE
    # c's first result is at epoch 2: ranked at rung 1, then at rung 2
    assert s.decide("c", _result(2, 0.95, 0.95)) == CONTINUE
    assert set(s.rungs[1]) == set(s.rungs[2]) == {"a", "b", "c"}


def test_rungs_inside_the_eps_ramp_are_taken_past_it(capsys):
    s = _scheduler(min_step=30)
    assert s.decide("a", _result(1, 0.9, 0.9, steps=10)) == CONTINUE
    assert s.decide("b", _result(1, 0.1, 0.1, steps=10)) == CONTINUE  # would be stopped
    assert s.rungs == {}
    # epoch 3, past the ramp: rungs 1 and 2 are taken now, with epoch 3's figures
    assert s.decide("a", _result(3, 0.9, 0.9, steps=40)) == CONTINUE
    assert s.decide("b", _result(3, 0.1, 0.1, steps=40)) == STOP
    assert s.stopped["b"] == {"rung": 1, "at": 3.0, "rank": 1, "of": 2}
    assert s.rungs == {1: {"a": [0.9, 0.9], "b": [0.1, 0.1]}, 2: {"a": [0.9, 0.9]}}
    assert ("trial b stopped at epoch 3: behind 1 of 2 results at that rung (rung 1, taken "
            "past the eps ramp)") in capsys.readouterr().out


def test_missing_or_nan_metrics_decide_nothing():
    s = _scheduler()
    assert s.decide("a", {"epoch": 1.0, "nominal_accuracy": 0.5}) == CONTINUE
    assert s.decide("a", _result(1, float("nan"), 0.5)) == CONTINUE
    assert s.rungs == {}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="reduction_factor must be >= 2"):
        _scheduler(reduction_factor=1)
    with pytest.raises(ValueError, match=r"grace_period must be in \[1, 8\)"):
        _scheduler(grace_period=8)


def test_records_survive_a_new_instance_and_the_decisions_stand(tmp_path):
    s = _scheduler(tmp_path)
    s.reset_state()
    assert s.decide("a", _result(1, 0.5, 0.5)) == CONTINUE
    assert s.decide("b", _result(1, 0.4, 0.4)) == STOP
    assert (tmp_path / STATE_FILE).exists()
    # Tune restores a scheduler from its first pickle, taken before any decision
    restored = pickle.loads(pickle.dumps(_scheduler(tmp_path)))
    assert restored.decide("b", _result(1, 0.99, 0.99)) == STOP  # stands
    assert restored.decide("a", _result(1, 0.5, 0.5)) == CONTINUE  # ranked there before
    assert restored.rungs[1] == {"a": [0.5, 0.5], "b": [0.4, 0.4]}
    # a new, dominated result is ranked against the restored rung
    assert restored.decide("c", _result(1, 0.1, 0.1)) == STOP
    # a sweep whose trials start afresh starts with empty rungs
    fresh = _scheduler(tmp_path)
    fresh.reset_state()
    assert pickle.loads(pickle.dumps(fresh)).decide("b", _result(1, 0.4, 0.4)) == CONTINUE


def _promoting(capsys=None, tmp_path=None):
    """A promoting scheduler after four results at rung 1 (top floor(n/2) promoted):
    b and a promoted (a lifted by d's arrival), c and d resting."""
    s = _scheduler(tmp_path, type="promotion")
    s.reset_state()
    assert s.decide("a", _result(1, 0.5, 0.5)) == PAUSE  # alone: the top 0 of 1 go on
    assert s.decide("b", _result(1, 0.9, 0.9)) == CONTINUE  # rank 0 of 2: top 1
    assert s.decide("c", _result(1, 0.1, 0.1)) == PAUSE  # rank 2 of 3: top 1
    assert s.decide("d", _result(1, 0.4, 0.4)) == PAUSE  # rank 2 of 4: top 2, which lifts a
    return s


def test_promotion_rests_a_trial_until_later_results_lift_it_into_the_top(capsys):
    s = _promoting()
    out = capsys.readouterr().out
    assert ("trial a paused at epoch 1: behind 0 of 1 results at that rung, where the top 0 go "
            "on") in out
    assert "trial a promoted past epoch 1: now 2 of 4 results at that rung" in out
    assert ("trial d paused at epoch 1: behind 2 of 4 results at that rung, where the top 2 "
            "go on") in out
    assert set(s.resting) == {"c", "d"} and s.promoted == {"b": [1], "a": [1]}
    assert RESTING["t"] == {"c", "d"}  # their slots are free for new trials
    # a trial restarted (after a restore) reports its rung again: the same answer
    assert s.decide("a", _result(1, 0.5, 0.5)) == CONTINUE
    assert s.decide("c", _result(1, 0.1, 0.1)) == PAUSE
    assert s.stopped == {}


def test_settling_promotes_the_best_of_a_rung_nobody_left_then_stops_the_rest(capsys):
    s = _promoting()
    assert s.decide("b", _result(2, 0.9, 0.9)) == PAUSE  # alone at rung 2
    assert s.decide("a", _result(2, 0.6, 0.6)) == PAUSE  # rank 1 of 2; b is promoted
    assert s.promoted["b"] == [1, 2]
    # b runs on and ends; then nothing else can run. Rung 4 is empty, rung 2 promoted b,
    # rung 1 promoted a and b: nobody more is promoted, and a, c and d stop where they rest
    assert s.settle(["a", "c", "d"]) == ["a", "c", "d"]
    assert s.stopped == {"a": {"rung": 2, "at": 2.0, "rank": 1, "of": 2},
                         "c": {"rung": 1, "at": 1.0, "rank": 3, "of": 4},
                         "d": {"rung": 1, "at": 1.0, "rank": 2, "of": 4}}
    assert "trial d stopped at epoch 1: behind 2 of 4 results at that rung" in (
        capsys.readouterr().out)
    assert s.resting == {} and s.decide("c", _result(1, 0.99, 0.99)) == STOP
    # a rung that promoted nobody promotes its best resting trial first
    s = _promoting()
    assert s.decide("a", _result(2, 0.6, 0.6)) == PAUSE  # alone at rung 2
    assert s.decide("b", _result(2, 0.5, 0.5)) == PAUSE  # behind a, which is promoted
    assert s.decide("a", _result(4, 0.6, 0.6)) == PAUSE  # alone at rung 4
    assert s.settle(["a", "b", "c", "d"]) == []
    assert s.promoted["a"] == [1, 2, 4] and "a" not in s.resting
    assert "trial a promoted past epoch 4: the best of its rung" in capsys.readouterr().out


def test_resting_and_promotions_survive_a_new_instance(tmp_path):
    _promoting(tmp_path=tmp_path)
    RESTING.clear()
    restored = pickle.loads(pickle.dumps(_scheduler(tmp_path, type="promotion")))
    assert restored.decide("c", _result(1, 0.1, 0.1)) == PAUSE  # rests again
    assert restored.decide("a", _result(1, 0.5, 0.5)) == CONTINUE  # promoted before
    assert RESTING["t"] == {"c", "d"}


class _Trial:
    def __init__(self, trial_id, status):
        self.trial_id, self.status = trial_id, status


class _Controller:
    """What the scheduler uses of Tune's controller: its trials, its searcher's end, and
    stopping a trial."""

    def __init__(self, trials, finished):
        self.trials, self.stopped = trials, []
        self.search_alg = type("Search", (), {"is_finished": lambda _: finished})()

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.status = "TERMINATED"


def test_tune_runs_promoted_trials_first_and_never_a_resting_one():
    s = _promoting()  # a and b promoted, c and d resting
    trials = [_Trial("c", "PAUSED"), _Trial("e", "PENDING"), _Trial("a", "PAUSED")]
    assert s.choose_trial_to_run(_Controller(trials, finished=False)).trial_id == "a"
    trials[2].status = "RUNNING"
    assert s.choose_trial_to_run(_Controller(trials, finished=False)).trial_id == "e"
    trials[1].status = "TERMINATED"
    # a runs, or the searcher has trials left: wait
    assert s.choose_trial_to_run(_Controller(trials, finished=True)) is None
    trials[2].status = "TERMINATED"
    unfinished = _Controller(trials, finished=False)
    assert s.choose_trial_to_run(unfinished) is None and unfinished.stopped == []
    # nothing else can run: the resting trials stop
    done = _Controller(trials + [_Trial("d", "PAUSED")], finished=True)
    assert s.max_concurrent == 0  # no limit given
    assert s.choose_trial_to_run(done) is None
    assert done.stopped == ["c", "d"] and set(s.stopped) == {"c", "d"}


def test_a_promoted_trial_waits_for_a_free_slot_and_a_failed_one_rests_nowhere():
    s = _promoting()  # a and b promoted, c and d resting
    s.max_concurrent = 2
    trials = [_Trial("a", "PAUSED"), _Trial("b", "RUNNING"), _Trial("e", "RUNNING")]
    assert s.choose_trial_to_run(_Controller(trials, finished=False)) is None  # 2 run
    trials[2].status = "PAUSED"  # e rests or ends: a slot is free
    assert s.choose_trial_to_run(_Controller(trials, finished=False)).trial_id == "a"
    s.on_trial_error(None, _Trial("c", "ERROR"))
    assert set(s.resting) == {"d"}
    # settling promotes only among the trials still paused
    s.decide("b", _result(2, 0.9, 0.9))  # b rests alone at rung 2
    assert s.settle(["d"]) == ["d"] and "b" in s.resting  # b is not paused: not promoted


def test_a_resting_trial_holds_no_slot_of_max_concurrent():
    from ray import tune

    generator = ResumableVariants(max_concurrent=1, resting="slots")
    generator.add_configurations({"e": {"run": lambda config: None,
                                        "config": {"x": tune.grid_search([1, 2, 3])}}})
    first = generator.next_trial()
    assert generator.next_trial() is None  # its one slot is held
    RESTING["slots"] = {first.trial_id}
    second = generator.next_trial()  # the first rests: its slot is free
    assert second.config == {"x": 2} and generator.next_trial() is None
    assert generator._live_trials == {first.trial_id, second.trial_id}
    RESTING["slots"] = set()  # promoted: it holds its slot again, and none is free
    generator.on_trial_complete(second.trial_id)
    assert generator.next_trial() is None


def test_optunas_limiter_does_not_count_a_resting_trial_either():
    from ray.tune.search import Searcher

    from orchestrator.resumable import SlotLimiter

    class Fixed(Searcher):
        def suggest(self, trial_id):
            return {"x": 1}

    limiter = SlotLimiter(Fixed(metric="m", mode="max"), max_concurrent=1, resting="optuna")
    assert limiter.suggest("t1") == {"x": 1} and limiter.suggest("t2") is None
    RESTING["optuna"] = {"t1"}
    assert limiter.suggest("t2") == {"x": 1} and limiter.live_trials == {"t1", "t2"}
    RESTING["optuna"] = set()
    assert limiter.suggest("t3") is None


@pytest.mark.parametrize("epoch, state", [(4.0, optuna.trial.TrialState.PRUNED),
                                          (8.0, optuna.trial.TrialState.COMPLETE)])
def test_optuna_learns_only_full_budget_results(epoch, state):
    search = FinalMetricOptunaSearch(
        space={"lr": optuna.distributions.FloatDistribution(0.0, 1.0)},
        metric=["nominal_accuracy", "verified_accuracy"], mode=["max", "max"],
        budget=("epoch", 8.0))
    search.suggest("t1")
    search.on_trial_complete("t1", result=_result(epoch, 0.9, 0.8))
    (trial,) = search._ot_study.get_trials()
    assert trial.state == state
    assert trial.values == (None if state == optuna.trial.TrialState.PRUNED else [0.9, 0.8])


def test_the_replay_counts_the_epochs_each_order_trains():
    from benchmarks.scheduler_replay import Curves, replay

    good = [{"a": 0.5 + 0.1 * e, "b": 0.5 + 0.1 * e} for e in range(4)]
    bad = [{"a": 0.1 * e, "b": 0.1 * e} for e in range(4)]
    curves = Curves({"a": "max", "b": "max"}, {"good": good, "bad": bad},
                    {"good": {"a": 0.7, "b": 0.7}, "bad": {"a": 0.2, "b": 0.2}})
    # the bad trial first: alone at every rung, it runs all 4 epochs; then the good one too
    first_bad = replay(curves, ["bad", "good"], reduction_factor=2, grace_period=1)
    assert first_bad["compute"] == 1.0
    # the good trial first: the bad one stops at rung 1 (behind 1 of 2)
    first_good = replay(curves, ["good", "bad"], reduction_factor=2, grace_period=1)
    assert first_good["compute"] == 5 / 8
    assert first_good["early_val"] == first_bad["early_val"] == pytest.approx(0.8 * 0.8)
    assert first_good["early_test"] == pytest.approx(0.7 * 0.7)
    # random search with 5 epochs affords one whole trial: the first of the order
    assert first_good["random_compute"] == 0.5 and first_good["random_test"] == pytest.approx(
        0.49)
