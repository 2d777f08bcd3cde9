"""A driver killed at any moment leaves a sweep that ``--resume`` completes, with each trial
once in MLflow and each epoch logged once: right after its first write, during MLflow's
set-up, during Ray's start, mid-sweep, and at random moments (the earliest included)."""

import os
import random
import time

import pytest

from tests.integration.conftest import (cli, kill_tree, logged, poll_sweep, run_ok, runs_of,
                                        sweep_args, training_space)

SEEDS = [1, 2]
EPOCHS = 3


def space() -> str:
    return training_space(epochs=EPOCHS, train_size=600, pgd_steps=2, seeds=SEEDS,
                          max_concurrent=2, max_failures=2)


def kill_when(driver, ready, timeout: float = 120.0) -> bool:
    """SIGKILL the driver's process group (as when its machine dies) as soon as ``ready()``;
    False if the driver ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        if ready():
            kill_tree(driver)
            return True
        time.sleep(0.01)
    return False


def resumed_once_each(args, tmp_path, uri, name) -> None:
    done = run_ok([*args, "--resume"], tmp_path)
    assert "Pareto front of" in done.stdout
    client, parents, children = runs_of(uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    live = [c for c in children if c.info.lifecycle_stage == "active"]
    assert len(live) == len(SEEDS), [c.info.run_name for c in live]  # each trial once
    assert len({c.data.tags["ray_trial_id"] for c in live}) == len(SEEDS)
    for child in live:
        assert child.info.status == "FINISHED"
        assert logged(client, child, "pgd_accuracy") == EPOCHS  # each epoch once
    assert parents[0].data.metrics["finished_trials"] == len(SEEDS)


@pytest.mark.parametrize("moment", ["before any write", "first write", "mlflow set-up",
                                    "ray start", "mid-sweep"])
def test_a_driver_killed_at_each_moment_is_resumed(tmp_path, moment):
    args, uri = sweep_args(tmp_path, space(), "crash")
    db = tmp_path / "mlflow.db"
    space_json = tmp_path / "sweeps" / "crash" / "space.json"
    driver = cli(args, tmp_path, start_new_session=True)
    if moment == "before any write":  # --resume of a sweep with nothing stored starts it
        assert kill_when(driver, lambda: True)
        assert not space_json.exists()
    elif moment == "first write":
        assert kill_when(driver, space_json.exists)
    elif moment == "mlflow set-up":
        assert kill_when(driver, db.exists)
    elif moment == "ray start":  # the parent run exists; Ray starts next
        assert kill_when(driver, lambda: _parent_created(uri))
        assert not any(p.name.startswith("experiment_state")  # Tune has saved nothing
                       for p in space_json.parent.iterdir())
    else:
        assert poll_sweep(driver, uri, "crash", lambda client, children: any(
            logged(client, c, "pgd_accuracy") >= 1 for c in children)), "ended too soon"
        kill_tree(driver)
    resumed_once_each(args, tmp_path, uri, "crash")


def _parent_created(uri: str) -> bool:
    import sqlite3

    path = uri.removeprefix("sqlite:///")
    if not os.path.exists(path):
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT 1 FROM runs WHERE name = 'crash'").fetchone() is not None
    except sqlite3.Error:
        return False


def test_random_crash_moments_are_all_resumable(tmp_path):
    seed = int(os.environ.get("CRASH_SEED", time.time()))
    rng = random.Random(seed)
    for attempt in range(3):
        name = f"random{attempt}"
        folder = tmp_path / name
        folder.mkdir()
        args, uri = sweep_args(folder, space(), name)
        delay = rng.uniform(0.0, 12.0)
        driver = cli(args, folder, start_new_session=True)
        time.sleep(delay)
        if driver.poll() is None:
            kill_tree(driver)
        driver.wait()
        try:
            resumed_once_each(args, folder, uri, name)
        except AssertionError as exc:
            raise AssertionError(f"killed after {delay:.2f} s (CRASH_SEED={seed}): {exc}") from exc
