"""The values a search-space parameter can take: fixed, or one distribution.

    lr: 0.01                        # fixed
    lr: {loguniform: [1e-3, 0.1]}   # uniform / loguniform: a float range
    steps: {int: [3, 10]}           # every integer in [lo, hi] (log: true samples on a log scale)
    depth: {choice: [stem, pool]}   # sampled by the searcher (every value under algorithm grid)
    n_components: {grid: [32, 64]}  # every value, each combined with the rest

A training objective's own parameters live under it (``ObjectiveSpace``):

    objective: {choice: {pgd: {eps: 0.031, steps: {int: [3, 10]}},
                         adv_reg: {multiplier: {loguniform: [0.05, 1]}}}}
"""

from __future__ import annotations

import math
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["Choice", "Grid", "Uniform", "LogUniform", "IntRange", "Distribution", "DIST_TYPES",
           "ObjectiveSpace", "parse_value", "check_distribution", "values_of", "representatives",
           "first_error"]


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
DIST_TYPES = (Choice, Grid, Uniform, LogUniform, IntRange)
_DIST_KEYS = {"choice": Choice, "grid": Grid, "uniform": Uniform, "loguniform": LogUniform,
              "int": IntRange}


def first_error(exc: ValidationError) -> str:
    """A pydantic error as one line: ``where: message (got value)``."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = err["msg"].removeprefix("Value error, ")
    if where and message.startswith((f"{where}.", f"{where}:")):  # it names the key itself
        where = ""
    return f"{where}: {message}{shown}" if where else f"{message}{shown}"


def parse_value(where: str, value: Any) -> Any:
    """A fixed value as it is; a mapping as exactly one distribution (``ValueError`` naming
    ``where`` otherwise)."""
    if not isinstance(value, dict):
        return value
    kinds = [k for k in value if k in _DIST_KEYS]
    if len(kinds) != 1:
        raise ValueError(f"{where}: a distribution needs exactly one of "
                         f"{', '.join(_DIST_KEYS)}, got keys {sorted(value)}")
    try:
        dist = _DIST_KEYS[kinds[0]](**value)
    except ValidationError as exc:
        raise ValueError(f"{where}: {first_error(exc)}") from None
    check_distribution(where, dist)
    return dist


def check_distribution(where: str, dist: Distribution) -> None:
    """Ranges must be non-empty and, on a log scale, positive."""
    if isinstance(dist, (Uniform, LogUniform)):
        low, high = dist.uniform if isinstance(dist, Uniform) else dist.loguniform
        kind = "uniform" if isinstance(dist, Uniform) else "loguniform"
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ValueError(f"{where}.{kind}: [{low}, {high}] is empty or inverted; "
                             "need low < high")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{where}.loguniform: bounds must be > 0, got {low}")
    if isinstance(dist, IntRange):
        low, high = dist.int
        if low > high:
            raise ValueError(f"{where}.int: [{low}, {high}] is inverted; need low <= high")
        if dist.log and low < 1:
            raise ValueError(f"{where}.int: log needs low >= 1, got {low}")


def values_of(value: Any) -> list[Any] | tuple[float, float]:
    """The finite values a parameter can take (fixed, choice, grid, int), or a float range."""
    if isinstance(value, (Choice, Grid)):
        return list(value.choice if isinstance(value, Choice) else value.grid)
    if isinstance(value, IntRange):
        return list(range(value.int[0], value.int[1] + 1))
    if isinstance(value, (Uniform, LogUniform)):
        return tuple(value.uniform if isinstance(value, Uniform) else value.loguniform)
    return [value]


def representatives(value: Any) -> list[Any]:
    """Values that span what a parameter can take (every listed value, a range's two ends):
    a typed model that accepts each of them accepts every value the searcher can draw."""
    if isinstance(value, IntRange):
        return sorted({value.int[0], value.int[1]})
    values = values_of(value)
    return list(values)


class ObjectiveSpace(_Strict):
    """``objective``: one training objective or several, each with its own parameters
    (fixed or distributions), searched as a choice (sampled) or a grid (every one)."""

    kind: str = Field(pattern="^(choice|grid)$")
    branches: dict[str, dict[str, Any]] = Field(min_length=1)

    @field_validator("branches", mode="before")
    @classmethod
    def _parse(cls, branches: Any) -> Any:
        if not isinstance(branches, dict):
            return branches
        out = {}
        for name, params in branches.items():
            if params is not None and not isinstance(params, dict):
                raise ValueError(f"params.objective.{name}: a mapping of its parameters, got "
                                 f"{params!r}")
            out[name] = {key: parse_value(f"params.objective.{name}.{key}", value)
                         for key, value in (params or {}).items()}
        return out

    @classmethod
    def parse(cls, value: Any) -> "ObjectiveSpace":
        """From the YAML: a name, a mapping {name: params}, {choice|grid: [names]} or
        {choice|grid: {name: params}}, or this model's own dump."""
        if isinstance(value, dict) and set(value) == {"kind", "branches"}:
            return cls(**value)
        if isinstance(value, str):
            return cls(kind="choice", branches={value: {}})
        if not isinstance(value, dict) or not value:
            raise ValueError(f"params.objective: a name, {{choice: [names]}} or {{choice: "
                             f"{{name: {{param: value}}}}}}, got {value!r}")
        kinds = [k for k in value if k in ("choice", "grid")]
        if kinds:
            if len(value) != 1:
                raise ValueError(f"params.objective: {kinds[0]} takes no other keys, got "
                                 f"{sorted(value)}")
            options = value[kinds[0]]
            if isinstance(options, list):
                if not options or not all(isinstance(o, str) for o in options):
                    raise ValueError(f"params.objective.{kinds[0]}: objective names, got "
                                     f"{options!r}")
                options = {name: {} for name in options}
            if not isinstance(options, dict) or not options:
                raise ValueError(f"params.objective.{kinds[0]}: a list of names or a mapping "
                                 f"name -> parameters, got {options!r}")
            return cls(kind=kinds[0], branches=options)
        return cls(kind="choice", branches=value)  # {name: params}: one objective, its params

    @property
    def names(self) -> list[str]:
        return list(self.branches)

    @property
    def searched(self) -> bool:
        """More than one objective, or a distribution among an objective's parameters."""
        return len(self.branches) > 1 or any(
            isinstance(v, DIST_TYPES) for params in self.branches.values()
            for v in params.values())
