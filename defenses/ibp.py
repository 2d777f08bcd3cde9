"""Interval Bound Propagation (Gowal et al. 2018) on any torch.fx-traceable model.

This module traces, interprets and elides, and holds the public API; the ``Interval`` type
(re-exported here) and the per-operation rules are in ``defenses.interval_rules``.

The model's ``forward`` is traced once with ``torch.fx`` (``Normalize`` and torch.nn's own
modules are leaves) and the graph is cached per model object; every call interprets that graph
against the live model, so parameter updates are seen and the batch size is free. A value in the
interpreter is an ``Interval`` (lower, upper) or a concrete value (a constant tensor, a shape, an
int), and each node with an interval among its arguments takes the rule for its module class,
function or tensor method (see ``defenses.interval_rules`` for what each covers); anything
computed from constants alone is computed as the forward computes it.

Anything else (``x @ x``, a GELU, an untraceable forward) raises ``ValueError`` naming the
operation and the node or module path; ``check_bounds`` runs once at load to refuse such models.
Dropout is the identity (bounds are for the network without dropout, in either mode). The last
layer is elided for verification when the model's output is a Linear (module or ``F.linear``):
bounds on ``z_j - z_y`` come straight from the penultimate interval.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from defenses.interval_rules import (_FUNCTION_RULES, _METHOD_RULES, Interval, _function_name,
                                     _has_interval, _linear_map, _module_rule, _NoRule, _sound,
                                     _supported)
from defenses.models import Normalize, eval_mode

__all__ = [
    "Interval",
    "interval_bounds",
    "penultimate_bounds",
    "elided_upper_bounds",
    "box_bounds",
    "box_upper_bounds",
    "verified",
    "ibp_loss",
    "layer_bound_widths",
    "check_bounds",
]


Recorder = Callable[[str, Interval], None]


# ------------------------------------------------------------------------------------------------
# tracing, once per model object and mode


def _first_line(err: Exception) -> str:
    return next(iter(str(err).strip().splitlines()), "") or type(err).__name__


class _Tracer(fx.Tracer):
    """torch.nn's own modules and ``Normalize`` are leaves; everything else is traced through.
    ``inside`` is the stack of modules whose forward is being traced (left as it was when
    tracing fails, so the error can name the module that failed)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside: list[nn.Module] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs) -> Any:
        self.inside.append(m)
        out = super().call_module(m, forward, args, kwargs)
        self.inside.pop()
        return out


class _Elided(NamedTuple):
    """The last layer, a Linear: a module path, or F.linear's weight and bias (nodes or
    constants)."""

    input: fx.Node
    module: str | None
    weight: Any = None
    bias: Any = None


# (node, nodes whose values are dropped after it): the interpreter's program
_Steps = tuple[tuple[fx.Node, tuple[fx.Node, ...]], ...]


class _Plan(NamedTuple):
    input: fx.Node
    output: fx.Node
    full: _Steps  # computes the output
    elided: _Elided | None
    penultimate: _Steps  # computes the elided layer's input and weights (empty if none)
    constants: dict[str, torch.Tensor]  # tensors the forward captured (fx's _tensor_constant*)


def _program(nodes: list[fx.Node], first: fx.Node, roots: tuple[Any, ...]) -> _Steps:
    """The nodes ``roots`` need, in graph order, each with the values it is the last user of
    (roots are kept; constants among them are ignored)."""
    roots = {r for r in roots if isinstance(r, fx.Node)}
    live: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    order = [n for n in nodes if n in live and n is not first]
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(order):
        for used in node.all_input_nodes:
            last_use[used] = i
    free: list[list[fx.Node]] = [[] for _ in order]
    for used, i in last_use.items():
        if used not in roots:
            free[i].append(used)
    return tuple((node, tuple(f)) for node, f in zip(order, free))


def _trace(model: nn.Module) -> _Plan:
    name = type(model).__name__
    before = set(vars(model))
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:
        failed, where = model, ""
        if tracer.inside:  # a submodule's forward: name it, and where it sits
            failed = tracer.inside[-1]
            path = next((p for p, m in model.named_modules() if m is failed), "?")
            where = f"; in module {path!r} of {name}"
        raise ValueError(f"interval bounds: cannot trace {type(failed).__name__} with torch.fx "
                         f"({_first_line(err)}{where})") from err
    finally:  # fx stores captured tensors on the model; keep them out of it
        added = {key: vars(model).pop(key) for key in set(vars(model)) - before}
    nodes = list(graph.nodes)
    constants = {n.target: added[n.target] for n in nodes
                 if n.op == "get_attr" and n.target in added}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        raise ValueError(f"interval bounds: {name}.forward takes no input")
    for extra in placeholders[1:]:
        if not extra.args:
            raise ValueError(f"interval bounds: {name}.forward takes more than one input "
                             f"({extra.target!r} has no default)")
    out = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        raise ValueError(f"interval bounds: {name}.forward returns {type(out).__name__}, "
                         "not one logits tensor")
    elided = None
    if (out.op == "call_module" and isinstance(model.get_submodule(out.target), nn.Linear)
            and len(out.args) == 1 and not out.kwargs and isinstance(out.args[0], fx.Node)):
        elided = _Elided(out.args[0], out.target)
    elif out.op == "call_function" and out.target is F.linear and isinstance(out.args[0], fx.Node):
        weight = out.args[1] if len(out.args) > 1 else out.kwargs["weight"]
        bias = out.args[2] if len(out.args) > 2 else out.kwargs.get("bias")
        elided = _Elided(out.args[0], None, weight, bias)
    first = placeholders[0]
    return _Plan(first, out, _program(nodes, first, (out,)), elided,
                 _program(nodes, first, (elided.input, elided.weight, elided.bias))
                 if elided else (), constants)


# Keyed by the model object (weakly: a plan holds no reference to its model) and its mode, as a
# forward may branch on self.training.
_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[bool, _Plan]] = weakref.WeakKeyDictionary()


def _plan(model: nn.Module) -> _Plan:
    by_mode = _PLANS.get(model)
    if by_mode is None:
        by_mode = _PLANS[model] = {}
    plan = by_mode.get(model.training)
    if plan is None:
        plan = by_mode[model.training] = _trace(model)
    return plan


# ------------------------------------------------------------------------------------------------
# the interpreter


def _operation(node: fx.Node, model: nn.Module) -> str:
    """What a node computes, for an error line: ``module conv1 (Conv2d)``, ``call_method
    Tensor.view``, ``call_function torch.sigmoid``."""
    if node.op == "call_module":
        return f"module {node.target} ({type(model.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"call_method Tensor.{node.target}"
    return f"call_function {_function_name(node.target)}"


def _no_rule(node: fx.Node, model: nn.Module, reason: str = "") -> ValueError:
    what = _operation(node, model)
    reason = f": {reason}" if reason else ""
    return ValueError(f"interval bounds: no rule for {what}{reason} at node {node.name!r} "
                      f"(supported: {_supported(node.op)})")


def _submodule(model: nn.Module, target: str) -> nn.Module:
    """``model.get_submodule(target)``, looked up live in a few dict reads (once per node and
    call: get_submodule's checks cost as much as a small layer's bounds)."""
    module = model
    try:
        for atom in target.split(".") if target else ():
            module = module._modules[atom]
    except KeyError:
        return model.get_submodule(target)  # raises the error that says what is missing
    return module


def _attr(model: nn.Module, plan: _Plan, target: str) -> Any:
    if target in plan.constants:
        return plan.constants[target]
    owner, _, attr = target.rpartition(".")
    return getattr(_submodule(model, owner), attr)


def _eval(model: nn.Module, plan: _Plan, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    op = node.op
    if op == "get_attr":
        return _attr(model, plan, node.target)
    if op == "placeholder":
        return node.args[0]  # a further input's default
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    intervals = _has_interval(args) or _has_interval(kwargs.values())
    if op == "call_module":
        module = _submodule(model, node.target)
        if not intervals:
            return module(*args, **kwargs)
        rule = _module_rule(module)
        if rule is None:
            raise _no_rule(node, model)
        if module._forward_pre_hooks:  # e.g. spectral_norm recomputes its weight there
            raise _no_rule(node, model, "a forward pre-hook may change what it computes")
        if len(args) != 1 or kwargs:
            raise _no_rule(node, model, "called with more than one argument")
        try:
            return rule(module, args[0])
        except _NoRule as refusal:
            raise _no_rule(node, model, str(refusal)) from None
    if op == "call_function":
        if not intervals:
            return node.target(*args, **kwargs)
        rule = _FUNCTION_RULES.get(node.target)
    else:  # call_method
        if not intervals:
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        rule = _METHOD_RULES.get(node.target) if isinstance(args[0], Interval) else None
    if rule is None:
        raise _no_rule(node, model)
    try:
        return rule(args, kwargs)
    except _NoRule as refusal:
        raise _no_rule(node, model, str(refusal)) from None


def _run(model: nn.Module, plan: _Plan, steps: _Steps, box: Interval, rec: Recorder
         ) -> dict[fx.Node, Any]:
    """Values of the steps' roots; ``rec(name, interval)`` after every node with an interval
    (named by module path for modules, by fx node name otherwise)."""
    env: dict[fx.Node, Any] = {plan.input: box}
    for node, free in steps:
        try:
            value = _eval(model, plan, node, env)
        except ValueError:
            raise
        except Exception as err:  # a torch error: say where
            err.add_note(f"interval bounds: at node {node.name!r} ({node.op} {node.target})")
            raise
        env[node] = value
        if isinstance(value, Interval):
            rec(node.target if node.op == "call_module" else node.name, value)
        for done in free:
            del env[done]
    return env


def _as_interval(value: Any, model: nn.Module) -> Interval:
    if isinstance(value, Interval):
        return value
    if isinstance(value, torch.Tensor):  # independent of the input
        return Interval(value, value)
    raise ValueError(f"interval bounds: {type(model).__name__} computes "
                     f"{type(value).__name__}, not a tensor")


def _penultimate(model: nn.Module, box: Interval, rec: Recorder
                 ) -> tuple[Interval, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """The elided layer's input interval and (weight, bias); the logit interval and None when
    the output is not a Linear's."""
    plan = _plan(model)
    steps = plan.full if plan.elided is None else plan.penultimate
    return _last_layer(model, plan, _run(model, plan, steps, box, rec))


def _last_layer(model: nn.Module, plan: _Plan, env: dict[fx.Node, Any]
                ) -> tuple[Interval, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """``_penultimate``'s answer from the values of a run that computed the elided layer's input
    (or, without one, the output)."""
    if plan.elided is None:
        return _as_interval(env[plan.output], model), None
    el = plan.elided
    if el.module is not None:
        last = _submodule(model, el.module)
        weight, bias = last.weight, last.bias
    else:
        weight, bias = (env[w] if isinstance(w, fx.Node) else w for w in (el.weight, el.bias))
        if isinstance(weight, Interval) or isinstance(bias, Interval):
            raise ValueError("interval bounds: no rule for call_function "
                             "torch.nn.functional.linear with interval weights at the output")
    return _as_interval(env[el.input], model), (weight, bias)


# ------------------------------------------------------------------------------------------------
# the public API


def _input_box(x: torch.Tensor, eps: float) -> Interval:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return Interval((x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0))


def _ignore(_name: str, _b: Interval) -> None:
    pass


def penultimate_bounds(model: nn.Module, x: torch.Tensor, eps: float,
                       record: Recorder | None = None) -> tuple[Interval, nn.Linear]:
    """Bounds on the input of the last linear layer over the box [clip(x-eps), clip(x+eps)],
    and that layer.

    The layer is the model's own ``nn.Linear`` when its output is one; for an output computed by
    ``F.linear``, an ``nn.Linear`` stand-in holding that call's weight and bias tensors; when the
    output is no linear layer's, the interval is the logits' and the layer the identity (so that
    ``W_j - W_y`` on it gives the unelided ``upper_j - lower_y``).
    """
    b, last = _penultimate(model, _input_box(x, eps), record or _ignore)
    b = _sound(*b)
    if last is None:
        return b, _stand_in(torch.eye(b.lower.shape[-1], dtype=b.lower.dtype,
                                      device=b.lower.device), None)
    plan = _plan(model)
    if plan.elided is not None and plan.elided.module is not None:
        return b, model.get_submodule(plan.elided.module)
    return b, _stand_in(*last)


def _stand_in(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` computing ``F.linear(x, weight, bias)`` with these very tensors."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    del layer.weight, layer.bias
    layer.weight, layer.bias = weight, bias
    return layer


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float) -> Interval:
    """(lower, upper) logit bounds [b, classes] over the L-inf box of radius eps in [0, 1]."""
    b, last = _penultimate(model, _input_box(x, eps), _ignore)
    b = _sound(*b)
    return b if last is None else _sound(*_linear_map(b, *last))


def elided_upper_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
                        ) -> torch.Tensor:
    """Upper bounds [b, classes] of ``z_j - z_y`` with the last layer elided (0 at j = y).

    For w = W_j - W_y, bias b_j - b_y on the penultimate interval (c, r): w.c + b + |w|.r.
    Without an elidable last layer: ``upper_j - lower_y`` on the logit interval.
    """
    return _elided_margins(*_penultimate(model, _input_box(x, eps), _ignore), y)


def box_bounds(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> Interval:
    """The interval of the model's output over the box [lower, upper] (any box, e.g. a
    latent one; nothing elided)."""
    if bool((lower > upper).any()):
        raise ValueError("box_bounds: a lower bound above its upper bound")
    plan = _plan(model)
    return _sound(*_as_interval(_run(model, plan, plan.full, Interval(lower, upper), _ignore)[
        plan.output], model))


def box_upper_bounds(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """``elided_upper_bounds`` over the box [lower, upper] (any box, e.g. SABR's small box
    around an adversarial point) instead of the eps-box around x."""
    if bool((lower > upper).any()):
        raise ValueError("box_upper_bounds: a lower bound above its upper bound")
    return _elided_margins(*_penultimate(model, Interval(lower, upper), _ignore), y)


def _elided_margins(b: Interval, last: tuple[torch.Tensor, torch.Tensor | None] | None,
                    y: torch.Tensor) -> torch.Tensor:
    """``elided_upper_bounds`` from the penultimate interval and the last layer."""
    lower, upper = _sound(*b)
    if last is None:
        upper_bound = (upper - lower.gather(1, y[:, None])).scatter(1, y[:, None], 0.0)
        return torch.nan_to_num(upper_bound, nan=math.inf)
    W, b = last
    c, r = (upper + lower) / 2, (upper - lower) / 2
    w = W[None, :, :] - W[y][:, None, :]  # [b, classes, hidden]
    bias = 0 if b is None else b[None, :] - b[y][:, None]
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


@torch.no_grad()
def layer_bound_widths(model: nn.Module, x: torch.Tensor, eps: float) -> list[tuple[str, float]]:
    """Mean width (upper - lower) of the interval after every bounded node, in order (module
    paths for modules, fx node names for functions and methods), ending with the logits."""
    widths: list[tuple[str, float]] = []
    b, last = _penultimate(model, _input_box(x, eps),
                           lambda name, iv: widths.append((name, float((iv[1] - iv[0]).mean()))))
    b = _sound(*b)
    lower, upper = b if last is None else _linear_map(b, *last)
    widths.append(("logits", float((upper - lower).mean())))
    return widths


def probe_input(model: nn.Module, input_shape: tuple[int, ...],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of 2 uniform random inputs of ``input_shape`` (seeded 0 unless ``generator`` is
    given) in the dtype and on the device of the model's first floating tensor: what the
    load-time checks bound."""
    tensor = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
                  None)
    gen = generator or torch.Generator().manual_seed(0)
    return torch.rand((2, *input_shape), generator=gen).to(
        dtype=tensor.dtype if tensor is not None else None,
        device=tensor.device if tensor is not None else None)


def check_bounds(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Refuse a model IBP cannot bound, before training it: trace it in eval mode and in train
    mode (each mode has its own graph) and bound a batch of 2 with shape ``input_shape`` (no
    batch axis) in each; in eval mode the bounds at eps 0 must equal the forward on random
    inputs, so a graph that computes something else than the forward (in-place updates of a
    shared tensor, which fx records as new values) is refused. The model is left as it was.

    Raises:
        ValueError: the forward is not traceable by torch.fx, a node has no interval rule (the
            message names the operation and the node or module path), the bounds fail on such
            inputs, the output is not [batch, classes], or the graph differs from the forward.
    """
    x = probe_input(model, input_shape)
    name = type(model).__name__

    def bounds(m: nn.Module) -> Interval:
        try:
            return interval_bounds(m, x, 0.0)
        except ValueError:
            raise
        except Exception as err:
            where = " ".join(getattr(err, "__notes__", []))
            raise ValueError(f"interval bounds: {name} fails on inputs of shape {tuple(x.shape)}"
                             f" ({type(err).__name__}: {_first_line(err)}"
                             f"{'; ' + where if where else ''})") from err

    with torch.no_grad():
        with eval_mode(model):
            lower, upper = bounds(model)
            out = model(x)
        if lower.dim() != 2 or lower.shape[0] != 2:
            raise ValueError(f"interval bounds: {name} outputs shape {tuple(lower.shape)} on "
                             f"inputs {tuple(x.shape)}, not [batch, classes]")
        scale = 1e-4 * (1 + out.abs().max())
        if not (torch.allclose(lower, out, atol=float(scale), rtol=1e-4)
                and torch.allclose(upper, out, atol=float(scale), rtol=1e-4)):
            raise ValueError(f"interval bounds: {name}'s torch.fx graph computes something "
                             "else than its forward (an in-place update of a tensor that is "
                             "used again?); write that step out of place")
        training = copy.deepcopy(model).train()  # the graph IBP training bounds
        bounds(training)
