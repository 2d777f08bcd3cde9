"""Driver crashes with storage on an S3-compatible server (moto_server on 127.0.0.1).

The driver's whole process group is SIGKILLed, as when the head machine dies, at the moments
that matter: while a shared stage is being computed, mid-sweep with trials finished and others
running, mid-epoch of training trials, and while the final Pareto front is being logged. Each
time the sweep is resumed with ``--resume``. The end state is compared with an uninterrupted run
of the same grid: every trial once, finished work not redone, and the same results and front.
"""

import re
import threading
import time

from orchestrator.storage import Storage
from tests.integration.conftest import (LESCI_GRID, check_tracked, cli, computed_stages,
                                        front_trials, kill_tree, logged, poll_sweep, run_ok,
                                        runs_of, sweep_args, training_space)

S3 = "s3://sweeps/runs"



class Driver:
    """``search.py`` in its own process group, its output read line by line as it comes."""

    def __init__(self, args, tmp_path, env):
        self.process = cli(args, tmp_path, env=env, start_new_session=True)
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 300) -> str | None:
        """The first output line matching ``pattern``; None if the driver ended first."""
        regex, seen, deadline = re.compile(pattern), 0, time.time() + timeout
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                if self.ended or time.time() > deadline:
                    return None
                self._changed.wait(timeout=1)

    def kill(self) -> None:
        kill_tree(self.process)  # the driver and everything it started
        self._reader.join(timeout=10)

    def finish(self, timeout: float = 600) -> int:
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.kill()
        self._reader.join(timeout=10)
        return self.process.returncode


def results_by_config(mlflow_uri: str, sweep: str, keys: list[str], metrics: list[str]):
    """{searched values: (final metric values, on the front)} of the sweep's child runs."""
    _, _, children = runs_of(mlflow_uri, sweep)
    return {tuple(c.data.params[k] for k in keys):
            (tuple(c.data.metrics[m] for m in metrics), c.data.tags["pareto_optimal"])
            for c in children}


def on_s3(tmp_path, space: str, s3_env: dict, monkeypatch) -> tuple[list[str], list[str], str]:
    """(CLI arguments of the uninterrupted sweep "reference" and of sweep "crashed", both of
    ``space`` on the bucket; the MLflow URI). This process reads the bucket too."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    reference, uri = sweep_args(tmp_path, space, "reference", storage=S3)
    crashed, _ = sweep_args(tmp_path, space, "crashed", storage=S3)
    return reference, crashed, uri


def test_driver_killed_during_a_stage_mid_sweep_and_during_pareto_logging(
        tmp_path, s3_server, monkeypatch):
    env, _, _ = s3_server
    # long enough a base model (8 epochs) to kill the driver while it is being trained
    reference, args, uri = on_s3(tmp_path, LESCI_GRID.replace("epochs: 2", "epochs: 8"), env,
                                 monkeypatch)
    run_ok(reference, tmp_path, env)
    crashed = Storage(f"{S3}/crashed")

    # 1. while the shared base-model stage is being computed
    driver = Driver(args, tmp_path, env)
    line = driver.wait_for_line(r"stage base \(\w+\): computing")
    assert line, driver.output[-3000:]
    driver.kill()
    stored = [name for name in crashed.list("stages")
              if name.startswith("base-") and crashed.get_verified(f"stages/{name}")]
    assert not stored, "killed after the stage was stored"
    assert computed_stages(crashed) == {}

    # 2. mid-sweep: two trials finished, others running
    driver = Driver([*args, "--resume"], tmp_path, env)
    assert poll_sweep(driver.process, uri, "crashed", lambda client, children: sum(
        c.info.status == "FINISHED" for c in children) >= 2), driver.output[-3000:]
    driver.kill()
    finished = {c.data.tags["ray_trial_id"]: c.info.run_id for c in runs_of(uri, "crashed")[2]
                if c.info.status == "FINISHED"}
    assert 2 <= len(finished) < 6

    # 3. while the front is being evaluated on the test split, before it is logged
    driver = Driver([*args, "--resume"], tmp_path, env)
    assert driver.wait_for_line(r"on the test split \(read once, now\)"), driver.output[-3000:]
    driver.kill()
    _, parents, _ = runs_of(uri, "crashed")
    assert parents[0].info.status == "RUNNING", "killed after the Pareto front was logged"

    # 4. the last resume completes the sweep
    driver = Driver([*args, "--resume"], tmp_path, env)
    assert driver.finish() == 0, driver.output[-3000:]
    assert "Pareto front of" in driver.output

    client, parent, children = check_tracked(uri, "crashed", "lesci", 6)  # each trial once
    assert parent.data.metrics["finished_trials"] == 6
    for child in children:  # no trial's result was computed and logged twice
        assert logged(client, child, "accuracy") == 1
        if child.data.tags["ray_trial_id"] in finished:
            assert finished[child.data.tags["ray_trial_id"]] == child.info.run_id
    results = [name for name in crashed.list("results") if name.endswith(".json")
               and not name.endswith(".json.json")]  # not the manifests
    assert len(results) == 6
    # every shared stage computed exactly once across the four drivers
    records = {name: crashed.read_bytes(f"stages/computed/{name}")
               for name in crashed.list("stages/computed") if name.endswith(".json")}
    manifests = {name: crashed.read_bytes(f"stages/{name}") for name in crashed.list("stages")
                 if name.endswith(".json")}
    front = front_trials(client, parent)
    assert computed_stages(crashed) == {"base": 1, "pca": 1, "space": 1, "transfer": 2,
                                        "test": len(front)}, (records, manifests)
    # the same results and the same Pareto front as the uninterrupted run
    keys, metrics = ["embedding_size"], ["accuracy", "projection_rate", "hypervolume"]
    reference = results_by_config(uri, "reference", keys, metrics)
    crashed = results_by_config(uri, "crashed", keys, metrics)
    assert crashed == reference
    assert sum(on == "true" for _, on in crashed.values()) >= 1


def test_driver_killed_mid_epoch_resumes_training_from_checkpoints(
        tmp_path, s3_server, monkeypatch):
    env, _, _ = s3_server
    reference, args, uri = on_s3(tmp_path, training_space(
        epochs=4, train_size=1500, pgd_steps=3, seeds=[1, 2], max_concurrent=2, max_failures=2),
        env, monkeypatch)
    run_ok(reference, tmp_path, env)

    driver = Driver(args, tmp_path, env)
    assert poll_sweep(driver.process, uri, "crashed", lambda client, children: len(children) == 2
                      and all(logged(client, c, "pgd_accuracy") >= 2 for c in children)), \
        driver.output[-3000:]
    driver.kill()
    client, _, children = runs_of(uri, "crashed")
    epochs_before = {c.data.params["seed"]: logged(client, c, "pgd_accuracy") for c in children}
    assert all(2 <= n < 4 for n in epochs_before.values()), epochs_before

    driver = Driver([*args, "--resume"], tmp_path, env)
    assert driver.finish() == 0, driver.output[-3000:]
    # the trials continued from their last checkpoints, not from epoch 0
    resumed = [int(n) for n in re.findall(r"resumed from epoch (\d+)", driver.output)]
    assert len(resumed) == 2 and all(n >= 2 for n in resumed), driver.output[-3000:]
    client, parents, children = runs_of(uri, "crashed")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:  # epoch counters continue: each epoch logged once, none restarted
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "pgd_accuracy")]
        assert steps == [1, 2, 3, 4]
    assert parents[0].data.metrics["finished_trials"] == 2
    # exact resume: the same final metrics, and front, as the uninterrupted run
    metrics = ["pgd_accuracy", "nominal_accuracy", "train_loss", "train_adv_accuracy"]
    assert (results_by_config(uri, "crashed", ["seed"], metrics)
            == results_by_config(uri, "reference", ["seed"], metrics))
