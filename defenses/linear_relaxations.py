"""Linear relaxations of the activations for CROWN (``defenses.crown``; Zhang et al. 2018,
"Efficient Neural Network Robustness Certification with General Activation Functions", section
3): for pre-activation bounds l <= v <= u, two lines ``a_L v + b_L <= sigma(v) <= a_U v + b_U``
on [l, u], and which nodes are bounded only by their interval (slope-0 lines).

ReLU and leaky ReLU: the chord above, the adaptive line below (section 3.3). Convex pieces: the
chord above and the tangent at the midpoint below; concave pieces: the reverse; across a change
of curvature or a kink without a rule: the interval. The underscored names are this module's
interface to ``defenses.crown`` only.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__: list[str] = []

# A relaxation: (lower slope, lower intercept, upper slope, upper intercept), each like l.
Lines = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]



def _chord(f: Callable, lo: torch.Tensor, hi: torch.Tensor, slope_at: Callable
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The line through (l, f(l)) and (u, f(u)); the tangent's slope at l when u - l is tiny."""
    width = hi - lo
    tiny = width <= 1e-7 * (1 + lo.abs())
    slope = torch.where(tiny, slope_at(lo), (f(hi) - f(lo)) / torch.where(tiny, 1.0, width))
    return slope, f(lo) - slope * lo


def _tangent(f: Callable, slope_at: Callable, d: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    slope = slope_at(d)
    return slope, f(d) - slope * d


def _constant(f: Callable, lo: torch.Tensor, hi: torch.Tensor) -> Lines:
    zero = torch.zeros_like(lo)
    return zero, f(lo), zero, f(hi)


def _curved(f: Callable, slope_at: Callable, lo: torch.Tensor, hi: torch.Tensor,
            convex: torch.Tensor, concave: torch.Tensor) -> Lines:
    """Chord and midpoint tangent where f is convex or concave on [l, u]; slope 0 elsewhere."""
    chord_a, chord_b = _chord(f, lo, hi, slope_at)
    tan_a, tan_b = _tangent(f, slope_at, (lo + hi) / 2)
    c_a_l, c_b_l, c_a_u, c_b_u = _constant(f, lo, hi)
    low_a = torch.where(convex, tan_a, torch.where(concave, chord_a, c_a_l))
    low_b = torch.where(convex, tan_b, torch.where(concave, chord_b, c_b_l))
    up_a = torch.where(convex, chord_a, torch.where(concave, tan_a, c_a_u))
    up_b = torch.where(convex, chord_b, torch.where(concave, tan_b, c_b_u))
    return low_a, low_b, up_a, up_b


class _PiecewiseLinear:
    """ReLU (slope 0) and leaky ReLU (0 <= slope <= 1): convex with a kink at 0. Above: the
    chord; below: the line of either piece, whichever leaves the smaller area (the slope-1 line
    when u > -l), CROWN's adaptive choice; where [l, u] lies in one piece, that piece exactly
    (so only neurons with l < 0 < u gain from tighter bounds)."""

    def __init__(self, slope: float):
        self.slope = slope

    def __call__(self, lo: torch.Tensor, hi: torch.Tensor) -> Lines:
        slope = self.slope
        f = (lambda v: F.leaky_relu(v, slope)) if slope else F.relu
        one = torch.ones_like(lo)
        side = lambda v: torch.where(v > 0, one, one * slope)  # noqa: E731
        up_a, up_b = _chord(f, lo, hi, side)
        low_a = torch.where(hi > -lo, one, one * slope)
        low_b = torch.zeros_like(lo)
        # one piece: both lines are that piece (the chord already is; the adaptive line not)
        low_a = torch.where(lo >= 0, one, torch.where(hi <= 0, one * slope, low_a))
        return low_a, low_b, up_a, up_b


def _sigmoid_like(f: Callable, slope_at: Callable) -> Callable[[torch.Tensor, torch.Tensor], Lines]:
    """Sigmoid and tanh: convex below 0, concave above."""
    return lambda lo, hi: _curved(f, slope_at, lo, hi, hi <= 0, lo >= 0)


def _softplus_lines(beta: float, threshold: float) -> Callable[[torch.Tensor, torch.Tensor], Lines]:
    """Convex; torch's softplus switches to x where beta x > threshold, with a drop of
    log1p(exp(-threshold)) / beta there (``interval_rules._softplus_bounds``): the lines move
    out by that drop."""
    drop = math.log1p(math.exp(-threshold)) / beta if threshold < 700 else 0.0
    f = lambda v: F.softplus(v, beta, threshold)  # noqa: E731
    slope_at = lambda v: torch.sigmoid(beta * v)  # noqa: E731

    def lines(lo, hi):
        la, lb, ua, ub = _curved(f, slope_at, lo, hi, torch.ones_like(lo, dtype=torch.bool),
                                 torch.zeros_like(lo, dtype=torch.bool))
        return la, lb - drop, ua, ub + drop

    return lines


def _elu_lines(alpha: float) -> Callable[[torch.Tensor, torch.Tensor], Lines]:
    """ELU is convex for 0 <= alpha <= 1; for alpha > 1 only on pieces on one side of 0."""
    f = lambda v: F.elu(v, alpha)  # noqa: E731
    slope_at = lambda v: torch.where(v > 0, torch.ones_like(v), F.elu(v, alpha) + alpha)  # noqa

    def lines(lo, hi):
        convex = (torch.ones_like(lo, dtype=torch.bool) if alpha <= 1
                  else (hi <= 0) | (lo >= 0))
        return _curved(f, slope_at, lo, hi, convex, torch.zeros_like(convex))

    return lines


def _clipped(low: float, high: float) -> Callable[[torch.Tensor, torch.Tensor], Lines]:
    """ReLU6 / hardtanh: exact where [l, u] lies in one piece, the interval across a kink."""
    f = lambda v: v.clamp(low, high)  # noqa: E731

    def lines(lo, hi):
        la, lb, ua, ub = _constant(f, lo, hi)
        inside = (lo >= low) & (hi <= high)
        one, zero = torch.ones_like(lo), torch.zeros_like(lo)
        return (torch.where(inside, one, la), torch.where(inside, zero, lb),
                torch.where(inside, one, ua), torch.where(inside, zero, ub))

    return lines


_SIGMOID = _sigmoid_like(torch.sigmoid, lambda v: torch.sigmoid(v) * (1 - torch.sigmoid(v)))
_TANH = _sigmoid_like(torch.tanh, lambda v: 1 - torch.tanh(v) ** 2)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _module_lines(m: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], Lines] | None:
    if isinstance(m, nn.ReLU):
        return _PiecewiseLinear(0.0)
    if isinstance(m, nn.LeakyReLU) and 0 <= m.negative_slope <= 1:
        return _PiecewiseLinear(m.negative_slope)
    if isinstance(m, nn.Sigmoid):
        return _SIGMOID
    if isinstance(m, nn.Tanh):
        return _TANH
    if isinstance(m, nn.Softplus):
        return _softplus_lines(m.beta, m.threshold)
    if isinstance(m, nn.ELU):
        return _elu_lines(m.alpha)
    if isinstance(m, nn.ReLU6):
        return _clipped(0.0, 6.0)
    if isinstance(m, nn.Hardtanh):
        return _clipped(m.min_val, m.max_val)
    return None


def _function_lines(target: Any, args: tuple, kwargs: dict
                    ) -> Callable[[torch.Tensor, torch.Tensor], Lines] | None:
    if target in (F.relu, torch.relu, "relu"):
        return _PiecewiseLinear(0.0)
    if target is F.leaky_relu:
        slope = _arg(args, kwargs, 1, "negative_slope", 0.01)
        return _PiecewiseLinear(slope) if 0 <= slope <= 1 else None
    if target in (torch.sigmoid, F.sigmoid, "sigmoid"):
        return _SIGMOID
    if target in (torch.tanh, F.tanh, "tanh"):
        return _TANH
    if target is F.softplus:
        return _softplus_lines(_arg(args, kwargs, 1, "beta", 1.0),
                               _arg(args, kwargs, 2, "threshold", 20.0))
    if target is F.elu:
        return _elu_lines(_arg(args, kwargs, 1, "alpha", 1.0))
    if target is F.relu6:
        return _clipped(0.0, 6.0)
    if target is F.hardtanh:
        return _clipped(_arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0))
    return None


# nodes whose value is only bounded by its interval (lines of slope 0): the max pools
_INTERVAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_INTERVAL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.adaptive_max_pool2d)
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
# elementwise nonlinear maps: their lines, or their interval where they have none
_NONLINEAR_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.Hardtanh,
                      nn.Softplus)
_NONLINEAR_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.elu, torch.sigmoid, F.sigmoid,
                        torch.tanh, F.tanh, F.softplus, F.relu6, F.hardtanh, "relu", "sigmoid",
                        "tanh")
# fx records ``x += y`` as operator.add; explicit in-place operators get their pure forms
_PURE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
         operator.itruediv: operator.truediv}
