"""Search spaces: the YAML schema, its validation, and the shipped spaces by name.

A space is validated completely before Ray starts; each problem is one line naming the file, the
key, the value and what is allowed (``SpaceError``; the CLI exits with code 2).

    name: demo                      # default sweep name
    family: lesci                   # lesci | ibp | adversarial
    dataset: {name: digits}         # root: /data/... for mnist, cifar10, tiny-imagenet
    model: {name: resnet_digits}    # options: {...}; checkpoint: path (LESCI: skip training)
    training: {epochs: 15, lr: 0.003}            # defenses.training.TrainConfig fields
    params:                         # per-trial values: fixed, or one distribution each
      depth: {choice: [stem, layer1, pool]}
      k: [3, 10, 30]                # LESCI: the surface every trial evaluates, not searched
      threshold: {uniform: [0.5, 1.0]}
    attack: {eps: 0.1, steps: 20}   # evaluation attacks (LESCI: adds robust metrics)
    objectives: {accuracy: max, projection_rate: max}
    search: {algorithm: nsga2, num_samples: 24, max_concurrent: 2, seed: 0}
    resources: {cpu: 1, gpu: 0}
    scheduler: none                 # asha: single-objective training sweeps only
    smoke_test: {training: {epochs: 2}, search: {num_samples: 2}}
"""

from __future__ import annotations

import copy
import enum
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["SpaceError", "Family", "Algorithm", "SweepSpec", "load_space", "shipped_spaces",
           "FAMILY_METRICS", "Distribution"]


class SpaceError(ValueError):
    """A search space is malformed: one line naming the file, the key and what is allowed."""


class Family(str, enum.Enum):
    LESCI = "lesci"
    IBP = "ibp"
    ADVERSARIAL = "adversarial"


class Algorithm(str, enum.Enum):
    TPE = "tpe"
    NSGA2 = "nsga2"
    RANDOM = "random"
    GRID = "grid"


FAMILY_METRICS: dict[Family, tuple[str, ...]] = {
    Family.LESCI: ("accuracy", "projection_rate", "accuracy_projected", "accuracy_identity",
                   "robust_accuracy", "transfer_robust_accuracy"),
    Family.IBP: ("nominal_accuracy", "verified_accuracy", "pgd_accuracy"),
    Family.ADVERSARIAL: ("clean_accuracy", "pgd_accuracy"),
}

# Parameters a trial of each family takes (searched or fixed), besides TrainConfig fields.
TRAIN_FIELDS = ("epochs", "batch_size", "physical_batch_size", "lr", "optimizer", "momentum",
                 "weight_decay", "lr_schedule", "lr_milestones", "lr_gamma", "seed")
FAMILY_PARAMS: dict[Family, tuple[str, ...]] = {
    Family.LESCI: ("depth", "n_components", "embedding_size", "center", "k",
                   "threshold") + TRAIN_FIELDS,
    Family.IBP: ("eps_train", "warmup", "rampup", "kappa_final", "ramp") + TRAIN_FIELDS,
    Family.ADVERSARIAL: ("objective", "eps", "alpha", "steps", "restarts", "mix", "multiplier",
                         "adv_step_size", "norm") + TRAIN_FIELDS,
}
# LESCI's k and threshold are not searched: each trial evaluates its whole (k, m) surface.
SURFACE_PARAMS = ("k", "threshold")
_REQUIRED_PARAMS = {Family.LESCI: ("depth", "n_components", "k"),
                    Family.IBP: ("eps_train",), Family.ADVERSARIAL: ("objective",)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choice(_Strict):
    choice: list[Any] = Field(min_length=1)


class Grid(_Strict):
    grid: list[Any] = Field(min_length=1)


class Uniform(_Strict):
    uniform: tuple[float, float]


class LogUniform(_Strict):
    loguniform: tuple[float, float]


class IntRange(_Strict):
    int: tuple[int, int]
    log: bool = False


Distribution = Union[Choice, Grid, Uniform, LogUniform, IntRange]
_DIST_KEYS = {"choice": Choice, "grid": Grid, "uniform": Uniform, "loguniform": LogUniform,
              "int": IntRange}


class DatasetSpec(_Strict):
    name: str
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # synthetic only: input_shape, ...


class ModelSpec(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None


class APGDSpec(_Strict):
    """LESCI's adaptive suite: APGD on the exact margin of the vote (SPEC.md section 1.9)."""

    steps: int = Field(default=100, ge=1)
    # random starts of each untargeted run, after the bare-model APGD and PGD examples
    restarts: int = Field(default=0, ge=0)
    targets: int = Field(default=1, ge=0)  # targeted runs toward the likeliest wrong classes
    smooth: float = Field(default=0.01, ge=0.0)  # temperature of the smoothed-margin run; 0: none
    group: int = Field(default=2, ge=1)  # consecutive m per smoothed run


class AttackSpec(_Strict):
    eps: float = Field(ge=0.0, le=1.0)
    steps: int = Field(default=20, ge=1)  # PGD: the transfer set (LESCI), pgd_accuracy (training)
    alpha: float | None = Field(default=None, gt=0.0, le=1.0)
    restarts: int = Field(default=1, ge=1)
    apgd: APGDSpec = Field(default_factory=APGDSpec)
    samples: int | None = Field(default=None, ge=1)  # LESCI: attack the first N validation samples

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps


class SearchSpec(_Strict):
    algorithm: Algorithm = Algorithm.TPE
    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=2, ge=1)
    seed: int = 0


class ResourcesSpec(_Strict):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)


class SweepSpec(_Strict):
    """A validated search space (built once from the YAML; never re-read as a dict)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    family: Family
    description: str = ""
    dataset: DatasetSpec
    model: ModelSpec
    training: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any]
    attack: AttackSpec | None = None
    objectives: dict[str, Literal["max", "min"]] = Field(min_length=1)
    search: SearchSpec = Field(default_factory=SearchSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduler: Literal["none", "asha"] = "none"
    max_failures: int = Field(default=2, ge=0)
    smoke_test: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _distributions(cls, params: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in params.items():
            if isinstance(value, dict):
                kinds = [k for k in value if k in _DIST_KEYS]
                if len(kinds) != 1:
                    raise ValueError(f"params.{key}: a distribution needs exactly one of "
                                     f"{', '.join(_DIST_KEYS)}, got keys {sorted(value)}")
                try:
                    out[key] = _DIST_KEYS[kinds[0]](**value)
                except ValidationError as exc:
                    raise ValueError(f"params.{key}: {_first_error(exc)}") from None
            else:
                out[key] = value
        return out

    # -- derived views ---------------------------------------------------------------------

    @property
    def metric_names(self) -> list[str]:
        return list(self.objectives)

    @property
    def modes(self) -> list[str]:
        return list(self.objectives.values())

    def _trial_params(self) -> dict[str, Any]:
        """The params that vary per trial (LESCI's k and threshold span each trial's surface)."""
        if self.family is Family.LESCI:
            return {k: v for k, v in self.params.items() if k not in SURFACE_PARAMS}
        return self.params

    def searched(self) -> dict[str, Distribution]:
        return {k: v for k, v in self._trial_params().items() if isinstance(v, _DIST_TYPES)}

    @property
    def search_metrics(self) -> tuple[list[str], list[str]]:
        """(metrics, modes) the searcher optimises: LESCI trials by the hypervolume of their
        surface (the front is taken over every surface point), others by the objectives."""
        if self.family is Family.LESCI:
            return ["hypervolume"], ["max"]
        return self.metric_names, self.modes

    def surface_ks(self) -> list[int]:
        """LESCI: the k values of every trial's surface (a number, a list, choice/grid values,
        or every integer of an int range)."""
        value = self.params.get("k")
        values = value if isinstance(value, list) else self.values_of("k")
        return sorted({int(v) for v in values})

    def surface_points(self) -> list[Any]:
        """LESCI: every (k, m) point of a trial's surface, thresholds m/k restricted by
        ``threshold``: absent, every m; a range {uniform: [lo, hi]}, every m/k inside it; a
        number or a list, each threshold t's rule, m = ceil(t k) (t <= 0: m = 1)."""
        from defenses.surface import SurfacePoint, surface_points

        ks = self.surface_ks()
        value = self.params.get("threshold")
        if value is None:
            return surface_points(ks)
        if isinstance(value, Uniform):
            return surface_points(ks, tuple(value.uniform))
        if isinstance(value, (Choice, Grid)):
            value = list(value.choice if isinstance(value, Choice) else value.grid)
        thresholds = value if isinstance(value, list) else [value]
        return sorted({SurfacePoint(k, min(k, max(1, math.ceil(float(t) * k - 1e-9))))
                       for k in ks for t in thresholds})

    @property
    def grid_only(self) -> bool:
        """Each combination runs once: the grid algorithm, or nothing to search."""
        return self.search.algorithm is Algorithm.GRID or not self.searched()

    def grid_values(self) -> dict[str, list[Any]]:
        """The params Tune runs as a grid: grid values, and choices under the grid algorithm."""
        grid = self.search.algorithm is Algorithm.GRID
        return {k: list(d.grid if isinstance(d, Grid) else d.choice)
                for k, d in self.searched().items()
                if isinstance(d, Grid) or (grid and isinstance(d, Choice))}

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs: every grid combination, times num_samples unless grid_only."""
        combinations = math.prod(len(v) for v in self.grid_values().values())
        return combinations * (1 if self.grid_only else self.search.num_samples)

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self._trial_params().items() if not isinstance(v, _DIST_TYPES)}

    def values_of(self, key: str) -> list[Any] | tuple[float, float] | None:
        """The finite values a param can take (fixed, choice, grid, int), or a float range."""
        v = self.params.get(key)
        if v is None:
            return None
        if isinstance(v, (Choice, Grid)):
            return list(v.choice if isinstance(v, Choice) else v.grid)
        if isinstance(v, IntRange):
            return list(range(v.int[0], v.int[1] + 1))
        if isinstance(v, (Uniform, LogUniform)):
            return tuple(v.uniform if isinstance(v, Uniform) else v.loguniform)
        return [v]

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_DIST_TYPES = (Choice, Grid, Uniform, LogUniform, IntRange)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}{shown}" if where else f"{message}{shown}"


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "params":
            out[key] = _merge(out[key], value)
        elif key == "params" and isinstance(value, dict):
            out.setdefault("params", {}).update(value)
        else:
            out[key] = value
    return out


def shipped_spaces() -> dict[str, Path]:
    """The spaces shipped with the package (``search_spaces/*.yaml``), by name."""
    folder = resources.files("search_spaces")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_space(name_or_path: str | Path, smoke_test: bool = False,
               overrides: dict[str, Any] | None = None, check_model: bool = True,
               check_data: bool = False) -> SweepSpec:
    """Read, merge the smoke-test overrides (if asked) and validate a space.

    ``name_or_path``: a shipped space's name (``lesci``) or a YAML file.
    ``check_data``: also open the dataset files and the model checkpoint (the CLI does, so a
    missing folder or a corrupt file is exit 2 before Ray starts, not a failed trial).
    Raises ``SpaceError`` with one line naming the file, the key and what is allowed.
    """
    shipped = shipped_spaces()
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    if not path.is_file():
        raise SpaceError(f"--space {name_or_path}: no such file, and not a shipped space "
                         f"(shipped: {', '.join(sorted(shipped))})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpaceError(f"{path}{where}: not valid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"{path}: unreadable ({exc})") from None
    if raw is None:
        raise SpaceError(f"{path}: empty file, expected a search space mapping")
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level, got "
                         f"{type(raw).__name__}")
    if smoke_test:
        raw = _merge(raw, raw.get("smoke_test") or {})
    if overrides:
        raw = _merge(raw, overrides)
    try:
        spec = SweepSpec(**raw)
    except ValidationError as exc:
        raise SpaceError(f"{path}: {_first_error(exc)}") from None
    except TypeError as exc:
        raise SpaceError(f"{path}: {exc}") from None
    try:
        _check_semantics(spec, check_model)
        if check_data:
            _check_data(spec)
    except ValueError as exc:
        raise SpaceError(f"{path}: {exc}") from None
    return spec


def _check_data(spec: SweepSpec) -> None:
    """Open the dataset (every loader checks its files' format) and the checkpoint."""
    from defenses.data import load_dataset
    from defenses.checkpoints import load_checkpoint

    try:
        splits = load_dataset(spec.dataset.name, spec.dataset.root, **spec.dataset.options)
        if len(splits.val):
            splits.val[0]  # decodes one image: a corrupt file format shows now, not in a trial
    except ValueError as exc:  # DatasetError included
        raise ValueError(f"dataset: {exc}") from None
    if spec.model.checkpoint:
        try:
            model, _ = load_checkpoint(spec.model.checkpoint)
        except ValueError as exc:  # CheckpointError included
            raise ValueError(f"model.checkpoint: {exc}") from None
        built = model.build_config
        if built["model"] != spec.model.name:
            raise ValueError(f"model.checkpoint: {spec.model.checkpoint} holds a "
                             f"{built['model']}, the space's model is {spec.model.name}")
        if (built["num_classes"], tuple(built["input_shape"])) != (splits.num_classes,
                                                                   splits.input_shape):
            raise ValueError(f"model.checkpoint: {spec.model.checkpoint} was built for "
                             f"{built['num_classes']} classes of {tuple(built['input_shape'])}"
                             f", the dataset has {splits.num_classes} of {splits.input_shape}")


# ------------------------------------------------------------------------------------------------
# checks that need more than types: families, ranges, metric names, the model's depths


def _check_semantics(spec: SweepSpec, check_model: bool) -> None:
    family = spec.family
    allowed = FAMILY_PARAMS[family]
    for key in spec.params:
        if key not in allowed:
            raise ValueError(f"params.{key}: not a parameter of family {family.value!r}; "
                             f"allowed: {', '.join(allowed)}")
    for key in _REQUIRED_PARAMS[family]:
        if key not in spec.params:
            raise ValueError(f"params.{key}: required for family {family.value!r}")
    for key, dist in spec.searched().items():
        _check_distribution(key, dist, spec.search.algorithm)
    metrics = FAMILY_METRICS[family]
    for metric in spec.objectives:
        if metric not in metrics:
            raise ValueError(f"objectives.{metric}: not a metric of family {family.value!r}; "
                             f"allowed: {', '.join(metrics)}")
        if metric in ("robust_accuracy", "transfer_robust_accuracy") and spec.attack is None:
            raise ValueError(f"objectives.{metric}: needs an attack (attack: {{eps: ...}})")
    if spec.scheduler == "asha":
        if len(spec.objectives) > 1:
            raise ValueError("scheduler: asha takes one objective; early-stopped trials would "
                             "pollute a multi-objective Pareto front (use none)")
        if family is Family.LESCI:
            raise ValueError("scheduler: asha needs trials that report per epoch; LESCI trials "
                             "report once (use none)")
    if spec.search.algorithm is Algorithm.GRID:
        for key, dist in spec.searched().items():
            if not isinstance(dist, (Choice, Grid)):
                raise ValueError(f"params.{key}: the grid algorithm needs choice or grid "
                                 f"values, got {type(dist).__name__.lower()}")
    elif any(isinstance(d, Grid) for d in spec.searched().values()) and \
            spec.search.algorithm is not Algorithm.RANDOM:
        raise ValueError(f"search.algorithm: grid values need algorithm grid or random, got "
                         f"{spec.search.algorithm.value}")
    from defenses.data import DatasetName
    from defenses.models import ModelName

    try:
        DatasetName(spec.dataset.name)
    except ValueError:
        raise ValueError(f"dataset.name: unknown dataset {spec.dataset.name!r}; allowed: "
                         f"{', '.join(d.value for d in DatasetName)}") from None
    if spec.dataset.name not in ("digits", "synthetic") and not spec.dataset.root:
        raise ValueError(f"dataset.root: required for dataset {spec.dataset.name!r}")
    try:
        ModelName(spec.model.name)
    except ValueError:
        raise ValueError(f"model.name: unknown model {spec.model.name!r}; allowed: "
                         f"{', '.join(m.value for m in ModelName)}") from None
    _check_training(spec)
    if family is Family.LESCI:
        _check_lesci(spec, check_model)
    if family is Family.ADVERSARIAL:
        from defenses.training import ObjectiveName

        for value in _values(spec, "objective"):
            if value not in {o.value for o in ObjectiveName}:
                raise ValueError(f"params.objective: {value!r} is not an objective; allowed: "
                                 f"{', '.join(o.value for o in ObjectiveName)}")
    if family is not Family.LESCI and spec.attack is None:
        raise ValueError(f"attack: family {family.value!r} needs an evaluation attack "
                         "(attack: {eps: ...})")


def _values(spec: SweepSpec, key: str) -> list[Any]:
    values = spec.values_of(key)
    return list(values) if isinstance(values, list) else []


def _check_distribution(key: str, dist: Distribution, algorithm: Algorithm) -> None:
    if isinstance(dist, (Uniform, LogUniform)):
        low, high = dist.uniform if isinstance(dist, Uniform) else dist.loguniform
        kind = "uniform" if isinstance(dist, Uniform) else "loguniform"
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ValueError(f"params.{key}.{kind}: [{low}, {high}] is empty or inverted; "
                             "need low < high")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"params.{key}.loguniform: bounds must be > 0, got {low}")
    if isinstance(dist, IntRange):
        low, high = dist.int
        if low > high:
            raise ValueError(f"params.{key}.int: [{low}, {high}] is inverted; need low <= high")
        if dist.log and low < 1:
            raise ValueError(f"params.{key}.int: log needs low >= 1, got {low}")


def _check_training(spec: SweepSpec) -> None:
    from defenses.training import TrainConfig

    unknown = set(spec.training) - set(TRAIN_FIELDS) - {"augmentation"}
    if unknown:
        raise ValueError(f"training.{sorted(unknown)[0]}: unknown; allowed: "
                         f"{', '.join(TRAIN_FIELDS)}, augmentation")
    try:
        TrainConfig(**{k: v for k, v in spec.training.items() if k != "augmentation"})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"training: {exc}") from None


def _number_range(spec: SweepSpec, key: str) -> tuple[float, float] | None:
    values = spec.values_of(key)
    if values is None:
        return None
    if isinstance(values, tuple):
        return values
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"params.{key}: expected numbers, got {values}")
    return min(values), max(values)


def _check_lesci(spec: SweepSpec, check_model: bool) -> None:
    k_value = spec.params["k"]
    if isinstance(k_value, IntRange):
        _check_distribution("k", k_value, spec.search.algorithm)
    if isinstance(k_value, (Uniform, LogUniform)):
        raise ValueError("params.k: the surface needs whole numbers: a number, a list, "
                         "{grid: [...]}, {choice: [...]} or {int: [lo, hi]} (every integer)")
    raw_ks = (k_value if isinstance(k_value, list) else spec.values_of("k"))
    if not raw_ks or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             and float(v).is_integer() and v >= 1 for v in raw_ks):
        raise ValueError(f"params.k: must be whole numbers >= 1, got {raw_ks}")
    threshold = spec.params.get("threshold")
    if isinstance(threshold, (LogUniform, IntRange)):
        raise ValueError("params.threshold: a number, a list, {choice/grid: [...]} or a range "
                         "{uniform: [lo, hi]}")
    if isinstance(threshold, Uniform):
        _check_distribution("threshold", threshold, spec.search.algorithm)
        high = threshold.uniform[1]
    else:
        values = (threshold if isinstance(threshold, list) else _values(spec, "threshold")
                  if threshold is not None else [])
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"params.threshold: expected numbers, got {values}")
        high = max(values, default=1.0)
    if high > 1:
        raise ValueError(f"params.threshold: must be <= 1 (a vote fraction; <= 0 means always "
                         f"project), got max {high}")
    try:
        spec.surface_points()
    except ValueError as exc:
        raise ValueError(f"params.threshold: {exc}") from None
    center = _values(spec, "center") if "center" in spec.params else []
    if not all(isinstance(v, bool) for v in center):
        raise ValueError(f"params.center: true (project with the PCA mean, the default) or "
                         f"false (x @ P, as the original entry), got {center}")
    n_components = _number_range(spec, "n_components")
    if n_components and n_components[0] < 1:
        raise ValueError(f"params.n_components: must be >= 1, got {n_components[0]}")
    size = _number_range(spec, "embedding_size")
    k_max = max(spec.surface_ks())
    if size and size[0] < k_max:
        raise ValueError(f"params.embedding_size: {int(size[0])} is smaller than the largest "
                         f"k ({k_max})")
    if not check_model:
        return
    from defenses.data import INPUT_SHAPES, load_dataset
    from defenses.models import build_model, depth_shapes

    if spec.dataset.name == "synthetic":
        shape = load_dataset("synthetic", **spec.dataset.options).input_shape
    else:
        shape = INPUT_SHAPES[spec.dataset.name]
    # the depths' shapes depend on the input shape only: any class count and normalisation do
    try:
        model = build_model(spec.model.name, 10, shape, (0.5,) * shape[0], (0.25,) * shape[0],
                            **spec.model.options)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None
    shapes = depth_shapes(model)
    for depth in _values(spec, "depth"):
        if depth not in shapes:
            raise ValueError(f"params.depth: {depth!r} is not a depth of {spec.model.name}; "
                             f"allowed: {', '.join(shapes)}")
        dims = math.prod(shapes[depth])
        if n_components and n_components[1] > dims:
            raise ValueError(f"params.n_components: {int(n_components[1])} exceeds the "
                             f"{dims} dimensions of depth {depth!r}")
