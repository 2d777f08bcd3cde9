"""Adversarial training (Madry et al. 2018): trials train with one objective of a choice
(standard, FGSM, PGD, TRADES-style regularisation, ...), each with its own parameters."""

from __future__ import annotations

from orchestrator.distributions import ObjectiveSpace
from orchestrator.families.training import TrainingFamily

__all__ = ["AdversarialFamily"]


class AdversarialFamily(TrainingFamily):
    name = "adversarial"
    metrics = {name: "max" for name in (
        "nominal_accuracy", "pgd_accuracy", "robust_accuracy", "apgd_ce_accuracy",
        "apgd_t_accuracy", "square_accuracy")}
    required_params = ("objective",)

    def objective_space(self, spec) -> ObjectiveSpace:
        return spec.params["objective"]
