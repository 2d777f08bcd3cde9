"""Storage faults: the S3-compatible server stops answering mid-sweep and comes back.

moto_server keeps its data in memory, so the outage is a SIGSTOP / SIGCONT of its process (the
port still accepts connections, nothing answers), the way a stalled or unreachable endpoint
looks to clients. The sweep rides it out, or stops with a clear error and then resumes to
completion; either way every trial ends once, with every epoch logged once.
"""

import os
import signal
import time

from tests.integration.conftest import (cli, logged, poll_sweep, run_ok, runs_of, sweep_args,
                                        training_space)



def test_sweep_survives_an_s3_outage(tmp_path, s3_server):
    env, s3, server = s3_server
    args, uri = sweep_args(tmp_path, training_space(
        epochs=6, train_size=1500, pgd_steps=3, seeds=[1, 2], max_concurrent=2, max_failures=5),
        "outage", storage="s3://sweeps/runs")
    driver = cli(args, tmp_path, env=env, start_new_session=True)
    try:
        assert poll_sweep(driver, uri, "outage", lambda client, children: any(
            logged(client, c, "pgd_accuracy") for c in children)), "the sweep ended too soon"
        os.killpg(server.pid, signal.SIGSTOP)  # the endpoint stops answering
        time.sleep(20)
        os.killpg(server.pid, signal.SIGCONT)
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    print("outage: rode it out" if driver.returncode == 0 else
          f"outage: stopped ({output.strip().splitlines()[-1][:200]}), then resumed")
    if driver.returncode != 0:
        # stopped with an error: one clear message, then --resume completes the sweep
        run_ok([*args, "--resume"], tmp_path, env=env)
    client, parents, children = runs_of(uri, "outage")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "pgd_accuracy")]
        assert steps == [1, 2, 3, 4, 5, 6]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sweeps")["Contents"]]
    assert "runs/outage/space.json" in keys
