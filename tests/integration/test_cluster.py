"""The user's cluster path on loopback, for real.

- sshd on 127.0.0.1:22 with a key of the test's own;
- an S3-compatible server (moto_server) and ``mlflow server`` (SQLite backend, artifacts proxied
  to S3);
- ``ray up docker/cluster-local.yaml``, then ``ray submit ... search.py -- --smoke-test --storage
  s3://... --mlflow-uri http://...``, then ``ray down``;
- headless Chromium (through chromedriver) on the MLflow UI.

Every process started here is stopped at the end, also on failure. Without sshd, rsync,
Chromium or a free port 22 these tests skip, unless REQUIRE_SYSTEM_SERVICES=1 (CI), where they
fail instead.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository
ARTIFACTS = ROOT / "test-artifacts"
# this interpreter's own tools: a virtualenv's bin need not be on PATH
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
BUCKET = "cluster-test"



def _missing(reason: str):
    if os.environ.get("REQUIRE_SYSTEM_SERVICES") == "1":
        pytest.fail(f"{reason} (REQUIRE_SYSTEM_SERVICES=1: .ci/run installs it)")
    pytest.skip(reason)


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


class Processes:
    """Processes started in their own sessions, stopped as whole groups."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, command, log: Path, env=None) -> subprocess.Popen:
        proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    import urllib.error

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """Services up, a sweep submitted through ``ray submit``; yields what the tests check."""
    for tool in ("sshd", "rsync"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            _missing(f"{tool} is not installed")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 22)) == 0:
            _missing("port 22 is taken: the loopback cluster needs it for sshd")
    tmp = tmp_path_factory.mktemp("cluster")
    # `ray up` may write an auth token for the cluster: leave the machine as it was found
    token = Path.home() / ".ray" / "auth_token"
    token_existed = token.exists()
    procs = Processes()
    s3_port, mlflow_port = free_port(), free_port()
    s3_env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "testing",
              "AWS_SECRET_ACCESS_KEY": "cluster-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}
    config = tmp / "cluster.yaml"
    try:
        procs.start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                    tmp / "moto.log")
        wait_for_port(s3_port)
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing",
                          aws_secret_access_key="cluster-secret-key")
        s3.create_bucket(Bucket=BUCKET)
        server_env = dict(os.environ, **s3_env,
                          MLFLOW_S3_ENDPOINT_URL=s3_env["AWS_ENDPOINT_URL"])
        procs.start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1",
                     "--port", str(mlflow_port),
                     "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                     "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"],
                    tmp / "mlflow.log", env=server_env)

        # sshd of the test's own: its key, its host key, and a home of its own for the head's
        # user, whose ~/.bashrc gives a shell on the head the environment a user's would have
        # (this interpreter's bin first on PATH, the S3 endpoint and credentials). Ray runs its
        # commands in login shells, which reset PATH from /etc/profile and then source
        # ~/.bashrc: a PATH set by sshd alone would not reach them (a virtualenv's `ray` would
        # be "command not found" on the head).
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "key")],
                       check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(tmp / "hostkey")], check=True)
        shutil.copy(tmp / "key.pub", tmp / "authorized_keys")
        home = tmp / "home"
        home.mkdir()
        exports = {"PATH": f"{BIN}:$PATH", **s3_env}
        (home / ".bashrc").write_text(
            "".join(f'export {k}="{v}"\n' for k, v in exports.items()))
        env_line = " ".join(f"{k}={v}" for k, v in {
            "HOME": str(home),
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", **s3_env}.items())
        (tmp / "sshd_config").write_text(
            f"Port 22\nListenAddress 127.0.0.1\nHostKey {tmp / 'hostkey'}\n"
            f"PidFile {tmp / 'sshd.pid'}\nAuthorizedKeysFile {tmp / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"SetEnv {env_line}\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        procs.start([sshd, "-D", "-e", "-f", str(tmp / "sshd_config")], tmp / "sshd.log")
        wait_for_port(22)
        wait_for_port(mlflow_port, 120)

        cluster = yaml.safe_load((ROOT / "docker" / "cluster-local.yaml").read_text())
        cluster["auth"]["ssh_private_key"] = str(tmp / "key")
        # the head runs this interpreter's own ray, whatever else is on its PATH
        cluster["head_start_ray_commands"] = [
            command.replace("ray ", f"{RAY} ", 1)
            for command in cluster["head_start_ray_commands"]]
        config.write_text(yaml.safe_dump(cluster))
        # the cluster's token, generated on "the user's machine" as its YAML says (kept if
        # there is one); file_mounts copies it to the head
        subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, check=True,
                       timeout=60)
        up = subprocess.run([RAY, "up", "-y", "--no-config-cache", str(config)],
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        submit = subprocess.run(
            [RAY, "submit", "--no-config-cache", str(config), str(ROOT / "search.py"), "--",
             "--smoke-test", "--name", "submitted", "--storage", f"s3://{BUCKET}/sweeps",
             "--mlflow-uri", f"http://127.0.0.1:{mlflow_port}"],
            capture_output=True, text=True, timeout=600)
        (tmp / "submit.log").write_text(submit.stdout + submit.stderr)
        # the head's job API (its dashboard, on the head's loopback) while the cluster runs:
        # without the token, and with it
        jobs = "http://127.0.0.1:8265/api/jobs/"
        anonymous = _http_status(jobs)
        with_token = _http_status(jobs, {"Authorization": f"Bearer {token.read_text().strip()}"})
        yield {"submit": submit, "s3": s3, "mlflow": f"http://127.0.0.1:{mlflow_port}",
               "tmp": tmp, "jobs": (anonymous, with_token), "home": home}
    finally:
        if config.exists():
            subprocess.run([RAY, "down", "-y", str(config)], capture_output=True, timeout=300)
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        procs.stop_all()
        if not token_existed:
            token.unlink(missing_ok=True)


def test_ray_up_submit_down_with_s3_storage_and_mlflow_server(submitted):
    submit = submitted["submit"]
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "Pareto front of demo" in submit.stdout
    # the sweep's state is in the bucket
    s3 = submitted["s3"]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert "sweeps/submitted/space.json" in keys
    assert any(k.startswith("sweeps/submitted/experiment_state") for k in keys)
    assert any(k.startswith("sweeps/submitted/stages/pca-") for k in keys)
    # runs, metrics and artifacts are in MLflow (artifacts proxied to the bucket)
    client = MlflowClient(submitted["mlflow"])
    experiment = client.get_experiment_by_name("submitted")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2  # the demo's smoke grid: two depths
    assert all({"accuracy", "projection_rate", "robust_accuracy"} <= set(c.data.metrics)
               for c in children)
    parent = parents[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "pareto_front.csv", "pareto_front.png"}
    assert any(k.startswith("mlflow/") and k.endswith("pareto_front.png") for k in keys)
    # no secret in what MLflow holds or what the sweep printed
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    for run in runs:
        for secret in ("cluster-secret-key", token):
            assert secret not in str(run.data.params) + str(run.data.tags)
    for secret in ("cluster-secret-key", token):
        assert secret not in submit.stdout + submit.stderr


def test_the_cluster_runs_with_token_authentication(submitted):
    """Every node started with RAY_AUTH_MODE=token and the user's token (file_mounts): the
    sweep above attached to it and completed, and its job API refuses a request without the
    token and answers one with it."""
    anonymous, with_token = submitted["jobs"]
    assert anonymous in (401, 403), anonymous
    assert with_token == 200, with_token
    assert (submitted["home"] / ".ray" / "auth_token").read_text().strip() == (
        Path.home() / ".ray" / "auth_token").read_text().strip()


def test_mlflow_ui_lists_child_runs_with_metrics(submitted):
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        _missing("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(submitted["mlflow"])
    experiment = client.get_experiment_by_name("submitted")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    children = len(runs) - 1  # the smoke grid's two depths
    # the parent's plot is served by the tracking server
    with urllib.request.urlopen(f"{submitted['mlflow']}/get-artifact?path=pareto_front.png"
                                f"&run_uuid={parent.info.run_id}", timeout=30) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=2400,1000",
                 f"--user-data-dir={submitted['tmp'] / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{submitted['mlflow']}/#/experiments/{experiment.experiment_id}/runs")
        expander = 'button[data-component-id*="runnamecellrenderer"]'
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, expander))
        driver.find_element(By.CSS_SELECTOR, expander).click()  # show the parent's children
        WebDriverWait(driver, 60).until(  # every child run, by its readable name
            lambda d: d.find_element(By.TAG_NAME, "body").text.count("lesci depth=") == children)
        # add every metric column through the toolbar's "Columns" selector (the table's own
        # "Show more columns" button is rendered but not interactable in MLflow 3.x): its tree
        # has one checkable group per kind, "Metrics (N)" among them
        columns = ("//button[@data-testid='column-selection-dropdown']"
                   "[contains(normalize-space(), 'Columns')]")
        WebDriverWait(driver, 30).until(
            expected_conditions.element_to_be_clickable((By.XPATH, columns))).click()
        metrics = ("//*[@data-testid='column-selector-tree']"
                   "//*[starts-with(normalize-space(text()),'Metrics (')]")
        WebDriverWait(driver, 30).until(
            expected_conditions.element_to_be_clickable((By.XPATH, metrics))).click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        cells = 'div.ag-cell[col-id="metrics.`accuracy`"]'  # the first metric: rendered
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, cells)) >= children + 1)
        values = [c.text for c in driver.find_elements(By.CSS_SELECTOR, cells)]
        numbers = [float(v) for v in values if v not in ("", "-")]
        assert len(numbers) == children and all(0.0 <= v <= 1.0 for v in numbers)
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "mlflow_ui.png"))
    finally:
        driver.quit()
    assert (ARTIFACTS / "mlflow_ui.png").stat().st_size > 10_000
