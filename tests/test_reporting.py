"""What counts as a failed trial, and the console's progress lines."""

import math
from types import SimpleNamespace

from orchestrator.progress import ConsoleProgress, ProgressLine, format_seconds
from orchestrator.reporting import _failure


def test_a_trial_fails_only_when_it_raised_or_a_required_metric_is_missing_or_nan():
    required = ["hypervolume"]
    assert _failure(None, {"hypervolume": 0.7, "accuracy_projected": math.nan}, required) is None
    assert _failure(None, {}, required) == "did not report hypervolume"
    assert _failure(None, {"hypervolume": math.nan}, required) == "reported hypervolume = NaN"
    error = RuntimeError("Traceback ...\n  File x\nValueError: k=50 exceeds the space's 40 samples")
    assert _failure(error, {"hypervolume": 0.7}, required) == (
        "raised RuntimeError: ValueError: k=50 exceeds the space's 40 samples")


def test_progress_lines_say_rate_and_time_left():
    lines = []
    progress = ProgressLine("PCA at stem", 1000, "samples", lines.append, every=0.0)
    progress(250)
    progress(1000)  # the end is said by the stage's "done" line, not here
    assert len(lines) == 1 and lines[0].startswith("PCA at stem: 250/1,000 samples, ")
    assert "/s, about " in lines[0] and lines[0].endswith(" left")
    assert format_seconds(75) == "1:15" and format_seconds(3725) == "1:02:05"


def test_a_console_saved_by_an_earlier_version_resumes():
    """Tune restores its callbacks from the saved experiment: a ConsoleProgress pickled when its
    flag was called ``lesci`` still knows whether trials report surfaces."""
    import pickle

    console = ConsoleProgress("s", total=1, concurrent=1, optimize={"a": "max"}, surface=True,
                              storage_uri="/nowhere", coordinator=None, log=print)
    state = dict(console.__dict__)
    state["lesci"] = state.pop("surface")
    old = ConsoleProgress.__new__(ConsoleProgress)
    old.__setstate__(state)
    assert old.surface is True and not hasattr(old, "lesci")
    assert pickle.loads(pickle.dumps(console)).surface is True


def test_status_line_counts_the_ending_trial_and_estimates_time_left():
    lines = []
    console = ConsoleProgress("s", total=4, concurrent=2, optimize={"a": "max", "b": "max"},
                              surface=False, storage_uri="/nowhere", coordinator=None,
                              log=lines.append)
    console.setup()
    done = SimpleNamespace(trial_id="t1", status="TERMINATED",
                           last_result={"a": 0.5, "b": 0.5, "time_total_s": 10.0})
    ending = SimpleNamespace(trial_id="t2", status="RUNNING",
                             last_result={"a": 1.0, "b": 0.25, "time_total_s": 10.0})
    running = SimpleNamespace(trial_id="t3", status="RUNNING", last_result={})
    pending = SimpleNamespace(trial_id="t4", status="PENDING", last_result={})
    console._record(done, done.last_result)
    console.on_trial_complete(0, [done, ending, running, pending], ending)
    assert len(lines) == 1
    line = lines[0]
    assert "trials: 2 done, 1 running, 0 failed, of 4" in line
    # one waiting and half of one running, at 10 s each, over two slots
    assert "about 0:08 left" in line
    assert "front hypervolume 0.3750" in line  # (0.5, 0.5) and (1, 0.25): 0.25 + 0.125
    # a trial resting at a rung (promotion) is counted as paused
    pending.status = "PAUSED"
    console.on_trial_complete(0, [done, ending, running, pending], running)
    assert "trials: 2 done, 1 running, 1 paused, 0 failed, of 4" in lines[-1]


def _front_result(tested: bool):
    from orchestrator.reporting import SweepResult

    row = {"trial_id": "t1", "depth": "stem", "k": 3, "min_votes": 3, "threshold": 1.0,
           "accuracy": 0.9806, "accuracy_ci_low": 0.961, "accuracy_ci_high": 0.990,
           "projection_rate": 0.9417, "projection_rate_ci_low": 0.913,
           "projection_rate_ci_high": 0.961}
    if tested:
        row.update({"test_accuracy": 0.975, "test_accuracy_ci_low": 0.952,
                    "test_accuracy_ci_high": 0.987, "test_projection_rate": 0.95,
                    "test_projection_rate_ci_low": 0.921, "test_projection_rate_ci_high": 0.968})
    return SweepResult("s", [row], [row], 0.9, 0, "1", "p", tested=tested,
                       selection_gap={"accuracy": (0.0056, 0.0056),
                                      "projection_rate": (-0.0083, -0.0083)} if tested else {},
                       base={"base_accuracy": 0.975, "base_accuracy_ci_low": 0.95,
                             "base_accuracy_ci_high": 0.99})


def test_the_console_front_shows_val_and_test_figures_with_their_intervals(tmp_path):
    from orchestrator.cli import format_front
    from orchestrator.loading import load_space

    spec = load_space("demo", check_model=False).model_copy(
        update={"optimize": {"accuracy": "max", "projection_rate": "max"}})
    lines = format_front(_front_result(True), spec).splitlines()
    assert "split" in lines[0] and "accuracy" in lines[0]
    assert lines[1].split()[:5] == ["stem", "3", "3", "1.0000", "val"]
    assert "0.981 (0.96-0.99)" in lines[1] and "0.942 (0.91-0.96)" in lines[1]
    assert lines[2].split()[0] == "test" and "0.975 (0.95-0.99)" in lines[2]
    assert any(line.startswith("the bare model (val): accuracy 0.975") for line in lines)
    assert any("selection gap" in line and "accuracy +0.006" in line for line in lines)
    assert not any("--no-test" in line for line in lines)
    untested = format_front(_front_result(False), spec)
    assert "--no-test" in untested and "test" not in untested.splitlines()[2:3]
    assert "selection gap" not in untested


def test_a_grid_of_objectives_reads_each_objectives_own_front_on_test(tmp_path):
    """The overall front can hold one objective only; each compared objective's own front is
    what the test split reads beside it, and the console shows each."""
    from orchestrator.cli import format_front
    from orchestrator.loading import load_space
    from orchestrator.reporting import SweepResult, objective_fronts

    spec = load_space("crown_ibp_mnist5k", check_model=False)
    figures = {"ibp": [(0.88, 0.95), (0.86, 0.97), (0.85, 0.96)],
               "crown_ibp": [(0.89, 0.95)], "fast_ibp": [(0.93, 0.96), (0.90, 0.97)]}
    rows = [{"trial_id": f"{name}{i}", "objective": name, "verified_accuracy": v,
             "nominal_accuracy": n} for name, points in figures.items()
            for i, (v, n) in enumerate(points)]
    fronts = objective_fronts(spec, rows)
    assert {name: sorted(r["trial_id"] for r in front) for name, front in fronts.items()} == {
        "ibp": ["ibp0", "ibp1"], "crown_ibp": ["crown_ibp0"], "fast_ibp": ["fast_ibp0",
                                                                           "fast_ibp1"]}
    assert [r["objective_front"] for r in rows] == [True, True, False, True, True, True]
    # one objective only, or objectives sampled (not a grid): no such fronts
    assert objective_fronts(load_space("ibp_mnist5k", check_model=False), rows) == {}
    front = [r for r in rows if r["trial_id"] in ("fast_ibp0", "fast_ibp1")]
    for row in rows:
        row.update(test_verified_accuracy=row["verified_accuracy"] - 0.01,
                   test_nominal_accuracy=row["nominal_accuracy"])
    text = format_front(SweepResult("s", rows, front, 0.9, 0, "1", "p", tested=True,
                                    objective_fronts=fronts), spec)
    assert "objective ibp: its own front, 2 of 3 trials" in text
    assert "objective crown_ibp: its own front, 1 of 1 trials" in text
    assert text.count("test ") >= len(front) + 5  # every front row and objective-front row


def test_a_front_model_is_logged_once_loadable_and_without_touching_mlflow_globals(tmp_path,
                                                                                    monkeypatch):
    import io
    import os

    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    from orchestrator.reporting import log_front_artifacts

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(experiment).info.run_id
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    lines = []
    before = mlflow.get_tracking_uri()
    artifacts = {"model": buffer.getvalue(), "verification.npz": b"npz bytes",
                 "model_seed1": b"not a pickle"}
    log_front_artifacts(client, run_id, artifacts, lines.append)
    log_front_artifacts(client, run_id, artifacts, lines.append)  # a resumed sweep: nothing new
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.active_run() is None
    names = sorted(a.path for a in client.list_artifacts(run_id))
    assert names == ["model", "verification.npz"]  # the broken pickle: one line, no artifact
    assert len(lines) == 1 and "model_seed1 not logged" in lines[0]
    assert client.get_run(run_id).data.tags["model_logged"] == "true"
    assert client.get_run(run_id).info.status == "RUNNING"  # the trial's run is left as it was
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(before)
    x = torch.rand(4, 3)
    assert torch.equal(loaded(x), model(x))
