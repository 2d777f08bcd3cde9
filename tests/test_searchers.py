"""How a space is searched: Tune's param_space (grid/random), Optuna's define-by-run space,
trial counting, and each trial's typed parameters resolved from its config."""

import pickle
import textwrap

import optuna
import pytest
import yaml
from ray import cloudpickle, tune
from ray.tune.search import ConcurrencyLimiter

from defenses.objectives import FGSMParams, PGDParams
from orchestrator.params import resolve
from orchestrator.resumable import ResumableSearch, ResumableVariants
from orchestrator.searchers import (DefineByRun, PicklableNSGAIISampler, param_space,
                                    sampler_of, tune_config)
from orchestrator.loading import load_space, shipped_spaces

CONDITIONAL = textwrap.dedent("""
    name: t
    family: adversarial
    dataset: {name: digits}
    model: {name: ibp_small}
    training: {epochs: 3, lr: 0.01}
    params:
      objective:
        choice:
          pgd: {eps: 0.1, alpha: 0.02, steps: {choice: [2, 4, 8]}}
          fgsm: {eps: 0.1, mix: {choice: [0.25, 0.75]}}
          standard: {}
      lr: {choice: [0.01, 0.1]}
    attack: {eps: 0.1}
    optimize: {nominal_accuracy: max, pgd_accuracy: max}
    search: {algorithm: tpe, num_samples: 5}
""")


def space(tmp_path, **updates):
    data = yaml.safe_load(CONDITIONAL)
    data.update(updates)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_space(path, check_model=False)


def test_grid_runs_each_objective_with_its_own_values_only(tmp_path):
    spec = space(tmp_path, search={"algorithm": "grid"})
    # (pgd x 3 steps + fgsm x 2 mixes + standard) x 2 learning rates, no cross products
    assert spec.trial_count == (3 + 2 + 1) * 2
    grid = param_space(spec)["objective"]["grid_search"]
    assert {"objective": "pgd", "steps": 8} in grid and {"objective": "standard"} in grid
    assert all("mix" not in g for g in grid if g["objective"] != "fgsm")
    assert len(grid) == 6
    trial = resolve(spec, {"objective": {"objective": "pgd", "steps": 4}, "lr": 0.1})
    assert trial.params == PGDParams(eps=0.1, alpha=0.02, steps=4)
    assert trial.training.lr == 0.1 and trial.training.epochs == 3


def test_random_search_draws_each_objectives_values_under_its_own_name(tmp_path):
    spec = space(tmp_path, search={"algorithm": "random", "num_samples": 7})
    assert spec.trial_count == 7
    domains = param_space(spec)
    assert isinstance(domains["objective"], tune.search.sample.Categorical)
    assert set(domains) == {"objective", "pgd.steps", "fgsm.mix", "lr"}
    trial = resolve(spec, {"objective": "fgsm", "pgd.steps": 2, "fgsm.mix": 0.75, "lr": 0.01})
    assert trial.params == FGSMParams(eps=0.1, mix=0.75)  # pgd.steps is not fgsm's


def test_random_search_over_an_objective_grid_runs_num_samples_of_each(tmp_path):
    """A comparison of objectives: Tune's own generator makes num_samples trials of each, each
    with its own draws of the shared and its own parameters."""
    from ray.tune.search.variant_generator import generate_variants

    spec = space(tmp_path, params={
        "objective": {"grid": {"pgd": {"eps": 0.1, "steps": {"choice": [2, 4, 8]}},
                               "fgsm": {"eps": 0.1}, "standard": {}}},
        "lr": {"loguniform": [0.001, 0.1]}}, search={"algorithm": "random", "num_samples": 4})
    assert spec.trial_count == 3 * 4
    domains = param_space(spec)
    assert sorted(domains["objective"]["grid_search"]) == ["fgsm", "pgd", "standard"]
    configs = [config for _ in range(spec.search.num_samples)
               for _, config in generate_variants(domains)]
    assert len(configs) == spec.trial_count
    assert sorted(c["objective"] for c in configs) == sorted(["pgd", "fgsm", "standard"] * 4)
    assert len({c["lr"] for c in configs}) == len(configs)  # drawn per trial
    trial = resolve(spec, next(c for c in configs if c["objective"] == "pgd"))
    assert isinstance(trial.params, PGDParams) and trial.params.steps in (2, 4, 8)


def test_optuna_draws_only_the_chosen_objectives_parameters(tmp_path):
    spec = space(tmp_path)
    assert param_space(spec) == {}  # Optuna draws everything; fixed values come from the spec
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        DefineByRun(spec)(trial)
        name = trial.params["objective"]
        seen.add(name)
        own = {k for k in trial.params if "." in k}
        assert own == {"pgd": {"pgd.steps"}, "fgsm": {"fgsm.mix"}, "standard": set()}[name]
        typed = resolve(spec, trial.params)
        assert typed.params.objective == name
        study.tell(trial, 0.5)
    assert seen == {"pgd", "fgsm", "standard"}


def test_logged_params_are_what_the_trial_used(tmp_path):
    spec = space(tmp_path)
    used = resolve(spec, {"objective": "pgd", "pgd.steps": 8, "lr": 0.1}).logged()
    assert used["objective"] == "pgd" and used["eps"] == 0.1 and used["steps"] == 8
    assert used["alpha"] == 0.02 and used["restarts"] == 1  # the objective's default, shown
    assert used["lr"] == 0.1 and used["epochs"] == 3 and used["augmentation.flip"] is False
    assert "mix" not in used  # fgsm's parameter
    assert spec.searched_names() == ["lr", "mix", "objective", "steps"]


@pytest.mark.parametrize("name, count", [("demo", 4), ("lesci", 12), ("ibp", 32),
                                         ("adversarial", 16), ("ibp_mnist_paper", 1),
                                         ("ibp_digits", 24), ("ibp_mnist5k", 8),
                                         ("crown_ibp_mnist5k", 9),
                                         ("crown_ibp_mnist5k_eps03", 9)])
def test_shipped_trial_counts(name, count):
    assert load_space(name, check_model=False).trial_count == count


def test_fixed_single_objective_takes_top_level_parameters(tmp_path):
    spec = space(tmp_path, params={"objective": "pgd", "eps": 0.1, "steps": 3})
    assert "standard" not in spec.params["objective"].branches
    assert spec.trial_count == 1 and spec.searched_names() == []
    assert resolve(spec, {}).params == PGDParams(eps=0.1, steps=3)


def _noop(config):
    return None


def _finish(searcher, trial_id: str, spec) -> dict:
    """Ask the searcher for a trial and report it finished with made-up values."""
    config = searcher.suggest(trial_id)
    assert config is not None
    metrics, _ = spec.search_metrics
    searcher.on_trial_complete(trial_id, {m: 0.1 + 0.01 * len(trial_id) for m in metrics})
    return config


@pytest.mark.parametrize("name", sorted(shipped_spaces()))
def test_every_shipped_searcher_survives_tunes_pickling(name, tmp_path):
    """Tune pickles the searcher (sampler and study included) when the Tuner is built and in
    every save of the sweep's state; a searcher that cannot be pickled fails the sweep at
    its start (Optuna 5.1's NSGA-II sampler held a threading.Lock)."""
    spec = load_space(name, check_model=False)
    config = tune_config(spec)
    # the Tuner pickles its whole state on construction, as `search.py` builds it
    tune.Tuner(_noop, param_space=param_space(spec), tune_config=config,
               run_config=tune.RunConfig(name="t", storage_path=str(tmp_path)))
    if spec.search.algorithm.value in ("grid", "random") or spec.grid_only:
        assert isinstance(config.search_alg, ResumableVariants)
        assert config.search_alg.max_concurrent == spec.search.max_concurrent
        return
    # Optuna's searcher behind the concurrency limit Tune would put around it itself
    assert isinstance(config.search_alg, ResumableSearch)
    limiter = config.search_alg.searcher
    assert isinstance(limiter, ConcurrencyLimiter)
    assert limiter.max_concurrent == spec.search.max_concurrent
    searcher = limiter.searcher
    for i in range(3):
        _finish(searcher, f"t{i}", spec)
    cloudpickle.dumps(searcher)
    searcher.save(str(tmp_path / "searcher.pkl"))  # what Tune writes at each save
    restored = tune_config(spec).search_alg.searcher.searcher
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert len(restored._ot_study.trials) == 3
    _finish(restored, "t3", spec)  # a restored searcher goes on sampling
    assert len(restored._ot_study.trials) == 4


@pytest.mark.parametrize("algorithm", ["tpe", "nsga2"])
@pytest.mark.parametrize("objectives", [1, 2])
def test_samplers_pickle_and_go_on_where_they_stopped(tmp_path, algorithm, objectives):
    """Each Optuna sampler a space can name, single- and multi-objective, through enough
    trials for NSGA-II to breed a generation, pickled and read back mid-study."""
    spec = space(tmp_path, search={"algorithm": algorithm, "num_samples": 30, "seed": 3})
    sampler = sampler_of(spec)
    if algorithm == "nsga2":
        assert isinstance(sampler, PicklableNSGAIISampler)
        sampler._population_size = 4
    directions = ["maximize"] * objectives
    study = optuna.create_study(directions=directions, sampler=sampler)

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        return x if objectives == 1 else (x, 1 - x)

    study.optimize(objective, n_trials=10)
    copy = pickle.loads(pickle.dumps(study))
    copy.optimize(objective, n_trials=6)
    assert len(copy.trials) == 16
    if algorithm == "nsga2":  # the copy breeds on from its generations, with a lock of its own
        key = getattr(optuna.samplers.NSGAIISampler, "_GENERATION_KEY", "nsga2:generation")
        assert max(t.system_attrs.get(key, 0) for t in copy.trials) >= 3
        if "_thread_lock" in sampler.__dict__:  # Optuna >= 5.1
            assert copy.sampler._thread_lock is not sampler._thread_lock
