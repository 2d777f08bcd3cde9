"""The contract every training objective keeps: typed parameters that reject what does not
apply, a finite differentiable loss, metrics as floats, randomness only from the generator."""

import pytest
import torch
from pydantic import ValidationError

from defenses.models import build_model
from defenses.objectives import (AdversarialRegularizationParams, Bound, Init, ObjectiveName,
                                 PARAMS, make_objective, objective_params)

# the smallest valid parameters of each objective
MINIMAL = {"standard": {}, "fgsm": {"eps": 0.1}, "fast_fgsm": {"eps": 0.1},
           "pgd": {"eps": 0.1, "steps": 2}, "adv_reg": {}, "ibp": {"eps_train": 0.1},
           "crown_ibp": {"eps_train": 0.1, "warmup": 1, "rampup": 8},
           "fast_ibp": {"eps_train": 0.1, "warmup": 1, "rampup": 8},
           "sabr": {"eps_train": 0.1, "rampup": 8, "attack_steps": 2},
           "mtl_ibp": {"eps_train": 0.1, "rampup": 8}, "cc_ibp": {"eps_train": 0.1, "rampup": 8},
           "exp_ibp": {"eps_train": 0.1, "rampup": 8},
           # the ramp over by step 5, so that TAPS's own loss is what is tested
           "taps": {"eps_train": 0.1, "warmup": 1, "rampup": 2, "split": "layers.relu_conv2",
                    "attack_steps": 2, "restarts": 2},
           "staps": {"eps_train": 0.1, "warmup": 1, "rampup": 2, "split": "layers.relu_conv2",
                     "attack_steps": 2, "restarts": 2}}


def test_every_objective_has_a_parameter_model_named_after_it():
    assert set(MINIMAL) == {o.value for o in ObjectiveName} == {o.value for o in PARAMS}
    for name in MINIMAL:
        assert objective_params(name)(**MINIMAL[name]).objective == name


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = build_model("ibp_small", 3, (1, 8, 8), (0.5,), (0.25,), padding="same")
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, x, y


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_loss_is_finite_differentiable_and_seeded(name, batch):
    model, x, y = batch
    objective = make_objective(name, **MINIMAL[name])
    assert objective.name == name
    model.train()
    losses = []
    for _ in range(2):
        model.zero_grad()
        loss, metrics = objective.loss(model, x, y, step=5, generator=torch.Generator().manual_seed(3))
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        assert metrics and all(isinstance(v, float) for v in metrics.values())
        assert "train_loss" in metrics
        losses.append(float(loss.detach()))
    assert losses[0] == losses[1]  # same generator, same loss
    assert model.training  # the objective leaves the model's mode as it found it


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_unknown_and_inapplicable_parameters_are_rejected(name):
    with pytest.raises(ValidationError, match="epsilon"):
        make_objective(name, **MINIMAL[name], epsilon=0.3)
    inapplicable = {"standard": "eps", "fgsm": "steps", "fast_fgsm": "steps", "pgd": "mix",
                    "adv_reg": "alpha", "ibp": "eps", "crown_ibp": "eps",
                    "fast_ibp": "eps", "sabr": "alpha", "mtl_ibp": "lam", "cc_ibp": "lam",
                    "exp_ibp": "lam", "taps": "lam", "staps": "alpha"}[name]
    with pytest.raises(ValidationError, match=inapplicable):
        make_objective(name, **{**MINIMAL[name], inapplicable: 0.01})


def test_unknown_objective_and_bad_values_name_what_is_allowed():
    with pytest.raises(ValueError, match="unknown objective 'trades'; allowed: standard, fgsm"):
        make_objective("trades")
    with pytest.raises(ValidationError, match="eps_train"):
        make_objective("ibp", eps_train=3)
    with pytest.raises(ValidationError, match="norm"):
        make_objective("adv_reg", norm="l3")
    with pytest.raises(ValidationError, match="eps"):
        make_objective("fgsm")  # required


def test_adversarial_regularisation_steps_by_eps_along_unit_directions():
    grad = torch.randn(4, 1, 3, 3)
    for norm, order in (("l2", 2), ("l1", 1), ("inf", float("inf"))):
        d = AdversarialRegularizationParams(norm=norm).build().direction(grad)
        assert torch.allclose(torch.linalg.vector_norm(d.flatten(1), ord=order, dim=1),
                              torch.ones(4), atol=1e-6)
        assert torch.equal(torch.sign(d), torch.sign(grad))
    # eps is the step: under l-inf no pixel of x_adv moves by more than eps
    objective = make_objective("adv_reg", eps=0.02)
    assert objective.params.eps == 0.02


def test_pgd_alpha_default_lives_in_one_place():
    from defenses.attacks import default_alpha

    assert objective_params("pgd")(eps=0.1, steps=4).alpha == default_alpha(0.1, 4)
    assert objective_params("pgd")(eps=0.1, steps=4, alpha=0.01).alpha == 0.01
    assert objective_params("fast_fgsm")(eps=0.1).alpha == 1.25 * 0.1


def test_ibp_recipes_are_ibp_with_their_own_defaults_and_refuse_contradictions(batch):
    schedule = {"eps_train": 0.1, "warmup": 1, "rampup": 8, "kappa_final": 0.4}
    ibp, crown, fast = (objective_params(n)(**schedule) for n in ("ibp", "crown_ibp", "fast_ibp"))
    fields = set(ibp.model_dump()) - {"objective"}
    assert crown.bound is Bound.CROWN_IBP
    assert {k for k in fields if getattr(crown, k) != getattr(ibp, k)} == {"bound"}
    assert (fast.init, fast.batch_norm, fast.fast_reg) == (Init.IBP, True, 0.5)
    assert {k for k in fields if getattr(fast, k) != getattr(ibp, k)} == {
        "init", "batch_norm", "fast_reg"}
    assert fast.model_options() == {"batch_norm": True}
    # a recipe is its IBP parameters: the same loss as ibp with them set
    model, x, y = batch
    for recipe, same in (("crown_ibp", {"bound": "crown_ibp"}), ("fast_ibp", {"fast_reg": 0.5})):
        losses = [make_objective(n, **schedule, **extra).loss(
                      model, x, y, step=5, generator=torch.Generator().manual_seed(0))[0].item()
                  for n, extra in ((recipe, {}), ("ibp", same))]
        assert losses[0] == losses[1]
    with pytest.raises(ValidationError, match="objective crown_ibp bounds by crown_ibp"):
        make_objective("crown_ibp", **schedule, bound="ibp")
    with pytest.raises(ValidationError, match="objective fast_ibp starts from IBP init"):
        make_objective("fast_ibp", **schedule, init="default")
    with pytest.raises(ValidationError, match="fast_reg"):
        make_objective("fast_ibp", **schedule, fast_reg=0.0)
    assert not make_objective("fast_ibp", **schedule, batch_norm=False).params.model_options()
