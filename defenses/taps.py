"""TAPS and STAPS (Mao et al. 2023, "Connecting Certified and Adversarial Training", NeurIPS):
certified training with IBP through a feature extractor and an attack through the head.

The network is cut after one module (``split``, a module path) into an extractor and a head.
IBP bounds the extractor's output over the input box (the latent box). In that box, PGD looks,
for each wrong class j, for a latent point maximising the head's margin ``z_j - z_y`` (one
point per class, ``restarts`` random starts of ``steps`` sign steps, each of a fraction of the
box's width that decays, as the paper's code does); the margins at those points take the place
of IBP's bounds of the head. They are no bound (the attack may miss the head's worst case), so
TAPS's loss is the cross-entropy of these estimated margins, multiplied by IBP's loss over the
same box (the paper's code does so by default: it keeps the training certifiable).

Gradients reach the extractor through the latent box: the gradient connector passes a point's
gradient to the box's upper end in a coordinate where the point lies within ``c`` times the
width of it, linearly from 0 at that distance to 1 at the end, and likewise to the lower end (a
rectified linear link; ``c`` in (0, 1]). The head's own parameters get the points' gradients
directly. The estimated loss's gradient is scaled by ``grad_scale`` (w) against IBP's.

STAPS is TAPS over SABR's small box (``defenses.expressive.small_box``) instead of the eps-box.

``split_model`` cuts a model: the module must be called once, and the logits must depend on the
input only through its output (a single cut of the graph); otherwise ``ValueError`` names it.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import fx, nn

from defenses.expressive import small_box
from defenses.ibp import _attr, _plan, _submodule, box_bounds, box_upper_bounds

__all__ = ["split_model", "latent_margins", "taps_loss"]


# ------------------------------------------------------------------------------------------------
# the cut


_SPLITS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, bool], tuple[fx.GraphModule,
                                                                        fx.GraphModule]]] = (
    weakref.WeakKeyDictionary())


def split_model(model: nn.Module, split: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(extractor, head): ``extractor(x)`` is module ``split``'s output in ``model(x)``, and
    ``head(that) == model(x)``; both hold the model's own modules and parameters (traced with
    torch.fx, once per model, path and mode).

    Raises:
        ValueError: no module at ``split``, one the forward calls more or less than once, or one
            whose output is not the only way from the input to the logits.
    """
    key = (split, model.training)
    cached = _SPLITS.setdefault(model, {})
    if key not in cached:
        cached[key] = _cut(model, split)
    return cached[key]


def _cut(model: nn.Module, split: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    name = type(model).__name__
    try:
        model.get_submodule(split)
    except AttributeError:
        raise ValueError(f"no module {split!r} in {name}") from None
    plan = _plan(model)  # IBP's trace of the model (cached; captured constants kept apart)
    nodes = list(plan.output.graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == split]
    if not calls:
        called = [n.target for n in nodes if n.op == "call_module"]
        raise ValueError(f"module {split!r} of {name} is not one step of its graph (a container "
                         f"is traced through); split at one of {', '.join(called)}")
    if len(calls) > 1:
        raise ValueError(f"module {split!r} of {name} is called {len(calls)} times by its "
                         "forward, not once")
    cut = calls[0]
    (first, *_) = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    # what the logits need, and whether any of it reaches the input other than through the cut
    needed, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in needed or node is cut:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    if first in needed or cut not in {i for n in needed for i in n.all_input_nodes}:
        raise ValueError(f"module {split!r} of {name} is no single cut of its graph: the logits "
                         "depend on the input other than through its output")
    extractor = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "output":
            continue
        copied[node] = extractor.node_copy(node, lambda n: copied[n])
        if node is cut:
            break
    extractor.output(copied[cut])
    head = fx.Graph()
    copied = {cut: head.placeholder("latent")}
    for node in nodes:
        if node in needed:
            copied[node] = head.node_copy(node, lambda n: copied[n])
    parts = []
    for graph in (extractor, head):
        # the model's own modules and tensors by their names (and the constants the trace
        # captured), so that both parts hold the live parameters
        root = {n.target: (_submodule(model, n.target) if n.op == "call_module"
                           else _attr(model, plan, n.target))
                for n in graph.nodes if n.op in ("call_module", "get_attr")}
        part = fx.GraphModule(root, graph)
        part.graph.eliminate_dead_code()
        part.recompile()
        parts.append(part)
    return parts[0], parts[1]


# ------------------------------------------------------------------------------------------------
# the estimated margins of the head over the latent box


class _Connector(torch.autograd.Function):
    """The identity on the points; backward, the rectified linear link to the box's ends."""

    @staticmethod
    def forward(ctx, lower, upper, points, c):  # points [b, k, *latent]
        ctx.save_for_backward(lower, upper, points)
        ctx.c = c
        return points.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        lower, upper, points = ctx.saved_tensors
        slack = (ctx.c * (upper - lower)).unsqueeze(1)
        tol = 1e-5
        near_upper = (points - (upper.unsqueeze(1) - slack)).clamp(min=0.5 * tol)
        near_lower = ((lower.unsqueeze(1) + slack) - points).clamp(min=0.5 * tol)
        to_upper = (points >= upper.unsqueeze(1) - slack) * near_upper / slack.clamp(min=tol)
        to_lower = (points <= lower.unsqueeze(1) + slack) * near_lower / slack.clamp(min=tol)
        return (grad * to_lower).sum(1), (grad * to_upper).sum(1), None, None


class _Scale(torch.autograd.Function):
    """The identity; backward, the gradient times ``w``."""

    @staticmethod
    def forward(ctx, value, w):
        ctx.w = w
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.w, None


def _wrong(y: torch.Tensor, classes: int) -> torch.Tensor:
    """[b, classes - 1]: the wrong classes of each sample, in order."""
    every = torch.arange(classes, device=y.device).expand(len(y), -1)
    return every[every != y[:, None]].view(len(y), classes - 1)


def _head_margins(head: nn.Module, points: torch.Tensor, y: torch.Tensor, wrong: torch.Tensor
                  ) -> torch.Tensor:
    """[b, k]: ``z_j - z_y`` at point i of each sample for its i-th wrong class j."""
    b, k = points.shape[:2]
    z = head(points.flatten(0, 1)).view(b, k, -1)
    return z.gather(2, wrong.unsqueeze(2)).squeeze(2) - z.gather(
        2, y.view(b, 1, 1).expand(b, k, 1)).squeeze(2)


def _schedule(steps: int) -> list[int]:
    """The steps after which the step size shrinks (x 0.2), as the paper's code has them."""
    if 10 <= steps <= 50:
        return [int(steps * 0.7)]
    if 50 < steps <= 80:
        return [int(steps * 0.4), int(steps * 0.7)]
    if steps > 80:
        return [int(steps * 0.3), int(steps * 0.6), int(steps * 0.8)]
    return []


def _pivotal_points(head: nn.Module, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor,
                    wrong: torch.Tensor, steps: int, restarts: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """[b, classes - 1, *latent]: per wrong class, the latent point in [lower, upper] with the
    largest margin that PGD found (sign steps of a fraction of the box's width)."""
    b, k = wrong.shape
    width = (upper - lower).unsqueeze(1)
    best = torch.full((b, k), -math.inf, dtype=lower.dtype, device=lower.device)
    best_points = lower.unsqueeze(1).expand(b, k, *lower.shape[1:]).clone()
    decay = _schedule(steps)
    for _ in range(restarts):
        noise = torch.rand(best_points.shape, generator=generator)  # a CPU generator
        points = lower.unsqueeze(1) + width * noise.to(lower.device, lower.dtype)
        lr = max(0.2, 2 / steps) if steps else 0.0
        for it in range(steps + 1):
            last = it == steps  # the final points are judged, not stepped: no backward
            with torch.set_grad_enabled(not last):
                points.requires_grad_(not last)
                margins = _head_margins(head, points, y, wrong)
                grad = None if last else torch.autograd.grad(margins.sum(), points)[0]
            with torch.no_grad():
                better = margins.detach() > best
                best = torch.where(better, margins.detach(), best)
                best_points[better] = points.detach()[better]
                if grad is None:
                    break
                points = torch.minimum(torch.maximum(points + lr * width * grad.sign(),
                                                     lower.unsqueeze(1)), upper.unsqueeze(1))
                if it + 1 in decay:
                    lr *= 0.2
    return best_points.detach()


def latent_margins(model: nn.Module, split: str, lower: torch.Tensor, upper: torch.Tensor,
                   y: torch.Tensor, steps: int, restarts: int, c: float,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimated, ibp) [b, classes], each the form of ``defenses.ibp.elided_upper_bounds``
    (``z_j - z_y``, 0 at j = y) over the input box [lower, upper]: TAPS's margins (IBP to the
    latent box, PGD through the head, the gradient connector with threshold ``c``) and IBP's
    bounds of the whole model (through the same latent box)."""
    if not 0 < c <= 1:
        raise ValueError(f"c must be in (0, 1], got {c}")
    extractor, head = split_model(model, split)
    latent = box_bounds(extractor, lower, upper)
    ibp = box_upper_bounds(head, latent.lower, latent.upper, y)
    wrong = _wrong(y, ibp.shape[1])
    lo, hi = latent.lower.detach(), latent.upper.detach()
    # in train mode the head's batch norms normalise the points by their batch's statistics
    # and leave the running statistics alone (the nominal forward keeps those)
    # (momentum 0 keeps the running means and variances; the count of batches seen, which a
    # cumulative average (momentum None) weighs by, is put back as it was)
    held = {m: (m.momentum, None if m.num_batches_tracked is None
                else m.num_batches_tracked.clone())
            for m in head.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training}
    try:
        for m in held:
            m.momentum = 0.0
        points = _pivotal_points(head, lo, hi, y, wrong, steps, restarts, generator)
        linked = _Connector.apply(latent.lower, latent.upper, points, c)
        estimated = _head_margins(head, linked, y, wrong)
    finally:
        for m, (momentum, seen) in held.items():
            m.momentum = momentum
            if seen is not None:
                m.num_batches_tracked.copy_(seen)
    out = torch.zeros_like(ibp).scatter(1, wrong, estimated)
    return out, ibp


def taps_loss(model: nn.Module, split: str, x: torch.Tensor, y: torch.Tensor, eps: float,
              steps: int, restarts: int, c: float, grad_scale: float, ibp_multiplier: bool = True,
              lam: float | None = None, box_steps: int = 0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """TAPS's loss at radius eps (STAPS's with ``lam``: over SABR's box of radius ``lam * eps``
    around PGD's point, ``box_steps`` steps): the cross-entropy of the estimated margins, its
    gradient times ``grad_scale``, times IBP's cross-entropy over the same box with
    ``ibp_multiplier``."""
    if grad_scale <= 0:
        raise ValueError(f"grad_scale must be > 0, got {grad_scale}")
    if lam is not None:
        lower, upper = small_box(model, x, y, eps, lam, box_steps, generator)
    else:
        lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    estimated, ibp = latent_margins(model, split, lower, upper, y, steps, restarts, c, generator)
    loss = _Scale.apply(F.cross_entropy(estimated, y), grad_scale)
    if ibp_multiplier:
        loss = loss * F.cross_entropy(ibp, y)
    return loss
