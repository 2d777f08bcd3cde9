"""Storage faults: the S3-compatible server stops answering mid-sweep and comes back.

moto_server keeps its data in memory, so the outage is a SIGSTOP / SIGCONT of its process (the
port still accepts connections, nothing answers), the way a stalled or unreachable endpoint
looks to clients.

How S3 calls are retried: ``orchestrator.storage`` builds pyarrow's ``S3FileSystem`` with its
defaults (``AwsStandardS3RetryStrategy(max_attempts=3)``, the AWS SDK's 1 s connect timeout and
3 s low-speed timeout), and so does Ray for the checkpoints and experiment state it uploads: an
S3 operation against a stopped endpoint fails after about 10 s. A trial whose checkpoint upload
or restore fails is then retried by Tune (``max_failures``) from its newest checkpoint.

- A 20 s outage is ridden out: the sweep finishes (exit 0, no resume), every trial once, every
  epoch logged once.
- An outage longer than those retries fails the trials (each child run FAILED, the storage
  error as its ``error`` tag); the driver waits on Ray's experiment-state upload until the
  endpoint answers again, then the sweep ends with exit 1, and ``--resume`` completes it from
  the trials' checkpoints, every epoch logged once.
"""

import os
import signal
import time

from tests.integration.conftest import (check_each_trial_once, cli, logged, poll_sweep, run_ok,
                                        runs_of, stop_driver, sweep_args, training_space)

EPOCHS = 6


def start(tmp_path, env, name, max_failures):
    """The sweep's driver (2 seeds x 6 epochs on s3://sweeps/runs), once it has logged an
    epoch; (driver, CLI arguments, MLflow URI)."""
    args, uri = sweep_args(tmp_path, training_space(
        epochs=EPOCHS, train_size=1500, pgd_steps=3, seeds=[1, 2], max_concurrent=2,
        max_failures=max_failures), name, storage="s3://sweeps/runs")
    driver = cli(args, tmp_path, env=env, start_new_session=True)
    assert poll_sweep(driver, uri, name, lambda client, children: any(
        logged(client, c, "pgd_accuracy") for c in children)), \
        "the sweep ended too soon: " + (driver.communicate()[0] or "")[-3000:]
    return driver, args, uri


def check_sweep_on_s3(uri, name, s3):
    check_each_trial_once(uri, name, 2, EPOCHS)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sweeps")["Contents"]]
    assert f"runs/{name}/space.json" in keys


def test_sweep_rides_out_a_20_s_s3_outage(tmp_path, s3_server):
    began = time.time()
    env, s3, server = s3_server
    driver, _, uri = start(tmp_path, env, "outage", max_failures=5)
    try:
        os.killpg(server.pid, signal.SIGSTOP)  # the endpoint stops answering
        time.sleep(20)
        os.killpg(server.pid, signal.SIGCONT)
        output, _ = driver.communicate(timeout=600)
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        stop_driver(driver)
    # ridden out: no error, no --resume
    assert driver.returncode == 0, output[-3000:]
    check_sweep_on_s3(uri, "outage", s3)
    print(f"20 s S3 outage ridden out; {time.time() - began:.0f} s")


def test_an_s3_outage_longer_than_the_retries_fails_the_trials_and_resume_completes_them(
        tmp_path, s3_server):
    began = time.time()
    env, s3, server = s3_server
    driver, args, uri = start(tmp_path, env, "long-outage", max_failures=1)
    try:
        os.killpg(server.pid, signal.SIGSTOP)
        # the endpoint stays stopped until every trial has used its retries
        failed = poll_sweep(driver, uri, "long-outage", lambda client, children: len(
            children) == 2 and all(c.info.status == "FAILED" for c in children), timeout=240)
        down = time.time() - began
        os.killpg(server.pid, signal.SIGCONT)
        output, _ = driver.communicate(timeout=300)
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        stop_driver(driver)
    assert failed, output[-3000:]
    assert driver.returncode != 0, output[-3000:]
    # each trial's run says why: the storage error
    _, _, children = runs_of(uri, "long-outage")
    for child in children:
        assert "NETWORK_CONNECTION" in child.data.tags["error"], child.data.tags["error"]
    run_ok([*args, "--resume"], tmp_path, env=env)
    check_sweep_on_s3(uri, "long-outage", s3)
    print(f"S3 outage longer than the retries: trials failed after {down:.0f} s, resumed; "
          f"{time.time() - began:.0f} s")
