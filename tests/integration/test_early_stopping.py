"""Early stopping with several objectives (``scheduler: mo_asha``) in a real sweep: dominated
trials stop at a rung, stay off the front and are told so in MLflow; a driver killed after a
decision resumes with every decision standing and no stopped trial run again."""

import json
import textwrap
import time

import pytest

from orchestrator.resumable import saved_trials
from orchestrator.schedulers import STATE_FILE
from orchestrator.storage import Storage
from tests.integration.conftest import (check_tracked, front_trials, read_csv_artifact, run_ok,
                                        runs_of, sweep_args)
from tests.integration.test_driver_crashes import Driver

# four IBP trials on digits, rungs at epochs 1 and 2 of 4; the last two (grid order) learn
# almost nothing at lr 1e-6 and meet the first two's results at rung 1
SPACE = textwrap.dedent("""
    name: mo
    family: ibp
    dataset: {name: digits}
    model: {name: ibp_small, options: {padding: same}}
    training: {epochs: 4, batch_size: 50, optimizer: adam}
    params:
      lr: {grid: [0.003, 0.000001]}
      kappa_final: {grid: [0.5, 0.7]}
      eps_train: 0.1
      rampup: 20
    attack: {eps: 0.1, steps: 2, suite: {apgd_steps: 3, targets: 1, square_queries: 10}}
    optimize: {verified_accuracy: max, nominal_accuracy: max}
    search: {algorithm: grid, max_concurrent: 2}
    scheduler: {name: mo_asha, type: stopping, reduction_factor: 2, grace_period: 1}
""")


def _check_stopped_trials(uri: str, name: str, stopped: dict):
    """Each trial's epochs tracked once, none after its stop; the stopped ones tagged, off
    the front and never read on test; the parent's counts and compute fraction. Returns the
    parent run."""
    client, parents, children = runs_of(uri, name)
    parent = parents[0]
    assert len(children) == 4 and len({c.data.tags["ray_trial_id"] for c in children}) == 4
    used = 0
    for child in children:
        trial_id = child.data.tags["ray_trial_id"]
        steps = [m.step for m in client.get_metric_history(child.info.run_id,
                                                           "verified_accuracy")]
        assert child.info.status == "FINISHED"
        if trial_id in stopped:  # each epoch once, none after the stop: not run again
            at = stopped[trial_id]["at"]
            assert steps == list(range(1, int(at) + 1))
            assert child.data.tags["stopped_early"] == "true"
            assert child.data.tags["stopped_at"] == f"epoch {at:g}"
            assert child.data.tags["pareto_optimal"] == "false"
        else:
            assert steps == [1, 2, 3, 4]
            assert child.data.tags["stopped_early"] == "false"
        assert child.data.metrics["budget_used"] == len(steps)
        used += len(steps)
    # the trials that barely learn are among the stopped
    assert all(c.data.tags["ray_trial_id"] in stopped for c in children
               if float(c.data.params["lr"]) < 1e-4)
    assert parent.data.metrics["stopped_trials"] == len(stopped)
    assert parent.data.metrics["compute_fraction"] == pytest.approx(used / 16)
    # the front: full-budget trials only, and only they read on test
    front = front_trials(client, parent)
    assert front and not front & set(stopped)
    assert all("test_verified_accuracy" not in c.data.metrics for c in children
               if c.data.tags["ray_trial_id"] in stopped)
    return parent


def _kill_and_resume(tmp_path, space: str, name: str, line: str) -> tuple[dict, dict, str, Driver]:
    """Sweep ``name`` of ``space``, its driver killed after a console line matching ``line``
    once Tune has saved its state (before it, a resume starts the trials afresh), then resumed
    to its end: (the scheduler's records at the kill, at the end; the MLflow URI; the resumed
    driver)."""
    args, uri = sweep_args(tmp_path, space, name)
    storage = Storage(str(tmp_path / "sweeps")).child(name)
    driver = Driver(args, tmp_path, None)
    assert driver.wait_for_line(line), driver.output[-3000:]
    deadline = time.time() + 120
    while saved_trials(str(tmp_path / "sweeps" / name)) is None and time.time() < deadline:
        time.sleep(0.2)
    driver.kill()
    before = json.loads(storage.read_bytes(STATE_FILE))
    driver = Driver([*args, "--resume"], tmp_path, None)
    assert driver.finish() == 0, driver.output[-3000:]
    return before, json.loads(storage.read_bytes(STATE_FILE)), uri, driver


def test_dominated_trials_stop_and_a_driver_killed_after_a_decision_resumes_with_it(tmp_path):
    before, after, uri, driver = _kill_and_resume(tmp_path, SPACE, "mo",
                                                  r"trial \w+ stopped at epoch \d")
    before, stopped = before["stopped"], after["stopped"]
    assert before
    assert stopped.items() >= before.items()  # every decision taken before the kill stands

    parent = _check_stopped_trials(uri, "mo", stopped)
    assert json.loads(parent.data.params["scheduler"]) == {
        "name": "mo_asha", "type": "stopping", "reduction_factor": 2, "grace_period": 1}
    assert "stopped early by scheduler mo_asha" in driver.output


def test_promotion_rests_trials_at_rungs_and_a_driver_killed_while_one_rests_resumes(
        tmp_path):
    """The same grid under ``type: promotion`` (the default): a trial not among its rung's
    top half pauses there, and goes on only if later results lift it into that top half; the
    rest stop at the end. A driver killed while a trial rests resumes with every record,
    promotion and rest standing, and no epoch trained twice."""
    before, after, uri, driver = _kill_and_resume(tmp_path, SPACE.replace("type: stopping, ", ""),
                                                  "promo", r"trial \w+ paused at epoch \d")
    assert before["resting"]
    for rung, results in before["rungs"].items():  # no result recorded twice or changed
        assert after["rungs"][rung].items() >= results.items()
    for trial_id, rungs in before["promoted"].items():
        assert set(after["promoted"][trial_id]) >= set(rungs)
    # every trial that rested then either went on from that rung or stopped there
    for trial_id, info in before["resting"].items():
        assert (info["rung"] in after["promoted"].get(trial_id, [])
                or after["stopped"][trial_id]["rung"] == info["rung"])
    assert not after["resting"]
    parent = _check_stopped_trials(uri, "promo", after["stopped"])
    assert after["stopped"] and parent.data.metrics["compute_fraction"] < 1
    assert json.loads(parent.data.params["scheduler"])["type"] == "promotion"
    assert "promoted past epoch" in driver.output


# LESCI under mo_asha races its attacks: two trials at the pooled features, one after the
# other; the second projects to one PCA component, and each of its points is worse in accuracy
# or projection than a point of the first and, after the first rung (30 of 90 attack samples),
# surely no more robust
RACE = textwrap.dedent("""
    name: race
    family: lesci
    dataset: {name: digits}
    model: {name: resnet_digits}
    training: {epochs: 3, batch_size: 64, lr: 0.003, seed: 0}
    params:
      depth: pool
      n_components: {grid: [32, 1]}
      k: [3, 10]
      threshold: {uniform: [0.5, 1.0]}
    attack: {eps: 0.1, steps: 5, apgd: {steps: 5, targets: 0}, samples: 90}
    optimize: {accuracy: max, projection_rate: max, robust_accuracy: max}
    search: {algorithm: grid, max_concurrent: 1}
    scheduler: {name: mo_asha, reduction_factor: 3, grace_period: 30}
""")


def test_lesci_races_its_attacks_and_the_front_is_attacked_on_every_sample(tmp_path):
    args, uri = sweep_args(tmp_path, RACE, "race")
    done = run_ok(args, tmp_path)
    assert "stopped after 30 of 90 attack samples: dominated by pool k" in done.stdout
    client, parent, children = check_tracked(uri, "race", "lesci", 2)
    by_components = {int(c.data.params["n_components"]): c for c in children}
    good, bad = by_components[32], by_components[1]
    # the one-component trial: every point stopped at the first rung, the trial with them
    assert bad.data.tags["stopped_early"] == "true"
    assert bad.data.tags["stopped_at"] == "attack samples 30"
    assert bad.data.tags["pareto_optimal"] == "false"
    assert bad.data.metrics["budget_used"] == 8 * 30
    surface = read_csv_artifact(client, bad.info.run_id, "surface.csv")
    assert len(surface) == 8 and all(r["raced_out"] == "True" and r["attacked_samples"] == "30"
                                     for r in surface)
    # the other: not stopped; the front is its points attacked on every attack sample
    assert good.data.tags["stopped_early"] == "false"
    rows = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
    assert rows and {r["trial_id"] for r in rows} == {good.data.tags["ray_trial_id"]}
    assert all(r["attacked_samples"] == "90" for r in rows)
    used = good.data.metrics["budget_used"] + bad.data.metrics["budget_used"]
    assert parent.data.metrics["compute_fraction"] == pytest.approx(used / (2 * 8 * 90))
    assert parent.data.metrics["compute_fraction"] < 1
    assert parent.data.metrics["raced_points"] >= 8
    assert "the attack race stopped" in done.stdout
