"""FGSM / PGD: constraints, strength, no side effects on the model."""

import pytest
import torch

from defenses.attacks import fgsm, pgd


@pytest.fixture(scope="module")
def val_batch(digits):
    return digits.val.images[:200], digits.val.labels[:200]


def accuracy_on(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_adversarial_inputs_stay_in_the_ball_and_pixel_range(trained_digits_resnet, val_batch):
    x, y = val_batch
    for adv in (fgsm(trained_digits_resnet, x, y, 0.1),
                pgd(trained_digits_resnet, x, y, 0.1, 0.025, 10,
                    generator=torch.Generator().manual_seed(0))):
        assert adv.shape == x.shape and not adv.requires_grad
        assert float((adv - x).abs().max()) <= 0.1 + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_pgd_is_at_least_as_strong_as_fgsm(trained_digits_resnet, val_batch):
    model, (x, y) = trained_digits_resnet, val_batch
    clean = accuracy_on(model, x, y)
    after_fgsm = accuracy_on(model, fgsm(model, x, y, 0.1), y)
    after_pgd = accuracy_on(model, pgd(model, x, y, 0.1, 0.01, 20,
                                       generator=torch.Generator().manual_seed(0)), y)
    assert after_pgd <= after_fgsm < clean


def test_restarts_only_add_strength(trained_digits_resnet, val_batch):
    model, (x, y) = trained_digits_resnet, val_batch
    one = pgd(model, x, y, 0.08, 0.02, 5, restarts=1, generator=torch.Generator().manual_seed(1))
    three = pgd(model, x, y, 0.08, 0.02, 5, restarts=3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_three = model(three).argmax(1) != y
    assert bool(fooled_three[fooled_one].all())  # the first restart is the single run


def test_attack_leaves_no_gradient_and_restores_mode(trained_digits_resnet, val_batch):
    model, (x, y) = trained_digits_resnet, val_batch
    model.train()
    for p in model.parameters():
        p.grad = None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd(model, x[:20], y[:20], 0.1, 0.02, 3)
    fgsm(model, x[:20], y[:20], 0.1)
    assert model.training
    model.eval()
    assert all(p.grad is None for p in model.parameters())
    # eval mode during the attack: batch-norm running statistics untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        fgsm(model, torch.rand(1, 4), torch.tensor([0]), -0.1)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        pgd(model, torch.rand(1, 4) * 255, torch.tensor([0]), 0.1, 0.01, 3)


def test_pgd_with_a_custom_loss_by_hand():
    """Maximising the pixel sum walks every pixel to min(x + eps, 1): checkable by hand."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.tensor([[0.0, 0.5, 0.97, 1.0]])
    adv = pgd(model, x, torch.tensor([0]), 0.1, 0.04, 5, random_start=False,
              loss=lambda z: z.flatten(1).sum(1))
    assert torch.allclose(adv, torch.tensor([[0.1, 0.6, 1.0, 1.0]]))


def test_pgd_with_a_custom_loss_stays_in_the_ball_and_raises_that_loss(trained_digits_resnet,
                                                                        val_batch):
    model, (x, y) = trained_digits_resnet, val_batch
    x, y = x[:64], y[:64]
    target = (y + 1) % 10

    def target_logit(z):  # a targeted objective: the logit of the next class
        return model(z).gather(1, target[:, None])[:, 0]

    eps = 0.05
    for restarts in (1, 2):
        adv = pgd(model, x, y, eps, eps / 4, 10, restarts=restarts, loss=target_logit,
                  generator=torch.Generator().manual_seed(0))
        assert adv.shape == x.shape and not adv.requires_grad
        assert float((adv - x).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        with torch.no_grad():
            assert bool((target_logit(adv) > target_logit(x)).all())


def test_fgsm_is_one_pgd_step_of_size_eps(trained_digits_resnet, val_batch):
    model, (x, y) = trained_digits_resnet, val_batch
    assert torch.equal(fgsm(model, x, y, 0.1), pgd(model, x, y, 0.1, 0.1, 1, random_start=False))
