"""IBP (SPEC.md section 2): trials train with interval bound propagation (objective ``ibp``,
its parameters at the top of ``params``) and report verified accuracy beside the attacks'."""

from __future__ import annotations

from defenses.objectives import ObjectiveName
from orchestrator.distributions import ObjectiveSpace
from orchestrator.families.training import TrainingFamily

__all__ = ["IBPFamily"]


class IBPFamily(TrainingFamily):
    name = "ibp"
    metrics = {name: "max" for name in (
        "nominal_accuracy", "verified_accuracy", "verified_ibp_accuracy",
        "verified_crown_accuracy", "pgd_accuracy", "robust_accuracy", "apgd_ce_accuracy",
        "apgd_t_accuracy", "square_accuracy")}
    verifies = True

    def objective_space(self, spec) -> ObjectiveSpace:
        return ObjectiveSpace(kind="choice", branches={ObjectiveName.IBP.value: {}})

    def _origin(self, name: str) -> str:
        return "params"

    def _not_shared(self) -> str:
        return ""

    def check_params(self, spec) -> None:
        if "objective" in spec.params:
            names = spec.params["objective"].names
            if names != [ObjectiveName.IBP.value] or spec.params["objective"].branches["ibp"]:
                raise ValueError(f"params.objective: family 'ibp' trains with objective 'ibp' "
                                 f"only (its parameters at the top of params), got {names}")
        super().check_params(spec)
        ibp_cnns = ("ibp_small", "ibp_medium", "ibp_large")
        if "batch_norm" in spec.params and spec.model.name not in ibp_cnns:
            raise ValueError(f"params.batch_norm: only the built-in IBP CNNs "
                             f"({', '.join(ibp_cnns)}) take a batch norm after every layer; "
                             f"the space's model is {spec.model.label}")
        for key in ("batch_norm", "init"):
            if key in spec.params and spec.model.checkpoint:
                raise ValueError(f"params.{key}: changes a fresh model, but the space "
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
