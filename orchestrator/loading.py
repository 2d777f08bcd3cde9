"""From a file to a validated search space: read the YAML (a shipped space by name, or a file),
merge the smoke-test overrides, build the ``SweepSpec`` (``orchestrator.space``: the schema),
and check what types cannot: the family's needs, metric names, the search algorithm, the
dataset and the model (``orchestrator.probes``). Each problem is one line naming the file, the
key, the value and what is allowed (``SpaceError``; the CLI exits with code 2).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator import probes
from orchestrator.distributions import DIST_TYPES, Choice, Grid, first_error
from orchestrator.params import check_params
from orchestrator.space import Algorithm, SpaceError, SweepSpec
from search_spaces import shipped_spaces

__all__ = ["load_space", "shipped_spaces"]


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
        raise SpaceError(f"{path}: {first_error(exc)}") from None
    except TypeError as exc:
        raise SpaceError(f"{path}: {exc}") from None
    try:
        _check_semantics(spec)
        splits = probes.open_dataset(spec) if check_data else None  # read once
        if check_model:
            probes.check_model(spec, splits)
        if check_data:
            probes.check_data(spec, splits)
    except ValueError as exc:
        raise SpaceError(f"{path}: {exc}") from None
    return spec


# ------------------------------------------------------------------------------------------------
# checks that need more than types: families, metric names, algorithms, LESCI's surface


def _check_semantics(spec: SweepSpec) -> None:
    """Everything but files and models."""
    family = spec.defense
    for key in family.required_params:
        if key not in spec.params:
            raise ValueError(f"params.{key}: required for family {family.name!r}")
    check_params(spec)
    for metric in spec.optimize:
        if metric not in family.metrics:
            raise ValueError(f"optimize.{metric}: not a metric of family {family.name!r}; "
                             f"allowed: {', '.join(family.metrics)}")
        best = family.metrics[metric]
        if spec.optimize[metric] != best:
            raise ValueError(f"optimize.{metric}: {spec.optimize[metric]}, but a "
                             f"{'higher' if best == 'max' else 'lower'} {metric} is better "
                             f"(use {best})")
        if metric in ("robust_accuracy", "transfer_robust_accuracy") and spec.attack is None:
            raise ValueError(f"optimize.{metric}: needs an attack (attack: {{eps: ...}})")
    _check_scheduler(spec)
    family.check(spec)
    _check_algorithm(spec)
    from defenses.data import EMBEDDED, DatasetName
    from defenses.models import ModelName

    try:
        DatasetName(spec.dataset.name)
    except ValueError:
        raise ValueError(f"dataset.name: unknown dataset {spec.dataset.name!r}; allowed: "
                         f"{', '.join(d.value for d in DatasetName)}") from None
    if spec.dataset.name == DatasetName.ARRAYS.value:
        if not spec.dataset.path:
            raise ValueError("dataset.path: required for dataset 'arrays' (an .npz file with "
                             "x_train, y_train, x_test, y_test)")
        if spec.dataset.root:
            raise ValueError("dataset.root: dataset 'arrays' reads dataset.path, not a folder")
    elif spec.dataset.path:
        raise ValueError(f"dataset.path: only for dataset 'arrays'; dataset "
                         f"{spec.dataset.name!r} reads " + (
                             "no file" if spec.dataset.name in EMBEDDED else "dataset.root"))
    elif spec.dataset.name not in EMBEDDED and not spec.dataset.root:
        raise ValueError(f"dataset.root: required for dataset {spec.dataset.name!r}")
    if spec.model.name is not None:
        try:
            ModelName(spec.model.name)
        except ValueError:
            raise ValueError(f"model.name: unknown model {spec.model.name!r}; allowed: "
                             f"{', '.join(m.value for m in ModelName)} (or your own: "
                             "model.factory)") from None


def _check_scheduler(spec: SweepSpec) -> None:
    """asha takes one objective, mo_asha several; mo_asha needs a family whose trials have a
    budget to stop early, and a first rung below it."""
    scheduler, family = spec.scheduler, spec.defense
    if scheduler.name == "asha" and len(spec.optimize) > 1:
        raise ValueError("scheduler: asha takes one metric to optimize; early-stopped trials "
                         "would pollute a multi-objective Pareto front (use mo_asha, or none)")
    if scheduler.name != "mo_asha":
        return
    if len(spec.optimize) < 2:
        raise ValueError("scheduler: mo_asha ranks several objectives; with one metric to "
                         "optimize use asha")
    if family.budget_unit is None:
        raise ValueError(f"scheduler: mo_asha: family {family.name!r} has no budget unit to "
                         "stop its trials by (use none)")
    full = family.full_budget(spec)
    if scheduler.grace_period >= full:
        raise ValueError(f"scheduler.grace_period: {scheduler.grace_period} is at or above "
                         f"the full budget ({full:g} {family.rung_unit}): no rung would stop "
                         "anything")


def _check_algorithm(spec: SweepSpec) -> None:
    """Grid values need the grid or random algorithm; the grid algorithm needs finite values
    everywhere, an objective's own parameters included."""
    algorithm = spec.search.algorithm
    space = spec.objective_space()
    searched = dict(spec.searched())
    if space is not None:
        searched.update({f"objective.{name}.{k}": v for name, own in space.branches.items()
                         for k, v in own.items() if isinstance(v, DIST_TYPES)})
    if algorithm is Algorithm.GRID:
        for key, dist in searched.items():
            if not isinstance(dist, (Choice, Grid)):
                raise ValueError(f"params.{key}: the grid algorithm needs choice or grid "
                                 f"values, got {type(dist).__name__.lower()}")
        return
    grids = [k for k, d in searched.items() if isinstance(d, Grid)]
    if (space is not None and space.kind == "grid" and len(space.branches) > 1
            and algorithm is not Algorithm.RANDOM):
        raise ValueError(f"params.objective: grid needs algorithm grid (every objective and "
                         f"its values once) or random (num_samples of each objective); use "
                         f"choice with {algorithm.value}")
    if space is not None:
        own_grids = [k for k in grids if k.startswith("objective.")]
        if own_grids:
            raise ValueError(f"params.{own_grids[0]}: an objective's own grid needs algorithm "
                             f"grid; use choice with {algorithm.value}")
    if grids and algorithm is not Algorithm.RANDOM:
        raise ValueError(f"search.algorithm: grid values need algorithm grid or random, got "
                         f"{algorithm.value}")
