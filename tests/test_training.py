"""Training loop: exact resume, gradient accumulation, schedules."""

import pytest
import torch

from defenses.models import build_model
from defenses.schedules import LRSchedule
from defenses.trainer import TrainConfig, Trainer


def small_model(digits, seed=0):
    torch.manual_seed(seed)
    return build_model("ibp_small", digits.num_classes, digits.input_shape, digits.mean,
                       digits.std, padding="same")


def test_resume_from_checkpoint_matches_uninterrupted_run(digits, tmp_path):
    config = TrainConfig(epochs=3, batch_size=128, lr=1e-3, seed=4)
    straight = Trainer(small_model(digits), digits.train, config)
    straight.fit()

    first = Trainer(small_model(digits), digits.train, config)
    first.run_epoch()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = Trainer(small_model(digits, seed=99), digits.train, config)  # other init
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert (resumed.epoch, resumed.step) == (1, first.step)
    resumed.run_epoch()
    resumed.run_epoch()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_gradient_accumulation_equals_the_full_batch(digits):
    full = Trainer(small_model(digits), digits.train,
                   TrainConfig(epochs=1, batch_size=96, lr=1e-2, optimizer="sgd", seed=1))
    accumulated = Trainer(small_model(digits), digits.train,
                          TrainConfig(epochs=1, batch_size=96, physical_batch_size=32, lr=1e-2,
                                      optimizer="sgd", seed=1))
    for trainer in (full, accumulated):
        trainer._train_step(trainer._epoch_order(0)[:96])
    for a, b in zip(full.model.parameters(), accumulated.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_learning_rate_schedules_are_pure_functions_of_the_step():
    cosine = TrainConfig(lr=0.1, lr_schedule=LRSchedule.COSINE)
    assert cosine.lr_at(0, 100) == 0.1
    assert abs(cosine.lr_at(50, 100) - 0.05) < 1e-12
    assert cosine.lr_at(100, 100) < 1e-12
    step = TrainConfig(lr=1e-3, lr_schedule="step", lr_milestones=(15_000, 25_000))
    assert [step.lr_at(s, 60_000) for s in (0, 14_999, 15_000, 30_000)] == \
        pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


def test_resume_refuses_another_configuration(digits):
    a = Trainer(small_model(digits), digits.train, TrainConfig(epochs=2, lr=1e-3))
    b = Trainer(small_model(digits), digits.train, TrainConfig(epochs=2, lr=5e-3))
    try:
        b.load_state_dict(a.state_dict())
    except ValueError as exc:
        assert "another configuration" in str(exc)
    else:
        raise AssertionError("loading a checkpoint of another configuration must fail")
