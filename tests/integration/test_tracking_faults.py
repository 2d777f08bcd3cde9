"""Tracking faults: the MLflow tracking server stops answering mid-sweep and comes back.

The server is a real ``mlflow server`` (SQLite store) suspended with SIGSTOP / SIGCONT of its
process group: the port still accepts connections and nothing answers, the way a stalled or
unreachable server looks to clients. The sweep's MLflow calls are retried by
``orchestrator.mlflow_client.TrackingClient`` for up to ``ROBUST_SWEEPS_MLFLOW_RETRY_S`` seconds;
MLflow's own per-request timeout and retries are set short in the sweep's environment (a user's
choice, process-wide for that process only) so that the wrapper is what rides the outage out.
"""

import time

from orchestrator.mlflow_client import RETRY_ENV
from tests.integration.conftest import (check_each_trial_once, cli, logged, poll_sweep, run_ok,
                                        stop_driver, sweep_args, training_space,
                                        with_mlflow_uri)

EPOCHS = 6
# each request tried once, for at most 2 s: a stopped server fails a call in 2 s
SHORT_REQUESTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def start(tmp_path, server, name, env):
    """The sweep's driver (2 seeds x 6 epochs) tracked by ``server``, once it has logged an
    epoch; (driver, CLI arguments)."""
    args, _ = sweep_args(tmp_path, training_space(
        epochs=EPOCHS, train_size=1500, pgd_steps=3, seeds=[1, 2], max_concurrent=2,
        max_failures=2), name)
    args = with_mlflow_uri(args, server.uri)
    driver = cli(args, tmp_path, env=env, start_new_session=True)
    assert poll_sweep(driver, server.uri, name, lambda client, children: len(children) == 2 and
                      any(logged(client, c, "pgd_accuracy") for c in children)), \
        "the sweep ended too soon: " + (driver.communicate()[0] or "")[-3000:]
    return driver, args


def test_sweep_rides_out_a_tracking_server_outage(tmp_path, mlflow_server):
    began = time.time()
    driver, _ = start(tmp_path, mlflow_server, "outage", SHORT_REQUESTS)
    try:
        mlflow_server.stop()
        time.sleep(20)
        mlflow_server.resume()
        output, _ = driver.communicate(timeout=300)
    finally:
        mlflow_server.resume()
        stop_driver(driver)
    assert driver.returncode == 0, output[-3000:]
    # the outage was met and ridden out by the retrying client: one line when it started,
    # one when it ended, not one per attempt
    down = [line for line in output.splitlines() if "unreachable (" in line]
    assert len(down) == 1 and mlflow_server.uri in down[0], output[-3000:]
    assert sum("reachable again" in line for line in output.splitlines()) == 1
    check_each_trial_once(mlflow_server.uri, "outage", 2, EPOCHS)
    print(f"tracking outage ridden out; {time.time() - began:.0f} s")


def test_an_outage_longer_than_the_retries_stops_the_sweep_and_resume_completes_it(
        tmp_path, mlflow_server):
    began = time.time()
    env = {RETRY_ENV: "10", **SHORT_REQUESTS}
    driver, args = start(tmp_path, mlflow_server, "long-outage", env)
    try:
        mlflow_server.stop()
        output, _ = driver.communicate(timeout=120)  # stays stopped until the sweep gives up
    finally:
        mlflow_server.resume()
        stop_driver(driver)
    assert driver.returncode == 1, output[-3000:]  # a failure, not bad input
    # one clear error: the URI, for how long it was unreachable, and the budget's variable
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unreachable for" in errors[0], output[-3000:]
    assert mlflow_server.uri in errors[0] and RETRY_ENV in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in output, output[-3000:]
    stopped = time.time() - began
    run_ok([*args, "--resume"], tmp_path, env=env)
    check_each_trial_once(mlflow_server.uri, "long-outage", 2, EPOCHS)
    print(f"tracking outage outlasted the retries: stopped after {stopped:.0f} s, resumed; "
          f"{time.time() - began:.0f} s")
