"""Sweeps end to end: the real CLI in a subprocess, local Ray, an MLflow SQLite store, local or
S3-compatible storage (moto_server on 127.0.0.1)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.space import load_space
from orchestrator.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
FAMILY_METRICS = {"lesci": ["accuracy", "projection_rate", "accuracy_projected",
                            "accuracy_identity"],
                  "ibp": ["nominal_accuracy", "verified_accuracy", "pgd_accuracy"],
                  "adversarial": ["nominal_accuracy", "pgd_accuracy"]}

pytestmark = pytest.mark.slow


def cli(args, tmp_path, env=None, timeout=600, **popen):
    command = [sys.executable, str(ROOT / "search.py"), *args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", **(env or {}))
    if popen:
        return subprocess.Popen(command, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **popen)
    return subprocess.run(command, cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def runs_of(mlflow_uri, sweep):
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(sweep)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def poll_sweep(driver, mlflow_uri, sweep, ready, timeout=300) -> bool:
    """While ``driver`` runs, read the sweep's child runs every half second until
    ``ready(client, children)`` holds; False if the sweep ended or time ran out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        try:
            client, _, children = runs_of(mlflow_uri, sweep)
        except Exception:  # the store is still being created
            continue
        if ready(client, children):
            return True
    return False


def logged(client, run, metric) -> int:
    """How many values of ``metric`` the run has logged (its epochs, for training trials)."""
    return len(client.get_metric_history(run.info.run_id, metric))


def check_tracked(mlflow_uri, sweep, family, trials):
    client, parents, children = runs_of(mlflow_uri, sweep)
    assert len(parents) == 1 and parents[0].data.tags["sweep"] == sweep
    parent = parents[0]
    assert parent.info.run_name == sweep and parent.info.status == "FINISHED"
    assert "hypervolume" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.csv", "pareto_front.png"} <= artifacts
    assert len(children) == trials
    assert len({c.data.tags["ray_trial_id"] for c in children}) == trials
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.info.run_name.startswith(family)
        assert child.data.tags["pareto_optimal"] in ("true", "false")
        assert set(FAMILY_METRICS[family]) <= set(child.data.metrics)
        if family == "lesci":  # each trial's whole (k, m) surface
            assert {"surface.csv", "surface.png"} <= {
                a.path for a in client.list_artifacts(child.info.run_id)}
            assert "hypervolume" in child.data.metrics
    assert any(c.data.tags["pareto_optimal"] == "true" for c in children)
    if family == "lesci":  # the front over every surface point, each with its run, k and m
        front = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
        assert {"run_id", "k", "min_votes", "threshold"} <= set(front[0])
        assert {row["run_id"] for row in front} == {c.info.run_id for c in children}
        if "robust_accuracy" in children[0].data.metrics:  # the bare model beside LESCI
            assert parent.data.metrics["base_robust_accuracy"] < parent.data.metrics[
                "base_accuracy"]
            assert {"attack.eps", "attack.apgd_steps", "attack.suite"} <= set(parent.data.params)
    return client, parent, children


def read_csv_artifact(client, run_id, name):
    import csv

    path = client.download_artifacts(run_id, name)
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("space", ["demo", "lesci", "ibp", "adversarial", "ibp_mnist_paper"])
def test_smoke_sweep_of_each_shipped_space(tmp_path, space):
    spec = load_space(space, smoke_test=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = cli(["--space", space, "--smoke-test", "--name", "smoke", "--storage",
                str(tmp_path / "sweeps"), "--mlflow-uri", uri], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Pareto front of" in done.stdout
    assert f"{spec.trial_count} trial(s)" in done.stdout
    client, parent, children = check_tracked(uri, "smoke", spec.family.value, spec.trial_count)
    if spec.family.value != "lesci":  # training trials log one step per epoch
        history = client.get_metric_history(children[0].info.run_id, spec.metric_names[0])
        assert [m.step for m in history] == list(range(1, spec.training["epochs"] + 1))


LESCI_GRID = textwrap.dedent("""
    name: grid
    family: lesci
    dataset: {name: digits}
    model: {name: resnet_digits}
    training: {epochs: 2, batch_size: 128}
    params:
      depth: layer1
      n_components: 8
      embedding_size: {grid: [100, 200, 300, 400, 500, 600]}
      k: [1, 3, 5]
      threshold: [0.3, 0.6]
    attack: {eps: 0.1, steps: 2, apgd: {steps: 3, targets: 0}, samples: 40}
    objectives: {accuracy: max, projection_rate: max}
    search: {algorithm: grid, max_concurrent: 2}
""")


def sweep_args(tmp_path, space: str, name: str, storage: str = "sweeps") -> tuple[list[str], str]:
    """Write ``space`` to tmp_path/space.yaml; (the CLI arguments of sweep ``name`` of it on
    ``storage``, tracked in tmp_path's SQLite MLflow store; that store's URI)."""
    (tmp_path / "space.yaml").write_text(space)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return ["--space", "space.yaml", "--name", name, "--storage", storage, "--mlflow-uri",
            uri], uri


def run_ok(args, tmp_path, env=None) -> subprocess.CompletedProcess:
    done = cli(args, tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def computed_stages(sweep: Storage) -> dict[str, int]:
    """How many times each kind of shared stage was computed (one record per computation)."""
    counts: dict[str, int] = {}
    for name in sweep.list("stages/computed"):
        if name.endswith(".json"):  # not an S3 folder marker
            kind = name.split("-")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def test_lesci_grid_fits_pca_and_builds_embedding_space_once(tmp_path):
    args, uri = sweep_args(tmp_path, LESCI_GRID, "g")
    run_ok(args, tmp_path)
    check_tracked(uri, "g", "lesci", 6)
    # six trials, two at a time: one base model, one PCA, one embedding space, one transfer set
    assert computed_stages(Storage.from_uri(tmp_path / "sweeps" / "g")) == {
        "base": 1, "pca": 1, "space": 1, "transfer": 1}


def test_resume_after_the_driver_is_killed(tmp_path):
    space = LESCI_GRID.replace("max_concurrent: 2", "max_concurrent: 1")
    args, uri = sweep_args(tmp_path, space, "r")
    driver = cli(args, tmp_path, start_new_session=True)
    assert poll_sweep(driver, uri, "r", lambda client, children: sum(
        c.info.status == "FINISHED" for c in children) >= 2), "the sweep ended too soon"
    os.killpg(driver.pid, signal.SIGKILL)  # as when the head machine dies
    driver.wait()
    before = {c.data.tags["ray_trial_id"]: c.info.run_id for c in runs_of(uri, "r")[2]
              if c.info.status == "FINISHED"}
    assert len(before) >= 2

    run_ok([*args, "--resume"], tmp_path)
    client, parent, children = check_tracked(uri, "r", "lesci", 6)  # exactly one run per trial
    assert parent.data.metrics["finished_trials"] == 6
    for child in children:
        # finished trials were not rerun: their metrics were logged once
        assert len(client.get_metric_history(child.info.run_id, "accuracy")) == 1
        if child.data.tags["ray_trial_id"] in before:
            assert before[child.data.tags["ray_trial_id"]] == child.info.run_id
    # and a second --resume of a finished sweep changes nothing
    again = cli([*args, "--resume"], tmp_path)
    assert again.returncode == 0
    assert len(runs_of(uri, "r")[2]) == 6
    # resuming with another space is refused before any Ray work, and nothing is touched
    (tmp_path / "other.yaml").write_text(space.replace("threshold: [0.3, 0.6]",
                                                       "threshold: [0.3]"))
    other = cli(["--space", "other.yaml", *args[2:], "--resume"], tmp_path)
    assert other.returncode == 2
    assert "was started with another space" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert len(runs_of(uri, "r")[2]) == 6


def test_sweep_with_storage_on_s3(tmp_path, s3_server):
    env, s3, _ = s3_server
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = cli(["--smoke-test", "--name", "on-s3", "--storage", "s3://sweeps/runs",
                "--mlflow-uri", uri], tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="sweeps")
            for o in page.get("Contents", [])]
    assert "runs/on-s3/space.json" in keys
    assert any(k.startswith("runs/on-s3/experiment_state") for k in keys)  # Tune's state
    assert any(k.startswith("runs/on-s3/stages/pca-") for k in keys)
    assert not (tmp_path / "sweeps").exists()  # nothing went to a local default
    check_tracked(uri, "on-s3", "lesci", 2)  # the demo's smoke grid: two depths
    # the secret key is nowhere in what the sweep wrote: MLflow's store and artifacts, the
    # bucket, the output
    secret = b"testing-secret-key"
    assert secret.decode() not in done.stdout + done.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written)
    for path in written:
        assert secret not in path.read_bytes(), path
    for key in keys:
        assert secret not in s3.get_object(Bucket="sweeps", Key=key)["Body"].read(), key


def test_lesci_sampled_search_maximises_each_trials_surface_hypervolume(tmp_path):
    space = (LESCI_GRID.replace("embedding_size: {grid: [100, 200, 300, 400, 500, 600]}",
                                "embedding_size: {int: [50, 600]}\n  center: {choice: [true, false]}")
             .replace("search: {algorithm: grid, max_concurrent: 2}",
                      "search: {algorithm: tpe, num_samples: 3, max_concurrent: 2}"))
    args, uri = sweep_args(tmp_path, space, "tpe")
    done = run_ok(args, tmp_path)
    assert "each a surface of 5 (k, m) points" in done.stdout  # k 1, 3, 5 x thresholds .3, .6
    client, parent, children = check_tracked(uri, "tpe", "lesci", 3)
    for child in children:  # the trial's point, not k or threshold, is what was searched
        assert set(child.data.params) == {"depth", "n_components", "embedding_size", "center"}
        assert child.data.metrics["surface_points"] == 5
    front = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
    assert len(front) == 15 and parent.data.metrics["surface_points"] == 15
