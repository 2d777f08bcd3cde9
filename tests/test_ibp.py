"""Interval bounds from the torch.fx graph: hand-checkable cases, soundness on random networks, on
every built-in model and on a user module, refusals, elision, caching, schedules."""

import gc
import weakref

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import defenses.ibp as ibp
from benchmarks.plots import plot_bound_widths
from defenses.ibp import (Interval, check_bounds, elided_upper_bounds, interval_bounds,
                          layer_bound_widths, penultimate_bounds, verified)
from defenses.models import (BasicBlock, Bottleneck, ModelName, Normalize, PreActBlock,
                             build_model)
from defenses.schedules import eps_schedule, kappa_schedule, ramp


def box_points(x, eps, gen, n):
    """n random points of the clipped box, corners every other time."""
    low, high = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    for i in range(n):
        u = torch.rand(x.shape, generator=gen)
        yield low + (u.round() if i % 2 else u) * (high - low)


def assert_sound(model, x, y, eps, gen, n=40, tol=1e-4):
    """Sampled points of the box (corners included) stay inside the bounds, every intermediate
    interval is ordered, and a verified label cannot change in the box."""
    unordered = []
    with torch.no_grad():
        penultimate_bounds(model, x, eps, lambda name, iv: unordered.extend(
            [name] if bool((iv.lower > iv.upper + tol).any()) else []))
        assert not unordered
        lower, upper = interval_bounds(model, x, eps)
        assert bool((lower <= upper).all())
        proven = verified(model, x, y, eps)
        for z in box_points(x, eps, gen, n):
            out = model(z)
            assert bool((out >= lower - tol).all()) and bool((out <= upper + tol).all())
            # verified => the label cannot change anywhere in the box
            assert bool((out.argmax(1) == y)[proven].all())
    return lower, upper


# ------------------------------------------------------------------------------------------------
# by hand


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


def test_zero_eps_in_train_mode_uses_the_batch_statistics():
    # train-mode batch norm takes the statistics of the box centres, which at eps 0 are the
    # inputs: the bounds collapse onto the train-mode forward
    model = build_model("resnet_digits", 10, (1, 8, 8), (0.3,), (0.4,)).train()
    x = torch.rand(6, 1, 8, 8)
    lower, upper = interval_bounds(model, x, 0.0)
    logits = model(x)
    assert torch.allclose(lower, logits, atol=1e-5) and torch.allclose(upper, logits, atol=1e-5)
    assert model.training


class Doubler(nn.Module):
    """relu(2 * x + 1) + x: a residual sum written in forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        with torch.no_grad():
            self.lin.weight.fill_(2.0)
            self.lin.bias.fill_(1.0)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.lin(x)) + x


def test_residual_sum_by_hand():
    # x in [0.2, 0.4]: 2x + 1 in [1.4, 1.8], relu keeps it, + x -> [1.6, 2.2]; the last layer
    # (identity weight, no bias) passes it through
    last = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        last.weight.fill_(1.0)
    model = nn.Sequential(Doubler(), last)
    lower, upper = interval_bounds(model, torch.tensor([[0.3]]), eps=0.1)
    assert lower.item() == pytest.approx(1.6) and upper.item() == pytest.approx(2.2)


class Arithmetic(nn.Module):
    def forward(self, x):
        return torch.cat([x - x, 2 - x, -x, x * -3, x / -2, torch.add(x, x, alpha=-2),
                          x * torch.tensor([[-1.0]]), (x + 1).relu().view(-1, 1)], dim=1)


def test_arithmetic_by_hand():
    # x in [0.2, 0.4]; intervals forget that both x are the same: x - x in [-0.2, 0.2]
    lower, upper = interval_bounds(Arithmetic(), torch.tensor([[0.3]]), eps=0.1)
    expected = [(-0.2, 0.2), (1.6, 1.8), (-0.4, -0.2), (-1.2, -0.6), (-0.2, -0.1), (-0.6, 0.0),
                (-0.4, -0.2), (1.2, 1.4)]
    assert lower[0].tolist() == pytest.approx([lo for lo, _ in expected], abs=1e-6)
    assert upper[0].tolist() == pytest.approx([hi for _, hi in expected], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# soundness: random networks, every built-in model, a user module


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
    else:  # a hand-written residual module and a module applied twice
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


def randomize_batch_norm(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial eval-mode batch norm: statistics and affine parameters away from defaults."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) * 3 - 1.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["conv", "basic", "bottleneck", "preact", "custom"]),
       seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.3))
def test_sound_on_random_networks(kind, seed, eps):
    model = random_network(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 8, 8, generator=gen)
    y = torch.randint(0, 5, (3,), generator=gen)
    assert_sound(model, x, y, eps, gen)


BUILT_IN = {name: ((1, 8, 8), {"padding": "same"} if name in (
    ModelName.IBP_SMALL, ModelName.IBP_MEDIUM) else {}) for name in ModelName}


def tame(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Weights scaled so that no layer widens an interval past its widest entry (each output's
    weights sum to 1 in absolute value): at initialisation deep ResNets' bounds overflow, and
    no point leaves an infinite box, so soundness would be checked on nothing."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight /= m.weight.abs().flatten(1).sum(1).view(-1, *[1] * (m.weight.dim() - 1))
    randomize_batch_norm(model, gen)
    for m in model.modules():  # |scale| <= 1 keeps widths in check through batch norm
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.clamp_(-1.0, 1.0)
                m.running_var.clamp_(min=1.0)
    return model.eval()


@pytest.mark.parametrize("name", list(ModelName), ids=[m.value for m in ModelName])
def test_sound_on_every_built_in_model(name):
    shape, options = BUILT_IN[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = tame(build_model(name, 10, shape, (0.4,), (0.25,), **options), gen)
    x = torch.rand(4, *shape, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    lower, upper = assert_sound(model, x, y, 0.02, gen, n=12, tol=1e-5)
    # bounds that say something: finite and narrower than the logits' spread
    assert bool(torch.isfinite(upper - lower).all()) and float((upper - lower).max()) < 1.0


_OFFSET = torch.tensor([0.5, -0.25, 1.0, 0.0])  # a constant the forward captures


class UserNet(nn.Module):
    """A plain user module: nested Sequentials, a residual sum in forward, functional calls,
    products with constants of both signs, a concatenation, a view on the batch size."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
                                   nn.Sequential(nn.Tanh(), nn.Conv2d(4, 4, 1)))
        self.side = nn.Linear(2 * 8 * 8, 4)
        self.head = nn.Sequential(nn.Linear(4 * 4 * 4 + 4, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(h + self.block(h))
        h = F.max_pool2d(h, 2) * -0.5
        side = self.side(torch.flatten(x, 1)) * _OFFSET
        z = torch.cat([h.view(x.size(0), -1), side], dim=1)
        return self.head(2.0 * z - 0.1)


def user_net(seed: int) -> UserNet:
    torch.manual_seed(seed)
    model = UserNet()
    randomize_batch_norm(model, torch.Generator().manual_seed(seed))
    return model.eval()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.2), batch=st.integers(1, 4))
def test_sound_on_a_user_module(seed, eps, batch):
    model = user_net(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 2, 8, 8, generator=gen)
    y = torch.randint(0, 5, (batch,), generator=gen)
    assert_sound(model, x, y, eps, gen)
    assert not hasattr(model, "_tensor_constant0")  # fx's captured constant stays out of it


class UserIBPSmall(nn.Module):
    """ibp_small (VALID padding) written by hand, under the built-in model's parameter names."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.layers = nn.ModuleDict({"conv1": nn.Conv2d(1, 16, 4, stride=2),
                                     "conv2": nn.Conv2d(16, 32, 4, stride=1),
                                     "fc1": nn.Linear(32 * 10 * 10, 100),
                                     "logits": nn.Linear(100, 10)})
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.relu(self.layers["conv1"](x))
        x = torch.relu(self.layers["conv2"](x))
        x = self.layers["fc1"](torch.flatten(x, 1)).relu()
        return self.layers["logits"](x)


def test_a_user_reimplementation_of_ibp_small_has_the_same_bounds():
    torch.manual_seed(0)
    built_in = build_model("ibp_small", 10, (1, 28, 28), (0.3,), (0.4,)).eval()
    user = UserIBPSmall(0.3, 0.4)
    user.load_state_dict(built_in.state_dict())
    user.eval()
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    with torch.no_grad():
        assert torch.allclose(user(x), built_in(x), rtol=1e-6, atol=1e-6)
        for eps in (0.0, 0.01, 0.1):
            for got, want in zip(interval_bounds(user, x, eps), interval_bounds(built_in, x, eps)):
                assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
            assert torch.allclose(elided_upper_bounds(user, x, y, eps),
                                  elided_upper_bounds(built_in, x, y, eps), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# elision of the last layer


def test_elided_bounds_are_tighter_than_logit_differences():
    model = random_network("basic", 3)
    x, y = torch.rand(6, 2, 8, 8), torch.randint(0, 5, (6,))
    with torch.no_grad():
        lower, upper = interval_bounds(model, x, 0.05)
        elided = elided_upper_bounds(model, x, y, 0.05)
    naive = upper - lower.gather(1, y[:, None])
    assert bool((elided <= naive + 1e-5).all())
    assert torch.allclose(elided.gather(1, y[:, None]), torch.zeros(6, 1))


class Scaled(nn.Module):
    """Logits that are not a Linear's output: nothing to elide."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x) * 2


def test_without_a_last_linear_layer_the_logit_interval_is_used():
    torch.manual_seed(0)
    model, x, y = Scaled().eval(), torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        lower, upper = interval_bounds(model, x, 0.1)
        elided = elided_upper_bounds(model, x, y, 0.1)
        (p_lower, p_upper), last = penultimate_bounds(model, x, 0.1)
    expected = (upper - lower.gather(1, y[:, None])).scatter(1, y[:, None], 0.0)
    assert torch.equal(elided, expected)
    # the penultimate interval is the logits', the last layer the identity
    assert torch.equal(p_lower, lower) and torch.equal(p_upper, upper)
    assert torch.equal(last.weight, torch.eye(3)) and last.bias is None
    widths = layer_bound_widths(model, x, 0.1)
    assert widths[-1][0] == "logits" and widths[-2][0] == "mul"


class Functional(nn.Module):
    """The last layer as F.linear on the module's own parameters."""

    def __init__(self, inner: nn.Sequential):
        super().__init__()
        self.body, self.last = inner[:-1], inner[-1]

    def forward(self, x):
        return F.linear(self.body(x), self.last.weight, bias=self.last.bias)


def test_a_functional_last_layer_is_elided_too():
    model = random_network("conv", 4)
    functional = Functional(model).eval()
    x, y = torch.rand(4, 2, 8, 8), torch.randint(0, 5, (4,))
    with torch.no_grad():
        assert torch.equal(elided_upper_bounds(functional, x, y, 0.05),
                           elided_upper_bounds(model, x, y, 0.05))
        (lower, upper), last = penultimate_bounds(functional, x, 0.05)
    assert last.weight is model[-1].weight and last.bias is model[-1].bias
    assert penultimate_bounds(model, x, 0.05)[1] is model[-1]


# verified on fixed seeded (untrained) models, computed with the Composite walk this replaced
VERIFIED_BEFORE = [
    ("ibp_small", {"padding": "same"}, [0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 4], 1e-4,
     [1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0], -9.289142608642578),
    ("ibp_small", {"padding": "same"}, [0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 4], 2e-4,
     [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], -6.9865241050720215),
    ("resnet_digits", {}, [3, 1, 7, 7, 3, 1, 7, 3, 7, 1, 1, 1, 7, 1, 7, 3], 1e-7,
     [0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1], -23.682342529296875),
]


@pytest.mark.parametrize("name, options, labels, eps, proven, elided_sum", VERIFIED_BEFORE)
def test_verified_is_unchanged(name, options, labels, eps, proven, elided_sum):
    torch.manual_seed(0)
    model = build_model(name, 10, (1, 8, 8), (0.3,), (0.4,), **options).eval()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
        assert y.tolist() == labels  # the same seeded model as then
        assert verified(model, x, y, eps).int().tolist() == proven
        assert float(elided_upper_bounds(model, x, y, eps).sum()) == pytest.approx(elided_sum,
                                                                                   rel=1e-5)


# ------------------------------------------------------------------------------------------------
# refusals


def test_unsupported_module_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no rule for module 2 \(GELU\)"):
        interval_bounds(model, torch.rand(1, 4), 0.1)
    with pytest.raises(ValueError, match=r"no rule for module 2 \(GELU\) at node"):
        check_bounds(model, (4,))


class Gram(nn.Module):
    def __init__(self, infix: bool = False):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.infix = infix

    def forward(self, x):
        h = self.lin(x)
        g = h @ h.transpose(1, 2) if self.infix else torch.matmul(h, h.transpose(1, 2))
        return g.flatten(1)


def test_a_product_of_two_activations_is_refused_naming_the_operation():
    with pytest.raises(ValueError, match=r"no rule for call_function torch\.matmul at node "
                                         r"'matmul' \(supported: .*torch\.cat"):
        check_bounds(Gram(), (2, 3))
    with pytest.raises(ValueError, match=r"no rule for call_function operator\.matmul"):
        interval_bounds(Gram(infix=True), torch.rand(1, 2, 3), 0.1)

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(ValueError, match=r"operator\.mul: of two intervals .* at node 'mul'"):
        check_bounds(Square(), (3,))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.lin(x)
        return -self.lin(x)


def test_an_untraceable_model_is_refused_naming_its_class():
    with pytest.raises(ValueError, match=r"interval bounds: cannot trace Branchy with torch\.fx "
                                         r"\(.+\)"):
        check_bounds(Branchy(), (3,))
    with pytest.raises(ValueError, match="cannot trace Branchy"):
        verified(Branchy(), torch.rand(2, 3), torch.zeros(2, dtype=torch.long), 0.1)
    # inside a wrapper: the module whose forward failed, and its path
    wrapped = nn.Sequential(nn.Identity(), nn.Sequential(nn.ReLU(), Branchy()))
    with pytest.raises(ValueError, match=r"cannot trace Branchy with torch\.fx \(.+; in module "
                                         r"'1\.1' of Sequential\)"):
        check_bounds(wrapped, (3,))


def test_check_bounds_accepts_every_built_in_model_and_restores_the_mode():
    for name in ModelName:
        shape, options = BUILT_IN[name]
        model = build_model(name, 10, shape, (0.4,), (0.25,), **options)
        assert model.training
        check_bounds(model, shape)
        assert model.training and all(m.training for m in model.modules())
    check_bounds(user_net(0), (2, 8, 8))
    with pytest.raises(ValueError, match=r"UserNet fails on inputs of shape \(2, 2, 9, 9\)"):
        check_bounds(user_net(0), (2, 9, 9))  # the wrong input size: the error says where
    with pytest.raises(ValueError, match=r"outputs shape \(2, 2, 3\)"):
        check_bounds(nn.Linear(3, 3), (2, 3))


def test_non_monotone_parameters_are_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.LeakyReLU(-0.5), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"module 1 \(LeakyReLU\): negative_slope -0.5 < 0"):
        check_bounds(model, (2,))


# ------------------------------------------------------------------------------------------------
# the traced graph: cached, weakly, against the live parameters


def test_traced_once_per_model_and_mode_for_any_batch_size(monkeypatch):
    traces = []
    real = ibp._trace
    monkeypatch.setattr(ibp, "_trace", lambda model: traces.append(model) or real(model))
    model = user_net(1)
    for batch in (1, 3, 7):
        elided_upper_bounds(model, torch.rand(batch, 2, 8, 8), torch.zeros(batch).long(), 0.01)
    assert len(traces) == 1
    model.train()
    ibp.ibp_loss(model, torch.rand(4, 2, 8, 8), torch.zeros(4).long(), 0.01, 0.5)
    model.eval()
    verified(model, torch.rand(2, 2, 8, 8), torch.zeros(2).long(), 0.01)
    assert len(traces) == 2  # one graph per mode


def test_the_cache_does_not_keep_a_model_alive():
    model = user_net(2)
    interval_bounds(model, torch.rand(2, 2, 8, 8), 0.01)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_parameter_updates_are_seen():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).eval()
    x = torch.tensor([[0.5, 0.5]])
    before = interval_bounds(model, x, 0.1)
    with torch.no_grad():
        model[0].weight.mul_(-3.0)
    model[2].bias = nn.Parameter(torch.tensor([5.0]))  # a replaced parameter as well
    after = interval_bounds(model, x, 0.1)
    fresh = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).eval()
    fresh.load_state_dict(model.state_dict())
    expected = interval_bounds(fresh, x, 0.1)
    assert not torch.equal(before.lower, after.lower)
    assert torch.equal(after.lower, expected.lower) and torch.equal(after.upper, expected.upper)
    assert isinstance(after, Interval) and after.lower is after[0]


def test_ibp_loss_gradients_reach_every_parameter():
    model = user_net(3).train()
    loss, _, worst = ibp.ibp_loss(model, torch.rand(4, 2, 8, 8), torch.arange(4), 0.05, 0.5)
    loss.backward()
    assert worst.shape == (4, 5)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# schedules and layer widths


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


def test_layer_widths_name_residual_sums_by_node():
    model = build_model("resnet_digits", 10, (1, 8, 8), (0.3,), (0.4,)).eval()
    names = [n for n, _ in layer_bound_widths(model, torch.rand(2, 1, 8, 8), 0.01)]
    assert names[:3] == ["normalize", "conv1", "bn1"] and names[-1] == "logits"
    assert names.count("layer1.0.relu") == 2  # a module applied twice, recorded twice
    assert "layer2.0.downsample.1" in names and {"add", "add_1", "add_2"} <= set(names)


def test_softplus_with_a_low_threshold_stays_sound():
    """softplus switches to x above beta*x = threshold and drops there: not monotone, so
    its ends move out by that drop."""
    torch.manual_seed(0)
    for act in (nn.Softplus(beta=1.0, threshold=0.0), nn.Softplus(beta=2.0, threshold=1.0)):
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), act, nn.Linear(6, 3)).eval()
        x = torch.rand(5, 1, 2, 2)
        lower, upper = interval_bounds(model, x, 0.3)
        assert (lower <= upper).all()
        for _ in range(200):
            point = (x + (torch.rand_like(x) * 2 - 1) * 0.3).clamp(0, 1)
            out = model(point)
            assert (out >= lower - 1e-5).all() and (out <= upper + 1e-5).all()


class _InPlaceShared(nn.Module):
    """``g += 1`` on a tensor that is used again: eager mode changes ``h`` too, fx's graph
    records a new value, so the graph is not the forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        g = h
        g += 1
        return self.out(h)


class _NoisyInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if self.training:
            x = x + torch.randn_like(x)
        return self.lin(x)


def test_check_bounds_refuses_a_graph_that_is_not_the_forward_and_a_train_only_op():
    with pytest.raises(ValueError, match="graph computes something else than its forward"):
        check_bounds(_InPlaceShared(), (3,))
    with pytest.raises(ValueError, match="randn_like"):
        check_bounds(_NoisyInTraining(), (3,))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].register_forward_pre_hook(lambda m, args: None)
    with pytest.raises(ValueError, match="forward pre-hook"):
        check_bounds(model, (3,))
