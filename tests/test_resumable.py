"""A restored sweep's searcher agrees with the restored trial table (orchestrator.resumable).

Tune uploads its trial table and its searcher's state as separate files; a driver killed
between the two leaves the table of one save beside the searcher's state of another. Here the
controller is played by hand: trials asked for, ended, the two files saved at different
moments and restored together, as ``Tuner.restore`` reads them.
"""

import json
import textwrap

import pytest
from ray import tune
from ray.tune.experiment import Experiment, Trial
from ray.tune.search import BasicVariantGenerator
from ray.tune.utils.serialization import TuneFunctionEncoder

from orchestrator.loading import load_space
from orchestrator.resumable import ResumableSearch, ResumableVariants, saved_trials
from orchestrator.searchers import tune_config

SESSION = "2026-01-01_00-00-00"


def _noop(config):
    return None


def _experiment(tmp_path, config, num_samples=1) -> Experiment:
    return Experiment("t", _noop, config=config, num_samples=num_samples,
                      storage_path=str(tmp_path / "storage"))


def _save_table(folder, trials: list[Trial]) -> None:
    """The trial table as TuneController.save_to_dir writes it."""
    state = {"trial_data": [trial.get_json_state() for trial in trials], "runner_data": {},
             "stats": {}}
    (folder / f"experiment_state-{SESSION}.json").write_text(
        json.dumps(state, cls=TuneFunctionEncoder))


def _end(search, trial: Trial, result=None) -> None:
    """What the controller does when a trial ends: the searcher first, then the status."""
    search.on_trial_complete(trial.trial_id, result=result)
    if result:
        trial.update_last_result(result)
    trial.set_status(Trial.TERMINATED)


def _ask_all(search) -> list[Trial]:
    trials = []
    while (trial := search.next_trial()) is not None:
        trials.append(trial)
    return trials


def _grid(tmp_path, cls):
    search = cls(max_concurrent=2)
    search.add_configurations(_experiment(tmp_path, {"i": tune.grid_search(list(range(6)))}))
    return search


def _torn(tmp_path, cls, table_ahead: bool):
    """A grid of 6, two at a time: 0 and 1 asked for (save A), ended, 2 and 3 asked for
    (save B); the restore folder holds the table of one save and the searcher of the other."""
    search = _grid(tmp_path, cls)
    save_a, save_b = tmp_path / "a", tmp_path / "b"
    save_a.mkdir(), save_b.mkdir()
    first = _ask_all(search)
    assert [t.config["i"] for t in first] == [0, 1]
    search.save_to_dir(str(save_a), SESSION)
    _save_table(save_a, first)
    for trial in first:
        _end(search, trial)
    second = _ask_all(search)
    assert [t.config["i"] for t in second] == [2, 3]
    search.save_to_dir(str(save_b), SESSION)
    _save_table(save_b, first + second)
    restore = tmp_path / "restore"
    restore.mkdir()
    table_from, searcher_from = (save_b, save_a) if table_ahead else (save_a, save_b)
    (restore / f"experiment_state-{SESSION}.json").write_bytes(
        (table_from / f"experiment_state-{SESSION}.json").read_bytes())
    name = BasicVariantGenerator.CKPT_FILE_TMPL.format(SESSION)
    (restore / name).write_bytes((searcher_from / name).read_bytes())
    return restore


def _resume_grid(restored, table) -> list[int]:
    """Tune's resume: the trials the table shows unfinished run and end; then the searcher
    hands out the rest, two at a time. The grid points of the trials it hands out."""
    for row in table:
        if row.live:
            restored.on_trial_complete(row.trial_id)
    handed = []
    while not restored.is_finished():
        batch = _ask_all(restored)
        if not batch:
            break  # nothing handed out and nothing running: Tune would wait forever
        handed += batch
        for trial in batch:
            _end(restored, trial)
    return [t.config["i"] for t in handed]


@pytest.mark.parametrize("table_ahead", [True, False])
def test_a_torn_grid_state_resumes_every_remaining_trial_once(tmp_path, table_ahead):
    restore = _torn(tmp_path, ResumableVariants, table_ahead)
    table = saved_trials(str(restore))
    assert len(table) == (4 if table_ahead else 2)
    restored = ResumableVariants(max_concurrent=2)
    restored.restore_from_dir(str(restore))
    assert restored._live_trials == {row.trial_id for row in table if row.live}
    ran = [row.config["i"] for row in table]
    assert _resume_grid(restored, table) == [i for i in range(6) if i not in ran]
    assert restored.is_finished()


@pytest.mark.parametrize("table_ahead", [True, False])
def test_tunes_own_grid_search_stalls_on_a_torn_state(tmp_path, table_ahead):
    """What the fix is for: Tune's generator restored from the same folder still counts two
    trials live that the restored sweep never ends, and hands out nothing more."""
    restore = _torn(tmp_path, BasicVariantGenerator, table_ahead)
    restored = BasicVariantGenerator(max_concurrent=2)
    restored.restore_from_dir(str(restore))
    assert _resume_grid(restored, saved_trials(str(restore))) == []
    assert not restored.is_finished()


def test_saved_trials_reads_the_newest_table(tmp_path):
    search = _grid(tmp_path, ResumableVariants)
    trials = _ask_all(search)
    _end(search, trials[0], {"x": 1.0})
    _save_table(tmp_path, trials)
    older = tmp_path / "experiment_state-2025-01-01_00-00-00.json"
    older.write_text(json.dumps({"trial_data": []}))
    rows = saved_trials(str(tmp_path))
    assert [(r.trial_id, r.status, r.config) for r in rows] == [
        (trials[0].trial_id, "TERMINATED", {"i": 0}), (trials[1].trial_id, "PENDING", {"i": 1})]
    assert rows[0].last_result["x"] == 1.0 and not rows[0].live and rows[1].live
    assert saved_trials(str(tmp_path / "missing")) is None


TPE = textwrap.dedent("""
    name: t
    family: adversarial
    dataset: {name: digits}
    model: {name: ibp_small}
    training: {epochs: 3, lr: 0.01}
    params:
      objective: {choice: {pgd: {eps: 0.1, alpha: 0.02, steps: {choice: [2, 4, 8]}}}}
      lr: {uniform: [0.001, 0.1]}
    attack: {eps: 0.1}
    optimize: {nominal_accuracy: max, pgd_accuracy: max}
    search: {algorithm: tpe, num_samples: 6, max_concurrent: 2, seed: 1}
""")


def _optuna(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "space.yaml"
    path.write_text(TPE)
    spec = load_space(path, check_model=False)
    search = tune_config(spec).search_alg
    search.add_configurations(_experiment(tmp_path, {}, num_samples=6))
    metrics, _ = spec.search_metrics
    return search, metrics


def _result(metrics, config: dict) -> dict:
    return {m: config["lr"] for m in metrics}


@pytest.mark.parametrize("table_ahead", [True, False])
def test_a_torn_optuna_state_resumes_and_tells_optuna_every_trial(tmp_path, table_ahead):
    search, metrics = _optuna(tmp_path)
    save_a, save_b, restore = tmp_path / "a", tmp_path / "b", tmp_path / "restore"
    for folder in (save_a, save_b, restore):
        folder.mkdir()
    first = _ask_all(search)
    assert len(first) == 2  # the concurrency limit
    search.save_to_dir(str(save_a), SESSION)
    _save_table(save_a, first)
    for trial in first:
        _end(search, trial, _result(metrics, trial.config))
    second = _ask_all(search)
    assert len(second) == 2
    search.save_to_dir(str(save_b), SESSION)
    _save_table(save_b, first + second)
    table_from, searcher_from = (save_b, save_a) if table_ahead else (save_a, save_b)
    for path in searcher_from.iterdir():
        if not path.name.startswith("experiment_state"):
            (restore / path.name).write_bytes(path.read_bytes())
    (restore / f"experiment_state-{SESSION}.json").write_bytes(
        (table_from / f"experiment_state-{SESSION}.json").read_bytes())
    table = saved_trials(str(restore))
    assert len(table) == (4 if table_ahead else 2)

    restored, _ = _optuna(tmp_path / "fresh")
    restored.restore_from_dir(str(restore))
    assert isinstance(restored, ResumableSearch)
    for row in table:
        if row.live:
            restored.on_trial_complete(row.trial_id, result=_result(metrics, row.config))
    handed = []
    while not restored.is_finished():
        batch = _ask_all(restored)
        assert batch, "the restored searcher hands out nothing more"
        handed += batch
        for trial in batch:
            _end(restored, trial, _result(metrics, trial.config))
    assert len(table) + len(handed) == 6  # num_samples trials in all, none lost
    optuna_search = restored.searcher.searcher
    study = optuna_search._ot_study
    ran = {row.trial_id: row.config for row in table}
    ran.update({t.trial_id: t.config for t in handed})
    for trial_id, config in ran.items():  # Optuna knows each trial run, with its values
        ot_trial = optuna_search._ot_trials[trial_id]
        frozen = study.trials[ot_trial.number]
        assert frozen.state.name == "COMPLETE"
        assert frozen.params["lr"] == config["lr"]
        assert frozen.values == [config["lr"]] * len(metrics)
    # the trials the table lacks never run under their ids: failed, not left running
    assert not any(t.state.name == "RUNNING" for t in study.trials)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 6


def test_a_sweep_without_a_saved_table_restores_as_tune_does(tmp_path):
    search = _grid(tmp_path, ResumableVariants)
    _ask_all(search)
    search.save_to_dir(str(tmp_path), SESSION)
    restored = ResumableVariants(max_concurrent=2)
    restored.restore_from_dir(str(tmp_path))
    assert restored._live_trials == search._live_trials
