"""Sweeps end to end: the real CLI in a subprocess, local Ray, an MLflow SQLite store, local or
S3-compatible storage (moto_server on 127.0.0.1)."""

import textwrap

import pytest

from orchestrator.loading import load_space, shipped_spaces
from orchestrator.storage import Storage
from tests.integration.conftest import (LESCI_GRID, check_tracked, cli, computed_stages,
                                        front_trials, kill_tree, poll_sweep, read_csv_artifact,
                                        run_ok, runs_of, sweep_args)


# the demo's sweep runs by default (python -m pytest: one real sweep end to end in 20 s); every
# shipped space runs with --long (CI: in the virtualenv of the newest releases)
@pytest.mark.parametrize("space", [pytest.param(s, marks=pytest.mark.quick) if s == "demo"
                                   else s for s in sorted(shipped_spaces())])
def test_smoke_sweep_of_each_shipped_space(tmp_path, space):
    spec = load_space(space, smoke_test=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = cli(["--space", space, "--smoke-test", "--name", "smoke", "--storage",
                str(tmp_path / "sweeps"), "--mlflow-uri", uri], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Pareto front of" in done.stdout
    assert f"{spec.trial_count} trial(s)" in done.stdout
    client, parent, children = check_tracked(uri, "smoke", spec.family, spec.trial_count)
    if spec.family != "lesci":  # training trials log one step per epoch
        for child in children:
            history = client.get_metric_history(child.info.run_id, spec.metric_names[0])
            stopped = child.data.tags.get("stopped_early") == "true"  # by the scheduler
            epochs = int(child.data.metrics["budget_used"]) if stopped else spec.training.epochs
            assert [m.step for m in history] == list(range(1, epochs + 1))
            assert not (stopped and child.data.tags["pareto_optimal"] == "true")
        if spec.scheduler.name == "mo_asha":
            assert 0 < parent.data.metrics["compute_fraction"] <= 1
    objectives = spec.objective_space()
    if objectives is not None and objectives.kind == "grid" and len(objectives.branches) > 1:
        # a comparison: num_samples trials of each objective, each one's own front on test
        rows = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
        assert sorted(r["objective"] for r in rows) == sorted(
            objectives.names * spec.search.num_samples)
        for name in objectives.names:
            mine = [r for r in rows if r["objective"] == name and r["objective_front"] == "True"]
            assert mine and all(r[f"test_{spec.metric_names[0]}"] != "" for r in mine), name
            assert f"objective {name}: its own front" in done.stdout
        if spec.family == "ibp":  # the recipes side by side, each final model verified again
            from benchmarks.recipe_comparison import main as compare

            assert compare(["--name", "smoke", "--mlflow-uri", uri, "--min-nominal", "0",
                            "--storage", str(tmp_path / "sweeps" / "smoke")]) == 0


def test_lesci_grid_fits_pca_and_builds_embedding_space_once(tmp_path):
    args, uri = sweep_args(tmp_path, LESCI_GRID, "g")
    run_ok(args, tmp_path)
    client, parent, _ = check_tracked(uri, "g", "lesci", 6)
    front = front_trials(client, parent)
    # six trials, two at a time: one base model, one PCA, one embedding space, the bare
    # model's attacks once on val and once on test, and each front trial once on test
    assert computed_stages(Storage.from_uri(tmp_path / "sweeps" / "g")) == {
        "base": 1, "pca": 1, "space": 1, "transfer": 2, "test": len(front)}


def test_repeats_run_each_configuration_with_each_seed(tmp_path):
    """search.repeats: 2 seeds per configuration, so two base models (and their stages), each
    figure the mean of the two with its spread across them, on val and on test."""
    space = LESCI_GRID.replace("embedding_size: {grid: [100, 200, 300, 400, 500, 600]}",
                               "embedding_size: {grid: [200, 400]}").replace(
        "search: {algorithm: grid, max_concurrent: 2}",
        "search: {algorithm: grid, max_concurrent: 2, repeats: 2}")
    args, uri = sweep_args(tmp_path, space, "rep")
    done = run_ok(args, tmp_path)
    assert "mean over 2 seeds" in done.stdout and " sd " in done.stdout
    client, parent, children = check_tracked(uri, "rep", "lesci", 2)
    stages = computed_stages(Storage.from_uri(tmp_path / "sweeps" / "rep"))
    assert stages["base"] == 2 and stages["pca"] == 2 and stages["transfer"] == 4  # val, test
    for child in children:
        assert {"accuracy_seed_std", "accuracy_ci_low", "robust_accuracy_seed_std"} <= set(
            child.data.metrics)
    rows = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
    assert all(float(r["accuracy_seed_std"]) >= 0 for r in rows)
    assert any(float(r["accuracy_seed_std"]) > 0 for r in rows)  # the seeds differ
    assert all(r["test_accuracy_seed_std"] != "" for r in rows if r["pareto_optimal"] == "True")


def test_resume_after_the_driver_is_killed(tmp_path):
    space = LESCI_GRID.replace("max_concurrent: 2", "max_concurrent: 1")
    args, uri = sweep_args(tmp_path, space, "r")
    driver = cli(args, tmp_path, start_new_session=True)
    assert poll_sweep(driver, uri, "r", lambda client, children: sum(
        c.info.status == "FINISHED" for c in children) >= 2), "the sweep ended too soon"
    kill_tree(driver)  # as when the head machine dies
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
        params = child.data.params
        assert {"depth", "n_components", "embedding_size", "center"} <= set(params)
        assert not {"k", "threshold", "min_votes"} & set(params)
        assert 50 <= int(params["embedding_size"]) <= 600 and params["center"] in ("True", "False")
        assert params["epochs"] == "2" and params["batch_size"] == "128"  # what it trained with
        assert child.info.run_name.startswith("lesci center=")  # named by what was drawn
        assert child.data.metrics["surface_points"] == 5
    front = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
    assert len(front) == 15 and parent.data.metrics["surface_points"] == 15


def test_training_sweep_optimizes_the_suites_worst_case(tmp_path):
    """A training sweep may optimize robust_accuracy, measured once after the last epoch:
    every trial reports it and each attack's figure then, the front is taken on it, and the
    parent run says which attacks ran at what budget."""
    space = textwrap.dedent("""
        name: suite
        family: adversarial
        dataset: {name: digits}
        model: {name: ibp_small, options: {padding: same}}
        training: {epochs: 2, batch_size: 64}
        params:
          objective: {choice: {pgd: {eps: 0.1, steps: 2}, fgsm: {eps: 0.1}}}
        attack: {eps: 0.1, steps: 5, suite: {apgd_steps: 10, targets: 2, square_queries: 50}}
        optimize: {robust_accuracy: max, nominal_accuracy: max}
        search: {algorithm: tpe, num_samples: 3, max_concurrent: 2}
    """)
    args, uri = sweep_args(tmp_path, space, "suite")
    run_ok(args, tmp_path)
    client, parent, children = check_tracked(uri, "suite", "adversarial", 3)
    for child in children:
        for name in ("robust_accuracy", "apgd_ce_accuracy", "apgd_t_accuracy",
                     "square_accuracy"):  # once, with the last epoch
            history = client.get_metric_history(child.info.run_id, name)
            assert [m.step for m in history] == [2], name
        # PGD every epoch (at the last, the suite's own PGD run: one run, not two)
        assert [m.step for m in client.get_metric_history(child.info.run_id,
                                                           "pgd_accuracy")] == [1, 2]
    params = parent.data.params
    assert params["attack.apgd_t"] == "2 targets x 10 steps x 2"
    assert params["attack.square"] == "50 queries x 1" and params["attack.pgd"] == "5 steps x 1"
    front = read_csv_artifact(client, parent.info.run_id, "pareto_front.csv")
    assert len(front) == 3 and all(0 <= float(r["robust_accuracy"]) <= 1 for r in front)
    # TPE on robust_accuracy alone: Optuna's searcher skips the epochs that lack it
    (tmp_path / "space.yaml").write_text(space.replace(
        "optimize: {robust_accuracy: max, nominal_accuracy: max}",
        "optimize: {robust_accuracy: max}").replace("name: suite", "name: single"))
    run_ok([*args[:3], "single", *args[4:]], tmp_path)
    check_tracked(uri, "single", "adversarial", 3)


MULTI_DEPTH = textwrap.dedent("""
    name: depths
    family: lesci
    dataset: {name: digits}
    model: {name: resnet_digits}
    training: {epochs: 2, batch_size: 128}
    params:
      depth: {grid: [stem, layer1, [stem, layer1]]}
      n_components: 8
      calibration: 0.25
      k: [3]
    attack: {eps: 0.1, steps: 2, apgd: {steps: 3, targets: 0}, samples: 40}
    optimize: {accuracy: max, projection_rate: max, robust_accuracy: max}
    search: {algorithm: grid, max_concurrent: 2}
""")


def test_a_vote_over_several_depths_reuses_each_depths_stages_and_is_calibrated(tmp_path):
    """depth [stem, layer1]: one vote over both depths, from the PCA and embedding space that
    the single-depth trials at stem and at layer1 use (computed once each); its surface has
    m = 1..6 of the 2*3 votes; the calibration split gives every point its credibility."""
    args, uri = sweep_args(tmp_path, MULTI_DEPTH, "d")
    run_ok(args, tmp_path)
    client, parent, children = check_tracked(uri, "d", "lesci", 3)
    front = front_trials(client, parent)
    stages = computed_stages(Storage.from_uri(tmp_path / "sweeps" / "d"))
    assert stages == {"base": 1, "pca": 2, "space": 2, "transfer": 2, "test": len(front)}
    by_depth = {c.data.params["depth"]: c for c in children}
    assert set(by_depth) == {"stem", "layer1", "stem+layer1"}
    train = 1797 - 2 * 360  # digits: val and test as large as sklearn's test split, 360 each
    for depth, child in by_depth.items():
        assert child.data.metrics["calibration_samples"] == round(0.25 * train)
        surface = read_csv_artifact(client, child.info.run_id, "surface.csv")
        votes = 6 if "+" in depth else 3
        assert [int(r["min_votes"]) for r in surface] == list(range(1, votes + 1))
        assert {int(r["votes"]) for r in surface} == {votes}
        credibility = [float(r["credibility"]) for r in surface]
        assert credibility == sorted(credibility) and credibility[-1] == 1.0
        assert all(0 <= c <= 1 for c in credibility)
        thresholds = [float(r["threshold"]) for r in surface]
        assert thresholds == [m / votes for m in range(1, votes + 1)]
