"""One contract, every model of ``ModelName``: interval bounds collapse onto the forward at eps 0
and contain it inside the box, ``depth_shapes`` tells the truth, checkpoints round-trip."""

import functools

import pytest
import torch
from torch import nn

from defenses.capture import capture
from defenses.checkpoints import checkpoint_bytes, load_checkpoint
from defenses.ibp import interval_bounds
from defenses.models import ModelName, build_model, depth_shapes, eval_mode

# Small inputs keep the suite fast on a CPU; the IBP CNNs need SAME padding below 28x28.
SMALL = {
    ModelName.RESNET18: ((3, 16, 16), {}),
    ModelName.RESNET34: ((1, 8, 8), {}),
    ModelName.RESNET50: ((1, 8, 8), {}),
    ModelName.PREACT_RESNET18: ((3, 16, 16), {}),
    ModelName.RESNET_DIGITS: ((1, 8, 8), {}),
    ModelName.IBP_SMALL: ((1, 8, 8), {"padding": "same"}),
    ModelName.IBP_MEDIUM: ((1, 8, 8), {"padding": "same"}),
    ModelName.IBP_LARGE: ((3, 16, 16), {}),
}
MODELS = list(ModelName)
EPS = 0.01


@functools.lru_cache(maxsize=None)
def model_for(name: ModelName) -> nn.Module:
    """The model in train mode, its weights scaled so that no layer widens an interval past its
    widest entry (every output's weights sum to 1 in absolute value, batch norm scales by at
    most 1; only residual sums add widths up): at initialisation the deep ResNets' bounds
    overflow to inf, and no point can leave an infinite box. Batch-norm statistics are away from
    their defaults, so eval-mode batch norm is a non-trivial affine map."""
    shape, options = SMALL[name]
    torch.manual_seed(0)
    model = build_model(name, 10, shape, (0.4,) * shape[0], (0.25,) * shape[0], **options)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight /= m.weight.abs().flatten(1).sum(1).view(-1, *[1] * (m.weight.dim() - 1))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 1.0)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


def inputs(name: ModelName, n: int = 4) -> torch.Tensor:
    return torch.rand(n, *SMALL[name][0], generator=torch.Generator().manual_seed(2))


def test_every_model_is_in_the_contract():
    assert set(SMALL) == set(ModelName)


@pytest.mark.parametrize("name", MODELS, ids=[m.value for m in MODELS])
def test_zero_eps_bounds_are_the_forward(name):
    model, x = model_for(name), inputs(name)
    with eval_mode(model), torch.no_grad():
        logits = model(x)
        lower, upper = interval_bounds(model, x, 0.0)
    assert torch.allclose(lower, logits, rtol=0, atol=1e-6)  # float error is about 1e-8
    assert torch.allclose(upper, logits, rtol=0, atol=1e-6)
    assert model.training  # eval_mode restored the mode


@pytest.mark.parametrize("name", MODELS, ids=[m.value for m in MODELS])
def test_points_of_the_box_stay_inside_the_bounds(name):
    model, x = model_for(name), inputs(name)
    gen = torch.Generator().manual_seed(3)
    low, high = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    with eval_mode(model), torch.no_grad():
        lower, upper = interval_bounds(model, x, EPS)
        # the bounds are finite and far narrower than the logits: a wrong rule would show
        assert bool((lower <= upper).all()) and float((upper - lower).max()) < 0.01
        for i in range(8):
            u = torch.rand(x.shape, generator=gen)
            u = u.round() if i % 2 else u  # corners of the box every other time
            out = model(low + u * (high - low))
            assert bool((out >= lower - 1e-6).all()) and bool((out <= upper + 1e-6).all())


@pytest.mark.parametrize("name", MODELS, ids=[m.value for m in MODELS])
def test_depth_shapes_match_the_captured_activations(name):
    model, x = model_for(name), inputs(name, n=2)
    with capture(model, model.depth_names) as outputs, eval_mode(model), torch.no_grad():
        model(x)
    shapes = depth_shapes(model)
    assert list(shapes) == model.depth_names
    assert {depth: [(2, *shape)] for depth, shape in shapes.items()} == {
        depth: [tuple(out.shape) for out in outs] for depth, outs in outputs.items()}


@pytest.mark.parametrize("name", MODELS, ids=[m.value for m in MODELS])
def test_checkpoint_round_trip_restores_the_outputs(name):
    model, x = model_for(name), inputs(name)
    loaded, extra = load_checkpoint(checkpoint_bytes(model, {"note": name.value}))
    assert extra == {"note": name.value}
    assert type(loaded) is type(model) and loaded.build_config == model.build_config
    with eval_mode(model), eval_mode(loaded), torch.no_grad():
        assert torch.equal(loaded(x), model(x))
