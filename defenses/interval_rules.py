"""Interval rules for Interval Bound Propagation (Gowal et al. 2018): the
``Interval`` type and one rule per operation, looked up by ``defenses.ibp``'s interpreter.

A rule maps the values of one torch.fx node's arguments, some of them an ``Interval`` (lower,
upper), to its value:

- affine layers (Linear, Conv1d/2d, BatchNorm1d/2d, Normalize, ``F.linear``/``F.conv2d`` with
  constant weights) in centre/radius form;
- monotone non-decreasing maps (ReLU & co., max pools) and positive linear maps (average pools,
  ``mean``, ``sum``, reshaping, slicing) on each end;
- sums and differences of intervals, products and quotients with a constant (sign-aware),
  ``torch.cat`` / ``torch.stack``; shape queries (``size``, ``shape``, ``dim``) on the lower end.

Module rules, ``rule(module, interval) -> interval``, are in ``_MODULE_RULES`` (by class; a
subclass takes its nearest base's rule, see ``_module_rule``); function and tensor-method rules,
``rule(args, kwargs) -> value``, in ``_FUNCTION_RULES`` and ``_METHOD_RULES``. A rule refuses its
arguments by raising ``_NoRule``; the interpreter turns that into a ``ValueError`` naming the node
and listing ``_supported`` operations. Dropout is the identity (bounds are for the network
without dropout, in either mode). The underscored names are this module's interface to
``defenses.ibp`` only; tracing, interpreting, elision and the public API are there.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from defenses.models import Normalize

__all__ = ["Interval"]


class Interval(NamedTuple):
    """Elementwise bounds ``lower <= value <= upper``, two tensors of one shape."""

    lower: torch.Tensor
    upper: torch.Tensor


class _NoRule(Exception):
    """A rule's refusal of its arguments; the interpreter adds the node and raises ValueError."""


# ------------------------------------------------------------------------------------------------
# the math: affine maps in centre/radius form, soundness of the outputs


def _affine(lower: torch.Tensor, upper: torch.Tensor, fn_centre, fn_radius) -> Interval:
    """Centre c = (l+u)/2, radius r = (u-l)/2; c' = f(c) (with bias), r' = |f|(r) (no bias)."""
    c, r = (upper + lower) / 2, (upper - lower) / 2
    c, r = fn_centre(c), fn_radius(r)
    return Interval(c - r, c + r)


def _sound(lower: torch.Tensor, upper: torch.Tensor) -> Interval:
    """Bounds past float range (deep untrained nets get there) become vacuous, never NaN.

    Applied once to the outputs: a NaN (from inf - inf) propagates through every rule here
    (ReLU, pools, affine maps), so only entries whose true bound is already vacuous are NaN."""
    return Interval(torch.nan_to_num(lower, nan=-math.inf, posinf=math.inf, neginf=-math.inf),
                    torch.nan_to_num(upper, nan=math.inf, posinf=math.inf, neginf=-math.inf))


def _linear_map(b: Interval, weight: torch.Tensor, bias: torch.Tensor | None) -> Interval:
    """[..., in] -> [..., out] through ``F.linear``."""
    return _affine(*b, lambda c: F.linear(c, weight, bias), lambda r: F.linear(r, weight.abs()))


def _conv_map(conv, b: Interval, weight: torch.Tensor, bias: torch.Tensor | None,
              *options: Any, **kw: Any) -> Interval:
    """``conv`` (F.conv1d / F.conv2d) with zero padding: an affine map."""
    return _affine(*b, lambda c: conv(c, weight, bias, *options, **kw),
                   lambda r: conv(r, weight.abs(), None, *options, **kw))


def _scale(b: Interval, c: Any) -> Interval:
    """``b * c`` for a constant c (number or tensor): the ends swap where c < 0."""
    if isinstance(c, torch.Tensor):
        lo, hi = b.lower * c, b.upper * c
        return Interval(torch.minimum(lo, hi), torch.maximum(lo, hi))
    return Interval(b.lower * c, b.upper * c) if c >= 0 else Interval(b.upper * c, b.lower * c)


# ------------------------------------------------------------------------------------------------
# rules for leaf modules (call_module nodes): rule(module, interval) -> interval


def _linear(m: nn.Linear, b: Interval) -> Interval:
    return _linear_map(b, m.weight, m.bias)


def _conv(m: nn.Conv1d | nn.Conv2d, b: Interval) -> Interval:
    if m.padding_mode != "zeros":
        raise _NoRule(f"padding_mode {m.padding_mode!r} (only 'zeros')")
    conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
    return _conv_map(conv, b, m.weight, m.bias, stride=m.stride, padding=m.padding,
                     dilation=m.dilation, groups=m.groups)


def fixed_batchnorm(m: nn.Module) -> bool:
    """A batch norm that computes a fixed per-channel affine map: eval mode, running stats."""
    return (isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not m.training
            and m.running_mean is not None)


def batchnorm_affine(m: nn.BatchNorm1d | nn.BatchNorm2d, b: Interval
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] of a batch norm on the box ``b`` [b, C, *spatial]: with its running
    statistics in eval mode; in train mode, with the statistics of the box centres' batch,
    held constant (as IBP implementations do)."""
    if fixed_batchnorm(m):
        mean, var = m.running_mean, m.running_var
    else:
        c = (b.lower + b.upper) / 2
        dims = (0, *range(2, c.dim()))
        mean, var = c.mean(dim=dims), c.var(dim=dims, unbiased=False)
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    return scale, -mean * scale + (m.bias if m.bias is not None else 0)


def _batchnorm(m: nn.BatchNorm1d | nn.BatchNorm2d, b: Interval) -> Interval:
    """The per-channel affine map of ``batchnorm_affine``. [b, C, *spatial]."""
    lower, upper = b
    scale, shift = batchnorm_affine(m, b)
    view = (1, -1) + (1,) * (lower.dim() - 2)
    return _affine(lower, upper, lambda c: c * scale.view(view) + shift.view(view),
                   lambda r: r * scale.abs().view(view))


def normalize_affine(m: Normalize, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [channels] of ``Normalize``: ``(x - mean) / std = x / std - mean / std``
    (a one-channel mean and std apply to every channel)."""
    scale, shift = 1 / m.std.flatten(), -m.mean.flatten() / m.std.flatten()
    return scale.expand(channels), shift.expand(channels)


def _normalize(m: Normalize, b: Interval) -> Interval:
    lower, upper = b
    return Interval((lower - m.mean) / m.std, (upper - m.mean) / m.std)  # std > 0: order kept


def _module_on_both_ends(m: nn.Module, b: Interval) -> Interval:
    """Monotone non-decreasing maps and positive linear maps without bias: each end."""
    if isinstance(m, nn.LeakyReLU) and m.negative_slope < 0:
        raise _NoRule(f"negative_slope {m.negative_slope} < 0 is not monotone")
    if isinstance(m, nn.ELU) and m.alpha < 0:
        raise _NoRule(f"alpha {m.alpha} < 0 is not monotone")
    lower, upper = m(b.lower), m(b.upper)
    if not isinstance(lower, torch.Tensor):
        raise _NoRule("it returns more than a tensor (return_indices?)")
    return Interval(lower, upper)


def _softplus_bounds(b: Interval, beta: float, threshold: float) -> Interval:
    """softplus(x) = log(1 + exp(beta x)) / beta below ``beta x = threshold``, x above: monotone
    on each side, with a drop of log1p(exp(-threshold)) / beta where it switches, so each end
    moves out by that drop (about 2e-9 at torch's default threshold 20)."""
    if beta <= 0:
        raise _NoRule(f"beta {beta} <= 0")
    drop = math.log1p(math.exp(-threshold)) / beta if threshold < 700 else 0.0
    lower = F.softplus(b.lower, beta, threshold) - drop
    upper = F.softplus(b.upper, beta, threshold) + drop
    return Interval(lower, upper)


def _softplus(m: nn.Softplus, b: Interval) -> Interval:
    return _softplus_bounds(b, m.beta, m.threshold)


def _dropout(_m: nn.Module, b: Interval) -> Interval:
    return b  # bounds of the network without dropout, in train mode too


_MODULE_RULES: dict[type, Callable[[Any, Interval], Interval]] = {
    nn.Linear: _linear, nn.Conv1d: _conv, nn.Conv2d: _conv,
    nn.BatchNorm1d: _batchnorm, nn.BatchNorm2d: _batchnorm, Normalize: _normalize,
    **{cls: _module_on_both_ends for cls in (
        nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.Hardtanh,
        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, nn.ZeroPad2d)},
    **{cls: _dropout for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d)},
    nn.Softplus: _softplus,
}
_MODULE_RULE_CACHE: dict[type, Callable[[Any, Interval], Interval] | None] = {}


def _module_rule(m: nn.Module) -> Callable[[Any, Interval], Interval] | None:
    cls = type(m)
    if cls not in _MODULE_RULE_CACHE:  # subclasses take their nearest base's rule
        _MODULE_RULE_CACHE[cls] = next((_MODULE_RULES[base] for base in cls.__mro__
                                        if base in _MODULE_RULES), None)
    return _MODULE_RULE_CACHE[cls]


# ------------------------------------------------------------------------------------------------
# rules for functions and tensor methods: rule(args, kwargs) -> value, some argument an Interval


Rule = Callable[[tuple, dict], Any]


def _has_interval(values) -> bool:
    return any(isinstance(v, Interval)
               or (isinstance(v, (list, tuple)) and _has_interval(v)) for v in values)


def _on_both_ends(fn: Callable, check: Callable[[tuple, dict], str | None] | None = None) -> Rule:
    """``fn(interval, *constants)``: monotone non-decreasing or positive linear in its first
    argument, applied to each end."""

    def rule(args: tuple, kwargs: dict) -> Interval:
        b, rest = args[0], args[1:]
        if not isinstance(b, Interval) or _has_interval(rest) or _has_interval(kwargs.values()):
            raise _NoRule("an interval beyond the first argument")
        reason = check(args, kwargs) if check else None
        if reason:
            raise _NoRule(reason)
        lower, upper = fn(b.lower, *rest, **kwargs), fn(b.upper, *rest, **kwargs)
        if not isinstance(lower, torch.Tensor):
            raise _NoRule("it returns more than a tensor (return_indices?)")
        return Interval(lower, upper)

    return rule


def _shape_only(fn: Callable) -> Rule:
    """A question about the shape: asked of the lower end, answered with a plain value."""

    def rule(args: tuple, kwargs: dict) -> Any:
        if fn is getattr and args[1] not in ("shape", "ndim", "dtype", "device"):
            raise _NoRule(f"attribute {args[1]!r} (only shape, ndim, dtype, device)")
        return fn(args[0].lower, *args[1:], **kwargs)

    return rule


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _at_least(index: int, name: str, default: float) -> Callable[[tuple, dict], str | None]:
    """Monotone only for a non-negative parameter (leaky_relu's slope, elu's alpha)."""

    def check(args: tuple, kwargs: dict) -> str | None:
        value = _arg(args, kwargs, index, name, default)
        return f"{name} {value} < 0 is not monotone" if value < 0 else None

    return check


def _alpha(kwargs: dict, b: Any) -> Any:
    alpha = kwargs.get("alpha", 1)
    if set(kwargs) - {"alpha"}:
        raise _NoRule(f"keyword arguments {sorted(set(kwargs) - {'alpha'})}")
    return b if alpha == 1 else (_scale(b, alpha) if isinstance(b, Interval) else b * alpha)


def _add(args: tuple, kwargs: dict) -> Interval:
    """Residual sums: the ends add. ``torch.add``'s alpha scales the second term."""
    a, b = args[0], _alpha(kwargs, args[1])
    if isinstance(a, Interval) and isinstance(b, Interval):
        return Interval(a.lower + b.lower, a.upper + b.upper)
    if isinstance(a, Interval):
        return Interval(a.lower + b, a.upper + b)
    return Interval(a + b.lower, a + b.upper)


def _sub(args: tuple, kwargs: dict) -> Interval:
    a, b = args[0], _alpha(kwargs, args[1])
    if isinstance(a, Interval) and isinstance(b, Interval):
        return Interval(a.lower - b.upper, a.upper - b.lower)
    if isinstance(a, Interval):
        return Interval(a.lower - b, a.upper - b)
    return Interval(a - b.upper, a - b.lower)


def _neg(args: tuple, kwargs: dict) -> Interval:
    return Interval(-args[0].upper, -args[0].lower)


def _mul(args: tuple, kwargs: dict) -> Interval:
    a, b = args
    if kwargs:
        raise _NoRule(f"keyword arguments {sorted(kwargs)}")
    if isinstance(a, Interval) and isinstance(b, Interval):
        raise _NoRule("of two intervals (only products with a constant)")
    return _scale(a, b) if isinstance(a, Interval) else _scale(b, a)


def _div(args: tuple, kwargs: dict) -> Interval:
    a, b = args
    if not isinstance(a, Interval) or isinstance(b, Interval):
        raise _NoRule("by an interval (only quotients by a constant)")
    if kwargs.get("rounding_mode") is not None:
        raise _NoRule(f"rounding_mode {kwargs['rounding_mode']!r}")
    if isinstance(b, torch.Tensor) or b == 0:
        lo, hi = a.lower / b, a.upper / b
        return Interval(torch.minimum(lo, hi), torch.maximum(lo, hi))
    return Interval(a.lower / b, a.upper / b) if b > 0 else Interval(a.upper / b, a.lower / b)


def _joined(fn: Callable) -> Rule:
    """``torch.cat`` / ``torch.stack`` of intervals and constants: lower ends, upper ends."""

    def rule(args: tuple, kwargs: dict) -> Interval:
        parts, rest = args[0], args[1:]
        if _has_interval(rest) or _has_interval(kwargs.values()):
            raise _NoRule("an interval beyond the tensors joined")
        lower = [p.lower if isinstance(p, Interval) else p for p in parts]
        upper = [p.upper if isinstance(p, Interval) else p for p in parts]
        return Interval(fn(lower, *rest, **kwargs), fn(upper, *rest, **kwargs))

    return rule


def _weights(args: tuple, kwargs: dict) -> tuple[Interval, torch.Tensor, Any, tuple, dict]:
    """(input, weight, bias, further args, further kwargs) of F.linear / F.conv*d; the weights
    must be constants (parameters), the input an interval."""
    kwargs = dict(kwargs)
    weight = args[1] if len(args) > 1 else kwargs.pop("weight")
    bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
    if not isinstance(args[0], Interval) or isinstance(weight, Interval) \
            or isinstance(bias, Interval):
        raise _NoRule("with interval weights (only constant weights)")
    return args[0], weight, bias, args[3:], kwargs


def _functional_linear(args: tuple, kwargs: dict) -> Interval:
    b, weight, bias, _, _ = _weights(args, kwargs)
    return _linear_map(b, weight, bias)


def _functional_conv(conv: Callable) -> Rule:
    def rule(args: tuple, kwargs: dict) -> Interval:
        b, weight, bias, options, kw = _weights(args, kwargs)
        return _conv_map(conv, b, weight, bias, *options, **kw)

    return rule


def _identity(args: tuple, kwargs: dict) -> Interval:
    if _has_interval(args[1:]) or _has_interval(kwargs.values()):
        raise _NoRule("an interval beyond the first argument")
    return args[0]


def _constant_pad(args: tuple, kwargs: dict) -> str | None:
    mode = _arg(args, kwargs, 2, "mode", "constant")
    return None if mode == "constant" else f"mode {mode!r} (only 'constant')"


def _view(args: tuple, kwargs: dict) -> str | None:
    return ("a view as another dtype" if any(isinstance(a, torch.dtype)
                                             for a in (*args, *kwargs.values())) else None)


def _functional_softplus(args: tuple, kwargs: dict) -> Interval:
    b = args[0]
    if not isinstance(b, Interval) or _has_interval(args[1:]) or _has_interval(kwargs.values()):
        raise _NoRule("an interval beyond the first argument")
    return _softplus_bounds(b, _arg(args, kwargs, 1, "beta", 1.0),
                            _arg(args, kwargs, 2, "threshold", 20.0))


_FUNCTION_RULES: dict[Any, Rule] = {
    **{fn: _on_both_ends(fn) for fn in (
        F.relu, torch.relu, F.relu6, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh,
        F.tanh, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, torch.reshape,
        torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.mean, torch.sum,
        operator.getitem)},
    F.leaky_relu: _on_both_ends(F.leaky_relu, _at_least(1, "negative_slope", 0.01)),
    F.elu: _on_both_ends(F.elu, _at_least(1, "alpha", 1.0)),
    F.pad: _on_both_ends(F.pad, _constant_pad),
    F.dropout: _identity,
    F.softplus: _functional_softplus,
    F.linear: _functional_linear, F.conv1d: _functional_conv(F.conv1d),
    F.conv2d: _functional_conv(F.conv2d),
    # fx records ``x += y`` as operator.add; an explicit operator.iadd gets fresh ends too
    operator.add: _add, operator.iadd: _add, torch.add: _add,
    operator.sub: _sub, operator.isub: _sub, torch.sub: _sub,
    operator.neg: _neg, torch.neg: _neg,
    operator.mul: _mul, operator.imul: _mul, torch.mul: _mul,
    operator.truediv: _div, operator.itruediv: _div, torch.div: _div,
    torch.cat: _joined(torch.cat), torch.stack: _joined(torch.stack),
    getattr: _shape_only(getattr),
}

_METHOD_RULES: dict[str, Rule] = {
    **{name: _on_both_ends(getattr(torch.Tensor, name)) for name in (
        "relu", "sigmoid", "tanh", "flatten", "reshape", "contiguous", "squeeze", "unsqueeze",
        "permute", "transpose", "mean", "sum")},
    "view": _on_both_ends(torch.Tensor.view, _view),
    **{name: _shape_only(getattr(torch.Tensor, name)) for name in ("size", "dim", "numel")},
    "add": _add, "sub": _sub, "neg": _neg, "mul": _mul, "div": _div,
}


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional",
              "torch._C._VariableFunctions": "torch", "builtins": ""}.get(module, module)
    name = getattr(fn, "__name__", repr(fn))
    return f"{module}.{name}" if module else name


def _supported(op: str) -> str:
    """The operations with a rule for fx op ``op``, for error messages."""
    if op == "call_module":
        return ", ".join(sorted({cls.__name__ for cls in _MODULE_RULES}))
    if op == "call_method":
        return ", ".join(f"Tensor.{name}" for name in _METHOD_RULES)
    return ", ".join(sorted({_function_name(fn) for fn in _FUNCTION_RULES}))
