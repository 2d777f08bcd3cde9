"""Trial crashes: a trial killed mid-epoch continues from its checkpoint; a trial that fails
every time is recorded as failed and does not stop the sweep."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
import uuid

from tests.integration.conftest import (cli, logged, poll_sweep, run_ok, runs_of, sweep_args,
                                        training_space)


def trial_workers() -> list[int]:
    """PIDs of Ray worker processes running a trial (Tune's function trainables)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::ImplicitFunc" in line]


def test_trial_killed_mid_epoch_continues_from_its_checkpoint(tmp_path):
    args, uri = sweep_args(tmp_path, training_space(
        epochs=6, train_size=3000, pgd_steps=4, seeds=None, max_concurrent=1, max_failures=2),
        "crash")
    driver = cli(args, tmp_path, start_new_session=True)
    try:
        assert poll_sweep(driver, uri, "crash", lambda client, children: children and logged(
            client, children[0], "pgd_accuracy") >= 2), "the trial ended before the kill"
        time.sleep(0.5)  # into the third epoch
        workers = trial_workers()
        assert workers, "no trial process found to kill"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # the trial's process dies mid-epoch
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, output[-3000:]
    # killed in the third epoch: continued from the second's checkpoint (or the third's, if it
    # was written in the moment before the kill)
    assert re.search(r"resumed from epoch [23]", output), output[-3000:]
    client, parents, children = runs_of(uri, "crash")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    # epochs continue after the crash: each logged once, 1..6, none restarted from 1
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "pgd_accuracy")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert parents[0].data.metrics["finished_trials"] == 1


FAILING = textwrap.dedent("""
    name: failing
    family: lesci
    dataset: {name: digits}
    model: {name: resnet_digits}
    training: {epochs: 2, batch_size: 128}
    params:
      depth: pool
      n_components: 8
      lr: {grid: [0.003, 0.0000001]}
      k: [3, 1000]
      threshold: 0.5
    optimize: {accuracy: max, projection_rate: max}
    search: {algorithm: grid, max_concurrent: 1}
    max_failures: 1
""")


def test_a_trial_that_always_fails_is_recorded_and_the_sweep_finishes(tmp_path):
    args, uri = sweep_args(tmp_path, FAILING, "failing")
    # k = 1000 exceeds the embedding space (the correctly classified training digits) of the
    # base model trained at a learning rate of 1e-7
    done = run_ok(args, tmp_path)
    client, parents, children = runs_of(uri, "failing")
    by_lr = {float(c.data.params["lr"]): c for c in children}
    assert set(by_lr) == {0.003, 1e-7} and len(children) == 2
    assert by_lr[0.003].info.status == "FINISHED"
    assert by_lr[1e-7].info.status == "FAILED"
    assert "exceeds the embedding space" in by_lr[1e-7].data.tags["error"]
    assert parents[0].data.metrics["failed_trials"] == 1
    assert parents[0].data.metrics["finished_trials"] == 1
    assert "1 finished, 1 failed" in done.stdout


def raylet_of(temp_dir: str) -> int:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return next(int(line.split()[0]) for line in out.splitlines()
                if "raylet/raylet" in line and f"{temp_dir}/" in line)


def kill_node(temp_dir: str) -> int:
    """SIGKILL a node: its raylet, the workers it spawned, and its other processes."""
    raylet = raylet_of(temp_dir)
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    victims = set()
    for line in out.splitlines()[1:]:
        pid, ppid, args = line.split(maxsplit=2)
        if int(ppid) == raylet or f"{temp_dir}/" in args:
            victims.add(int(pid))
    trials = sum("ray::ImplicitFunc" in line for line in out.splitlines()[1:]
                 if int(line.split()[1]) == raylet)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return trials


def test_a_lost_worker_node_does_not_lose_trials(tmp_path):
    from tests.integration.conftest import free_port

    port = free_port()
    # short paths: Ray's Unix sockets live below the temp dir (a socket path has ~107 bytes)
    head_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    worker_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    common = ["--num-cpus=1", "--disable-usage-stats"]
    # Ray 2.60 turns token authentication on by default: one token for every process of this
    # cluster, given through the environment (the home folder's token file is not touched)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    env = dict(os.environ, **auth)
    try:
        subprocess.run(["ray", "start", "--head", f"--port={port}", f"--temp-dir={head_dir}",
                        "--include-dashboard=false", *common], check=True, capture_output=True,
                       env=env)
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}",
                        f"--temp-dir={worker_dir}", *common], check=True, capture_output=True,
                       env=env)
        args, uri = sweep_args(tmp_path, training_space(
            epochs=4, train_size=1500, pgd_steps=3, seeds=[1, 2, 3, 4], max_concurrent=2,
            max_failures=3), "nodes")
        driver = cli(args, tmp_path, env={"RAY_ADDRESS": f"127.0.0.1:{port}", **auth},
                     start_new_session=True)
        def trial_on_worker_node(client, children) -> bool:
            if not any(logged(client, c, "pgd_accuracy") for c in children):
                return False  # wait until training is under way
            out = subprocess.run(["ps", "-ww", "-eo", "ppid,args"], capture_output=True,
                                 text=True).stdout
            raylet = raylet_of(worker_dir)
            return any(line.split()[0] == str(raylet) and "ray::ImplicitFunc" in line
                       for line in out.splitlines()[1:])

        try:
            assert poll_sweep(driver, uri, "nodes", trial_on_worker_node), \
                "no trial ran on the worker node before the sweep ended"
            assert kill_node(worker_dir) >= 1
            output, _ = driver.communicate(timeout=600)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        assert driver.returncode == 0, output[-3000:]
        client, parents, children = runs_of(uri, "nodes")
        assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
        for child in children:
            steps = [m.step for m in client.get_metric_history(child.info.run_id,
                                                               "pgd_accuracy")]
            assert steps == [1, 2, 3, 4]
        assert parents[0].data.metrics["finished_trials"] == 4
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
