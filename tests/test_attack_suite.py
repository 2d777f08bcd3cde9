"""The training families' attack suite: APGD-CE / APGD-T agree with a reference implementation
(the Adversarial Robustness Toolbox), Square is a working black box, and the suite's worst case
is never above any of its attacks, PGD-20 included."""

import numpy as np
import pytest
import torch
from torch import nn

from defenses.attacks import (apgd, cross_entropy_objective, dlr_loss, dlr_objective, margin,
                              pgd, square, top_wrong_classes)
from defenses.evaluation import AttackSuite, suite_accuracy
from defenses.models import build_model
from defenses.objectives import make_objective
from defenses.trainer import TrainConfig, Trainer

EPS = 0.1


@pytest.fixture(scope="module")
def small_cnn(digits):
    """The IBP paper's small CNN, trained normally on digits for 10 epochs (fixed seed)."""
    torch.manual_seed(0)
    model = build_model("ibp_small", 10, digits.input_shape, digits.mean, digits.std,
                        padding="same")
    Trainer(model, digits.train, TrainConfig(epochs=10, batch_size=64),
            make_objective("standard")).fit()
    return model.eval()


@pytest.fixture(scope="module")
def val(digits):
    return digits.val.images, digits.val.labels


def _accuracy(model, x, y, fooled=None):
    with torch.no_grad():
        right = model(x).argmax(1) == y
    return float((right if fooled is None else right & ~fooled).float().mean())


@pytest.mark.parametrize("loss, targeted", [("cross_entropy", False),
                                           ("difference_logits_ratio", False),
                                           ("difference_logits_ratio", True)])
def test_apgd_agrees_with_the_reference_implementation(small_cnn, val, loss, targeted):
    """Our APGD and ART's AutoProjectedGradientDescent, each 100 steps from one random start,
    leave the same accuracy within 1 point on the 360 validation digits (the mean over three
    seeds: one start alone varies by about a point either way): APGD-CE, APGD-DLR and APGD-T
    (targeted DLR toward each sample's likeliest wrong class, the suite's APGD-T run)."""
    art = pytest.importorskip("art", reason="the reference library (dev extra)")
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    x, y = val
    classifier = PyTorchClassifier(small_cnn, loss=nn.CrossEntropyLoss(),
                                   input_shape=tuple(x.shape[1:]), nb_classes=10,
                                   clip_values=(0.0, 1.0))
    reference = AutoProjectedGradientDescent(classifier, norm=np.inf, eps=EPS, eps_step=2 * EPS,
                                             max_iter=100, targeted=targeted, nb_random_init=1,
                                             batch_size=len(y), loss_type=loss, verbose=False)
    with torch.no_grad():
        target = top_wrong_classes(small_cnn(x), y, 1)[:, 0] if targeted else None
    objective = (cross_entropy_objective(small_cnn, y) if loss == "cross_entropy"
                 else dlr_objective(small_cnn, y, target))
    ours, theirs = [], []
    for seed in range(3):
        np.random.seed(seed)
        adv = reference.generate(x.numpy(), y=(target if targeted else y).numpy())
        theirs.append(float((classifier.predict(adv).argmax(1) == y.numpy()).mean()))
        _, fooled = apgd(objective, x, EPS, 100, 1, torch.Generator().manual_seed(seed))
        ours.append(_accuracy(small_cnn, x, y, fooled))
    assert np.mean(ours) < _accuracy(small_cnn, x, y) - 0.2  # the attack does something
    assert abs(np.mean(ours) - np.mean(theirs)) <= 0.01, (ours, theirs, art.__version__)


def test_square_is_at_least_as_strong_as_the_reference_implementation(small_cnn, val):
    """With the same 300 queries, our Square leaves no more accuracy than ART's SquareAttack
    (measured: 0.54 vs 0.59)."""
    pytest.importorskip("art", reason="the reference library (dev extra)")
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import PyTorchClassifier

    x, y = val
    classifier = PyTorchClassifier(small_cnn, loss=nn.CrossEntropyLoss(),
                                   input_shape=tuple(x.shape[1:]), nb_classes=10,
                                   clip_values=(0.0, 1.0))
    np.random.seed(0)
    adv = SquareAttack(classifier, norm=np.inf, eps=EPS, max_iter=300, p_init=0.8,
                       nb_restarts=1, batch_size=len(y), verbose=False).generate(
        x.numpy(), y=y.numpy())
    theirs = float((classifier.predict(adv).argmax(1) == y.numpy()).mean())
    _, fooled = square(small_cnn, x, y, EPS, queries=300,
                       generator=torch.Generator().manual_seed(0))
    ours = _accuracy(small_cnn, x, y, fooled)
    assert ours < _accuracy(small_cnn, x, y) - 0.2 and ours <= theirs + 0.01, (ours, theirs)


def test_the_worst_case_is_below_pgd20_and_never_above_it_on_the_same_samples(small_cnn, digits):
    suite = AttackSuite(apgd_steps=30, targets=2, square_queries=200)
    result = suite_accuracy(small_cnn, digits.val, EPS, suite, seed=0)
    worst = result["robust_accuracy"]
    # the suite finds more than PGD-20 alone on this normally trained model, and more than
    # any one of its attacks
    assert worst < result["pgd_accuracy"]
    assert worst < max(result[name] for name in ("apgd_ce_accuracy", "apgd_t_accuracy",
                                                  "square_accuracy"))
    # and PGD-20 is what evaluate_robustness reports under that name, on the same samples
    pgd20 = pgd(small_cnn, digits.val.images, digits.val.labels, EPS, 2.5 * EPS / 20, 20,
                generator=torch.Generator().manual_seed(0))
    assert worst <= _accuracy(small_cnn, pgd20, digits.val.labels)


def test_square_is_a_black_box_that_gradient_masking_does_not_stop(small_cnn, val):
    """Quantising the input to 16 levels gives zero gradients: APGD cannot move, Square
    (queries only) still finds adversarial examples, inside the ball and the pixel range."""
    class Quantised(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(torch.round(x * 16) / 16)

    masked = Quantised(small_cnn).eval()
    x, y = val
    x, y = x[:120], y[:120]
    clean = _accuracy(masked, x, y)
    _, by_gradient = apgd(cross_entropy_objective(masked, y), x, EPS, 20, 0,
                          starts=[x])  # from the clean point: the gradient is zero
    adv, by_queries = square(masked, x, y, EPS, queries=300,
                             generator=torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert _accuracy(masked, x, y, by_gradient) == pytest.approx(clean)
    assert _accuracy(masked, x, y, by_queries) < clean - 0.1
    with torch.no_grad():  # what square says it fooled, it fooled
        assert bool((masked(adv).argmax(1) != y)[by_queries].all())


def test_square_restarts_add_strength(small_cnn, val):
    """More restarts of a short budget fool more samples, and never undo the first run."""
    x, y = val[0][:100], val[1][:100]
    _, once = square(small_cnn, x, y, 0.05, queries=20, restarts=1,
                     generator=torch.Generator().manual_seed(3))
    _, thrice = square(small_cnn, x, y, 0.05, queries=20, restarts=4,
                       generator=torch.Generator().manual_seed(3))
    assert bool(thrice[once].all()) and int(thrice.sum()) > int(once.sum())


def test_dlr_and_margin_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
    y = torch.tensor([0, 0])
    assert margin(logits, y).tolist() == [2.0, -2.0]
    # untargeted: -(z_y - max other) / (z_pi1 - z_pi3)
    assert dlr_loss(logits, y).tolist() == pytest.approx([-2.0 / 3.0, 2.0 / 1.5])
    # targeted toward class 2: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    target = torch.tensor([2, 2])
    assert dlr_loss(logits, y, target).tolist() == pytest.approx([-3.0 / 3.5, 1.0 / 1.75])
    # invariant to shifting and scaling the logits
    assert dlr_loss(5 * logits + 7, y).tolist() == pytest.approx(dlr_loss(logits, y).tolist())
    assert top_wrong_classes(logits, y, 2).tolist() == [[1, 2], [1, 2]]
    with pytest.raises(ValueError, match="at least 4 classes"):
        dlr_loss(logits[:, :3], y, target)


def test_bad_budgets_are_rejected(small_cnn, val):
    x, y = val[0][:4], val[1][:4]
    with pytest.raises(ValueError, match="queries and restarts"):
        square(small_cnn, x, y, EPS, queries=0)
    with pytest.raises(ValueError, match="images"):
        square(small_cnn, x.flatten(1), y, EPS)
    with pytest.raises(ValueError):
        AttackSuite(apgd_steps=0)


def test_no_attack_fools_a_verified_sample(digits):
    """On an IBP-trained model, every sample IBP verifies survives the whole suite: the
    verified figure bounds the worst case from below, as the attacks bound it from above."""
    from defenses.crown import certificates
    from defenses.evaluation import evaluate_robustness
    from defenses.ibp import verified

    torch.manual_seed(0)
    model = build_model("ibp_small", 10, digits.input_shape, digits.mean, digits.std,
                        padding="same")
    Trainer(model, digits.train, TrainConfig(epochs=30, batch_size=50),
            make_objective("ibp", eps_train=0.12, warmup=100, rampup=400)).fit()
    model.eval()
    suite = AttackSuite(apgd_steps=30, targets=2, square_queries=200)
    result = suite_accuracy(model, digits.val, EPS, suite, seed=0)
    proven = evaluate_robustness(model, digits.val, EPS, steps=5, verify=True)
    assert proven["verified_accuracy"] > 0.5  # IBP training worked
    assert proven["verified_accuracy"] <= result["robust_accuracy"] <= result["pgd_accuracy"]
    # and sample by sample: APGD-CE, APGD-T and Square leave every verified sample right, by
    # IBP or by the best certificate (CROWN-IBP or IBP per margin), which proves at least as many
    x, y = digits.val.images, digits.val.labels
    with torch.no_grad():
        safe = certificates(model, x, y, EPS)["best"]
        assert bool((safe >= verified(model, x, y, EPS)).all())
    _, ce = apgd(cross_entropy_objective(model, y), x, EPS, 30, 1,
                 torch.Generator().manual_seed(0))
    _, targeted = apgd(dlr_objective(model, y, top_wrong_classes(model(x), y, 1)[:, 0]), x, EPS,
                       30, 1, torch.Generator().manual_seed(0))
    _, boxed = square(model, x, y, EPS, queries=200, generator=torch.Generator().manual_seed(0))
    assert not bool((safe & (ce | targeted | boxed)).any())
