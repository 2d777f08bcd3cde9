"""IBP (Gowal et al. 2018): trials train with interval bound propagation and report verified
accuracy beside the attacks'. The objective is ``ibp`` with its parameters at the top of
``params``, or a choice or grid of ``ibp`` and its named recipes (``crown_ibp``, ``fast_ibp``:
IBP with other defaults; ``sabr``, ``mtl_ibp``, ``cc_ibp``, ``exp_ibp``: IBP's ramps with a loss
between the adversarial and the verified one, ``defenses.expressive``; ``taps``, ``staps``: IBP
to a cut of the model and an attack through the rest, ``defenses.taps``) under
``params.objective``, each with its own parameters."""

from __future__ import annotations

from typing import Any

from defenses.objectives import IBP_OBJECTIVES, ObjectiveName, objective_params
from orchestrator.distributions import ObjectiveSpace, representatives
from orchestrator.families.training import TrainingFamily

__all__ = ["IBPFamily"]


class IBPFamily(TrainingFamily):
    name = "ibp"
    metrics = {name: "max" for name in (
        "nominal_accuracy", "verified_accuracy", "verified_ibp_accuracy",
        "verified_crown_accuracy", "verified_alpha_crown_accuracy", "pgd_accuracy",
        "robust_accuracy", "apgd_ce_accuracy", "apgd_t_accuracy", "square_accuracy")}
    verifies = True

    def objective_space(self, spec) -> ObjectiveSpace:
        if "objective" in spec.params:
            return spec.params["objective"]
        return ObjectiveSpace(kind="choice", branches={ObjectiveName.IBP.value: {}})

    def _origin(self, name: str) -> str:
        # plain ibp's parameters sit at the top of params; a recipe's own under its name
        return "params" if name == ObjectiveName.IBP.value else f"params.objective.{name}"

    def _not_shared(self) -> str:
        return ""

    @staticmethod
    def _set(spec, name: str, key: str) -> tuple[str, list[Any]]:
        """Where objective ``name``'s ``key`` is set and the values it can take; left unset,
        the objective's default, and where it would be set, saying so."""
        own = spec.params["objective"].branches[name] if "objective" in spec.params else {}
        for where, params in ((f"params.objective.{name}.{key}", own),
                              (f"params.{key}", spec.params)):
            if key in params:
                return where, representatives(params[key])
        default = objective_params(name).model_fields[key].default
        return (f"params.objective.{name}.{key} (objective {name}'s default, "
                f"{getattr(default, 'value', default)})", [default])

    def check_params(self, spec) -> None:
        names = self.objective_space(spec).names
        allowed = [o.value for o in IBP_OBJECTIVES]
        wrong = [n for n in names if n not in allowed]
        if wrong:
            raise ValueError(f"params.objective: family 'ibp' trains with {', '.join(allowed)} "
                             f"(IBP and its named recipes), got {wrong[0]!r}")
        super().check_params(spec)
        ibp_cnns = ("ibp_small", "ibp_medium", "ibp_large")
        for name in names:
            where, values = self._set(spec, name, "batch_norm")
            if any(values) and spec.model.name not in ibp_cnns:
                raise ValueError(f"{where}: only the built-in IBP CNNs ({', '.join(ibp_cnns)}) "
                                 f"take a batch norm after every layer; the space's model is "
                                 f"{spec.model.label}")
            if not spec.model.checkpoint:
                continue
            for key, fresh in (("batch_norm", [False]), ("init", ["default"])):
                where, values = self._set(spec, name, key)
                if any(getattr(v, "value", v) not in fresh for v in values):
                    raise ValueError(f"{where}: changes a fresh model, but the space "
                                     f"fine-tunes model.checkpoint {spec.model.checkpoint}")

    def check_model(self, spec, model, input_shape) -> None:
        """The model's bounds can be computed (``defenses.ibp.check_bounds``), CROWN's too
        (``defenses.crown.check_crown``)."""
        from defenses.crown import check_crown
        from defenses.ibp import check_bounds

        try:
            check_bounds(model, input_shape)
            check_crown(model, input_shape)
        except ValueError as exc:
            raise ValueError(f"model {spec.model.label}: {exc}") from None
        self._check_splits(spec, model, input_shape)
        super().check_model(spec, model, input_shape)

    def _check_splits(self, spec, model, input_shape) -> None:
        """TAPS's and STAPS's ``split``: a single cut of the model each trial builds (with a
        batch norm after every layer where the recipe's ``batch_norm`` adds them)."""
        from defenses.taps import split_model
        from orchestrator.probes import probe_model

        with_norms = None
        for name in self.objective_space(spec).names:
            if name not in (ObjectiveName.TAPS.value, ObjectiveName.STAPS.value):
                continue
            where, splits = self._set(spec, name, "split")
            models = []
            for batch_norm in set(self._set(spec, name, "batch_norm")[1]):
                if batch_norm and with_norms is None:  # built as the trials build it
                    with_norms = probe_model(spec.model_copy(update={
                        "model": spec.model.model_copy(update={"options": {
                            **spec.model.options, "batch_norm": True}})}))[0]
                models.append(with_norms if batch_norm else model)
            for split in splits:
                for each in models:
                    try:
                        split_model(each, split)
                    except ValueError as exc:
                        raise ValueError(f"{where}: {exc}") from None
