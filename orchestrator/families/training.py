"""The training families' common part: a trial trains a model (one per seed) with an objective
of ``defenses.objectives``, reports each epoch's figures and checkpoints every epoch; after the
last epoch it runs the attack suite once. ``ibp`` and ``adversarial`` differ in their
objectives, their metrics and what they need of the model."""

from __future__ import annotations

from typing import Any

from defenses.objectives import objective_params
from orchestrator.distributions import DIST_TYPES, values_of
from orchestrator.families.base import DefenseFamily
from orchestrator.params import TRAINING_FIELDS, chosen, validate

__all__ = ["TrainingFamily", "SUITE_METRICS"]

# the metrics of the attack suite, measured once, after the last epoch
SUITE_METRICS = ("robust_accuracy", "apgd_ce_accuracy", "apgd_t_accuracy", "square_accuracy")


class TrainingFamily(DefenseFamily):
    """A family whose trials train: its objectives (``objective_space``) and their
    parameters, at the top of ``params`` when shared by all of them."""

    # the trial's model is verified (IBP bounds) as well as attacked
    budget_unit = "epoch"
    rung_unit = "epochs"

    def _shared(self, spec) -> dict[str, Any]:
        """The top-level params that go to the objective (neither training nor ``objective``)."""
        return {k: v for k, v in spec.params.items()
                if k not in TRAINING_FIELDS and k != "objective"}

    def _origin(self, name: str) -> str:
        """Where an error about objective ``name``'s parameters points."""
        return f"params.objective.{name}"

    def _not_shared(self) -> str:
        return "; put it under the objectives it applies to"

    def check_params(self, spec) -> None:
        shared = self._shared(spec)
        space = self.objective_space(spec)
        for name, own in space.branches.items():
            try:
                model = objective_params(name)
            except ValueError as exc:
                raise ValueError(f"params.objective: {exc}") from None
            fields = [f for f in model.model_fields if f != "objective"]
            for key in shared:
                if key not in fields:
                    raise ValueError(f"params.{key}: not a parameter of objective {name!r} "
                                     f"(its parameters: {', '.join(fields) or 'none'})"
                                     f"{self._not_shared()}")
            for key in own:
                if key in shared:
                    raise ValueError(f"params.objective.{name}.{key}: also set at "
                                     f"params.{key}; set it in one place")
                if key in TRAINING_FIELDS:
                    raise ValueError(f"params.objective.{name}.{key}: a training field; set "
                                     f"it at params.{key} (it applies to every objective)")
                if key not in fields:
                    raise ValueError(f"params.objective.{name}.{key}: not a parameter of "
                                     f"objective {name!r}; its parameters: "
                                     f"{', '.join(fields) or 'none'}")
            origin = {"": self._origin(name), **{k: f"params.{k}" for k in shared},
                      **{k: f"params.objective.{name}.{k}" for k in own}}
            validate(model, {**shared, **own}, origin)

    def trial_params(self, spec, config: dict[str, Any]):
        space = self.objective_space(spec)
        picked = config.get("objective")
        if isinstance(picked, dict):  # grid/random search: the objective and its own values
            branch_config = {k: v for k, v in picked.items() if k != "objective"}
            name = picked["objective"]
        else:
            if isinstance(picked, str) and picked not in space.branches:
                raise ValueError(f"objective {picked!r} is not one of the space's "
                                 f"({', '.join(space.names)})")
            name = picked if isinstance(picked, str) else space.names[0]
            prefix = f"{name}."
            branch_config = {k[len(prefix):]: v for k, v in config.items()
                             if k.startswith(prefix)}
        own = {k: branch_config[k] if isinstance(v, DIST_TYPES) else v
               for k, v in space.branches[name].items()}
        values = {**chosen(spec, config, list(self._shared(spec))), **own}
        return objective_params(name)(**values)

    # -- checks ----------------------------------------------------------------------------

    def check(self, spec) -> None:
        attack = spec.attack
        if attack is None:
            raise ValueError(f"attack: family {self.name!r} needs an evaluation attack "
                             "(attack: {eps: ...})")
        # LESCI's keys would be ignored (a value other than the default: a full dump of a
        # spec, as_dict, loads again)
        lesci_only = [k for k, changed in (("apgd", attack.apgd != type(attack.apgd)()),
                                           ("samples", attack.samples is not None)) if changed]
        if lesci_only:
            raise ValueError(f"attack.{lesci_only[0]}: LESCI only; the training families' "
                             "suite is set under attack.suite (apgd_steps, apgd_restarts, "
                             "targets, square_queries, square_restarts)")
        if spec.verify.complete and spec.search.repeats > 1:
            raise ValueError("verify.complete: verifies one model per trial; set "
                             "search.repeats to 1")
        scheduler = spec.scheduler.name
        if scheduler != "none":
            suite = [m for m in spec.optimize if m in SUITE_METRICS]
            if suite:
                raise ValueError(f"optimize.{suite[0]}: measured once, after the last epoch, "
                                 f"so scheduler {scheduler} cannot compare trials by it; "
                                 "optimize a per-epoch metric (pgd_accuracy, "
                                 "verified_accuracy) or use scheduler none")

    def check_model(self, spec, model, input_shape) -> None:
        """With ``verify.complete``: the model has an exact mixed-integer encoding."""
        if spec.verify.complete:
            from defenses.complete import check_complete

            try:
                check_complete(model, input_shape)
            except ValueError as exc:
                raise ValueError(f"verify.complete: model {spec.model.label}: {exc}") from None

    def test_metrics(self, spec) -> list[str]:
        """With ``verify.complete``: the front's complete verification, with intervals."""
        if not spec.verify.complete:
            return []
        from orchestrator.training_trial import VERIFICATION_METRICS

        return [f"{m}{end}" for m in VERIFICATION_METRICS for end in ("", "_ci_low", "_ci_high")
                ] + ["verify_samples"]

    def check_data(self, spec, splits) -> None:
        if spec.verify.complete and spec.verify.samples > len(splits.test):
            raise ValueError(f"verify.samples: {spec.verify.samples} is above the test split's "
                             f"{len(splits.test)} samples")

    def full_budget(self, spec) -> int:
        return spec.training.epochs

    def ramp_steps(self, spec) -> int:
        """The largest ``warmup + rampup`` any objective of the space can draw (IBP's eps,
        kappa and beta ramps), in optimiser steps."""
        space = self.objective_space(spec)
        shared = self._shared(spec)
        longest = 0
        for name, own in space.branches.items():
            fields = objective_params(name).model_fields
            total = 0
            for key in ("warmup", "rampup"):
                if key not in fields:
                    continue
                value = own.get(key, shared.get(key, fields[key].default))
                total += max(values_of(value))
            longest = max(longest, int(total))
        return longest

    # -- what a trial reports ----------------------------------------------------------------

    def lenient_metrics(self, spec) -> bool:
        return any(m in SUITE_METRICS for m in spec.optimize)

    def attack_budget(self, spec) -> dict[str, Any]:
        return {"eps": spec.attack.eps, **spec.attack.attack_suite().described(),
                "robust_accuracy": "per-sample worst case of the suite, after the last epoch"}

    # -- running ---------------------------------------------------------------------------

    def trainable(self):
        from orchestrator.training_trial import training_trial

        return training_trial

    def test_item(self, item: dict[str, Any], row: dict[str, Any]) -> None:
        item["trial_dir"] = row.get("trial_dir")

    def evaluate_test(self, spec, splits, device, cache, log, item, storage) -> dict[str, Any]:
        """The trial's final models (its newest checkpoint, one per seed) on the test split,
        the attack suite included (a stage: computed once, then read back)."""
        import copy
        import hashlib
        import io
        import json

        import torch

        from orchestrator.trainables import over_seeds
        from orchestrator.training_trial import (complete_verification, evaluate_training,
                                                 newest_checkpoint, trial_models,
                                                 verification_metrics)

        found = newest_checkpoint(storage.child(item["trial_dir"]))
        if found is None:
            raise RuntimeError(f"trial {item['trial_id']}: no intact checkpoint in "
                               f"{item['trial_dir']} to evaluate on the test split")
        state, _ = found
        inputs = {"split": "test", "dataset": spec.dataset.model_dump(),
                  "attack": spec.attack.model_dump(), "family": self.name,
                  "checkpoint": hashlib.sha256(state).hexdigest(),
                  "certificates": "ibp, crown-ibp, alpha-crown"}

        built: list[Any] = []

        def models() -> list[Any]:
            if not built:
                built.extend(trial_models(spec, splits, state, device))
            return built

        def compute() -> bytes:
            runs = [evaluate_training(spec, model, splits.test, seed=1000 * r)
                    for r, model in enumerate(models())]
            return json.dumps({"metrics": over_seeds(runs)}).encode()

        result = json.loads(cache.get("test", inputs, compute, item["trial_id"]))
        # the final models, one per seed, for the child run (MLflow's PyTorch flavour)
        artifacts: dict[str, bytes] = {}
        for r, model in enumerate(models()):
            name = "model" if r == 0 else f"model_seed{r}"
            buffer = io.BytesIO()
            try:
                torch.save(copy.deepcopy(model).cpu(), buffer)
            except Exception as exc:  # noqa: BLE001  (e.g. a user model holding a lambda)
                log(f"{name} cannot be pickled for MLflow ({type(exc).__name__}); its weights "
                    f"stay in the trial's checkpoint")
                continue
            artifacts[name] = buffer.getvalue()
        if spec.verify.complete:
            data = cache.get(
                "verify", {**inputs, "verify": spec.verify.model_dump(),
                           "seed": spec.training.seed},
                lambda: complete_verification(spec, models()[0], splits.test, log),
                item["trial_id"])
            result["metrics"].update(verification_metrics(data))
            artifacts["verification.npz"] = data
        result["artifacts"] = artifacts
        return result
