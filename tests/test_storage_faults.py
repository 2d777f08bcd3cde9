"""Storage faults: the S3-compatible server stops answering mid-sweep and comes back.

moto_server keeps its data in memory, so the outage is a SIGSTOP / SIGCONT of its process (the
port still accepts connections, nothing answers), the way a stalled or unreachable endpoint
looks to clients. The sweep rides it out, or stops with a clear error and then resumes to
completion; either way every trial ends once, with every epoch logged once.
"""

import os
import signal
import time

import pytest

from orchestrator.storage import Storage, StorageError
from tests.test_reliability import training_space
from tests.test_sweep import cli, logged, poll_sweep, run_ok, runs_of, sweep_args

pytestmark = pytest.mark.slow


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


def test_local_writes_are_fsynced_renames_that_leave_no_temporary(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    storage = Storage.from_uri(tmp_path)
    storage.put_verified("trial/state.pt", b"epoch 1", {"epoch": 1})
    storage.put_verified("trial/state.pt", b"epoch 2", {"epoch": 2})
    assert len(synced) == 4  # each blob and each manifest
    data, manifest = storage.get_verified("trial/state.pt")
    assert data == b"epoch 2" and manifest["epoch"] == 2
    assert storage.list("trial") == ["state.pt", "state.pt.json"]
    with pytest.raises(StorageError, match="trial/state.pt/x: cannot write"):
        storage.write_bytes("trial/state.pt/x", b"a file is not a folder")
    assert storage.list("trial") == ["state.pt", "state.pt.json"]
