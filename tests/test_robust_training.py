"""Robust training on digits at eps 0.1: IBP certifies, PGD training resists PGD."""

import pytest
import torch

from defenses.models import build_model
from defenses.training import (AdversarialRegularization, TrainConfig, Trainer,
                               evaluate_robustness, make_objective)

EPS = 0.1
STEPS_PER_EPOCH = 23  # 1,437 digits at batch 64


def train_small_cnn(digits, objective, epochs):
    torch.manual_seed(0)
    model = build_model("ibp_small", digits.num_classes, digits.input_shape, digits.mean,
                        digits.std, padding="same")
    Trainer(model, digits.train, TrainConfig(epochs=epochs, batch_size=64, lr=1e-3),
            objective).fit()
    return model.eval()


@pytest.fixture(scope="module")
def results(digits):
    models = {
        "standard": train_small_cnn(digits, make_objective("standard"), 20),
        "ibp": train_small_cnn(digits, make_objective(
            "ibp", eps_train=1.1 * EPS, warmup=2 * STEPS_PER_EPOCH,
            rampup=15 * STEPS_PER_EPOCH), 40),
        "pgd": train_small_cnn(digits, make_objective("pgd", eps=EPS, alpha=0.025, steps=7), 20),
    }
    return {name: evaluate_robustness(m, digits.val, EPS, pgd_steps=20, verify=True)
            for name, m in models.items()}


@pytest.mark.slow
def test_ibp_training_certifies_far_more(results):
    assert results["standard"]["verified_accuracy"] < 0.1
    assert results["ibp"]["verified_accuracy"] > results["standard"]["verified_accuracy"] + 0.5
    assert results["ibp"]["nominal_accuracy"] > 0.85


@pytest.mark.slow
def test_pgd_training_raises_pgd_accuracy(results):
    assert results["pgd"]["pgd_accuracy"] > results["standard"]["pgd_accuracy"] + 0.15
    assert results["pgd"]["clean_accuracy"] > 0.9
    # nothing is verified without IBP training, and verification never exceeds PGD accuracy
    for r in results.values():
        assert r["verified_accuracy"] <= r["pgd_accuracy"] + 1e-9


def test_adversarial_regularisation_directions_have_unit_norm():
    grad = torch.randn(4, 1, 3, 3)
    for norm, order in (("l2", 2), ("l1", 1), ("inf", float("inf"))):
        d = AdversarialRegularization(norm=norm).direction(grad)
        assert torch.allclose(torch.linalg.vector_norm(d.flatten(1), ord=order, dim=1),
                              torch.ones(4), atol=1e-6)
        assert torch.equal(torch.sign(d), torch.sign(grad))


def test_make_objective_validates():
    with pytest.raises(ValueError, match="unknown objective 'trades'; allowed: standard, fgsm"):
        make_objective("trades")
    with pytest.raises(ValueError, match=r"objective 'pgd' takes no parameter\(s\) \['epsilon'\]"):
        make_objective("pgd", epsilon=0.3, alpha=0.01, steps=3)
    with pytest.raises(ValueError, match=r"eps_train must be in \[0.0, 1.0\], got 3"):
        make_objective("ibp", eps_train=3)
    with pytest.raises(ValueError, match="norm must be one of l2, l1, inf"):
        make_objective("adv_reg", norm="l3")
