"""Interval bounds: hand-checkable cases, soundness on random networks, schedules, elision."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from benchmarks.plots import plot_bound_widths
from defenses.ibp import elided_upper_bounds, interval_bounds, layer_bound_widths, verified
from defenses.models import (BasicBlock, Bottleneck, Composite, Normalize, PreActBlock,
                             Residual, build_model)
from defenses.schedules import eps_schedule, kappa_schedule, ramp


def test_one_linear_layer_by_hand():
    # w = 1, b = 2, z = [1, 2, 3] +/- 1 -> sum in [3, 9], plus 2 -> [5, 11]
    layer = nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(2.0)
    model = nn.Sequential(nn.Flatten(), layer)
    # inputs are pixels: scale the case into [0, 1] by 1/10 (bounds scale linearly, bias stays)
    x = torch.tensor([[0.1, 0.2, 0.3]])
    lower, upper = interval_bounds(model, x, eps=0.1)
    assert lower.item() == pytest.approx(0.3 + 2) and upper.item() == pytest.approx(0.9 + 2)


def test_negative_weights_and_clipping_to_pixel_range():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    # box [0, 0.2] x [0.85, 1] after clipping x = (0.05, 0.95) +/- 0.15
    lower, upper = interval_bounds(model, torch.tensor([[0.05, 0.95]]), eps=0.15)
    # 2*[0, .2] - [.85, 1] = [-1, -0.45] -> relu -> [0, 0]
    assert lower.item() == 0.0 and upper.item() == 0.0


def test_zero_eps_gives_the_nominal_logits():
    model = build_model("resnet_digits", 10, (1, 8, 8), (0.3,), (0.4,)).eval()
    x = torch.rand(4, 1, 8, 8)
    lower, upper = interval_bounds(model, x, 0.0)
    assert torch.allclose(lower, model(x), atol=1e-5) and torch.allclose(upper, model(x), atol=1e-5)


class Doubler(Composite):
    """relu(2 * x + 1) + x: one Residual, bounded by the generic rule (no rule of its own)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        with torch.no_grad():
            self.lin.weight.fill_(2.0)
            self.lin.bias.fill_(1.0)
        self.relu = nn.ReLU()
        self.structure = (Residual(("lin", "relu")),)


def test_residual_sum_by_hand():
    # x in [0.2, 0.4]: 2x + 1 in [1.4, 1.8], relu keeps it, + x -> [1.6, 2.2]; the last layer
    # (identity weight, no bias) passes it through
    last = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        last.weight.fill_(1.0)
    model = nn.Sequential(Doubler(), last)
    lower, upper = interval_bounds(model, torch.tensor([[0.3]]), eps=0.1)
    assert lower.item() == pytest.approx(1.6) and upper.item() == pytest.approx(2.2)


def random_network(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c = 2
    if kind == "conv":
        body = [nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, stride=1), nn.Tanh(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = 4
    elif kind == "basic":
        body = [nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(),
                BasicBlock(4, 4), BasicBlock(4, 8, stride=2, downsample=nn.Sequential(
                    nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))),
                nn.AvgPool2d(2), nn.Flatten()]
        features = 8 * 2 * 2
    elif kind == "bottleneck":
        body = [nn.Conv2d(c, 8, 3, padding=1), nn.LeakyReLU(0.1),
                Bottleneck(8, 2), nn.ZeroPad2d(1), nn.Sigmoid(), nn.Flatten()]
        features = 8 * 10 * 10
    elif kind == "preact":
        body = [nn.Conv2d(c, 4, 3, padding=1), PreActBlock(4, 6, stride=2), nn.ELU(),
                nn.Flatten()]
        features = 6 * 4 * 4
    else:  # a hand-made Composite and a module applied twice
        shared = nn.Linear(1, 1)
        body = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1), Doubler(), shared,
                nn.Tanh(), shared]
        features = 1
    model = nn.Sequential(Normalize((0.4, 0.5), (0.3, 0.2)), *body, nn.Linear(features, 5))
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, -1.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["conv", "basic", "bottleneck", "preact", "composite"]),
       seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.3))
def test_sound_on_random_networks(kind, seed, eps):
    model = random_network(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 8, 8, generator=gen)
    y = torch.randint(0, 5, (3,), generator=gen)
    with torch.no_grad():
        lower, upper = interval_bounds(model, x, eps)
        proven = verified(model, x, y, eps)
        for _ in range(40):
            # random points of the box, corners included half the time
            u = torch.rand(x.shape, generator=gen)
            if torch.rand(1, generator=gen).item() < 0.5:
                u = u.round()
            z = ((x - eps).clamp(0, 1) + u * ((x + eps).clamp(0, 1) - (x - eps).clamp(0, 1)))
            out = model(z)
            assert bool((out >= lower - 1e-4).all()) and bool((out <= upper + 1e-4).all())
            # verified => the label cannot change anywhere in the box
            assert bool((out.argmax(1) == y)[proven].all())


def test_elided_bounds_are_tighter_than_logit_differences():
    model = random_network("basic", 3)
    x, y = torch.rand(6, 2, 8, 8), torch.randint(0, 5, (6,))
    with torch.no_grad():
        lower, upper = interval_bounds(model, x, 0.05)
        elided = elided_upper_bounds(model, x, y, 0.05)
    naive = upper - lower.gather(1, y[:, None])
    assert bool((elided <= naive + 1e-5).all())
    assert torch.allclose(elided.gather(1, y[:, None]), torch.zeros(6, 1))


def test_unsupported_module_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no rule for module 2 \(GELU\)"):
        interval_bounds(model, torch.rand(1, 4), 0.1)


def test_schedules():
    assert [ramp(s, 10, 20) for s in (0, 10, 20, 30, 99)] == [0, 0, 0.5, 1, 1]
    assert ramp(20, 10, 20, "smooth") == pytest.approx(0.5)
    assert ramp(12, 10, 20, "smooth") < ramp(12, 10, 20, "linear")
    assert eps_schedule(20, 0.4, 10, 20) == pytest.approx(0.2)
    assert kappa_schedule(0, 0.5, 10, 20) == 1.0 and kappa_schedule(40, 0.5, 10, 20) == 0.5
    assert kappa_schedule(20, 0.5, 10, 20) == pytest.approx(0.75)


def test_every_model_of_the_library_is_bounded():
    for name, opts in (("resnet18", {}), ("resnet50", {}), ("preact_resnet18", {}),
                       ("resnet_digits", {}), ("ibp_large", {})):
        model = build_model(name, 10, (1, 8, 8), (0.3,), (0.4,), **opts).eval()
        lower, upper = interval_bounds(model, torch.rand(2, 1, 8, 8), 0.01)
        assert lower.shape == (2, 10) and bool((lower <= upper).all())


def test_layer_widths_and_plot(tmp_path):
    model = build_model("ibp_small", 10, (1, 8, 8), (0.3,), (0.4,), padding="same").eval()
    widths = layer_bound_widths(model, torch.rand(8, 1, 8, 8), 0.1)
    names = [n for n, _ in widths]
    # module paths, as model.named_modules() names them
    assert names[0] == "layers.normalize" and names[-1] == "logits"
    assert "layers.relu_conv1" in names and set(names[:-1]) <= dict(model.named_modules()).keys()
    assert all(w >= 0 for _, w in widths)
    plot_bound_widths({"model": widths}, tmp_path / "w.png", 0.1)
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
