"""Interval Bound Propagation (Gowal et al. 2018; SPEC.md section 2).

Bounds travel as (lower, upper) through a registry of per-module rules: affine layers in
centre/radius form, monotone layers on each end, and the residual blocks and models of
``defenses.models`` by mirroring their forward. A module without a rule raises ``ValueError``
naming it. The last linear layer is elided for verification: bounds on ``z_j - z_y`` come
straight from the penultimate interval.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from defenses.models import (BasicBlock, Bottleneck, IBPCNN, Normalize, PreActBlock,
                             PreActResNet, ResNet)

__all__ = [
    "Interval",
    "interval_bounds",
    "penultimate_bounds",
    "elided_upper_bounds",
    "verified",
    "ibp_loss",
    "layer_bound_widths",
]

Interval = tuple[torch.Tensor, torch.Tensor]
Recorder = Callable[[str, Interval], None]


# ------------------------------------------------------------------------------------------------
# rules for single modules


def _affine(lower: torch.Tensor, upper: torch.Tensor, fn_centre, fn_radius) -> Interval:
    """Centre c = (l+u)/2, radius r = (u-l)/2; c' = f(c) (with bias), r' = |f|(r) (no bias)."""
    c, r = (upper + lower) / 2, (upper - lower) / 2
    c, r = fn_centre(c), fn_radius(r)
    return c - r, c + r


def _sound(lower: torch.Tensor, upper: torch.Tensor) -> Interval:
    """Bounds past float range (deep untrained nets get there) become vacuous, never NaN.

    Applied once to the outputs: a NaN (from inf - inf) propagates through every rule here
    (ReLU, pools, affine maps), so only entries whose true bound is already vacuous are NaN."""
    return (torch.nan_to_num(lower, nan=-math.inf, posinf=math.inf, neginf=-math.inf),
            torch.nan_to_num(upper, nan=math.inf, posinf=math.inf, neginf=-math.inf))


def _linear(m: nn.Linear, b: Interval) -> Interval:
    return _affine(*b, lambda c: F.linear(c, m.weight, m.bias),
                   lambda r: F.linear(r, m.weight.abs()))


def _conv2d(m: nn.Conv2d, b: Interval) -> Interval:
    if m.padding_mode != "zeros":
        raise ValueError(f"cannot bound {m}: padding_mode {m.padding_mode!r} (only 'zeros')")
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    return _affine(*b, lambda c: F.conv2d(c, m.weight, m.bias, **kw),
                   lambda r: F.conv2d(r, m.weight.abs(), None, **kw))


def _batchnorm(m: nn.BatchNorm2d, b: Interval) -> Interval:
    """Affine with running statistics in eval mode; in train mode, with the statistics of the
    box centres' batch, held constant (as IBP implementations do)."""
    lower, upper = b
    if m.training or m.running_mean is None:
        c = (lower + upper) / 2
        mean = c.mean(dim=(0, 2, 3))
        var = c.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -mean * scale + (m.bias if m.bias is not None else 0)
    view = (1, -1, 1, 1)
    return _affine(lower, upper, lambda c: c * scale.view(view) + shift.view(view),
                   lambda r: r * scale.abs().view(view))


def _normalize(m: Normalize, b: Interval) -> Interval:
    lower, upper = b
    return (lower - m.mean) / m.std, (upper - m.mean) / m.std  # std > 0: order kept


def _on_both_ends(m: nn.Module, b: Interval) -> Interval:
    """Monotone non-decreasing maps (ReLU & co., max pool) and positive linear maps without
    bias (average pools), flattening, padding with zeros: apply to each end."""
    return m(b[0]), m(b[1])


_MONOTONE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Softplus,
             nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
             nn.Identity, nn.ZeroPad2d)


def _residual_basic(m: BasicBlock, b: Interval, rec: Recorder, name: str) -> Interval:
    identity = b if m.downsample is None else _propagate(m.downsample, b, rec, f"{name}.downsample")
    out = _propagate(m.conv1, b, rec, f"{name}.conv1")
    out = _propagate(m.bn1, out, rec, f"{name}.bn1")
    out = _propagate(m.relu, out, rec, f"{name}.relu1")
    out = _propagate(m.conv2, out, rec, f"{name}.conv2")
    out = _propagate(m.bn2, out, rec, f"{name}.bn2")
    out = (out[0] + identity[0], out[1] + identity[1])  # residual add: ends add
    return _propagate(m.relu, out, rec, f"{name}.relu")


def _residual_bottleneck(m: Bottleneck, b: Interval, rec: Recorder, name: str) -> Interval:
    identity = b if m.downsample is None else _propagate(m.downsample, b, rec, f"{name}.downsample")
    out = b
    for i in (1, 2, 3):
        out = _propagate(getattr(m, f"conv{i}"), out, rec, f"{name}.conv{i}")
        out = _propagate(getattr(m, f"bn{i}"), out, rec, f"{name}.bn{i}")
        if i < 3:
            out = _propagate(m.relu, out, rec, f"{name}.relu{i}")
    out = (out[0] + identity[0], out[1] + identity[1])
    return _propagate(m.relu, out, rec, f"{name}.relu")


def _residual_preact(m: PreActBlock, b: Interval, rec: Recorder, name: str) -> Interval:
    out = _propagate(m.relu, _propagate(m.bn1, b, rec, f"{name}.bn1"), rec, f"{name}.relu1")
    shortcut = b if m.shortcut is None else _propagate(m.shortcut, out, rec, f"{name}.shortcut")
    out = _propagate(m.conv1, out, rec, f"{name}.conv1")
    out = _propagate(m.relu, _propagate(m.bn2, out, rec, f"{name}.bn2"), rec, f"{name}.relu2")
    out = _propagate(m.conv2, out, rec, f"{name}.conv2")
    return out[0] + shortcut[0], out[1] + shortcut[1]


def _sequential(m: nn.Sequential, b: Interval, rec: Recorder, name: str) -> Interval:
    for child_name, child in m.named_children():
        b = _propagate(child, b, rec, f"{name}.{child_name}" if name else child_name)
    return b


_LEAF_RULES: dict[type, Callable[[nn.Module, Interval], Interval]] = {
    nn.Linear: _linear, nn.Conv2d: _conv2d, nn.BatchNorm2d: _batchnorm, Normalize: _normalize,
}
_CONTAINER_RULES: dict[type, Callable[[nn.Module, Interval, Recorder, str], Interval]] = {
    nn.Sequential: _sequential, BasicBlock: _residual_basic, Bottleneck: _residual_bottleneck,
    PreActBlock: _residual_preact,
}


def _propagate(m: nn.Module, b: Interval, rec: Recorder, name: str) -> Interval:
    for cls in type(m).__mro__:
        if cls in _CONTAINER_RULES:
            return _CONTAINER_RULES[cls](m, b, rec, name)
        if cls in _LEAF_RULES:
            out = _LEAF_RULES[cls](m, b)
            break
    else:
        if not isinstance(m, _MONOTONE):
            raise ValueError(f"interval bounds: no rule for module {name or '<root>'} "
                             f"({type(m).__name__}); supported: Linear, Conv2d, BatchNorm2d, "
                             "Normalize, monotone activations, pooling, Flatten, residual blocks")
        out = _on_both_ends(m, b)
    rec(name, out)
    return out


# ------------------------------------------------------------------------------------------------
# whole models: everything up to the last linear layer, which verification elides


def _penultimate(model: nn.Module, b: Interval, rec: Recorder) -> tuple[Interval, nn.Linear]:
    if isinstance(model, ResNet):
        b = _propagate(model.normalize, b, rec, "normalize")
        for part in ("conv1", "bn1", "relu", "maxpool"):
            b = _propagate(getattr(model, part), b, rec, part)
        for i, layer in enumerate(model.layers(), start=1):
            b = _propagate(layer, b, rec, f"layer{i}")
        b = _propagate(model.avgpool, b, rec, "avgpool")
        return _propagate(model.flatten, b, rec, "flatten"), model.fc
    if isinstance(model, PreActResNet):
        b = _propagate(model.normalize, b, rec, "normalize")
        b = _propagate(model.conv1, b, rec, "conv1")
        for i, layer in enumerate(model.layers(), start=1):
            b = _propagate(layer, b, rec, f"layer{i}")
        for part in ("bn", "relu", "avgpool", "flatten"):
            b = _propagate(getattr(model, part), b, rec, part)
        return b, model.fc
    body = model.layers if isinstance(model, IBPCNN) else model
    if not isinstance(body, nn.Sequential) or not isinstance(body[-1], nn.Linear):
        raise ValueError(f"interval bounds: {type(model).__name__} is neither a model of "
                         "defenses.models nor an nn.Sequential ending in nn.Linear")
    for child_name, child in list(body.named_children())[:-1]:
        b = _propagate(child, b, rec, child_name)
    return b, body[-1]


def _input_box(x: torch.Tensor, eps: float) -> Interval:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def penultimate_bounds(model: nn.Module, x: torch.Tensor, eps: float,
                       record: Recorder | None = None) -> tuple[Interval, nn.Linear]:
    """Bounds on the input of the last linear layer over the box [clip(x-eps), clip(x+eps)]."""
    b, last = _penultimate(model, _input_box(x, eps), record or (lambda _n, _b: None))
    return _sound(*b), last


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float) -> Interval:
    """(lower, upper) logit bounds [b, classes] over the L-inf box of radius eps in [0, 1]."""
    b, last = penultimate_bounds(model, x, eps)
    return _sound(*_linear(last, b))


def elided_upper_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
                        ) -> torch.Tensor:
    """Upper bounds [b, classes] of ``z_j - z_y`` with the last layer elided (0 at j = y).

    For w = W_j - W_y, bias b_j - b_y on the penultimate interval (c, r): w.c + b + |w|.r.
    """
    (lower, upper), last = penultimate_bounds(model, x, eps)
    c, r = (upper + lower) / 2, (upper - lower) / 2
    W = last.weight
    w = W[None, :, :] - W[y][:, None, :]  # [b, classes, hidden]
    bias = 0 if last.bias is None else last.bias[None, :] - last.bias[y][:, None]
    upper_bound = torch.einsum("bkh,bh->bk", w, c) + torch.einsum("bkh,bh->bk", w.abs(), r) + bias
    return torch.nan_to_num(upper_bound, nan=math.inf)


def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Bool [b]: IBP proves no input in the eps-box changes the label from y."""
    with torch.no_grad():
        worst = elided_upper_bounds(model, x, y, eps)
    worst = worst.scatter(1, y[:, None], -math.inf)
    return (worst <= 0).all(dim=1)


def ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kappa * CE(nominal) + (1 - kappa) * CE(worst-case logits); returns (loss, nominal
    logits, worst-case logits)."""
    logits = model(x)
    worst = elided_upper_bounds(model, x, y, eps) if kappa < 1 else None
    loss = kappa * F.cross_entropy(logits, y)
    if worst is not None:
        loss = loss + (1 - kappa) * F.cross_entropy(worst, y)
    return loss, logits, worst if worst is not None else logits.detach()


# ------------------------------------------------------------------------------------------------
# how loose the bounds get, layer by layer


@torch.no_grad()
def layer_bound_widths(model: nn.Module, x: torch.Tensor, eps: float) -> list[tuple[str, float]]:
    """Mean width (upper - lower) of the interval after every bounded module, in order,
    ending with the logits."""
    widths: list[tuple[str, float]] = []
    b, last = penultimate_bounds(model, x, eps,
                                 lambda name, iv: widths.append((name, float((iv[1] - iv[0])
                                                                             .mean()))))
    lower, upper = _linear(last, b)
    widths.append(("logits", float((upper - lower).mean())))
    return widths
