"""scikit-learn's own IncrementalPCA tests, run against StreamingPCA, once per backend.

Nothing is copied: each run is a fresh pytest on the installed
``sklearn/decomposition/tests/test_incremental_pca.py`` (with scikit-learn's conftest for its
fixtures), whose module global ``IncrementalPCA`` is rebound to an adapter: ``StreamingPCA``
with ``IncrementalPCA``'s constructor, the backend fixed and ``hold_first_batch=False`` (a first
batch smaller than ``n_components`` raises, as in scikit-learn). This file is also that run's
plugin (``-p tests.test_sklearn_ipca``); the counts are printed in the terminal summary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE = "sklearn.decomposition.tests.test_incremental_pca"
BACKENDS = {"torch": "float64", "sklearn": None}  # backend -> dtype of the adapter
# Tests of the module that cannot apply, with the reason (docs/tests.md lists them). None today:
# fit and transform accept sparse input (densified batch by batch, as scikit-learn does).
NOT_APPLICABLE: dict[str, str] = {}
_ENV_BACKEND, _ENV_REPORT = "STREAMING_PCA_SKLEARN_BACKEND", "STREAMING_PCA_SKLEARN_REPORT"


# ----------------------------------------------------------------------------------------
# the plugin side, active only in the child pytest (the environment names the backend)


def _adapter(backend: str, dtype: str | None):
    import torch

    from defenses.pca import StreamingPCA

    fixed = {"backend": backend, "dtype": getattr(torch, dtype) if dtype else None,
             "hold_first_batch": False}

    class IncrementalPCA(StreamingPCA):  # the name scikit-learn's tests expect in messages
        def __init__(self, n_components=None, *, whiten=False, copy=True, batch_size=None):
            _constructed.append(type(self).__name__)
            super().__init__(n_components, whiten=whiten, copy=copy, batch_size=batch_size,
                             **fixed)

    return IncrementalPCA


def pytest_collection_modifyitems(config, items):
    backend = os.environ.get(_ENV_BACKEND)
    if backend is None:
        return
    adapter = _adapter(backend, BACKENDS[backend])
    kept = []
    for item in items:
        item.module.IncrementalPCA = adapter
        if item.originalname in NOT_APPLICABLE:
            item.add_marker(pytest.mark.skip(reason=NOT_APPLICABLE[item.originalname]))
        kept.append(item)
    items[:] = kept


_outcomes: dict[str, str] = {}
_constructed: list[str] = []  # adapters built: proof the tests ran against StreamingPCA


def pytest_runtest_logreport(report):
    if os.environ.get(_ENV_BACKEND) is None:
        return
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped:
        _outcomes.setdefault(report.nodeid, "skipped")
    elif report.when == "call":
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(_ENV_REPORT)
    if os.environ.get(_ENV_BACKEND) is not None and path:
        Path(path).write_text(json.dumps({"outcomes": _outcomes, "constructed": len(_constructed),
                                          "collected": session.testscollected}))


# ----------------------------------------------------------------------------------------
# the test side


class _Summary:
    """Prints each backend's counts in the terminal summary of the outer pytest."""

    def __init__(self):
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.section("scikit-learn's test_incremental_pca.py against StreamingPCA")
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def summary(request):
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "streaming-pca-sklearn-summary")
    return plugin


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sklearn_incremental_pca_module_passes(backend, summary, tmp_path):
    import sklearn

    origin = importlib.util.find_spec(MODULE).origin
    report = tmp_path / "report.json"
    env = dict(os.environ, **{_ENV_BACKEND: backend, _ENV_REPORT: str(report)},
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("SKLEARN_TESTS_GLOBAL_RANDOM_SEED", None)  # scikit-learn's default seed, 42
    # torch's OpenMP threads spin-wait between calls and starve OpenBLAS's on a small machine
    # (scikit-learn's PCA in the same tests ran 15x slower); passive waiting changes no result
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ini = tmp_path / "pytest.ini"  # none of this project's pytest settings in that run
    ini.write_text("[pytest]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", origin, "-q", "-c", str(ini), "-p", "no:cacheprovider",
         "-p", "tests.test_sklearn_ipca"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), f"the child pytest wrote no report:\n{proc.stdout[-4000:]}" \
                            f"{proc.stderr[-4000:]}"
    result = json.loads(report.read_text())
    outcomes = result["outcomes"]
    assert result["constructed"] > 50, "the tests did not build the StreamingPCA adapter"
    counts = {kind: sum(1 for o in outcomes.values() if o == kind)
              for kind in ("passed", "skipped", "failed")}
    dtype = BACKENDS[backend] or "the input's dtype"
    summary.lines.append(f"backend={backend} ({dtype}), scikit-learn {sklearn.__version__}: "
                         f"{counts['passed']} passed, {counts['skipped']} skipped, "
                         f"{counts['failed']} failed")
    failed = sorted(node for node, outcome in outcomes.items() if outcome == "failed")
    assert not failed, f"{len(failed)} failed: {failed}\n{proc.stdout[-6000:]}"
    skipped = {node.split("::")[1].split("[")[0]
               for node, outcome in outcomes.items() if outcome == "skipped"}
    assert skipped == set(NOT_APPLICABLE), f"skipped {skipped}, documented {NOT_APPLICABLE}"
    assert counts["passed"] >= 20 and proc.returncode == 0, proc.stdout[-4000:]
