"""The interface every defense family implements: one object per family, looked up by name.

The rest of ``orchestrator/`` never asks which family a space is; it asks the family:
its parameter model (``check_params``, ``trial_params``), what it reports (``metrics``,
``reported_metrics``, ``counts``, ``surface``), what it needs (``required_params``, ``check``,
``check_model``), how a trial runs (``trainable``) and how a front trial is evaluated on the
test split (``test_item``, ``evaluate_test``). A new family is a module with a subclass and
one ``register`` call (``orchestrator.families``).
"""

from __future__ import annotations

import abc
from typing import Any, Callable

__all__ = ["DefenseFamily"]


class DefenseFamily(abc.ABC):
    """A defense family. Class attributes describe it; methods take the validated space
    (``orchestrator.space.SweepSpec``) as ``spec``. A family implements the abstract methods
    (its parameters, its trial function, its test-split evaluation); the others have the
    defaults of a family of one row per trial without early stopping."""

    name: str = ""
    # every metric a trial reports, in the order tables show them, with its direction (max:
    # higher is better); ``optimize`` picks from these, in their direction
    metrics: dict[str, str] = {}
    required_params: tuple[str, ...] = ()
    # True: a trial reports a surface of operating points (one row each, stored with its
    # result as results/<trial>.json); False: one row per trial, its last reported figures
    surface: bool = False
    # what names one row of a trial's surface beside its trial (empty without a surface)
    point_keys: tuple[str, ...] = ()
    # what the front's rows are, in sentences
    unit: str = "finished trials"
    # params that span every trial's surface instead of being searched
    surface_params: tuple[str, ...] = ()
    # what a trial's budget counts in, for early stopping (``scheduler: mo_asha``): the key of
    # its results that counts it; None: the family's trials cannot be stopped early
    budget_unit: str | None = None
    # what the scheduler's rungs count, in words (messages): "epochs", "attack samples"
    rung_unit: str = ""
    # True: the trials stop their own work under ``scheduler: mo_asha`` (LESCI's attack race)
    # and the sweep runs no Tune scheduler
    stops_in_trial: bool = False
    # True: a trial proves robustness too (verified accuracy by certificates beside the
    # attacks'), so its evaluation runs the verifiers
    verifies: bool = False

    # -- parameters ------------------------------------------------------------------------

    def parse_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The space's ``params`` (distributions parsed) in the family's canonical form."""
        return params

    @abc.abstractmethod
    def check_params(self, spec) -> None:
        """Every family key of ``params`` applies, and every value a searcher can draw is
        accepted by the family's typed models (``ValueError`` naming the key otherwise); the
        training fields are checked by ``orchestrator.params.check_params``."""

    @abc.abstractmethod
    def trial_params(self, spec, config: dict[str, Any]):
        """The family's typed parameters of the trial whose Tune config is ``config``."""

    def objective_space(self, spec):
        """The training objectives the trials choose from (``ObjectiveSpace``), or None."""
        return None

    def search_metrics(self, spec) -> tuple[list[str], list[str]]:
        """(metrics, modes) the searcher optimises: those of ``optimize`` by default."""
        return spec.metric_names, spec.modes

    # -- checks before Ray starts ----------------------------------------------------------

    def check(self, spec) -> None:
        """What the family needs of a space beyond its parameters (``ValueError`` naming
        the key)."""

    def check_model(self, spec, model, input_shape) -> None:
        """What the family needs of the model (``ValueError`` naming it)."""

    def check_data(self, spec, splits) -> None:
        """What the family needs of the dataset's splits (``ValueError`` naming the key)."""

    # -- what a trial reports ----------------------------------------------------------------

    def reported_metrics(self, spec) -> list[str]:
        """The figures a trial reports with their 95% intervals."""
        return list(self.metrics)

    def test_metrics(self, spec) -> list[str]:
        """Figures measured on the test split only (a front trial's child run and
        ``pareto_front.csv``), beside ``reported_metrics``."""
        return []

    def counts(self) -> list[str]:
        """The sample counts behind the intervals."""
        return ["samples"]

    def required_metrics(self, spec) -> list[str]:
        """What a finished trial must report (missing or NaN: the trial failed)."""
        return spec.metric_names

    def lenient_metrics(self, spec) -> bool:
        """True when an optimized metric is reported only at a trial's end, so Tune must not
        require it of every intermediate result."""
        return False

    def describe(self, spec) -> str:
        """What each trial evaluates, for the console's first line ("" for nothing more)."""
        return ""

    def attack_budget(self, spec) -> dict[str, Any]:
        """The attack budget the parent run logs, known from the space alone ({} if the
        trials report it)."""
        return {}

    def full_budget(self, spec) -> int:
        """A trial's whole budget in ``budget_unit``s (early stopping's ``max_t``)."""
        raise NotImplementedError

    def ramp_steps(self, spec) -> int:
        """Optimiser steps until every trial of the space has ended its eps ramp: a rung
        before them would compare trials at different radii (0: no ramp)."""
        return 0

    def budget_used(self, spec, result: dict[str, Any]) -> float:
        """How much of its budget a trial used, from its last result."""
        return float(result.get(self.budget_unit, 0)) if self.budget_unit else 0.0

    def full_budget_reached(self, spec, result: dict[str, Any]) -> bool:
        """Whether a trial ran its whole budget (only such trials can reach the front)."""
        return self.budget_unit is None or self.budget_used(spec, result) >= self.full_budget(
            spec)

    def trial_full_budget(self, spec, result: dict[str, Any]) -> float:
        """What a trial would have used at full budget, in ``budget_unit``s
        (``compute_fraction``'s denominator)."""
        return float(self.full_budget(spec))

    def stopped_at(self, spec, result: dict[str, Any]) -> str:
        """Where a stopped trial stopped, in words (its ``stopped_at`` tag)."""
        return f"{self.budget_unit} {self.budget_used(spec, result):g}"

    def searcher_budget(self, spec) -> tuple[str, float] | None:
        """(result key, value) below which a trial ended short of its full budget, for the
        searcher (``FinalMetricOptunaSearch``), or None."""
        if self.budget_unit is None:
            return None
        return self.budget_unit, float(self.full_budget(spec))

    def row_key(self, row: dict[str, Any]) -> tuple:
        """A front row's identity: its trial, and its point on the trial's surface."""
        return (row["trial_id"], *(int(row[k]) for k in self.point_keys))

    # -- running ---------------------------------------------------------------------------

    @abc.abstractmethod
    def trainable(self) -> Callable[..., None]:
        """The Tune function trainable: ``fn(config, spec_json, storage_uri)``."""

    def test_item(self, item: dict[str, Any], row: dict[str, Any]) -> None:
        """Add a front row to its trial's test-split work item (``orchestrator.holdout``)."""

    @abc.abstractmethod
    def evaluate_test(self, spec, splits, device, cache, log, item: dict[str, Any],
                      storage) -> dict[str, Any]:
        """One front trial's figures on the test split: ``{"rows": [...], "base": ...,
        "budget": ...}`` with a surface, else ``{"metrics": {...}}``."""

    def surface_points(self, spec, depths: int) -> list:
        """The operating points of one trial's surface over ``depths`` voting depths (a family
        with ``surface``); none otherwise."""
        return []
