"""A trial's typed parameters, per family, and their validation at load.

The fields come from the typed models themselves, never from a copied table:
- every family: ``TrainConfig``'s fields (``defenses.trainer``), set in ``training`` or searched
  in ``params``;
- ``lesci``: ``LESCIParams`` (depth, n_components, embedding_size, center), plus ``k`` and
  ``threshold``, which span every trial's surface instead of being searched;
- ``ibp``: ``defenses.objectives.IBPParams`` (eps_train, warmup, rampup, kappa_final, ramp);
- ``adversarial``: ``objective`` and each objective's own parameter model
  (``defenses.objectives``). A parameter at the top of ``params`` is shared: it must apply to
  every objective of the choice; one that applies to some lives under them.

``check_params`` validates every value a searcher can draw against those models before Ray
starts (an unknown or inapplicable key is an error naming it, never dropped);
``resolve`` builds a trial's typed objects from its Tune config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from defenses.objectives import ObjectiveName, ObjectiveParams, objective_params
from defenses.trainer import TrainConfig
from orchestrator.distributions import DIST_TYPES, ObjectiveSpace, representatives

__all__ = ["LESCIParams", "Trial", "TRAINING_FIELDS", "SURFACE_PARAMS", "check_params",
           "resolve", "objective_space", "branch_key"]

TRAINING_FIELDS = tuple(TrainConfig.model_fields)
# LESCI's k and threshold are not searched: each trial evaluates its whole (k, m) surface.
SURFACE_PARAMS = ("k", "threshold")


class LESCIParams(BaseModel):
    """Where and how a LESCI layer projects: the PCA at ``depth`` truncated to
    ``n_components``, an embedding space of ``embedding_size`` training samples (all of them
    when unset), centred by the PCA mean (``center``, the default) or not (x @ P)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: str
    n_components: int = Field(ge=1)
    embedding_size: int | None = Field(default=None, ge=1)
    center: StrictBool = True


@dataclass(frozen=True)
class Trial:
    """What one trial runs with: its training, and its objective (training families) or its
    LESCI parameters."""

    training: TrainConfig
    objective: ObjectiveParams | None = None
    lesci: LESCIParams | None = None

    def logged(self) -> dict[str, Any]:
        """Every value the trial used, by its one name (the child run's params)."""
        out: dict[str, Any] = {}
        if self.lesci is not None:
            out.update(self.lesci.model_dump(mode="json"))
        if self.objective is not None:
            out.update(self.objective.model_dump(mode="json"))
        training = self.training.model_dump(mode="json")
        augmentation = training.pop("augmentation")
        out.update(training)
        out.update({f"augmentation.{k}": v for k, v in augmentation.items()})
        return out


def branch_key(objective: str, key: str) -> str:
    """The Tune/Optuna name of an objective's own searched parameter (``pgd.steps``): one
    name per distribution, whichever objectives share a parameter name."""
    return f"{objective}.{key}"


def objective_space(spec) -> ObjectiveSpace | None:
    """The objectives a training sweep's trials use (IBP: ``ibp``); None for LESCI."""
    from orchestrator.space import Family

    if spec.family is Family.LESCI:
        return None
    if spec.family is Family.IBP:
        return ObjectiveSpace(kind="choice", branches={ObjectiveName.IBP.value: {}})
    return spec.params["objective"]


def _shared(spec) -> dict[str, Any]:
    """The top-level params that go to the objective (neither training nor ``objective``)."""
    return {k: v for k, v in spec.params.items()
            if k not in TRAINING_FIELDS and k != "objective"}


def _validate(model: type[BaseModel], values: dict[str, Any], origin: dict[str, str]) -> None:
    """``model`` accepts ``values`` with each key at every one of its representative values
    (the others at their first); an error names where the bad key was written."""
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
            raise ValueError(f"{where}: {err['msg']}{shown}") from None


def check_params(spec) -> None:
    """Every key of ``params`` and ``training`` applies to the family (and, for a training
    sweep, to every objective it goes to), and every value a searcher can draw is accepted by
    the typed models. ``ValueError`` naming the key otherwise."""
    from orchestrator.space import Family

    family = spec.family
    training_params = {k: v for k, v in spec.params.items() if k in TRAINING_FIELDS}
    base_training = spec.training.model_dump()
    _validate(TrainConfig, {**base_training, **training_params},
              {k: f"params.{k}" if k in training_params else f"training.{k}"
               for k in TRAINING_FIELDS})
    shared = _shared(spec)
    if family is Family.LESCI:
        fields = set(LESCIParams.model_fields) | set(SURFACE_PARAMS)
        for key in spec.params:
            if key not in fields and key not in TRAINING_FIELDS:
                raise ValueError(f"params.{key}: not a parameter of family 'lesci'; allowed: "
                                 f"{', '.join([*LESCIParams.model_fields, *SURFACE_PARAMS])} "
                                 f"and the training fields ({', '.join(TRAINING_FIELDS)})")
        lesci = {k: v for k, v in shared.items() if k in LESCIParams.model_fields}
        _validate(LESCIParams, lesci, {"": "params", **{k: f"params.{k}" for k in lesci}})
        return
    if family is Family.IBP and "objective" in spec.params:
        names = spec.params["objective"].names
        if names != [ObjectiveName.IBP.value] or spec.params["objective"].branches["ibp"]:
            raise ValueError(f"params.objective: family 'ibp' trains with objective 'ibp' "
                             f"only (its parameters at the top of params), got {names}")
    if family is Family.ADVERSARIAL and "objective" not in spec.params:
        raise ValueError("params.objective: required for family 'adversarial' (a name, or "
                         "{choice: {name: {its parameters}}})")
    space = objective_space(spec)
    for name, own in space.branches.items():
        try:
            model = objective_params(name)
        except ValueError as exc:
            raise ValueError(f"params.objective: {exc}") from None
        fields = [f for f in model.model_fields if f != "objective"]
        for key in shared:
            if key not in fields:
                where = "" if family is Family.IBP else (
                    "; put it under the objectives it applies to")
                raise ValueError(f"params.{key}: not a parameter of objective {name!r} "
                                 f"(its parameters: {', '.join(fields) or 'none'}){where}")
        for key in own:
            if key in shared:
                raise ValueError(f"params.objective.{name}.{key}: also set at params.{key}; "
                                 "set it in one place")
            if key in TRAINING_FIELDS:
                raise ValueError(f"params.objective.{name}.{key}: a training field; set it at "
                                 f"params.{key} (it applies to every objective)")
            if key not in fields:
                raise ValueError(f"params.objective.{name}.{key}: not a parameter of "
                                 f"objective {name!r}; its parameters: "
                                 f"{', '.join(fields) or 'none'}")
        origin = {"": (f"params.objective.{name}" if family is Family.ADVERSARIAL
                       else "params"),
                  **{k: f"params.{k}" for k in shared},
                  **{k: f"params.objective.{name}.{k}" for k in own}}
        _validate(model, {**shared, **own}, origin)


def _chosen(spec, config: dict[str, Any], keys) -> dict[str, Any]:
    """The value of each of ``keys``: the trial's config for a searched key, else the fixed
    value of the space."""
    out = {}
    for key in keys:
        value = spec.params[key]
        out[key] = config[key] if isinstance(value, DIST_TYPES) else value
    return out


def resolve(spec, config: dict[str, Any]) -> Trial:
    """The typed objects of the trial whose Tune config is ``config``."""
    from orchestrator.space import Family

    training_keys = [k for k in spec.params if k in TRAINING_FIELDS]
    training = TrainConfig.model_validate({**spec.training.model_dump(),
                                           **_chosen(spec, config, training_keys)})
    shared_keys = list(_shared(spec))
    if spec.family is Family.LESCI:
        lesci = [k for k in shared_keys if k in LESCIParams.model_fields]
        return Trial(training, lesci=LESCIParams(**_chosen(spec, config, lesci)))
    space = objective_space(spec)
    chosen = config.get("objective")
    branch_config: dict[str, Any] = {}
    if isinstance(chosen, dict):  # grid/random search: the objective and its own values
        branch_config = {k: v for k, v in chosen.items() if k != "objective"}
        name = chosen["objective"]
    else:
        name = chosen if isinstance(chosen, str) and spec.family is not Family.IBP \
            else space.names[0]
        prefix = f"{name}."
        branch_config = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    own = {k: branch_config[k] if isinstance(v, DIST_TYPES) else v
           for k, v in space.branches[name].items()}
    values = {**_chosen(spec, config, shared_keys), **own}
    return Trial(training, objective=objective_params(name)(**values))
