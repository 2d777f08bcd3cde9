"""A trial's typed parameters and their validation at load.

The fields come from the typed models themselves, never from a copied table:
- every family: ``TrainConfig``'s fields (``defenses.trainer``), set in ``training`` or searched
  in ``params``;
- each family's own (``orchestrator.families``): LESCI's ``LESCIParams`` and its surface's
  ``k`` and ``threshold``; a training family's objective and each objective's own parameter
  model (``defenses.objectives``).

``check_params`` validates every value a searcher can draw against those models before Ray
starts (an unknown or inapplicable key is an error naming it, never dropped);
``resolve`` builds a trial's typed objects from its Tune config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from defenses.trainer import TrainConfig
from orchestrator.distributions import DIST_TYPES, representatives

__all__ = ["Trial", "TRAINING_FIELDS", "check_params", "resolve", "branch_key", "validate",
           "chosen"]

TRAINING_FIELDS = tuple(TrainConfig.model_fields)


@dataclass(frozen=True)
class Trial:
    """What one trial runs with: its training, and its family's typed parameters (LESCI's
    ``LESCIParams``, a training family's objective parameters)."""

    training: TrainConfig
    params: BaseModel

    def logged(self) -> dict[str, Any]:
        """Every value the trial used, by its one name (the child run's params)."""
        out: dict[str, Any] = dict(self.params.model_dump(mode="json"))
        training = self.training.model_dump(mode="json")
        augmentation = training.pop("augmentation")
        out.update(training)
        out.update({f"augmentation.{k}": v for k, v in augmentation.items()})
        return out


def branch_key(objective: str, key: str) -> str:
    """The Tune/Optuna name of an objective's own searched parameter (``pgd.steps``): one
    name per distribution, whichever objectives share a parameter name."""
    return f"{objective}.{key}"


def validate(model: type[BaseModel], values: dict[str, Any], origin: dict[str, str]) -> None:
    """``model`` accepts ``values`` with each key at every one of its representative values
    (the others at their first); an error names where the bad key was written (``origin``:
    key -> where; "" -> where a missing key belongs)."""
    base = {k: representatives(v)[0] for k, v in values.items()}
    trials = [base] + [{**base, key: r} for key, v in values.items()
                       for r in representatives(v)[1:]]
    for trial in trials:
        try:
            model.model_validate(trial)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = str(err["loc"][0]) if err["loc"] else ""
            if err["type"] == "missing":
                raise ValueError(f"{origin.get('', 'params')}: {key} is required") from None
            where = ".".join([origin.get(key, f"params.{key}"), *map(str, err["loc"][1:])])
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            message = err["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}: {message}{shown}") from None


def chosen(spec, config: dict[str, Any], keys) -> dict[str, Any]:
    """The value of each of ``keys``: the trial's config for a searched key, else the fixed
    value of the space."""
    out = {}
    for key in keys:
        value = spec.params[key]
        out[key] = config[key] if isinstance(value, DIST_TYPES) else value
    return out


def check_params(spec) -> None:
    """Every key of ``params`` and ``training`` applies to the family (and, for a training
    sweep, to every objective it goes to), and every value a searcher can draw is accepted by
    the typed models. ``ValueError`` naming the key otherwise."""
    training_params = {k: v for k, v in spec.params.items() if k in TRAINING_FIELDS}
    base_training = spec.training.model_dump()
    validate(TrainConfig, {**base_training, **training_params},
             {k: f"params.{k}" if k in training_params else f"training.{k}"
              for k in TRAINING_FIELDS})
    spec.defense.check_params(spec)


def resolve(spec, config: dict[str, Any]) -> Trial:
    """The typed objects of the trial whose Tune config is ``config``."""
    training_keys = [k for k in spec.params if k in TRAINING_FIELDS]
    training = TrainConfig.model_validate({**spec.training.model_dump(),
                                           **chosen(spec, config, training_keys)})
    return Trial(training, spec.defense.trial_params(spec, config))
