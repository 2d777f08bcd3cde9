"""TAPS and STAPS: the cut of a model, the estimated margins between the attack and IBP, the
gradient connector, and the identities at the ends (a linear head is IBP, lam 1 is TAPS)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.ibp import box_bounds, elided_upper_bounds
from defenses.models import build_model
from defenses.objectives import make_objective
from defenses.taps import _Connector, latent_margins, split_model, taps_loss

SPLITS = ["layers.conv1", "layers.relu_conv2", "layers.flatten", "layers.bn_fc1",
          "layers.relu_fc1"]


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = build_model("ibp_small", 3, (1, 8, 8), (0.5,), (0.25,), padding="same",
                        batch_norm=True)
    model(torch.rand(16, 1, 8, 8))  # running statistics of their own
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model.eval(), x, y


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.stem(x.flatten(1)))
        return self.head(self.act(self.inner(h)) + h)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.layer(self.act(self.layer(x)))


@pytest.mark.parametrize("split", SPLITS)
def test_the_head_of_the_extractor_is_the_model(split, batch):
    model, x, _ = batch
    extractor, head = split_model(model, split)
    with torch.no_grad():
        torch.testing.assert_close(head(extractor(x)), model(x))
    names = {id(p) for p in model.parameters()}  # the model's own parameters, not copies
    assert {id(p) for p in (*extractor.parameters(), *head.parameters())} <= names


def test_a_split_that_is_no_single_cut_is_refused_by_name():
    with pytest.raises(ValueError, match="no module 'layers.conv9' in IBPCNN"):
        split_model(build_model("ibp_small", 3, (1, 8, 8), (0.5,), (0.25,), padding="same"),
                    "layers.conv9")
    with pytest.raises(ValueError, match="'layers' of IBPCNN is not one step.*layers.conv1"):
        split_model(build_model("ibp_small", 3, (1, 8, 8), (0.5,), (0.25,), padding="same"),
                    "layers")
    with pytest.raises(ValueError, match="'inner' of Residual is no single cut"):
        split_model(Residual(), "inner")  # the skip connection passes around it
    residual = Residual()
    extractor, head = split_model(residual, "stem")  # before the block it is one
    x = torch.rand(2, 4)
    torch.testing.assert_close(head(extractor(x)), residual(x))
    with pytest.raises(ValueError, match="'layer' of Twice is called 2 times"):
        split_model(Twice(), "layer")


def test_the_estimate_lies_below_ibp_and_equals_it_for_a_linear_head(batch):
    model, x, y = batch
    lower, upper = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    ibp_whole = elided_upper_bounds(model, x, y, 0.1)
    for split in SPLITS:
        estimated, ibp = latent_margins(model, split, lower, upper, y, 10, 2, 0.5,
                                        torch.Generator().manual_seed(0))
        torch.testing.assert_close(ibp, ibp_whole)  # IBP through the cut is IBP
        assert bool((estimated <= ibp + 1e-5 * (1 + ibp.abs())).all())
        assert bool((estimated.gather(1, y[:, None]) == 0).all())
    # the head after relu_fc1 is the last linear layer: its worst case in the latent box is a
    # corner, which sign steps reach, so TAPS's margins are IBP's
    estimated, ibp = latent_margins(model, "layers.relu_fc1", lower, upper, y, 10, 1, 0.5,
                                    torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimated, ibp, rtol=1e-5, atol=1e-5)
    # through a nonlinear head the attack finds less than IBP's bound
    estimated, ibp = latent_margins(model, "layers.relu_conv2", lower, upper, y, 10, 1, 0.5,
                                    torch.Generator().manual_seed(0))
    assert bool((estimated < ibp - 1e-4).any())


def test_the_connector_links_a_point_near_an_end_of_the_box_to_that_end():
    lower = torch.zeros(1, 3, requires_grad=True)
    upper = torch.ones(1, 3, requires_grad=True)
    # per coordinate: at the upper end, within c = 0.5 of it (0.75), in the middle-low (0.25)
    points = torch.tensor([[[1.0, 0.75, 0.25]]])
    out = _Connector.apply(lower, upper, points, 0.5)
    assert torch.equal(out, points)
    out.sum().backward()
    torch.testing.assert_close(upper.grad, torch.tensor([[1.0, 0.5, 0.0]]))
    torch.testing.assert_close(lower.grad, torch.tensor([[0.0, 0.0, 0.5]]))


def test_grad_scale_scales_the_estimated_losss_gradient_only(batch):
    model, x, y = batch

    def grads(scale, multiplier):
        model.zero_grad()
        taps_loss(model, "layers.relu_conv2", x, y, 0.1, 4, 1, 0.5, scale, multiplier,
                  generator=torch.Generator().manual_seed(1)).backward()
        return [p.grad.clone() for p in model.parameters()]

    for one, four in zip(grads(1.0, False), grads(4.0, False)):
        torch.testing.assert_close(four, 4 * one)
    # with IBP's loss as a factor: d(a * b) = b da + a db, and only da is scaled
    model.zero_grad()
    lower, upper = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    estimated, ibp = latent_margins(model, "layers.relu_conv2", lower, upper, y, 4, 1, 0.5,
                                    torch.Generator().manual_seed(1))
    a, b = F.cross_entropy(estimated, y), F.cross_entropy(ibp, y)
    (4 * a * b.detach() + a.detach() * b).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for got, want in zip(grads(4.0, True), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_staps_at_lam_one_is_taps_and_each_gets_every_parameter_a_gradient(batch):
    model, x, y = batch
    model.train()
    try:
        schedule = {"eps_train": 0.1, "warmup": 1, "rampup": 2, "split": "layers.relu_conv2",
                    "attack_steps": 3, "restarts": 1}
        losses = {}
        for name, extra in (("taps", {}), ("staps", {"lam": 1.0}), ("staps", {})):
            model.zero_grad()
            loss, metrics = make_objective(name, **schedule, **extra).loss(
                model, x, y, step=5, generator=torch.Generator().manual_seed(2))
            loss.backward()
            losses[(name, bool(extra))] = float(loss.detach())
            missing = [n for n, p in model.named_parameters()
                       if p.grad is None or not bool(p.grad.abs().sum() > 0)]
            assert not missing, (name, missing)
        assert losses[("staps", True)] == losses[("taps", False)]
        assert losses[("staps", False)] != losses[("taps", False)]
    finally:
        model.eval()


def test_while_eps_ramps_taps_trains_on_ibps_loss_and_staps_on_sabrs(batch):
    model, x, y = batch
    ramp = {"eps_train": 0.1, "warmup": 1, "rampup": 50, "kappa_final": 0.0, "fast_reg": 0.0}
    for name, same in (("taps", ("ibp", {})), ("staps", ("sabr", {"attack_steps": 4}))):
        got = make_objective(name, **ramp, split="layers.relu_conv2", attack_steps=4).loss(
            model, x, y, step=20, generator=torch.Generator().manual_seed(0))[0]
        want = make_objective(same[0], **ramp, **same[1]).loss(
            model, x, y, step=20, generator=torch.Generator().manual_seed(0))[0]
        assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_the_latent_box_holds_the_clean_latent(batch):
    model, x, _ = batch
    extractor, _ = split_model(model, "layers.relu_conv2")
    box = box_bounds(extractor, (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1))
    with torch.no_grad():
        clean = extractor(x)
    assert bool((box.lower <= clean + 1e-6).all() and (clean <= box.upper + 1e-6).all())


@pytest.mark.parametrize("params, key", [
    ({"split": "layers.relu_conv2", "c": 0.0}, "c"),
    ({"split": "layers.relu_conv2", "c": 1.5}, "c"),
    ({"split": "layers.relu_conv2", "grad_scale": 0.0}, "grad_scale"),
    ({"split": ""}, "split"),
    ({}, "split")])
def test_out_of_range_parameters_are_refused_by_name(params, key):
    with pytest.raises(ValueError, match=key):
        make_objective("taps", eps_train=0.1, **params)
    with pytest.raises(ValueError, match="lam"):
        make_objective("staps", eps_train=0.1, split="layers.relu_conv2", lam=0.0)


def test_the_latent_search_leaves_the_heads_batch_norm_statistics_as_they_were(batch):
    model, x, y = batch
    model.train()
    try:
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        norms[0].momentum = None  # a cumulative average counts the batches it has seen
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
        latent_margins(model, "layers.relu_conv2", (x - 0.1).clamp(0, 1),
                       (x + 0.1).clamp(0, 1), y, 3, 2, 0.5, torch.Generator().manual_seed(0))
        for m, state in zip(norms, before):
            for key, value in m.state_dict().items():
                assert torch.equal(value, state[key]), key
    finally:
        norms[0].momentum = 0.1
        model.eval()


class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.act(self.a(x)) * torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_a_forward_with_constants_splits_and_keeps_them_out_of_the_model():
    model = WithConstant()
    extractor, head = split_model(model, "act")
    x = torch.rand(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(head(extractor(x)), model(x))
    assert not [k for k in vars(model) if "constant" in k]  # fx's capture stays out of it
    assert head.b.weight is model.b.weight
