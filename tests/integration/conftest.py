"""Helpers of the integration tests: the CLI in a subprocess, MLflow read-backs, small sweep
spaces, and an S3-compatible server (moto_server) on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.storage import Storage


@pytest.hookimpl(tryfirst=True)  # before tests/conftest.py's hook reads the long marks
def pytest_collection_modifyitems(config, items):
    """Every test here starts real services (Ray, MLflow, moto_server, sshd, Chromium):
    marked ``integration``, so ``-m "not integration"`` is the unit run; and ``long`` (run
    with ``--long``) unless marked ``quick``."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
            if not item.get_closest_marker("quick"):
                item.add_marker(pytest.mark.long)

ROOT = Path(__file__).resolve().parents[2]  # the repository
FAMILY_METRICS = {"lesci": ["accuracy", "projection_rate", "accuracy_projected",
                            "accuracy_identity"],
                  "ibp": ["nominal_accuracy", "verified_accuracy", "verified_ibp_accuracy",
                          "verified_crown_accuracy", "pgd_accuracy"],
                  "adversarial": ["nominal_accuracy", "pgd_accuracy"]}

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


def _experiment_exists(mlflow_uri: str, sweep: str) -> bool:
    """Whether the SQLite store holds the sweep's experiment, read without MLflow: opening an
    MlflowClient on a store that the driver is still creating would race its migrations."""
    import sqlite3

    path = mlflow_uri.removeprefix("sqlite:///")
    if not os.path.exists(path):
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT 1 FROM experiments WHERE name = ?", (sweep,)).fetchone() \
                is not None
    except sqlite3.Error:  # tables not created yet
        return False


def poll_sweep(driver, mlflow_uri, sweep, ready, timeout=300) -> bool:
    """While ``driver`` runs, read the sweep's child runs every half second until
    ``ready(client, children)`` holds; False if the sweep ended or time ran out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        if mlflow_uri.startswith("sqlite:///") and not _experiment_exists(mlflow_uri, sweep):
            continue
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
        # (a trial whose every point the attack race stopped has none there)
        assert {row["run_id"] for row in front} == {
            c.info.run_id for c in children if c.data.tags.get("stopped_early") != "true"}
        if "robust_accuracy" in children[0].data.metrics:  # the bare model beside LESCI
            assert parent.data.metrics["base_robust_accuracy"] < parent.data.metrics[
                "base_accuracy"]
            assert {"attack.eps", "attack.apgd_steps", "attack.suite"} <= set(parent.data.params)
    return client, parent, children


def front_trials(client, parent) -> set[str]:
    """The trials with a point on the parent run's Pareto front (its pareto_front.csv)."""
    return {row["trial_id"] for row in read_csv_artifact(client, parent.info.run_id,
                                                         "pareto_front.csv")
            if row["pareto_optimal"] == "True"}


def read_csv_artifact(client, run_id, name):
    import csv

    path = client.download_artifacts(run_id, name)
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


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
    optimize: {accuracy: max, projection_rate: max}
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


def training_space(epochs: int, train_size: int, pgd_steps: int, seeds: list[int] | None,
                   max_concurrent: int, max_failures: int) -> str:
    """A small PGD-training sweep on synthetic 16x16 images (one trial per seed), long enough
    per epoch to break something in the middle of one."""
    space = {
        "name": "faults", "family": "adversarial",
        "dataset": {"name": "synthetic", "options": {"num_classes": 4, "input_shape": [1, 16, 16],
                                                     "train_size": train_size, "val_size": 64}},
        "model": {"name": "ibp_small", "options": {"padding": "same"}},
        "training": {"epochs": epochs, "batch_size": 64, "lr": 0.001},
        "params": {"objective": "pgd", "eps": 0.1, "alpha": 0.03, "steps": pgd_steps},
        "attack": {"eps": 0.1, "steps": 2},
        "optimize": {"pgd_accuracy": "max"},
        "search": {"algorithm": "grid", "max_concurrent": max_concurrent},
        "resources": {"cpu": 1},
        "max_failures": max_failures,
    }
    if seeds:
        space["params"]["seed"] = {"grid": seeds}
    return yaml.safe_dump(space)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import boto3

        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing",
                          aws_secret_access_key="testing-secret-key")
        s3.create_bucket(Bucket="sweeps")
        yield env, s3, server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in its own process group (it spawns uvicorn and its
    workers): ``stop()`` suspends the whole group (the port still accepts connections,
    nothing answers, as with a stalled or unreachable server), ``resume()`` continues it."""

    def __init__(self, folder: Path, app: str | None = None, env: dict | None = None,
                 serve_artifacts: bool = False):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.auth = app is not None
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "server.log"
        artifacts = (["--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"]
                     if serve_artifacts else ["--default-artifact-root", str(folder / "artifacts")])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", *artifacts,
             *(["--app-name", app] if app else [])],
            # no job runner (its ten consumers are for GenAI jobs, not tracking)
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(env or {})),
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        probe = f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(probe, timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as refused:  # the auth app answers, anonymously 401
                if self.auth and refused.code == 401:
                    return
                time.sleep(0.3)
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer in {timeout} s: "
                           f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        try:  # workers that outlived the server
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server")
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def with_mlflow_uri(args: list[str], uri: str) -> list[str]:
    """``args`` of ``sweep_args`` tracked at ``uri`` instead of the SQLite store."""
    at = args.index("--mlflow-uri")
    return [*args[:at + 1], uri, *args[at + 2:]]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): Ray's workers run in process groups of their
    own, under the raylet the driver started."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(driver: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL a driver started with ``start_new_session``, its process group and every process
    it started, as when its machine dies; return once all of them are gone. (Killing the group
    alone leaves Ray's workers running for a moment, still writing to the sweep's storage.)"""
    tree = _descendants(driver.pid)
    for kill in (lambda: os.killpg(driver.pid, signal.SIGKILL),
                 *(lambda pid=pid: os.kill(pid, signal.SIGKILL) for pid in tree)):
        try:
            kill()
        except ProcessLookupError:
            pass
    driver.wait(timeout=timeout)
    deadline = time.time() + timeout
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") and
                                         _state(pid) != "Z" for pid in tree):
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def stop_driver(driver) -> None:
    """SIGKILL a driver started with ``start_new_session`` (and its Ray) if still running."""
    if driver.poll() is None:
        kill_tree(driver)


def check_each_trial_once(uri: str, name: str, trials: int, epochs: int,
                          metric: str = "pgd_accuracy") -> None:
    """The finished sweep ``name``: one parent, one FINISHED child run per trial, each epoch
    of ``metric`` logged exactly once."""
    client, parents, children = runs_of(uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == trials and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["ray_trial_id"] for c in children}) == trials
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
        assert steps == list(range(1, epochs + 1)), steps
