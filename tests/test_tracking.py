"""The MLflow callback: one child run per trial and each step logged once, also when the state
saved with the experiment is older than the runs (what a restore after a crash sees)."""

import pickle
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from orchestrator.space import load_space
from orchestrator.tracking import MLflowTracking, ensure_experiment, ensure_parent_run


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


def test_training_steps_follow_the_epoch(tmp_path):
    client, experiment, _, callback = make(tmp_path)
    trial = SimpleNamespace(trial_id="t2", config={"depth": "layer1"})
    callback.on_trial_start(0, [], trial)
    for epoch in (1, 2, 2, 3):  # epoch 2 re-reported after a retry from its checkpoint
        callback.on_trial_result(0, [], trial, {"accuracy": 0.5 + epoch / 10, "epoch": epoch,
                                                "training_iteration": 7})
    run_id = callback.run_id(trial)
    assert [m.step for m in client.get_metric_history(run_id, "accuracy")] == [1, 2, 3]
