"""The MLflow callback: one child run per trial and each step logged once, also when the state
saved with the experiment is older than the runs (what a restore after a crash sees)."""

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from orchestrator.loading import load_space
from orchestrator.mlflow_client import ensure_experiment, ensure_parent_run
from orchestrator.tracking import MLflowTracking

ROOT = Path(__file__).resolve().parents[1]


def make(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "s")
    parent = ensure_parent_run(client, experiment, "s", {"space": "x"}, {})
    spec = load_space("demo", smoke_test=True, check_model=False)  # depth searched
    callback = MLflowTracking(uri, experiment, parent, "s", spec)
    return client, experiment, parent, callback


def test_each_trial_one_run_each_step_once_across_stale_restores(tmp_path):
    client, experiment, parent, callback = make(tmp_path)
    trial = SimpleNamespace(trial_id="t1", config={"depth": "stem"})
    stale = pickle.loads(pickle.dumps(callback))  # saved before anything was logged
    callback.on_trial_start(0, [], trial)
    saved_map_only = {"runs": dict(callback.get_state()["runs"]), "logged_step": {}}
    callback.on_trial_result(0, [], trial, {"accuracy": 0.9, "training_iteration": 1})
    callback.on_trial_complete(0, [], trial)

    # a restore from state saved before the result (with or without the run map) re-reports it
    for state in ({"runs": {}, "logged_step": {}}, saved_map_only):
        restored = pickle.loads(pickle.dumps(stale))
        restored.set_state(state)
        restored.on_trial_start(0, [], trial)
        restored.on_trial_result(0, [], trial, {"accuracy": 0.9, "training_iteration": 1})
        restored.on_trial_complete(0, [], trial)

    runs = client.search_runs([experiment], filter_string="tags.ray_trial_id = 't1'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "lesci depth=stem"
    assert run.data.tags["mlflow.parentRunId"] == parent
    # params: every value the trial used, by its one name, defaults included
    assert run.data.params["depth"] == "stem" and run.data.params["center"] == "True"
    assert {"n_components", "epochs", "lr", "seed", "augmentation.flip"} <= set(run.data.params)
    assert len(client.get_metric_history(run.info.run_id, "accuracy")) == 1
    # and the parent is found again, never created twice
    assert ensure_parent_run(client, experiment, "s", {}, {}) == parent


def test_a_run_left_without_params_by_a_kill_gets_them_on_resume(tmp_path):
    """The driver killed between a child run's create and its params: the resumed driver
    finds the run by its tag and logs the values the trial used, once."""
    client, experiment, parent, callback = make(tmp_path)
    trial = SimpleNamespace(trial_id="t4", config={"depth": "stem"})
    run = client.create_run(experiment, tags={"mlflow.parentRunId": parent,
                                              "ray_trial_id": "t4"}, run_name="lesci depth=stem")
    client.log_param(run.info.run_id, "depth", "stem")  # one batch of several landed, say
    callback.on_trial_start(0, [], trial)
    callback.on_trial_complete(0, [], trial)
    runs = client.search_runs([experiment], filter_string="tags.ray_trial_id = 't4'")
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    params = runs[0].data.params
    assert params["depth"] == "stem" and params["center"] == "True"
    assert {"n_components", "epochs", "lr", "seed", "augmentation.flip"} <= set(params)


def test_training_steps_follow_the_epoch(tmp_path):
    client, experiment, _, callback = make(tmp_path)
    trial = SimpleNamespace(trial_id="t2", config={"depth": "layer1"})
    callback.on_trial_start(0, [], trial)
    for epoch in (1, 2, 2, 3):  # epoch 2 re-reported after a retry from its checkpoint
        callback.on_trial_result(0, [], trial, {"accuracy": 0.5 + epoch / 10, "epoch": epoch,
                                                "training_iteration": 7})
    run_id = callback.run_id(trial)
    assert [m.step for m in client.get_metric_history(run_id, "accuracy")] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# the retrying client (orchestrator.mlflow_client.TrackingClient)

import json  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402
from mlflow.exceptions import MlflowException, RestException  # noqa: E402
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE  # noqa: E402

from orchestrator.mlflow_client import (RETRY_ENV, TrackingClient, TrackingError,  # noqa: E402
                                        TrackingUnavailable, check_tracking_uri, is_transient,
                                        retry_budget, tracking_failure)


def fast(uri, lines, **options):
    """A TrackingClient with short delays that logs to ``lines``."""
    return TrackingClient(uri, log=lines.append, first_delay_s=0.05, max_delay_s=0.2, **options)


class FakeServer:
    """An HTTP server on 127.0.0.1 answering MLflow's REST paths with ``answer(request
    number, method, path) -> (status, json body)``; it counts the requests."""

    def __init__(self, answer, port=0):
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.requests += 1
                status, body = answer(outer.requests, self.command, self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _reply

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def one_try(monkeypatch):
    """MLflow's own HTTP layer tries each request once, quickly (the user's choice in their
    environment; the test process only): the retries seen are the wrapper's."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def test_a_server_failing_with_503_is_retried_until_it_answers(one_try):
    server = FakeServer(lambda n, method, path: (503, {"error_code": "TEMPORARILY_UNAVAILABLE",
                                                       "message": "busy"}) if n <= 3
                        else (200, {"experiments": []}))
    lines = []
    try:
        assert fast(server.uri, lines, budget_s=30).search_experiments() == []
    finally:
        server.close()
    assert server.requests == 4
    # one line when the outage starts and one when it ends, not one per attempt
    assert len(lines) == 2 and "unreachable" in lines[0] and server.uri in lines[0]
    assert "retrying for up to 30 s" in lines[0] and "reachable again" in lines[1]


def test_a_port_with_nothing_listening_for_a_while_is_waited_for(one_try):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started: list[FakeServer] = []
    timer = threading.Timer(1.0, lambda: started.append(
        FakeServer(lambda n, method, path: (200, {"experiments": []}), port=port)))
    timer.start()
    lines = []
    try:
        begin = time.monotonic()
        assert fast(f"http://127.0.0.1:{port}", lines, budget_s=30).search_experiments() == []
        assert 0.9 < time.monotonic() - begin < 10
    finally:
        timer.join()
        for server in started:
            server.close()
    assert "ConnectionRefusedError" in lines[0] and len(lines) == 2


def test_gives_up_after_the_budget_with_one_clear_error(one_try):
    server = FakeServer(lambda n, method, path: (503, {"error_code": "TEMPORARILY_UNAVAILABLE",
                                                       "message": "down"}))
    lines = []
    try:
        begin = time.monotonic()
        with pytest.raises(TrackingUnavailable) as raised:
            fast(server.uri, lines, budget_s=1.0).search_experiments()
        elapsed = time.monotonic() - begin
    finally:
        server.close()
    message = str(raised.value)
    assert 0.9 < elapsed < 5 and server.requests > 2
    assert "\n" not in message and message.startswith(f"MLflow at {server.uri} unreachable for")
    assert RETRY_ENV in message and len(lines) == 1
    assert isinstance(raised.value, TrackingError)  # what the CLI reports as one line


def test_a_4xx_answer_is_not_retried(one_try):
    server = FakeServer(lambda n, method, path: (400, {"error_code": "RESOURCE_ALREADY_EXISTS",
                                                       "message": "experiment x exists"}))
    lines = []
    try:
        with pytest.raises(RestException, match="RESOURCE_ALREADY_EXISTS"):
            fast(server.uri, lines, budget_s=30).create_experiment("x")
    finally:
        server.close()
    assert server.requests == 1 and lines == []


def test_which_errors_are_transient():
    def chained(outer, inner):
        try:
            try:
                raise inner
            except Exception:
                raise outer  # noqa: B904 - chained implicitly, as MLflow's http_request does
        except Exception as exc:  # noqa: BLE001
            return exc

    assert is_transient(chained(MlflowException("API request failed"),
                                requests.exceptions.ConnectionError("refused")))
    assert is_transient(chained(MlflowException("API request failed"),
                                requests.exceptions.ReadTimeout("read timed out")))
    assert is_transient(RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}))
    assert is_transient(RestException({"error_code": "REQUEST_LIMIT_EXCEEDED"}))  # 429
    assert is_transient(MlflowException("database is locked", TEMPORARILY_UNAVAILABLE))
    assert is_transient(MlflowException("API request to endpoint /x failed with error code 502 "
                                        "!= 200. Response body: '<html>'"))
    assert not is_transient(RestException({"error_code": "RESOURCE_ALREADY_EXISTS"}))
    assert not is_transient(RestException({"error_code": "INVALID_PARAMETER_VALUE"}))
    assert not is_transient(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST"}))
    assert not is_transient(MlflowException("a bug on our side"))  # local, no network cause
    assert not is_transient(chained(MlflowException("API request failed"),
                                    requests.exceptions.SSLError("certificate verify failed")))
    assert not is_transient(ValueError("bad value"))


def test_the_budget_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    assert retry_budget() == 180
    monkeypatch.setenv(RETRY_ENV, "12.5")
    assert retry_budget() == 12.5
    assert TrackingClient(f"sqlite:///{tmp_path / 'm.db'}").budget_s == 12.5
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv(RETRY_ENV, bad)
        with pytest.raises(TrackingError, match=RETRY_ENV):
            check_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")  # before any Ray work


def test_a_tracking_error_is_found_behind_what_ray_tune_raises():
    from ray.tune.error import TuneError

    error = TrackingUnavailable("MLflow at http://h unreachable for 12 s")
    try:
        try:
            raise error
        except TrackingUnavailable:
            import traceback
            raise TuneError(traceback.format_exc())  # noqa: B904 - what Tune's controller does
    except TuneError as wrapped:
        assert tracking_failure(wrapped) is error
    assert tracking_failure(ValueError("other")) is None


class LostAnswers:
    """A real MlflowClient whose named calls reach the store and then lose their answer once
    each (a connection reset after the server did the work)."""

    def __init__(self, client, *names):
        self.client, self.pending, self.calls = client, set(names), []

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            result = method(*args, **kwargs)
            if name in self.pending:
                self.pending.discard(name)
                raise MlflowException("API request failed") from \
                    requests.exceptions.ConnectionError("connection reset by peer")
            return result

        return call


def test_retried_creates_and_logs_after_a_lost_answer_are_not_duplicated(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines = []
    flaky = LostAnswers(MlflowClient(uri), "create_experiment", "create_run")
    client = fast(uri, lines, budget_s=30, client=flaky)
    experiment = ensure_experiment(client, "s")  # no RESOURCE_ALREADY_EXISTS on the retry
    flaky.pending.add("create_run")
    parent = ensure_parent_run(client, experiment, "s", {"space": "x"}, {})
    spec = load_space("demo", smoke_test=True, check_model=False)
    callback = MLflowTracking(uri, experiment, parent, "s", spec)
    callback._client = client
    trial = SimpleNamespace(trial_id="t1", config={"depth": "stem"})
    flaky.pending |= {"create_run", "log_batch"}
    callback.on_trial_start(0, [], trial)  # the child run's create and its params lose answers
    flaky.pending.add("log_batch")
    callback.on_trial_result(0, [], trial, {"accuracy": 0.9, "training_iteration": 1})
    callback.on_trial_complete(0, [], trial)

    plain = MlflowClient(uri)
    assert len(plain.search_experiments(filter_string="name = 's'")) == 1
    runs = plain.search_runs([experiment])
    assert len(runs) == 2  # the parent and one child
    child = next(r for r in runs if r.data.tags.get("ray_trial_id") == "t1")
    assert child.data.params["depth"] == "stem"
    # the metrics' log_batch reached the store twice: MLflow kept its values once
    assert len(plain.get_metric_history(child.info.run_id, "accuracy")) == 1
    assert flaky.calls.count("create_run") == 2  # the parent's and the child's, once each
    assert sum("unreachable" in line for line in lines) == 5  # 5 short outages, one line each


def test_a_create_whose_answer_was_lost_and_that_lands_late_is_deleted(tmp_path):
    client, experiment, parent, callback = make(tmp_path)
    trial = SimpleNamespace(trial_id="t3", config={"depth": "stem"})
    callback.on_trial_start(0, [], trial)
    # the lost request lands after the run was created again: a second run with its tags
    client.create_run(experiment, tags={"mlflow.parentRunId": parent, "ray_trial_id": "t3"})
    callback.on_trial_result(0, [], trial, {"accuracy": 0.8, "training_iteration": 1})
    callback.on_trial_complete(0, [], trial)
    runs = client.search_runs([experiment], filter_string="tags.ray_trial_id = 't3'")
    assert [r.info.run_id for r in runs] == [callback.run_id(trial)]
    assert runs[0].data.metrics["accuracy"] == 0.8


def test_a_start_killed_while_creating_the_sqlite_store_leaves_nothing_that_breaks_the_next(
        tmp_path):
    """MLflow builds a new SQLite store in many committed migrations; a sweep killed among them
    used to leave a half-built file that every later start failed on ("duplicate column
    name"). The store is built beside its path and linked in only when complete."""
    import signal
    import subprocess
    import sys

    from orchestrator.mlflow_client import tracking_client

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    # the killed start: held just before its store would be linked into place
    script = (
        "import os, sys, time\n"
        "def hold(*args):\n"
        "    print('built', flush=True)\n"
        "    time.sleep(600)\n"
        "os.link = hold\n"
        "from orchestrator.mlflow_client import create_sqlite_store\n"
        f"create_sqlite_store({uri!r})\n")
    killed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert killed.stdout.readline().strip() == "built"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mlflow.db.creating-")]
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert not db.exists()

    client = tracking_client(uri)
    experiment_id = ensure_experiment(client, "after-a-kill")
    assert client.get_experiment(experiment_id).name == "after-a-kill"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "mlruns") == ["mlflow.db"]
    # an existing store is used as it is
    assert tracking_client(uri).get_experiment_by_name("after-a-kill") is not None
