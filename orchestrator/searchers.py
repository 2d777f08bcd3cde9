"""A space as Tune searches it: Optuna's samplers through ``OptunaSearch`` (define-by-run, so
an objective's own parameters are drawn only for trials of that objective), Tune's grid and
random search through ``param_space``, and the scheduler.

A trial's config holds the values drawn for it, by name: top-level parameters by their name;
the objective under ``objective``, either as a name with its own parameters as
``<objective>.<param>`` (Optuna, random search; under random search an objective grid runs
``num_samples`` trials of each objective) or as ``{"objective": name, param: value}`` (grid
search: each objective with each of its own values, no more).
``orchestrator.params.resolve`` reads both into the trial's typed objects.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from orchestrator.distributions import DIST_TYPES, Choice, Grid, IntRange, LogUniform, Uniform
from orchestrator.params import branch_key
from orchestrator.resumable import ResumableSearch, ResumableVariants, SlotLimiter
from orchestrator.space import Algorithm, SweepSpec

__all__ = ["param_space", "tune_config", "scheduler_of", "DefineByRun", "sampler_of",
           "PicklableNSGAIISampler"]


def _domain(dist):
    if isinstance(dist, Choice):
        return tune.choice(list(dist.choice))
    if isinstance(dist, Uniform):
        return tune.uniform(*dist.uniform)
    if isinstance(dist, LogUniform):
        return tune.loguniform(*dist.loguniform)
    if isinstance(dist, IntRange):
        low, high = dist.int
        return tune.lograndint(low, high + 1) if dist.log else tune.randint(low, high + 1)
    raise TypeError(f"no Tune domain for {dist!r}")


def _suggest(trial, name: str, dist) -> Any:
    if isinstance(dist, (Choice, Grid)):
        return trial.suggest_categorical(name, list(dist.choice if isinstance(dist, Choice)
                                                    else dist.grid))
    if isinstance(dist, (Uniform, LogUniform)):
        low, high = dist.uniform if isinstance(dist, Uniform) else dist.loguniform
        return trial.suggest_float(name, low, high, log=isinstance(dist, LogUniform))
    low, high = dist.int
    return trial.suggest_int(name, low, high, log=dist.log)


class DefineByRun:
    """Optuna's define-by-run space: the top-level searched parameters, the objective, and
    only that objective's own searched parameters (``<objective>.<param>``)."""

    def __init__(self, spec: SweepSpec):
        self.searched = spec.searched()
        self.space = spec.objective_space()

    def __call__(self, trial) -> None:
        for key, dist in self.searched.items():
            _suggest(trial, key, dist)
        if self.space is None:
            return None
        names = self.space.names
        name = trial.suggest_categorical("objective", names) if len(names) > 1 else names[0]
        for key, dist in self.space.branches[name].items():
            if isinstance(dist, DIST_TYPES):
                _suggest(trial, branch_key(name, key), dist)
        return None


def _uses_optuna(spec: SweepSpec) -> bool:
    return spec.search.algorithm in (Algorithm.TPE, Algorithm.NSGA2) and not spec.grid_only


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: fixed values are read from the space by each trial, so this holds
    what Tune itself draws (grid/random search) or nothing (Optuna draws everything)."""
    if _uses_optuna(spec):
        return {}
    space: dict[str, Any] = {}
    grids = spec.grid_values()
    for key, dist in spec.searched().items():
        space[key] = tune.grid_search(grids[key]) if key in grids else _domain(dist)
    objective_sp = spec.objective_space()
    if objective_sp is not None and objective_sp.searched:
        if spec.search.algorithm is Algorithm.GRID:
            space["objective"] = tune.grid_search(spec.objective_grid())
        else:  # every objective's own values are drawn; the trial reads its objective's
            if len(objective_sp.branches) > 1:  # a grid: num_samples trials of each
                space["objective"] = (tune.grid_search(objective_sp.names)
                                      if objective_sp.kind == "grid"
                                      else tune.choice(objective_sp.names))
            for name, own in objective_sp.branches.items():
                for key, dist in own.items():
                    if isinstance(dist, DIST_TYPES):
                        space[branch_key(name, key)] = _domain(dist)
    return space


class FinalMetricOptunaSearch(OptunaSearch):
    """OptunaSearch that skips an intermediate result without the searched metric (the
    training families' suite metrics come with the last epoch only); Optuna gets the final
    result at the trial's end either way.

    With early stopping (``budget``: the result key counting a trial's budget and the full
    budget), a trial that ends short of its full budget is told to the study as PRUNED,
    without values: its figures are those of a shorter training, and a study that took them
    for full-budget ones would steer its sampler with them. NSGA-II picks parents among
    COMPLETE trials only; TPE ranks a PRUNED trial after every COMPLETE one."""

    def __init__(self, *args, budget: tuple[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget = budget

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result and self.budget is not None:
            key, full = self.budget
            if float(result.get(key, full)) < full:
                result = None  # stopped early: PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable on every Optuna release the ranges allow.

    Tune pickles the searcher, and with it the study's sampler, when the Tuner is built and
    whenever it saves the sweep's state. Optuna 5.1's genetic samplers guard an in-memory
    cache of the study's generations with a ``threading.Lock`` and define no ``__getstate__``,
    so pickling them raises ``TypeError: cannot pickle '_thread.lock' object``. A lock holds
    no state: it is left out of the pickle and a new one is made when the sampler is read
    back; the cache it guards is rebuilt from the study when it does not match.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_thread_lock" in state:
            self._thread_lock = threading.Lock()


# Optuna 5 names a genetic sampler's study attributes after its class
# ("NSGAIISampler:generation"); the subclass keeps upstream's names, so a study reads the same
# either way.
for _key in ("_GENERATION_KEY", "_PARENT_CACHE_KEY_PREFIX"):
    if hasattr(optuna.samplers.NSGAIISampler, _key):
        setattr(PicklableNSGAIISampler, _key, getattr(optuna.samplers.NSGAIISampler, _key))


def sampler_of(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a space searched with TPE or NSGA-II, seeded with its seed."""
    if spec.search.algorithm is Algorithm.TPE:
        return optuna.samplers.TPESampler(seed=spec.search.seed)
    if spec.search.algorithm is Algorithm.NSGA2:
        return PicklableNSGAIISampler(seed=spec.search.seed)
    raise ValueError(f"search.algorithm {spec.search.algorithm.value!r} has no Optuna sampler")


def scheduler_of(spec: SweepSpec, state_uri: str | None = None, sweep: str = ""):
    """The sweep's trial scheduler: None (run every trial to its end), Tune's ASHA (one
    objective) or ``orchestrator.schedulers.MultiObjectiveASHA`` (several; its rung records
    kept in ``state_uri``, the sweep's storage). A family whose trials stop their own work
    (``stops_in_trial``: LESCI races its attacks inside each trial) runs none."""
    metrics, modes = spec.metric_names, spec.modes
    if spec.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        epochs = spec.training.epochs
        # rungs by epoch, not by report: a trial resumed after a crash reports its last
        # epoch again
        return ASHAScheduler(time_attr="epoch", metric=metrics[0], mode=modes[0],
                             max_t=epochs, grace_period=max(1, epochs // 8))
    if spec.scheduler.name == "mo_asha" and not spec.defense.stops_in_trial:
        from orchestrator.schedulers import MultiObjectiveASHA

        family = spec.defense
        return MultiObjectiveASHA(metrics, modes, max_t=family.full_budget(spec),
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor,
                                  time_attr=family.budget_unit,
                                  min_step=family.ramp_steps(spec), state_uri=state_uri,
                                  sweep=sweep, type=spec.scheduler.type,
                                  max_concurrent=spec.search.max_concurrent)
    return None


def tune_config(spec: SweepSpec, scheduler=None) -> tune.TuneConfig:
    """Tune's config of the sweep: its searcher, limited to ``search.max_concurrent`` trials at
    once, in a form whose restore agrees with the restored trial table
    (``orchestrator.resumable``), and its scheduler (``scheduler_of``)."""
    metrics, modes = spec.search_metrics
    single = len(metrics) == 1
    concurrent = spec.search.max_concurrent
    stops = spec.scheduler.name != "none"
    budget = spec.defense.searcher_budget(spec) if stops else None
    # a trial resting at a rung of a promoting scheduler holds no slot (orchestrator.resumable)
    resting = scheduler.sweep if getattr(scheduler, "type", None) == "promotion" else None
    if _uses_optuna(spec):
        sampler = sampler_of(spec)
        # metric/mode go to the searcher only: TuneConfig's would make it single-objective
        optuna_search = FinalMetricOptunaSearch(space=DefineByRun(spec),
                                                metric=metrics[0] if single else metrics,
                                                mode=modes[0] if single else modes,
                                                sampler=sampler, budget=budget)
        # the wrappers Tune itself puts around a searcher for max_concurrent_trials
        search_alg = ResumableSearch(SlotLimiter(optuna_search, max_concurrent=concurrent,
                                                 resting=resting))
    else:  # Tune's grid and random search
        search_alg = ResumableVariants(max_concurrent=concurrent, resting=resting)
    # reuse_actors: a trial's process serves the next trial (no new process importing torch
    # for every trial: 0.17 s of overhead per trial instead of 2.7 s, benchmarks/run.py)
    # (max_concurrent_trials stays unset: the searcher limits itself)
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, reuse_actors=True,
                           num_samples=1 if spec.grid_only else spec.search.num_samples)
