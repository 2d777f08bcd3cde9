"""Search spaces: the YAML schema, its validation, and the shipped spaces by name.

A space is validated completely before Ray starts; each problem is one line naming the file, the
key, the value and what is allowed (``SpaceError``; the CLI exits with code 2).

    name: demo                      # default sweep name
    family: lesci                   # lesci | ibp | adversarial (orchestrator.families)
    dataset: {name: digits}         # root: /data/... for mnist, cifar10, tiny-imagenet,
                                    # folder (DIR/train/<class>/*, DIR/test/<class>/*;
                                    # options: {size, channels}); arrays: path: FILE.npz;
                                    # val: 0.2 or 5000 (carved from train), split_seed: 0
    model: {name: resnet_digits}    # options: {...}; checkpoint: path (LESCI: skip training;
                                    # training families: fine-tune); or your own module:
                                    # {factory: "pkg.mod:make_net", options, mean, std}
    training: {epochs: 15, lr: 0.003}            # defenses.trainer.TrainConfig fields
    params:                         # per-trial values: fixed, or one distribution each
      depth: {choice: [stem, layer1, pool]}
      k: [3, 10, 30]                # LESCI: the surface every trial evaluates, not searched
      threshold: {uniform: [0.5, 1.0]}
      # training families: objective: {choice: {pgd: {steps: {int: [3, 10]}}, fgsm: {}}}
    attack: {eps: 0.1, steps: 20}   # evaluation attacks (LESCI: adds robust metrics)
    optimize: {accuracy: max, projection_rate: max}   # the metrics of the Pareto front
    search: {algorithm: nsga2, num_samples: 24, max_concurrent: 2, seed: 0, repeats: 1}
    resources: {cpu: 1, gpu: 0}
    scheduler: none                 # asha: one objective; {name: mo_asha, reduction_factor: 3,
                                    # grace_period: 1}: several (training families: by epoch;
                                    # LESCI: races the attacks, by attack sample)
    smoke_test: {training: {epochs: 2}, search: {num_samples: 2}}
"""

from __future__ import annotations

import enum
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from defenses.attacks import default_alpha
from defenses.evaluation import AttackSuite
from defenses.lesci_attack import VoteSuite
from defenses.trainer import TrainConfig
from orchestrator.distributions import (DIST_TYPES, Choice, Distribution, Grid,
                                        ObjectiveSpace, parse_value, values_of)
from orchestrator.families import DefenseFamily, get_family

__all__ = ["SpaceError", "Algorithm", "SweepSpec", "Distribution", "check_sweep_name"]


class SpaceError(ValueError):
    """A search space is malformed: one line naming the file, the key and what is allowed."""


class Algorithm(str, enum.Enum):
    TPE = "tpe"
    NSGA2 = "nsga2"
    RANDOM = "random"
    GRID = "grid"


# A sweep's name is a folder of the storage and an MLflow experiment: the one rule for both
# the space's ``name`` and ``--name``.
SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


def check_sweep_name(name: str) -> str:
    """``name`` if it is a valid sweep name, else ``ValueError`` saying the rule."""
    if not (len(name) <= 100 and SWEEP_NAME.match(name)):
        raise ValueError("use letters, digits, '-', '_' and single '.' between them (at most "
                         "100 characters)")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    name: str
    root: str | None = None  # the data folder (mnist, cifar10, tiny-imagenet, folder)
    path: str | None = None  # the .npz file of ``arrays``
    # synthetic: num_classes, input_shape, ...; folder: size, channels
    options: dict[str, Any] = Field(default_factory=dict)
    # the validation split carved from the training data: a fraction in (0, 1) or a count;
    # unset: defenses.data.DEFAULT_VAL (as large as the test split)
    val: int | float | None = None
    split_seed: int = 0

    @field_validator("root", "path")
    @classmethod
    def _absolute_root(cls, value: str | None) -> str | None:
        # trials run in folders of their own (Tune's trial dirs): a relative path is the
        # launching directory's
        return None if value is None else str(Path(value).expanduser().absolute())

    @field_validator("val")
    @classmethod
    def _val_size(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"a fraction must be in (0, 1), got {value}")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a count must be >= 1, got {value}")
        return value

    def load(self):
        """The dataset's splits (``defenses.data.load_dataset``)."""
        from defenses.data import load_dataset

        return load_dataset(self.name, self.root, self.val, self.split_seed, path=self.path,
                            **self.options)


class ModelSpec(_Strict):
    """The classifier: a built-in architecture (``name``) or a researcher's own (``factory``:
    ``"module:callable"`` returning an ``nn.Module``, called with ``options``; ``mean``/``std``
    when it expects normalised inputs). ``checkpoint``: its weights (LESCI: no training; the
    training families: fine-tuned from them)."""

    name: str | None = None
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    @field_validator("checkpoint")
    @classmethod
    def _absolute_checkpoint(cls, value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().absolute())

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.name is None) == (self.factory is None):
            raise ValueError("give either name (a built-in model) or factory "
                             "('module:callable'), not " + ("both" if self.name else "neither"))
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together: give both or neither")
        if self.mean is not None and self.name is not None:
            raise ValueError("mean/std: only for a factory; a built-in model normalises with "
                             "the dataset's statistics")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} channels, std {len(self.std)}")
        return self

    @property
    def label(self) -> str:
        """How runs and tables name the model: the built-in name or the factory."""
        return self.name or self.factory

    def build(self, num_classes: int, input_shape, mean, std):
        """A fresh model (random weights): the built-in one normalised with ``mean``/``std`` (the
        dataset's), or the factory's with the space's own ``mean``/``std``."""
        if self.factory:
            from defenses.user_models import build_user_model

            return build_user_model(self.factory, self.options, num_classes, input_shape,
                                    self.mean, self.std)
        from defenses.models import build_model

        return build_model(self.name, num_classes, input_shape, mean, std, **self.options)


def _vote_default(name: str) -> Any:
    return VoteSuite.model_fields[name].default  # the one place the vote suite's defaults live


class APGDSpec(_Strict):
    """LESCI's adaptive suite: APGD on the exact margin of the vote (Croce & Hein 2020;
    ``defenses.lesci_attack.VoteSuite``)."""

    steps: int = Field(default=_vote_default("steps"), ge=1)
    # random starts of each untargeted run, after the bare-model APGD and PGD examples
    restarts: int = Field(default=_vote_default("restarts"), ge=0)
    # targeted runs toward the likeliest wrong classes
    targets: int = Field(default=_vote_default("targets"), ge=0)
    # temperature of the smoothed-margin run; 0: none
    smooth: float = Field(default=_vote_default("smooth"), ge=0.0)
    group: int = Field(default=_vote_default("group"), ge=1)  # consecutive m per smoothed run

    def vote_suite(self) -> VoteSuite:
        return VoteSuite(**self.model_dump())


def _suite_default(name: str) -> Any:
    return AttackSuite.model_fields[name].default  # the one place the suite's defaults live


class SuiteSpec(_Strict):
    """The training families' suite behind ``robust_accuracy`` (``defenses.evaluation.
    AttackSuite``, PGD aside): APGD-CE and APGD-T runs, APGD-T's targets, Square's budget."""

    apgd_steps: int = Field(default=_suite_default("apgd_steps"), ge=1)
    apgd_restarts: int = Field(default=_suite_default("apgd_restarts"), ge=0)
    targets: int = Field(default=_suite_default("targets"), ge=0)
    square_queries: int = Field(default=_suite_default("square_queries"), ge=0)  # 0: no Square
    square_restarts: int = Field(default=_suite_default("square_restarts"), ge=1)


class AttackSpec(_Strict):
    eps: float = Field(ge=0.0, le=1.0)
    steps: int = Field(default=20, ge=1)  # PGD: the transfer set (LESCI), pgd_accuracy (training)
    # PGD's step; unset: defenses.attacks.default_alpha(eps, steps), filled in at load
    alpha: float | None = Field(default=None, gt=0.0, le=1.0)
    restarts: int = Field(default=1, ge=1)
    apgd: APGDSpec = Field(default_factory=APGDSpec)  # LESCI only
    samples: int | None = Field(default=None, ge=1)  # LESCI: attack the first N validation samples
    suite: SuiteSpec = Field(default_factory=SuiteSpec)  # the training families only

    def attack_suite(self) -> AttackSuite:
        """The training families' suite behind ``robust_accuracy``: PGD as configured
        (``steps``, ``alpha``, ``restarts``), then ``suite``'s APGD-CE, APGD-T and Square."""
        return AttackSuite(steps=self.steps, alpha=self.alpha, restarts=self.restarts,
                           **self.suite.model_dump())

    @model_validator(mode="before")
    @classmethod
    def _default_alpha(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("alpha") is None and isinstance(
                values.get("eps"), (int, float)):
            steps = values.get("steps", cls.model_fields["steps"].default)
            if isinstance(steps, int) and steps >= 1:
                values = {**values, "alpha": default_alpha(values["eps"], steps) or None}
        return values


class SearchSpec(_Strict):
    algorithm: Algorithm = Algorithm.TPE
    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=2, ge=1)
    seed: int = 0
    # each configuration with this many seeds (training.seed, +1, ...: the model's training
    # and the attacks' starts); its figures are the mean, with the spread across seeds
    repeats: int = Field(default=1, ge=1)


class ResourcesSpec(_Strict):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)


class SchedulerSpec(_Strict):
    """Early stopping (``orchestrator.schedulers``): ``none``; ``asha`` (Tune's, one
    objective); ``mo_asha`` (several objectives: rungs at ``grace_period *
    reduction_factor**i`` budget units, the top ``1/reduction_factor`` of each rung go on,
    either promoted out of a rung where the others rest (``type: promotion``) or judged once on
    arrival, the others stopped (``type: stopping``); on a LESCI space the units are attack
    samples, the points of the surfaces race, ``orchestrator.racing``, and ``type`` has no
    effect; nor has it under ``asha``)."""

    name: Literal["none", "asha", "mo_asha"] = "none"
    type: Literal["promotion", "stopping"] = "promotion"
    reduction_factor: int = Field(default=3, ge=2)
    grace_period: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class VerifySpec(_Strict):
    """Complete verification of the front's models on the test split (the training families;
    ``defenses.complete``): each of the first ``samples`` test samples proved, falsified or
    left undecided after ``time_limit`` seconds of its mixed-integer programs."""

    complete: bool = False
    time_limit: float = Field(default=10.0, gt=0.0)
    samples: int = Field(default=1000, ge=1)


class SweepSpec(_Strict):
    """A validated search space (built once from the YAML; never re-read as a dict)."""

    name: str
    family: str  # a registered family's name (orchestrator.families)
    description: str = ""
    dataset: DatasetSpec
    model: ModelSpec
    training: TrainConfig = Field(default_factory=TrainConfig)
    params: dict[str, Any]
    attack: AttackSpec | None = None
    optimize: dict[str, Literal["max", "min"]] = Field(min_length=1)  # the front's metrics
    search: SearchSpec = Field(default_factory=SearchSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    max_failures: int = Field(default=2, ge=0)
    smoke_test: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_sweep_name(name)

    @field_validator("family")
    @classmethod
    def _family(cls, name: str) -> str:
        get_family(name)
        return name

    @field_validator("params")
    @classmethod
    def _distributions(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        parsed = {key: ObjectiveSpace.parse(value) if key == "objective"
                  else parse_value(f"params.{key}", value) for key, value in params.items()}
        family = info.data.get("family")  # absent: the family's own error names it
        return get_family(family).parse_params(parsed) if family else parsed

    @property
    def defense(self) -> DefenseFamily:
        """The space's family (``orchestrator.families``): what its trials are and report."""
        return get_family(self.family)

    # -- derived views ---------------------------------------------------------------------

    @property
    def metric_names(self) -> list[str]:
        return list(self.optimize)

    @property
    def modes(self) -> list[str]:
        return list(self.optimize.values())

    def _trial_params(self) -> dict[str, Any]:
        """The top-level params that vary per trial or are fixed for all (LESCI's k and
        threshold span each trial's surface; ``objective`` has its own space)."""
        skip = (*self.defense.surface_params, "objective")
        return {k: v for k, v in self.params.items() if k not in skip}

    def searched(self) -> dict[str, Distribution]:
        """The top-level searched params (an objective's own are in ``objective_space``)."""
        return {k: v for k, v in self._trial_params().items() if isinstance(v, DIST_TYPES)}

    def searched_names(self) -> list[str]:
        """Every parameter that varies between trials, by its one name: the top-level
        searched params, ``objective`` when there are several, and each objective's own
        searched parameters (run names, CSV columns)."""
        names = list(self.searched())
        space = self.objective_space()
        if space is not None:
            if len(space.branches) > 1:
                names.append("objective")
            for own in space.branches.values():
                names.extend(k for k, v in own.items() if isinstance(v, DIST_TYPES))
        return sorted(dict.fromkeys(names))

    @property
    def search_metrics(self) -> tuple[list[str], list[str]]:
        """(metrics, modes) the searcher optimises (the family's choice: LESCI trials by the
        hypervolume of their surface, others by the metrics of ``optimize``)."""
        return self.defense.search_metrics(self)

    def objective_space(self) -> ObjectiveSpace | None:
        """The training objectives the trials choose from; None for a family without."""
        return self.defense.objective_space(self)

    @property
    def grid_only(self) -> bool:
        """Each combination runs once: the grid algorithm, or nothing to search."""
        space = self.objective_space()
        return self.search.algorithm is Algorithm.GRID or not (
            self.searched() or (space is not None and space.searched))

    def grid_values(self) -> dict[str, list[Any]]:
        """The top-level params Tune runs as a grid: grid values, and choices under the grid
        algorithm."""
        grid = self.search.algorithm is Algorithm.GRID
        return {k: list(d.grid if isinstance(d, Grid) else d.choice)
                for k, d in self.searched().items()
                if isinstance(d, Grid) or (grid and isinstance(d, Choice))}

    def objective_grid(self) -> list[dict[str, Any]]:
        """Under the grid algorithm, every (objective, its own values) combination as one
        dict ``{"objective": name, param: value, ...}``; else one dict per objective."""
        space = self.objective_space()
        if space is None:
            return []
        out = []
        for name, own in space.branches.items():
            combos: list[dict[str, Any]] = [{"objective": name}]
            for key, value in own.items():
                if isinstance(value, DIST_TYPES) and self.search.algorithm is Algorithm.GRID:
                    combos = [{**c, key: v} for c in combos for v in values_of(value)]
            out.extend(combos)
        return out

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs: every grid combination (an objective's own grid values
        combined with that objective only; under random search each objective of a grid),
        times num_samples unless grid_only."""
        combinations = math.prod(len(v) for v in self.grid_values().values())
        space = self.objective_space()
        if self.search.algorithm is Algorithm.GRID and space is not None:
            combinations *= len(self.objective_grid())
        elif space is not None and space.kind == "grid":  # random: num_samples of each
            combinations *= len(space.branches)
        return combinations * (1 if self.grid_only else self.search.num_samples)

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self._trial_params().items() if not isinstance(v, DIST_TYPES)}

    def values_of(self, key: str) -> list[Any] | tuple[float, float] | None:
        """The finite values a param can take (fixed, choice, grid, int), or a float range."""
        value = self.params.get(key)
        return None if value is None else values_of(value)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
