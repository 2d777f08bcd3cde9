"""SABR and the expressive losses (defenses.expressive, the objectives sabr, mtl_ibp, cc_ibp and
exp_ibp): each is IBP's loss at one end of its parameter and the adversarial loss at the other,
SABR's box lies in the eps-ball and bounds between the attack and IBP, every parameter gets a
gradient, and out-of-range parameters are refused by name."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from defenses.expressive import Expressive, expressive_loss, sabr_margins, small_box
from defenses.ibp import elided_upper_bounds
from defenses.models import build_model
from defenses.objectives import make_objective

EPS = 0.1
# after the ramp (8 steps) eps is EPS; kappa_final 0.3 keeps the natural term in
COMMON = {"eps_train": EPS, "rampup": 8, "kappa_final": 0.3, "fast_reg": 0.0,
          "init": "default", "batch_norm": False}


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = build_model("ibp_small", 3, (1, 8, 8), (0.5,), (0.25,), padding="same").train()
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 3
    return model, x, y


def _loss(name, batch, step=20, seed=3, **params):
    model, x, y = batch
    loss, _ = make_objective(name, **params).loss(model, x, y, step,
                                                  torch.Generator().manual_seed(seed))
    return loss


@pytest.mark.parametrize("name, end", [("mtl_ibp", {"alpha": 1.0}), ("cc_ibp", {"alpha": 1.0}),
                                       ("exp_ibp", {"alpha": 1.0}), ("sabr", {"lam": 1.0})])
def test_at_one_end_each_recipe_is_ibps_loss(name, end, batch):
    for step in (4, 20):  # inside the ramp and after it
        want = _loss("ibp", batch, step, eps_train=EPS, rampup=8, kappa_final=0.3)
        got = _loss(name, batch, step, **COMMON, **end)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (step, got, want)


@pytest.mark.parametrize("name", ["mtl_ibp", "cc_ibp", "exp_ibp"])
def test_at_alpha_zero_each_expressive_loss_is_the_adversarial_loss(name, batch):
    # past the ramp, kappa 0: PGD training with the same attack and the same generator
    want = _loss("pgd", batch, eps=EPS, steps=3)
    got = _loss(name, batch, **{**COMMON, "kappa_final": 0.0}, alpha=0.0, attack_steps=3)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_between_the_ends_each_loss_lies_between_its_ends(batch):
    model, x, y = batch
    with torch.no_grad():  # a point of the box: IBP's margins bound its margins from above
        point = (x + 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)))
        adv = model(point.clamp(0, 1))
        worst = elided_upper_bounds(model, x, y, EPS)
    for kind in Expressive:
        for i in range(len(y)):  # per sample: the cross-entropy grows with every margin
            a, w, t = adv[i:i + 1], worst[i:i + 1], y[i:i + 1]
            ends = [float(F.cross_entropy(a, t)), float(F.cross_entropy(w, t))]
            values = [float(expressive_loss(kind, alpha, a, w, t))
                      for alpha in (0.0, 0.3, 0.7, 1.0)]
            assert values[0] == pytest.approx(ends[0]) and values[-1] == pytest.approx(ends[1])
            assert all(ends[0] - 1e-6 <= v <= ends[1] + 1e-6 for v in values), (kind, values)
            assert values == sorted(values)  # more alpha, more of IBP's loss
        if kind is Expressive.MTL:  # linear in alpha
            mix = float(expressive_loss(kind, 0.3, adv, worst, y))
            assert mix == pytest.approx(0.7 * float(F.cross_entropy(adv, y))
                                        + 0.3 * float(F.cross_entropy(worst, y)))


def test_sabrs_box_is_inside_the_ball_and_its_bound_between_the_attack_and_ibp(batch):
    model, x, y = batch
    for lam in (0.2, 0.5, 0.9):
        lower, upper = small_box(model, x, y, EPS, lam, 5, torch.Generator().manual_seed(0))
        assert (lower >= (x - EPS).clamp(0, 1) - 1e-7).all()
        assert (upper <= (x + EPS).clamp(0, 1) + 1e-7).all()
        assert ((upper - lower) <= 2 * lam * EPS + 1e-7).all()
        with torch.no_grad():
            small = sabr_margins(model, x, y, EPS, lam, 5, torch.Generator().manual_seed(0))
            whole = elided_upper_bounds(model, x, y, EPS)
            centre = model.eval()((lower + upper) / 2)
            model.train()
        assert (small <= whole + 1e-5).all()  # IBP of a sub-box is no looser
        # sound on the box: the margins at a point of it are below the bound
        margins = centre - centre.gather(1, y[:, None])
        assert (margins <= small + 1e-5).all()


@pytest.mark.parametrize("name, params", [("sabr", {"attack_steps": 2}), ("mtl_ibp", {}),
                                          ("cc_ibp", {}), ("exp_ibp", {})])
def test_every_parameter_gets_a_gradient(name, params, batch):
    model, x, y = batch
    model.zero_grad()
    _loss(name, batch, step=4, **{**COMMON, "fast_reg": 0.5}, **params).backward()
    for path, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, path


@pytest.mark.parametrize("name, params, key", [
    ("mtl_ibp", {"alpha": 1.5}, "alpha"), ("cc_ibp", {"alpha": -0.1}, "alpha"),
    ("exp_ibp", {"alpha": 2}, "alpha"), ("sabr", {"lam": 0.0}, "lam"),
    ("sabr", {"lam": 1.2}, "lam"), ("sabr", {"bound": "crown_ibp"}, "bound"),
    ("mtl_ibp", {"attack_steps": 0}, "attack_steps"),
    ("cc_ibp", {"beta_start": 0.5}, "beta_start: objective cc_ibp bounds by ibp alone")])
def test_out_of_range_parameters_are_refused_by_name(name, params, key):
    with pytest.raises(ValidationError, match=key):
        make_objective(name, eps_train=EPS, **params)
