"""Interval Bound Propagation (Gowal et al. 2018; SPEC.md section 2).

Bounds travel as (lower, upper) through one rule per primitive module type: affine layers
(Linear, Conv2d, BatchNorm2d, Normalize) in centre/radius form, monotone layers (ReLU & co.,
pooling, Flatten, padding) on each end. Containers are not special-cased: an ``nn.Sequential``
and a ``defenses.models.Composite`` (every block and model there) are walked along their
structure, the same walk their forward makes, with the ends of a ``Residual`` sum adding up. A
module without a rule raises ``ValueError`` naming it. The last linear layer is elided for
verification: bounds on ``z_j - z_y`` come straight from the penultimate interval.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from defenses.models import Composite, Normalize, Steps, walk

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


_LEAF_RULES: dict[type, Callable[[nn.Module, Interval], Interval]] = {
    nn.Linear: _linear, nn.Conv2d: _conv2d, nn.BatchNorm2d: _batchnorm, Normalize: _normalize,
}


# ------------------------------------------------------------------------------------------------
# containers: walked along the structure their forward walks


def _add(a: Interval, b: Interval) -> Interval:
    """A residual sum: the ends add."""
    return a[0] + b[0], a[1] + b[1]


def _steps(m: nn.Module) -> Steps | None:
    """The children a container applies, in order; None for a primitive module."""
    if isinstance(m, Composite):
        return m.structure
    if isinstance(m, nn.Sequential):
        return tuple(m._modules)  # not named_children(): that skips a module used twice
    return None


def _join(name: str, child_name: str) -> str:
    return f"{name}.{child_name}" if name else child_name


def _walk(m: nn.Module, steps: Steps, b: Interval, rec: Recorder, name: str) -> Interval:
    def apply(child_name: str, child: nn.Module, iv: Interval) -> Interval:
        return _propagate(child, iv, rec, _join(name, child_name))

    return walk(m, steps, b, apply, _add)


def _propagate(m: nn.Module, b: Interval, rec: Recorder, name: str) -> Interval:
    """Bounds on ``m``'s output; ``rec(name, interval)`` after every primitive module."""
    steps = _steps(m)
    if steps is not None:
        return _walk(m, steps, b, rec, name)
    rule = next((_LEAF_RULES[cls] for cls in type(m).__mro__ if cls in _LEAF_RULES), None)
    if rule is not None:
        out = rule(m, b)
    elif isinstance(m, _MONOTONE):
        out = _on_both_ends(m, b)
    else:
        raise ValueError(f"interval bounds: no rule for module {name or '<root>'} "
                         f"({type(m).__name__}); supported: Linear, Conv2d, BatchNorm2d, "
                         "Normalize, monotone activations, pooling, Flatten, ZeroPad2d, "
                         "nn.Sequential and defenses.models.Composite")
    rec(name, out)
    return out


# ------------------------------------------------------------------------------------------------
# whole models: everything up to the last linear layer, which verification elides


def _penultimate(m: nn.Module, b: Interval, rec: Recorder, name: str = ""
                 ) -> tuple[Interval, nn.Linear]:
    """Walk all but the last step; the last is the elided linear layer or a container whose
    own last step is (IBPCNN's ``layers``)."""
    steps = _steps(m)
    if not steps or not isinstance(steps[-1], str):
        raise ValueError(f"interval bounds: {type(m).__name__} {name or '<root>'} does not end "
                         "in nn.Linear; models must be an nn.Sequential or a "
                         "defenses.models.Composite whose last step is the logit layer")
    b = _walk(m, steps[:-1], b, rec, name)
    last = getattr(m, steps[-1])
    if isinstance(last, nn.Linear):
        return b, last
    return _penultimate(last, b, rec, _join(name, steps[-1]))


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
