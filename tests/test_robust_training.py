"""Robust training on digits at eps 0.1: IBP certifies, PGD training resists PGD."""

import pytest
import torch

from defenses.models import build_model
from defenses.evaluation import evaluate_robustness
from defenses.objectives import make_objective
from defenses.trainer import TrainConfig, Trainer

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
    return {name: evaluate_robustness(m, digits.val, EPS, steps=20, verify=True)
            for name, m in models.items()}


@pytest.mark.slow
def test_ibp_training_certifies_far_more(results):
    assert results["standard"]["verified_accuracy"] < 0.1
    assert results["ibp"]["verified_accuracy"] > results["standard"]["verified_accuracy"] + 0.5
    assert results["ibp"]["nominal_accuracy"] > 0.85


@pytest.mark.slow
def test_pgd_training_raises_pgd_accuracy(results):
    assert results["pgd"]["pgd_accuracy"] > results["standard"]["pgd_accuracy"] + 0.15
    assert results["pgd"]["nominal_accuracy"] > 0.9
    # nothing is verified without IBP training, and verification never exceeds PGD accuracy
    for r in results.values():
        assert r["verified_accuracy"] <= r["pgd_accuracy"] + 1e-9
