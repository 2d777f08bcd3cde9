"""A team's tracking server as docker/compose.yaml runs it: ``mlflow server --app-name
basic-auth`` with the project's auth config (docker/mlflow-auth.ini) and artifacts served
through MLflow, on 127.0.0.1. Anonymous requests are refused; a sweep as user A completes and
owns its experiment; user B sees nothing of it until granted, and then cannot change it; a
wrong password is one line and exit 2 with nothing stored; and no password or key reaches
anything stored (the tracking and auth stores, the artifacts, the sweep's state in an
S3-compatible bucket) or printed."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.integration.conftest import ROOT, MlflowServer, cli, sweep_args, training_space

ADMIN = "admin-Pa55word-0f-the-team"
KEY = "flask-5ecret-key-0f-the-server"
ALICE = "alice-Pa55word-long-enough"
BOB = "bob-Pa55word-long-enough-too"
SECRETS = (ADMIN, KEY, ALICE, BOB)


@pytest.fixture
def team_server(tmp_path):
    folder = tmp_path / "team-server"
    folder.mkdir()
    config = (ROOT / "docker" / "mlflow-auth.ini").read_text().replace(
        "sqlite:////mlflow-auth/basic_auth.db", f"sqlite:///{folder / 'basic_auth.db'}")
    assert "NO_PERMISSIONS" in config and ADMIN not in config
    (folder / "auth.ini").write_text(config)
    server = MlflowServer(folder, app="basic-auth", serve_artifacts=True,
                          env={"MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
                               "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN,
                               "MLFLOW_FLASK_SERVER_SECRET_KEY": KEY})
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def as_user(name: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password}


def team(uri: str, *args: str, env: dict[str, str], stdin: str = ""
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.team", "--mlflow-uri", uri, *args],
                          input=stdin, capture_output=True, text=True, cwd=ROOT,
                          env={**_clean_env(), **env}, timeout=120)


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}


def status_of(uri: str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"{uri}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


def test_a_team_server_lets_in_only_the_team_and_no_secret_is_stored_or_printed(
        tmp_path, team_server, s3_server, monkeypatch):
    uri = team_server.uri
    s3_env, s3, _ = s3_server
    secrets = (*SECRETS, s3_env["AWS_SECRET_ACCESS_KEY"])
    printed = []
    # anonymous: refused, for the tracking API and for artifacts
    assert status_of(uri, "/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert status_of(uri, "/api/2.0/mlflow-artifacts/artifacts") == 401
    # the admin adds the two users (one line each, no password shown)
    admin = as_user("admin", ADMIN)
    for name, password in (("alice", ALICE), ("bob", BOB)):
        added = team(uri, "add-user", name, "--password-stdin", env=admin, stdin=password + "\n")
        assert added.returncode == 0, added.stderr
        printed += [added.stdout, added.stderr]
    short = team(uri, "add-user", "carol", "--password-stdin", env=admin, stdin="short\n")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    not_admin = team(uri, "add-user", "carol", "--password-stdin", env=as_user("bob", BOB),
                     stdin="carol-Pa55word-long\n")
    assert not_admin.returncode == 2 and "PERMISSION_DENIED" in not_admin.stderr
    printed += [short.stderr, not_admin.stderr]

    # a sweep as alice: it completes, its state in S3, its artifacts through the server
    args, _ = sweep_args(tmp_path, training_space(1, 64, 1, None, 1, 0), "team-sweep",
                         storage="s3://sweeps/team")
    args[args.index("--mlflow-uri") + 1] = uri
    done = cli(args, tmp_path, env={**as_user("alice", ALICE), **s3_env})
    printed += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # alice owns her experiment; her runs and the front's artifacts are there
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    for name, value in as_user("alice", ALICE).items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("team-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {
        "pareto_front.csv", "pareto_front.png"}
    for name, value in admin.items():
        monkeypatch.setenv(name, value)
    from orchestrator.team import _auth_client

    auth = _auth_client(uri)
    assert auth.get_user_permission("alice", "experiment",
                                    experiment.experiment_id).permission == "MANAGE"
    assert auth.get_user_permission("bob", "experiment",
                                    experiment.experiment_id).permission == "NO_PERMISSIONS"

    # bob: nothing of alice's experiment (NO_PERMISSIONS by default)
    for name, value in as_user("bob", BOB).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(MlflowException, match="403"):
        MlflowClient(uri).get_experiment(experiment.experiment_id)
    # granted READ by the admin, he reads it and still cannot change it
    granted = team(uri, "grant", "bob", "team-sweep", "READ", env=admin)
    assert granted.returncode == 0, granted.stderr
    printed += [granted.stdout, granted.stderr]
    assert MlflowClient(uri).get_experiment(experiment.experiment_id).name == "team-sweep"
    with pytest.raises(MlflowException, match="403"):
        MlflowClient(uri).set_experiment_tag(experiment.experiment_id, "vandal", "yes")

    # a wrong password: one line naming the URI and the status, never the password, and
    # nothing stored
    args, _ = sweep_args(tmp_path, training_space(1, 64, 1, None, 1, 0), "wrong-password",
                         storage="wrong-storage")
    args[args.index("--mlflow-uri") + 1] = uri
    wrong = cli(args, tmp_path, env=as_user("alice", ALICE + "-not"))
    printed += [wrong.stdout, wrong.stderr]
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    (line,) = wrong.stderr.strip().splitlines()
    assert uri in line and "401" in line
    assert not (tmp_path / "wrong-storage").exists()

    # no password or key in anything stored (the tracking and auth stores, the artifacts,
    # the sweep's state in the bucket, the server's log) or printed
    blobs = [(str(path), path.read_bytes()) for path in Path(tmp_path).rglob("*")
             if path.is_file() and path.name != "auth.ini"]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="sweeps")
            for o in page.get("Contents", [])]
    assert any(k.startswith("team/team-sweep/") for k in keys)
    blobs += [(key, s3.get_object(Bucket="sweeps", Key=key)["Body"].read()) for key in keys]
    for where, blob in blobs:
        for secret in secrets:
            assert secret.encode() not in blob, (secret, where)
    for text in printed:
        for secret in secrets:
            assert secret not in text
