"""CROWN bounds: an independent matrix-form CROWN on MLPs, soundness on random networks, every
built-in model and a user module with a residual sum, tightness against IBP, the best
certificate, CROWN-IBP training and the fast-IBP recipe."""

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from defenses.certified_training import certified_margins, fast_regularizer, ibp_init
from defenses import crown
from defenses.crown import (_pass, alpha_crown_margins, bound_pass, certificates, check_crown,
                            crown_bounds, crown_margins,
                            crown_margin_upper_bounds, verified_crown)
from defenses.ibp import elided_upper_bounds, interval_bounds, verified
from defenses.models import ModelName, Normalize, build_model
from defenses.objectives import make_objective
from defenses.trainer import TrainConfig, Trainer
from tests.test_ibp import BUILT_IN, box_points, random_network, tame, user_net


# ------------------------------------------------------------------------------------------------
# an independent CROWN: Zhang et al. 2018's matrices for a Linear-ReLU MLP


def reference_crown(layers, x, eps, C, pre_bounds):
    """Lower bounds of C z over the clipped box, layer by layer backward with the paper's
    diagonal relaxation matrices; ``pre_bounds`` are the pre-activation bounds of each hidden
    layer. ReLU: upper slope u/(u-l) with intercept -l u/(u-l), lower slope 1 iff u > -l."""
    low, high = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    Lambda = C.clone()  # [b, s, out]
    const = torch.zeros(C.shape[:2])
    for i in range(len(layers) - 1, -1, -1):
        W, b = layers[i].weight, layers[i].bias
        const = const + Lambda @ b
        Lambda = Lambda @ W  # [b, s, in]
        if i == 0:
            break
        lo, hi = pre_bounds[i - 1]
        upper_slope = torch.where(hi <= 0, 0.0, torch.where(lo >= 0, 1.0, hi / (hi - lo)))
        upper_icpt = torch.where((lo < 0) & (hi > 0), -lo * hi / (hi - lo), 0.0)
        lower_slope = torch.where(hi <= 0, 0.0, torch.where(lo >= 0, 1.0,
                                                            (hi > -lo).float()))
        pos, neg = Lambda.clamp(min=0), Lambda.clamp(max=0)
        const = const + (neg * upper_icpt[:, None, :]).sum(-1)
        Lambda = pos * lower_slope[:, None, :] + neg * upper_slope[:, None, :]
    return const + (Lambda.clamp(min=0) * low[:, None, :]).sum(-1) + \
        (Lambda.clamp(max=0) * high[:, None, :]).sum(-1)


def ibp_pre_bounds(layers, x, eps):
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    found = []
    for layer in layers[:-1]:
        c, r = (hi + lo) / 2, (hi - lo) / 2
        c, r = layer(c), F.linear(r, layer.weight.abs())
        lo, hi = c - r, c + r
        found.append((lo, hi))
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    return found


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.001, 0.3), depth=st.integers(1, 3))
def test_equals_the_matrix_form_of_crown_ibp_and_of_full_crown_on_mlps(seed, eps, depth):
    torch.manual_seed(seed)
    widths = [6] + [8] * depth + [4]
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    mods = []
    for layer in layers[:-1]:
        mods += [layer, nn.ReLU()]
    model = nn.Sequential(*mods, layers[-1]).eval()
    x, y = torch.rand(3, 6), torch.randint(0, 4, (3,))
    C = torch.eye(4)[y][:, None, :] - torch.eye(4)[None]
    with torch.no_grad():
        want = -reference_crown(layers, x, eps, C, ibp_pre_bounds(layers, x, eps))
        got = crown_margin_upper_bounds(model, x, y, eps)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        # full CROWN: every hidden layer's bounds by the reference on the prefix, for the
        # neurons a sample has unstable under IBP carried on from the layers already bounded
        # (the others keep those IBP bounds: their lines are exact either way)
        pre = []
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        for i, layer in enumerate(layers[:-1]):
            c, r = layer((hi + lo) / 2), F.linear((hi - lo) / 2, layer.weight.abs())
            lo, hi = c - r, c + r
            n = lo.shape[1]
            eye = torch.eye(n).expand(3, n, n)
            low = reference_crown(layers[:i + 1], x, eps, eye, pre)
            high = -reference_crown(layers[:i + 1], x, eps, -eye, pre)
            unstable = (lo < 0) & (hi > 0)
            pre.append((torch.where(unstable, low, lo), torch.where(unstable, high, hi)))
            lo, hi = pre[-1][0].clamp(min=0), pre[-1][1].clamp(min=0)
        want = -reference_crown(layers, x, eps, C, pre)
        got = crown_margin_upper_bounds(model, x, y, eps, method="crown")
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# soundness


def assert_sound(model, x, y, eps, gen, method, n=30, tol=1e-4):
    with torch.no_grad():
        lower, upper = crown_bounds(model, x, eps, method)
        margins = crown_margin_upper_bounds(model, x, y, eps, method)
        proven = certificates(model, x, y, eps, method)
        for z in box_points(x, eps, gen, n):
            out = model(z)
            assert bool((out >= lower - tol).all()) and bool((out <= upper + tol).all())
            assert bool((out - out.gather(1, y[:, None]) <= margins + tol).all())
            for hit in proven.values():  # a proven label cannot change in the box
                assert bool((out.argmax(1) == y)[hit].all())
    return lower, upper


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["conv", "basic", "bottleneck", "preact", "custom"]),
       seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.3),
       method=st.sampled_from(["crown-ibp", "crown"]))
def test_sound_on_random_networks(kind, seed, eps, method):
    model = random_network(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 8, 8, generator=gen)
    y = torch.randint(0, 5, (3,), generator=gen)
    assert_sound(model, x, y, eps, gen, method)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.2), batch=st.integers(1, 3))
def test_sound_on_a_user_module_with_a_residual_sum(seed, eps, batch):
    model = user_net(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 2, 8, 8, generator=gen)
    y = torch.randint(0, 5, (batch,), generator=gen)
    for method in ("crown-ibp", "crown"):
        assert_sound(model, x, y, eps, gen, method)


def conv_chain(seed):
    """A random chain of convolutions (strides, paddings, dilations, groups; zero padding of
    their own or as a module), batch norms in either mode, input normalisation and activations
    with and without kinks, then a head."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa
    layers, c, size = [Normalize((0.5, 0.4), (0.3, 0.2))], 2, 12
    for _ in range(int(torch.randint(2, 4, (1,), generator=gen))):
        out = pick([2, 4, 6])
        groups = pick([1, 2]) if c % 2 == 0 and out % 2 == 0 else 1
        k, st, p, d = pick([1, 2, 3]), pick([1, 2]), pick([0, 1, 2]), pick([1, 2])
        if (size + 2 * p - d * (k - 1) - 1) // st + 1 < 2:  # keep at least 2 x 2
            k, st, p, d = 1, 1, 0, 1
        size = (size + 2 * p - d * (k - 1) - 1) // st + 1
        if pick([True, False]):  # as a module of its own (TensorFlow's SAME), uneven sides
            layers.append(nn.ZeroPad2d((2 * p, 0, 0, 2 * p)))
            p = 0
        layers.append(nn.Conv2d(c, out, k, stride=st, padding=p, dilation=d, groups=groups))
        if pick([True, False]):
            bn = nn.BatchNorm2d(out)
            bn.running_mean.uniform_(-0.3, 0.3, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.data.uniform_(0.5, 1.5, generator=gen)
            bn.train(pick([True, False]))
            layers.append(bn)
        layers.append(pick([nn.ReLU(), nn.LeakyReLU(0.2), nn.Tanh()]))
        c = out
    model = nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(5))
    model(torch.rand(2, 2, 12, 12))  # sizes the head; keeps each batch norm's mode
    return model


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.001, 0.2))
def test_patches_mode_gives_the_dense_passs_bounds(seed, eps):
    """Full CROWN bounds a convolutional layer's neurons by their receptive-field windows
    (patches mode); the dense backward pass of the whole layer is the reference."""
    model = conv_chain(seed).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 12, 12, dtype=torch.float64, generator=gen)
    chains = []
    find = crown._Pass._patch_chain

    def found(self, start):
        chains.append(find(self, start))
        return chains[-1]

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(crown._Pass, "_patch_chain", found)
        windowed = crown_bounds(model, x, eps, "crown")
        mp.setattr(crown._Pass, "_patch_chain", lambda self, start: None)
        dense = crown_bounds(model, x, eps, "crown")
    assert any(chain is not None for chain in chains)  # the second convolution's neurons
    torch.testing.assert_close(windowed.lower, dense.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(windowed.upper, dense.upper, rtol=1e-9, atol=1e-9)


def test_patches_mode_with_windows_wholly_in_a_padding():
    """A convolution padded by more than its kernel reaches (rows of the layer after it whose
    windows lie wholly in the padding), on a grid smaller than the windows (the dense form)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 4), nn.Tanh(), nn.Conv2d(3, 3, 1, padding=2),
                          nn.Tanh(), nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model(x)
    model.eval()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        windowed = crown_bounds(model, x, 0.1, "crown")
        mp.setattr(crown._Pass, "_patch_chain", lambda self, start: None)
        dense = crown_bounds(model, x, 0.1, "crown")
    torch.testing.assert_close(windowed.lower, dense.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(windowed.upper, dense.upper, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(ModelName), ids=[m.value for m in ModelName])
def test_sound_and_no_looser_than_ibp_on_every_built_in_model(name):
    shape, options = BUILT_IN[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = tame(build_model(name, 10, shape, (0.4,), (0.25,), **options), gen)
    x = torch.rand(2, *shape, generator=gen)
    y = torch.randint(0, 10, (2,), generator=gen)
    lower, upper = assert_sound(model, x, y, 0.02, gen, "crown-ibp", n=6, tol=1e-5)
    with torch.no_grad():
        ibp_lower, ibp_upper = interval_bounds(model, x, 0.02)
        crown = crown_margin_upper_bounds(model, x, y, 0.02)
        ibp = elided_upper_bounds(model, x, y, 0.02)
    assert bool((upper - lower <= ibp_upper - ibp_lower + 1e-5).all())
    assert bool((crown <= ibp + 1e-5).all())
    check_crown(model, shape)


def test_eps_zero_in_train_mode_gives_the_forward_with_batch_statistics():
    model = random_network("basic", 5).train()
    x = torch.rand(6, 2, 8, 8)
    with torch.no_grad():
        lower, upper = crown_bounds(model, x, 0.0)
        out = model(x)
    assert torch.allclose(lower, out, atol=1e-4) and torch.allclose(upper, out, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# tightness on a trained small CNN, and the best certificate


@pytest.fixture(scope="module")
def ibp_trained_cnn(digits):
    torch.manual_seed(0)
    model = build_model("ibp_small", digits.num_classes, digits.input_shape, digits.mean,
                        digits.std, padding="same")
    Trainer(model, digits.train, TrainConfig(epochs=6, batch_size=64, lr=1e-3),
            make_objective("ibp", eps_train=0.05, warmup=23, rampup=80)).fit()
    xs, ys = zip(*(digits.val[i] for i in range(200)))
    return model.eval(), torch.stack(xs), torch.as_tensor(ys)


def test_crown_verifies_strictly_more_than_ibp_on_a_trained_cnn(ibp_trained_cnn):
    model, x, y = ibp_trained_cnn
    for eps in (0.02, 0.05):
        with torch.no_grad():
            by_ibp, by_crown = verified(model, x, y, eps), verified_crown(model, x, y, eps)
            crown = crown_margin_upper_bounds(model, x, y, eps)
            ibp = elided_upper_bounds(model, x, y, eps)
        assert int(by_crown.sum()) > int(by_ibp.sum())
        assert bool((crown <= ibp + 1e-4).all())  # at the training radius and below
        proven = certificates(model, x, y, eps)
        assert torch.equal(proven["ibp"], by_ibp) and torch.equal(proven["crown"], by_crown)
        assert bool((proven["best"] >= (by_ibp | by_crown)).all())


def test_the_best_certificate_takes_the_tighter_bound_per_margin(ibp_trained_cnn):
    model, x, y = ibp_trained_cnn
    eps = 0.2  # far beyond the training radius: CROWN's lines can be looser than intervals
    with torch.no_grad():
        crown = crown_margin_upper_bounds(model, x, y, eps)
        ibp = elided_upper_bounds(model, x, y, eps)
        proven = certificates(model, x, y, eps)
    best = torch.minimum(crown, ibp).scatter(1, y[:, None], -math.inf)
    assert torch.equal(proven["best"], (best <= 0).all(1))


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(["conv", "basic", "custom"]), seed=st.integers(0, 10_000),
       eps=st.floats(0.0, 0.3), method=st.sampled_from(["crown-ibp", "crown"]))
def test_alpha_crown_is_sound_and_never_looser_than_crown(kind, seed, eps, method):
    model = random_network(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 8, 8, generator=gen)
    y = torch.randint(0, 5, (3,), generator=gen)
    run = _pass(model, x, eps, method)
    crown, optimised = crown_margins(run, y).detach(), alpha_crown_margins(run, y)
    assert bool((optimised <= crown + 1e-6).all())
    assert all(p.grad is None for p in model.parameters())  # only the slopes were optimised
    with torch.no_grad():
        for z in box_points(x, eps, gen, 30):
            out = model(z)
            assert bool((out - out.gather(1, y[:, None]) <= optimised + 1e-4).all())


def test_alpha_crown_proves_more_than_crown_on_a_trained_cnn(ibp_trained_cnn):
    model, x, y = ibp_trained_cnn
    eps = 0.05  # the training radius
    with torch.no_grad():
        proven = certificates(model, x, y, eps, alpha=True)
        crown = crown_margin_upper_bounds(model, x, y, eps)
    optimised = alpha_crown_margins(_pass(model, x, eps, "crown-ibp"), y)
    assert bool((optimised < crown - 1e-3).any())  # the optimised lines are tighter
    assert bool((proven["alpha_crown"] >= proven["crown"]).all())
    assert int(proven["alpha_crown"].sum()) > int(proven["crown"].sum())
    assert bool((proven["best"] >= proven["alpha_crown"] | proven["ibp"]).all())


# ------------------------------------------------------------------------------------------------
# CROWN-IBP training and the fast-IBP recipe


def test_certified_margins_mix_crown_ibp_and_ibp_and_reach_every_parameter():
    model = user_net(3).train()
    x, y = torch.rand(4, 2, 8, 8), torch.arange(4)
    ibp, _ = certified_margins(model, x, y, 0.05, beta=0.0)
    crown, _ = certified_margins(model, x, y, 0.05, beta=1.0)
    half, reg = certified_margins(model, x, y, 0.05, beta=0.5, regularize=True)
    assert torch.allclose(half, 0.5 * crown + 0.5 * ibp, atol=1e-5)
    assert torch.allclose(ibp, elided_upper_bounds(model, x, y, 0.05), atol=1e-6)
    (F.cross_entropy(half, y) + reg).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters())


def test_crown_ibp_objective_ramps_beta_with_eps():
    objective = make_objective("ibp", eps_train=0.1, warmup=2, rampup=4, bound="crown_ibp",
                               beta_start=1.0, beta_end=0.0)
    model = build_model("ibp_small", 10, (1, 8, 8), (0.3,), (0.4,), padding="same").train()
    x, y, gen = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), torch.Generator()
    betas = [objective.loss(model, x, y, step, gen)[1]["beta"] for step in (0, 2, 4, 6, 9)]
    assert betas == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    # with bound ibp and no regulariser the loss is Gowal et al.'s, as before
    plain = make_objective("ibp", eps_train=0.1, warmup=2, rampup=4)
    loss, metrics = plain.loss(model, x, y, 4, gen)
    assert "beta" not in metrics and bool(torch.isfinite(loss))


def test_ibp_init_keeps_interval_widths_from_growing():
    def width_growth(model):
        x = torch.rand(64, 1, 28, 28)
        with torch.no_grad():
            run = bound_pass(model.eval(), x, 0.1)
            first, last = run.first_layer_input(), run.activation_inputs()[-1]
        return float((last.upper - last.lower).mean() / (first.upper - first.lower).mean())

    torch.manual_seed(0)
    default = build_model("ibp_medium", 10, (1, 28, 28), (0.1,), (0.3,))
    torch.manual_seed(0)
    fresh = ibp_init(build_model("ibp_medium", 10, (1, 28, 28), (0.1,), (0.3,)))
    assert width_growth(fresh) < 0.2 * width_growth(default)
    for name, m in fresh.named_modules():  # sigma = sqrt(2 pi) / fan_in, the output layer kept
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name != "layers.logits":
            want = math.sqrt(2 * math.pi) / m.weight[0].numel()
            assert float(m.weight.detach().std()) == pytest.approx(want, rel=0.15)


def test_fast_regularizer_penalises_growing_widths_and_dead_relus():
    torch.manual_seed(0)
    model = build_model("ibp_small", 10, (1, 8, 8), (0.3,), (0.4,), padding="same",
                        batch_norm=True).train()
    names = [n for n, _ in model.layers.named_children() if not n.startswith("pad")]
    assert names[:4] == ["normalize", "conv1", "bn_conv1", "relu_conv1"]
    x = torch.rand(32, 1, 8, 8)
    run = bound_pass(model, x, 0.1)
    reg = fast_regularizer(run).detach()
    assert float(reg) >= 0
    with torch.no_grad():  # all neurons dead: the balance term is at its most (2 per layer)
        model.layers.bn_conv1.bias.fill_(-100.0)
        model.layers.bn_conv2.bias.fill_(-100.0)
        model.layers.bn_fc1.bias.fill_(-100.0)
    dead = fast_regularizer(bound_pass(model, x, 0.1))
    assert float(dead) > float(reg)
