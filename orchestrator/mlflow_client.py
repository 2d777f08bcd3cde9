"""MLflow through a client that survives a flaky tracking server.

Every MLflow call of a sweep goes through ``tracking_client``: a failing call is retried with
exponential backoff and jitter for up to ``ROBUST_SWEEPS_MLFLOW_RETRY_S`` seconds (default 180)
when the error means the server is unreachable or failing (connection errors, timeouts, HTTP 5xx
and 429), never when it answered no (4xx). This sits on top of MLflow's own per-request retries,
which follow its ``MLFLOW_HTTP_REQUEST_*`` environment variables; those are left as the user set
them. Creations are made idempotent: before a create is tried again, the object is looked up
(it may have been created by the attempt whose answer was lost). ``ensure_experiment`` and
``ensure_parent_run`` find a sweep's experiment and parent run again on resume.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Any, Callable, TypeVar

from mlflow.entities import Param
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from orchestrator.storage import redact

__all__ = ["TrackingClient", "TrackingError", "TrackingUnavailable",
           "check_tracking_uri", "create_sqlite_store", "ensure_experiment", "ensure_parent_run",
           "is_transient", "retry_budget", "tracking_client", "tracking_failure", "RETRY_ENV",
           "DEFAULT_RETRY_S"]

T = TypeVar("T")

RETRY_ENV = "ROBUST_SWEEPS_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 180.0


class TrackingError(ValueError):
    """The MLflow tracking URI is unusable (unreachable server, unwritable file)."""


class TrackingUnavailable(TrackingError):
    """MLflow stayed unreachable (or kept failing) for the whole retry budget."""


def tracking_failure(exc: BaseException | None) -> TrackingError | None:
    """The ``TrackingError`` behind ``exc``, if any: itself, or one in its ``__cause__`` /
    ``__context__`` chain. Ray Tune turns an exception raised in a callback into a
    ``TuneError`` whose text is the traceback and whose ``__context__`` is the original."""
    for link in _chain(exc):
        if isinstance(link, TrackingError):
            return link
    return None


def retry_budget() -> float:
    """Seconds a failing MLflow call is retried: ``ROBUST_SWEEPS_MLFLOW_RETRY_S`` or 180."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise TrackingError(f"{RETRY_ENV}={raw!r}: not a number of seconds (0 or more)")
    return value


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# MLflow error codes that say "not now" rather than "no" (TEMPORARILY_UNAVAILABLE is also what
# the SQL stores raise for a locked or unreachable database)
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED",
                    "DEADLINE_EXCEEDED"}


def _network_errors() -> tuple[type, ...]:
    import http.client

    import requests
    import urllib3

    return (ConnectionError, TimeoutError, http.client.HTTPException,
            requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.RetryError, requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.MaxRetryError, urllib3.exceptions.ProtocolError,
            urllib3.exceptions.TimeoutError, urllib3.exceptions.NewConnectionError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means that the tracking server is unreachable or failing (worth trying
    again): a connection error or timeout anywhere in its chain, HTTP 5xx or 429, or an MLflow
    error code for "temporarily unavailable". A 4xx answer (the request itself is wrong: the
    run exists, a bad parameter) is not, nor a TLS certificate error."""
    import requests

    network = _network_errors()
    for link in _chain(exc):
        if isinstance(link, requests.exceptions.SSLError):
            return False
        if isinstance(link, network):
            return True
        if isinstance(link, MlflowException):
            if link.error_code in _TRANSIENT_CODES:  # its name, e.g. "TEMPORARILY_UNAVAILABLE"
                return True
            status = link.get_http_status_code()
            if isinstance(link, RestException) and (status == 429 or status >= 500):
                return True  # the server answered that it is failing
            if "failed with error code" in str(link):  # a non-JSON answer (a proxy's 502)
                import re

                found = re.search(r"failed with error code (\d{3})", str(link))
                if found and (int(found.group(1)) in (408, 429) or int(found.group(1)) >= 500):
                    return True
    return False


def _reason(exc: BaseException) -> str:
    """A short, redacted line for the innermost error of ``exc``'s chain."""
    links = [link for link in _chain(exc) if str(link).strip()]
    link = links[-1] if links else exc
    text = str(link).strip().splitlines()[0] if str(link).strip() else ""
    return redact(f"{type(link).__name__}: {text}"[:200])


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class TrackingClient:
    """An ``MlflowClient`` whose calls are retried while the tracking server is unreachable.

    Any ``MlflowClient`` method is proxied; a call that fails with a transient error
    (``is_transient``) is tried again with exponential backoff and jitter until ``budget_s``
    seconds have passed since it started, then ``TrackingUnavailable`` is raised (one line:
    the URI and how long it was unreachable). An outage is logged once when it starts and once
    when it ends, not per attempt. Retried calls must be idempotent: ``create_once`` looks the
    object up before creating it again, ``log_metric`` keeps its first timestamp (MLflow
    dedups a metric with the same key, value, step and timestamp), and the tracking callback
    logs metrics as ``Metric`` objects built once.
    """

    def __init__(self, uri: str, budget_s: float | None = None,
                 log: Callable[[str], None] | None = None, client: Any = None,
                 first_delay_s: float = 1.0, max_delay_s: float = 15.0,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.uri = uri
        self.budget_s = retry_budget() if budget_s is None else float(budget_s)
        self.raw = client if client is not None else MlflowClient(uri)
        self._log = log or _print_stderr
        self._first_delay_s, self._max_delay_s = first_delay_s, max_delay_s
        self._sleep, self._clock = sleep, clock
        self._down_since: float | None = None  # the start of the outage being ridden out

    def __getattr__(self, name: str) -> Any:
        if name == "raw" or name.startswith("__"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        attribute = getattr(self.raw, name)
        if not callable(attribute) or name.startswith("_"):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "log_metric" and len(args) < 4 and kwargs.get("timestamp") is None:
                kwargs["timestamp"] = int(time.time() * 1000)  # the same on every attempt
            return self.retrying(lambda raw: getattr(raw, name)(*args, **kwargs))

        call.__name__ = name
        return call

    def retrying(self, call: Callable[[Any], T],
                 find: Callable[[Any], T | None] | None = None) -> T:
        """``call(raw client)``, tried again while MLflow is unreachable. Before each new
        attempt ``find(raw client)`` is asked, if given: a result it returns is taken instead
        (what an attempt whose answer was lost already did)."""
        started = self._clock()
        attempt = 0
        while True:
            try:
                found = find(self.raw) if attempt and find is not None else None
                result = found if found is not None else call(self.raw)
            except Exception as exc:  # noqa: BLE001 - sorted by is_transient
                if not is_transient(exc):
                    raise
                now = self._clock()
                if self._down_since is None:
                    self._down_since = started
                    self._log(f"MLflow at {redact(self.uri)} unreachable ({_reason(exc)}); "
                              f"retrying for up to {self.budget_s:.0f} s")
                # one budget per outage, not per call: the calls of an outage share it
                left = self.budget_s - (now - self._down_since)
                if left <= 0:
                    down = now - self._down_since
                    self._down_since = None
                    raise TrackingUnavailable(
                        f"MLflow at {redact(self.uri)} unreachable for {down:.0f} s, longer "
                        f"than the {self.budget_s:.0f} s retry budget ({RETRY_ENV}); last "
                        f"error: {_reason(exc)}") from exc
                delay = min(self._max_delay_s, self._first_delay_s * 2 ** attempt)
                self._sleep(min(left, delay * random.uniform(0.5, 1.0)))
                attempt += 1
                continue
            if self._down_since is not None:
                self._log(f"MLflow at {redact(self.uri)} reachable again after "
                          f"{self._clock() - self._down_since:.0f} s")
                self._down_since = None
            return result


def tracking_client(uri: str, **options: Any) -> TrackingClient:
    """The MLflow client every part of a sweep uses (see ``TrackingClient``)."""
    create_sqlite_store(uri)
    return TrackingClient(uri, **options)


def _sqlite_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    from urllib.parse import unquote

    return os.path.abspath(unquote(uri[len("sqlite:///"):].split("?", 1)[0]))


def create_sqlite_store(uri: str) -> None:
    """Create a SQLite tracking store that does not exist yet all at once.

    MLflow builds a new store's schema in dozens of migrations, each committed on its own; a
    sweep killed among them would leave a file that no later MLflow can open (the next run
    repeats a migration whose column exists: ``duplicate column name``). So the schema is built
    in a file beside it, and that file is linked into place only when complete (a link fails
    rather than replacing a store that another sweep created meanwhile). A kill before the link
    leaves only the side file, which the next start removes.
    """
    path = _sqlite_path(uri)
    if path is None or os.path.exists(path):
        return
    folder, base = os.path.split(path)
    for stale in os.listdir(folder):  # side files of starts that were killed
        if stale.startswith(f".{base}.creating-"):
            pid = stale[len(f".{base}.creating-"):].split("-", 1)[0]
            if not pid.isdigit() or not _alive(int(pid)):
                _remove(os.path.join(folder, stale))
    side = os.path.join(folder, f".{base}.creating-{os.getpid()}")
    _remove(side)
    try:
        # the first call builds the store (every migration), committed before it returns
        MlflowClient(f"sqlite:///{side}").search_experiments(max_results=1)
        try:
            os.link(side, path)
        except FileExistsError:
            pass  # another sweep created it first: theirs is used
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            _remove(side + suffix)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _create_once(client: Any, create: Callable[[Any], T], find: Callable[[Any], T | None]) -> T:
    if isinstance(client, TrackingClient):
        return client.retrying(create, find=find)
    return create(client)


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before any Ray work, on a tracking URI that cannot be used (and on a retry
    budget that is not a number)."""
    retry_budget()
    if uri.startswith(("http://", "https://")):
        # one quick request through MLflow's own HTTP layer (its credentials: token, user and
        # password, certificates), with its retries off for this call only: MLflow's client
        # would retry for minutes, and its retry settings are process-wide variables
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(get_default_host_creds(uri),
                                    "/api/2.0/mlflow/experiments/search", "GET",
                                    max_retries=0, timeout=10, raise_on_status=False,
                                    params={"max_results": 1})
        except Exception as exc:  # noqa: BLE001 - any failure to connect is "unreachable"
            reason = _reason(exc)
            raise TrackingError(f"--mlflow-uri {redact(uri)}: unreachable ({reason})") from None
        if response.status_code != 200:
            raise TrackingError(f"--mlflow-uri {redact(uri)}: the server answered HTTP "
                                f"{response.status_code} ({response.reason}); check the URI "
                                "and its credentials") from None
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise TrackingError(f"--mlflow-uri {uri}: folder {folder} is missing or unwritable")

def ensure_experiment(client: MlflowClient | TrackingClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def find(raw) -> str | None:
        found = raw.get_experiment_by_name(name)
        return found.experiment_id if found is not None else None

    return _create_once(client, lambda raw: raw.create_experiment(name), find)


def _parent_run(client, experiment_id: str, sweep: str):
    for run in client.search_runs([experiment_id], filter_string=f"tags.sweep = '{sweep}'"):
        if "mlflow.parentRunId" not in run.data.tags:
            return run
    return None


def ensure_parent_run(client: MlflowClient | TrackingClient, experiment_id: str, sweep: str,
                      params: dict[str, str], tags: dict[str, str]) -> str:
    """The sweep's parent run: found by its ``sweep`` tag, created once."""
    run = _parent_run(client, experiment_id, sweep)
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def find(raw) -> str | None:
        found = _parent_run(raw, experiment_id, sweep)
        return found.info.run_id if found is not None else None

    run_id = _create_once(client, lambda raw: raw.create_run(
        experiment_id, run_name=sweep, tags={"sweep": sweep, **tags}).info.run_id, find)
    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    return run_id
