"""CROWN linear bounds (Zhang et al. 2018, "Efficient Neural Network Robustness Certification
with General Activation Functions") and the CROWN-IBP bound (Zhang et al. 2020, "Towards Stable
and Efficient Training of Verifiably Robust Neural Networks") on any model IBP bounds.

A specification ``C`` (``[b, s, *output]``) asks for a lower bound of each ``C_i . z(x)`` over the
L-inf box of radius eps around x, clipped to [0, 1]. CROWN answers it backward: a linear
function ``A_v . v + c`` of each node v's value bounds ``C . z`` from below for every x in the
box, starting at the output (A = C, c = 0) and pulled back through each node to its arguments:

- an affine node (linear, conv, batch norm in eval mode, normalisation, pooling by averages,
  reshaping, slicing, sums of bounded tensors, products or quotients by constants,
  concatenation) maps ``A`` to ``A . J`` (its Jacobian, taken by ``torch.func.vjp`` at the box
  centres and batched over the specification by ``vmap``) and adds ``A . (f(x0) - J x0)`` to c;
  batch norm in train mode is affine with the statistics of the box centres' batch, held as
  IBP holds them (``defenses.interval_rules``);
- a monotone activation sigma with pre-activation bounds l <= v <= u is bracketed by two lines,
  ``a_L v + b_L <= sigma(v) <= a_U v + b_U`` on [l, u]; a positive entry of A takes the lower
  line, a negative one the upper (Zhang et al. 2018, Theorem 3.2). ReLU: the chord above,
  ``0`` or ``v`` below, whichever has the smaller area (CROWN's adaptive choice, section 3.3);
  convex pieces (leaky ReLU with slope <= 1, softplus, ELU with alpha <= 1, sigmoid and tanh
  for u <= 0) the chord above and the tangent at the midpoint below; concave pieces (sigmoid
  and tanh for l >= 0) the reverse; anything else (max pools, ReLU6 and hardtanh across a kink,
  sigmoid and tanh across 0) the node's interval, lines of slope 0: sound, and as loose as IBP
  there;
- at the input box, ``A . x`` is bounded by its ends: ``A+ . lower + A- . upper``.

The pre-activation bounds l, u come from IBP (``method="crown-ibp"``, the CROWN-IBP setting) or
from CROWN itself, bounding each activation's input in order with the identity specification
(``method="crown"``, full CROWN: the unstable neurons of a layer as the specification rows of
one backward pass, in chunks; behind a chain of convolutions each row is carried as its
receptive-field window of every layer rather than the whole layer, auto_LiRPA's patches mode;
a first layer's exact interval is kept as it is; for verification of small models). Both
agree with auto_LiRPA 0.7.1's ``CROWN-IBP`` and ``CROWN`` to rounding on every built-in model
(``benchmarks/crown_crosscheck.py``).

The last layer needs no elision of its own: the specification ``e_y - e_j`` is pulled through it
like through any linear node, so margins ``z_y - z_j`` are bounded directly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from defenses.models import Normalize, eval_mode
from defenses.ibp import (_elided_margins, _eval, _input_box, _last_layer, _no_rule, _plan, _Plan,
                          _submodule, probe_input)
from defenses.interval_rules import (Interval, _module_rule, batchnorm_affine, fixed_batchnorm,
                                     normalize_affine)
from defenses.linear_relaxations import (_IDENTITY_MODULES, _INTERVAL_FUNCTIONS,
                                         _INTERVAL_MODULES, _NONLINEAR_FUNCTIONS,
                                         _NONLINEAR_MODULES, _PURE, _function_lines,
                                         _module_lines, _PiecewiseLinear)

__all__ = ["Method", "bound_pass", "crown_lower", "crown_bounds", "margin_spec",
           "crown_margins", "alpha_crown_margins", "crown_margin_upper_bounds", "verified_crown",
           "certificates", "check_crown"]

Method = Literal["crown-ibp", "crown"]
METHODS = ("crown-ibp", "crown")

# ------------------------------------------------------------------------------------------------
# the backward pass


class _Pass:
    """One model, one input box: the IBP value of every node, the pre-activation bounds used by
    the relaxations (IBP's, or tightened by full CROWN), and backward passes from any node."""

    def __init__(self, model: nn.Module, plan: _Plan, box: Interval):
        self.model, self.plan, self.box = model, plan, box
        self.env: dict[fx.Node, Any] = {plan.input: box}
        self.order = [plan.input]
        for node, _ in plan.full:
            self.env[node] = _eval(model, plan, node, self.env)
            self.order.append(node)
        self.index = {node: i for i, node in enumerate(self.order)}
        self.pre: dict[fx.Node, Interval] = {}  # tightened pre-activation bounds
        self._chains: dict[fx.Node, list[tuple[fx.Node, str, Any]] | None] = {}

    # -- what each node does backward

    def _kind(self, node: fx.Node) -> tuple[str, Any]:
        """('input'|'identity'|'lines'|'interval'|'batchnorm'|'affine', payload)."""
        if node is self.plan.input:
            return "input", None
        args = fx.node.map_arg(node.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.env.__getitem__)
        if node.op == "call_module":
            m = _submodule(self.model, node.target)
            if isinstance(m, _IDENTITY_MODULES):
                return "identity", None
            if isinstance(m, _INTERVAL_MODULES):
                return "interval", None
            if isinstance(m, _NONLINEAR_MODULES):
                lines = _module_lines(m)
                return ("lines", lines) if lines is not None else ("interval", None)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not fixed_batchnorm(m):
                return "batchnorm", m
            if _module_rule(m) is None:
                raise _no_rule(node, self.model)
            return "affine", None
        if node.target is F.dropout:
            return "identity", None
        if node.target in _INTERVAL_FUNCTIONS:
            return "interval", None
        lines = _function_lines(node.target, args, kwargs)
        if lines is not None:
            return "lines", lines
        if node.target in _NONLINEAR_FUNCTIONS:  # e.g. a leaky ReLU of slope > 1: no lines
            return "interval", None
        return "affine", None

    def _call(self, node: fx.Node, values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
        """The node's operation with tensors in place of its interval arguments."""
        pick = lambda n: values[n] if n in values else self.env[n]  # noqa: E731
        args = fx.node.map_arg(node.args, pick)
        kwargs = fx.node.map_arg(node.kwargs, pick)
        if node.op == "call_module":
            return _submodule(self.model, node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return _PURE.get(node.target, node.target)(*args, **kwargs)

    def ibp_margins(self, y: torch.Tensor) -> torch.Tensor:
        """IBP's elided margin bounds (``defenses.ibp.elided_upper_bounds``) from this pass."""
        return _elided_margins(*_last_layer(self.model, self.plan, self.env), y)

    def activation_inputs(self) -> list[Interval]:
        """The bounds of each activation's input (IBP's, or tightened), in graph order."""
        found = []
        for node in self.order[1:]:
            if self._kind(node)[0] == "lines":
                (source,) = [n for n in node.all_input_nodes
                             if isinstance(self.env[n], Interval)]
                found.append(self._bounds_of(source))
        return found

    def first_layer_input(self) -> Interval:
        """The interval entering the first linear or convolutional layer (after any input
        normalisation): the reference width of Shi et al.'s tightness."""
        for node in self.order[1:]:
            if node.op == "call_module" and isinstance(
                    _submodule(self.model, node.target), (nn.Linear, nn.Conv1d, nn.Conv2d)) or (
                    node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d)):
                return self.env[node.all_input_nodes[0]]
        return self.box

    def _bounds_of(self, node: fx.Node) -> Interval:
        return self.pre.get(node) or self.env[node]

    # -- one backward pass

    def lower(self, start: fx.Node, spec: torch.Tensor,
              slopes: dict[fx.Node, torch.Tensor] | None = None) -> torch.Tensor:
        """Lower bounds [b, s] of ``spec[b, i] . value(start)`` over the box. ``slopes``: for
        (leaky) ReLU nodes, the lower lines' slopes [b, s, *shape] to use instead of CROWN's
        choice (alpha-CROWN; each must lie in [leak, 1] where the neuron is unstable)."""
        A: dict[fx.Node, torch.Tensor] = {start: spec}
        bias = spec.new_zeros(spec.shape[:2])

        def push(node: fx.Node, a: torch.Tensor) -> None:
            A[node] = A[node] + a if node in A else a

        def dot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [b, s, *] . [b, *]
            if v.shape[0] != a.shape[0]:  # a value broadcast over the batch
                v = v.expand(a.shape[0], *v.shape[1:])
            return torch.bmm(a.flatten(2), v.reshape(a.shape[0], -1, 1)).squeeze(2)

        for node in reversed(self.order[:self.index[start] + 1]):
            a = A.pop(node, None)
            if a is None:
                continue
            kind, payload = self._kind(node)
            if kind == "input":
                lo, hi = self.box
                bias = bias + dot(a.clamp(min=0), lo) + dot(a.clamp(max=0), hi)
                continue
            if kind == "interval":
                lo, hi = self.env[node]
                bias = bias + dot(a.clamp(min=0), lo) + dot(a.clamp(max=0), hi)
                continue
            inputs = [n for n in node.all_input_nodes if isinstance(self.env[n], Interval)]
            if kind == "identity":
                push(inputs[0], a)
                continue
            if kind == "lines":
                (source,) = inputs
                lo, hi = self._bounds_of(source)
                la, lb, ua, ub = payload(lo, hi)
                pos, neg = a.clamp(min=0), a.clamp(max=0)
                low = slopes[node] if slopes and node in slopes else la.unsqueeze(1)
                push(source, pos * low + neg * ua.unsqueeze(1))
                bias = bias + dot(pos, lb) + dot(neg, ub)
                continue
            if kind == "batchnorm":
                (source,) = inputs
                scale, shift = _batchnorm_affine(payload, self.env[source])
                push(source, a * scale)
                bias = bias + (a * shift).flatten(2).sum(-1)
                continue
            direct = self._direct(node, inputs, a)
            if direct is not None:  # a linear or convolutional layer: its transpose, directly
                g, constant = direct
                bias = bias + constant
                push(inputs[0], g)
                continue
            centres = [(self.env[n].lower + self.env[n].upper) / 2 for n in inputs]
            out, pull = torch.func.vjp(
                lambda *ts: self._call(node, dict(zip(inputs, ts))), *centres)
            pulled = torch.func.vmap(pull, in_dims=1, out_dims=1)(a)
            bias = bias + dot(a, out)
            for source, centre, g in zip(inputs, centres, pulled):
                bias = bias - dot(g, centre)
                push(source, g)
        if A:  # a node the start depends on that the graph order missed: a bug, never silent
            raise RuntimeError(f"CROWN: unvisited nodes {[n.name for n in A]}")
        return bias

    def _direct(self, node: fx.Node, inputs: list[fx.Node], a: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``A . J`` and ``A . bias`` of an ``nn.Linear``, a zero-padded ``nn.Conv2d`` or an
        eval-mode batch norm module with one bounded argument, by its transpose (a matrix
        product, a transposed convolution, a per-channel scale) rather than ``vjp`` under
        ``vmap``: the same numbers, several times faster on the wide specifications of full
        CROWN, and cheaper to differentiate in training. None for any other node."""
        if node.op != "call_module" or len(inputs) != 1 or len(node.args) != 1 or node.kwargs:
            return None
        m = _submodule(self.model, node.target)
        b, s = a.shape[:2]
        if type(m) is nn.Linear:
            g = a @ m.weight
            constant = a @ m.bias if m.bias is not None else None
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) and fixed_batchnorm(m):
            scale, shift = _batchnorm_affine(m, self.env[inputs[0]])
            g = a * scale
            constant = (a.flatten(3).sum(-1) if a.dim() > 3 else a) @ shift.flatten()
        elif type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(
                m.padding, str):
            shape = self.env[inputs[0]].lower.shape[1:]
            kernel = m.weight.shape[2:]
            extra = [size - ((o - 1) * st - 2 * p + d * (k - 1) + 1) for size, o, st, p, d, k in
                     zip(shape[1:], a.shape[3:], m.stride, m.padding, m.dilation, kernel)]
            if any(e < 0 or e >= max(st, d) for e, st, d in zip(extra, m.stride, m.dilation)):
                return None
            g = F.conv_transpose2d(a.reshape(b * s, *a.shape[2:]), m.weight, None, m.stride,
                                   m.padding, tuple(extra), m.groups, m.dilation
                                   ).view(b, s, *shape)
            constant = a.sum((3, 4)) @ m.bias if m.bias is not None else None
        else:
            return None
        return g, (constant if constant is not None else a.new_zeros(b, s))

    def _exact(self, node: fx.Node) -> bool:
        """IBP's interval of ``node`` is already exact: the node is one linear or
        convolutional layer of the input box, behind at most per-channel normalisation
        (including eval-mode batch norm) and reshaping (a box's image under one linear map
        has each coordinate's extremes at independent corners, and a per-channel scale and
        shift keeps them so), so CROWN would find the same bounds at far greater cost (the
        widest layer, the first, is the dearest to bound)."""
        mixing = 0
        while node is not self.plan.input:
            bounded = [n for n in node.all_input_nodes if isinstance(self.env[n], Interval)]
            if len(bounded) != 1:
                return False
            if node.op == "call_module":
                m = _submodule(self.model, node.target)
                if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d):
                    mixing += 1
                elif not (isinstance(m, (*_IDENTITY_MODULES, nn.Flatten, Normalize))
                          or fixed_batchnorm(m)):
                    return False
            elif not (node.op == "call_function" and node.target is torch.flatten):
                return False
            if mixing > 1:
                return False
            node = bounded[0]
        return True

    def tighten(self, budget: int = 2**25) -> None:
        """Full CROWN: each activation's input bounded by CROWN (identity specification over
        its neurons, in chunks of at most ``budget`` specification entries), in graph order.
        Which neurons are unstable is decided, as auto_LiRPA's CROWN decides it, by IBP
        carried on from the bounds already tightened (not by IBP from the input box, which is
        looser and finds more unstable neurons): before a ReLU only the neurons a sample has
        unstable under it (l < 0 < u) are bounded by CROWN, as that sample's own rows of the
        specification, and the others keep its bounds (their lines are exact already). As
        auto_LiRPA does, CROWN's bound is kept even where IBP's is tighter (the intersection
        is not always better: it moves the ReLU's lines, and the final bound can come out
        looser; ``certificates`` takes the tighter bound at the output)."""
        carried = dict(self.env)  # IBP from the tightened bounds on
        for node in self.order:
            if node is self.plan.input:
                continue
            self._tighten_input(node, carried, budget)
            if self.pre:  # something upstream was tightened: IBP again from it
                carried[node] = self.pre.get(node) or _eval(self.model, self.plan, node,
                                                            carried)

    def _tighten_input(self, node: fx.Node, carried: dict[fx.Node, Any], budget: int) -> None:
        """``tighten``'s step at an activation ``node``: its input's bounds by CROWN."""
        kind, lines = self._kind(node)
        if kind != "lines":
            return
        (source,) = [n for n in node.all_input_nodes if isinstance(self.env[n], Interval)]
        if source in self.pre or source is self.plan.input or self._exact(source):
            return
        lo, hi = carried[source]
        b, n = lo.shape[0], lo[0].numel()
        low, high = lo.flatten(1).clone(), hi.flatten(1).clone()
        wanted = ((low < 0) & (high > 0) if isinstance(lines, _PiecewiseLinear)
                  else torch.ones_like(low, dtype=torch.bool))
        # each sample's own unstable neurons as its rows (not the batch's union: a
        # trained network has few per sample), padded to the largest count; a padding
        # row's bound is computed and dropped
        counts = wanted.sum(1)
        most = int(counts.max())
        order = torch.argsort((~wanted).to(torch.int8), dim=1, stable=True)[:, :most]
        chain = self._patch_chain(source)
        width = n if chain is None else _patch_width(self, chain)
        chunk = max(1, budget // (2 * b * width))
        for start in range(0, most, chunk):
            rows = order[:, start:start + chunk]  # [b, r]
            r = rows.shape[1]
            if chain is not None:
                bound = self._patches_lower(chain, torch.cat([rows, rows], 1),
                                            torch.cat([lo.new_ones(b, r), -lo.new_ones(b, r)], 1))
            else:
                eye = lo.new_zeros(b, r, n).scatter_(2, rows.unsqueeze(2), 1.0)
                spec = torch.cat([eye, -eye], 1).view(b, 2 * r, *lo.shape[1:])
                bound = self.lower(source, spec)
            real = torch.arange(start, start + r, device=lo.device) < counts.unsqueeze(1)
            low.scatter_(1, rows, torch.where(real, bound[:, :r], low.gather(1, rows)))
            high.scatter_(1, rows, torch.where(real, -bound[:, r:], high.gather(1, rows)))
        self.pre[source] = Interval(low.view_as(lo), high.view_as(hi))
        carried[source] = self.pre[source]  # (``tighten`` carries IBP on from here)

    # -- patches mode: the identity specification of a convolutional layer's neurons

    def _patch_chain(self, start: fx.Node) -> list[tuple[fx.Node, str, Any, fx.Node]] | None:
        """The nodes from ``start`` back to the input box, each with what it does backward
        (``'identity'``, ``'lines'``, ``'scale'`` (a per-channel affine map: eval or train
        batch norm, ``Normalize``), ``'conv'`` (a zero-padded ``nn.Conv2d``) or ``'input'``),
        when they form a chain of such nodes over [b, C, H, W] values (each with one bounded
        argument): then a row of the identity specification at ``start`` stays a small window
        of each node's value (the neuron's receptive field), and ``_patches_lower`` bounds it
        there (auto_LiRPA's patches mode). None otherwise (a linear layer, a residual sum, a
        max pool, ...): the dense ``lower`` takes it."""
        if start in self._chains:
            return self._chains[start]
        chain: list[tuple[fx.Node, str, Any, fx.Node]] | None = []
        node = start
        while chain is not None:
            kind, payload = self._kind(node)
            if kind == "input":
                chain.append((node, "input", None, node))
                break
            bounded = [n for n in node.all_input_nodes if isinstance(self.env[n], Interval)]
            if len(bounded) != 1 or self.env[bounded[0]].lower.dim() != 4:
                chain = None
                break
            m = _submodule(self.model, node.target) if node.op == "call_module" else None
            if kind in ("identity", "lines"):
                step = kind
            elif kind == "batchnorm" or (kind == "affine" and (
                    fixed_batchnorm(m) or isinstance(m, Normalize))):
                step, payload = "scale", m
            elif (kind == "affine" and type(m) is nn.Conv2d and m.padding_mode == "zeros"
                  and not isinstance(m.padding, str) and len(node.args) == 1 and not node.kwargs):
                step, payload = "conv", m
            elif kind == "affine" and type(m) is nn.ZeroPad2d and min(m.padding) >= 0:
                step, payload = "pad", m
            else:
                chain = None
                break
            chain.append((node, step, payload, bounded[0]))
            node = bounded[0]
        self._chains[start] = chain
        return chain

    def _patches_lower(self, chain: list[tuple[fx.Node, str, Any, fx.Node]], rows: torch.Tensor,
                       signs: torch.Tensor) -> torch.Tensor:
        """``lower`` for the specification ``signs[b, i] * e_{rows[b, i]}`` at ``chain``'s
        start (a row: one neuron, flat index into its [C, H, W] value, with sign +-1), kept
        as a window of each node's value: ``P`` [b, s, C, kh, kw] at top-left corner
        ``(oy, ox)`` [b, s] of the node's grid, zero wherever the window leaves the grid. A
        convolution pulls a window back by a transposed convolution of the window alone (its
        receptive field grows by the kernel); activations, per-channel maps and the input box
        act on the same window of their own tensors. Where a window would cover more than
        the whole grid it becomes the grid (the dense form, offset 0). The same numbers as the
        dense pass (``tests/test_crown.py``), at a cost per row of the receptive field rather
        than of the whole layer."""
        start = chain[0][0]
        b, s = rows.shape
        C, H, W = self.env[start].lower.shape[1:]
        P = F.one_hot(rows // (H * W), C).to(signs.dtype) * signs.unsqueeze(2)
        P = P.view(b, s, C, 1, 1)
        oy, ox = (rows % (H * W)) // W, rows % W
        bias = signs.new_zeros(b, s)

        def window(t: torch.Tensor) -> torch.Tensor:  # t [b or 1, C, H, W] -> like P
            return _windows(t.expand(b, *t.shape[1:]), oy, ox, P.shape[3], P.shape[4])

        for node, kind, payload, source in chain:
            if kind == "identity":
                continue
            if kind in ("input", "lines"):
                pos, neg = P.clamp(min=0), P.clamp(max=0)
                if kind == "input":
                    lo, hi = self.box
                    bias = bias + (pos * window(lo) + neg * window(hi)).sum((2, 3, 4))
                    break
                lo, hi = self._bounds_of(source)
                la, lb, ua, ub = (t.expand_as(lo) for t in payload(lo, hi))
                bias = bias + (pos * window(lb) + neg * window(ub)).sum((2, 3, 4))
                P = pos * window(la) + neg * window(ua)
                continue
            m = payload
            if kind == "scale":
                scale, shift = (normalize_affine(m, P.shape[2]) if isinstance(m, Normalize)
                                else batchnorm_affine(m, self.env[source]))
                bias = bias + P.sum((3, 4)) @ shift.to(P.dtype)
                P = P * scale.view(1, 1, -1, 1, 1)
                continue
            h, w = self.env[source].lower.shape[2:]
            if kind == "pad":  # the same window, moved onto the unpadded grid and cut to it
                left, _, top, _ = m.padding
                oy, ox = oy - top, ox - left
                P = _cut(P, oy, ox, h, w)
                continue
            # a convolution: the window through the transposed kernel, then the padding cut
            if m.bias is not None:
                bias = bias + P.sum((3, 4)) @ m.bias
            if P.shape[3:] == (1, 1) and m.groups == 1 and m.dilation == (1, 1):
                # a one-pixel window (a layer's own neurons): a product with the kernels
                P = (P.flatten(2) @ m.weight.flatten(1)).view(b, s, *m.weight.shape[1:])
            else:
                P = F.conv_transpose2d(P.reshape(b * s, *P.shape[2:]), m.weight, None,
                                       m.stride, 0, 0, m.groups, m.dilation)
                P = P.view(b, s, *P.shape[1:])
            oy, ox = oy * m.stride[0] - m.padding[0], ox * m.stride[1] - m.padding[1]
            P = _cut(P, oy, ox, h, w)
            if P.shape[3] * P.shape[4] >= h * w:  # the dense form is no larger
                P, oy, ox = _to_grid(P, oy, ox, h, w), oy.new_zeros(b, s), ox.new_zeros(b, s)
        return bias

    def alpha_lower(self, start: fx.Node, spec: torch.Tensor, iterations: int = 20,
                    lr: float = 0.1) -> torch.Tensor:
        """alpha-CROWN (Xu et al. 2021, "Fast and Complete: Enabling Complete Neural Network
        Verification with Rapid and Massively Parallel Incomplete Verifiers"): the lower
        bounds of ``lower``, with the slope of every unstable (leaky) ReLU's lower line, one per
        neuron and specification row, optimised by projected gradient ascent (Adam) on the
        bound. Any slope in [leak, 1] gives a sound line through the origin below the
        activation, so every iterate is a sound bound and the best of them, per row, is kept;
        the first is CROWN's own choice, so the result is never looser than ``lower``. The
        pre-activation bounds stay as they are (IBP's, or full CROWN's); only the lines of
        the final backward pass are optimised."""
        b, s = spec.shape[:2]
        free: dict[fx.Node, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}
        for node in self.order[1:self.index[start] + 1]:
            kind, lines = self._kind(node)
            if kind != "lines" or not isinstance(lines, _PiecewiseLinear):
                continue
            (source,) = [n for n in node.all_input_nodes if isinstance(self.env[n], Interval)]
            lo, hi = self._bounds_of(source)
            unstable = ((lo < 0) & (hi > 0)).unsqueeze(1)
            if not unstable.any():
                continue
            fixed = lines(lo, hi)[0].detach().unsqueeze(1).expand(b, s, *lo.shape[1:])
            mask = unstable.expand_as(fixed)
            # one free slope per unstable neuron and row (Adam keeps state for these only)
            free[node] = (mask, fixed, fixed[mask].clone().requires_grad_(True), lines.slope)
        with torch.no_grad():
            best = self.lower(start, spec)
        if not free or iterations <= 0:
            return best
        params = [p for _, _, p, _ in free.values()]
        optimiser = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(iterations):
                slopes = {node: fixed.masked_scatter(mask, p)
                          for node, (mask, fixed, p, _) in free.items()}
                bound = self.lower(start, spec, slopes)
                best = torch.maximum(best, bound.detach())
                # the slopes' gradients only (never the model's; the bounds of the nodes may
                # hold the model's graph, kept for the next iteration)
                grads = torch.autograd.grad(-bound[torch.isfinite(bound)].sum(), params,
                                            retain_graph=True, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
                optimiser.step()
                with torch.no_grad():
                    for _, _, p, leak in free.values():
                        p.clamp_(leak, 1.0)
            with torch.no_grad():
                slopes = {node: fixed.masked_scatter(mask, p)
                          for node, (mask, fixed, p, _) in free.items()}
                best = torch.maximum(best, self.lower(start, spec, slopes))
        return best


def _grown(size: int, m: nn.Conv2d, axis: int) -> int:
    """The side of a window of side ``size`` pulled back through convolution ``m``."""
    return (size - 1) * m.stride[axis] + m.dilation[axis] * (m.kernel_size[axis] - 1) + 1


def _patch_width(run: _Pass, chain: list[tuple[fx.Node, str, Any, fx.Node]]) -> int:
    """The most entries a row of ``_Pass._patches_lower`` holds along ``chain``."""
    most = run.env[chain[0][0]].lower.shape[1]
    kh = kw = 1
    for _, kind, m, source in chain:
        if kind == "conv":
            c, h, w = run.env[source].lower.shape[1:]
            kh, kw = _grown(kh, m, 0), _grown(kw, m, 1)
            most = max(most, c * kh * kw)
            if kh * kw >= h * w:  # the dense form, as _patches_lower takes it
                kh, kw = h, w
    return most


def _cut(P: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Windows P [b, s, C, kh, kw] at (oy, ox) with their entries outside the h x w grid (a
    padding's) set to 0."""
    ys = oy.unsqueeze(2) + torch.arange(P.shape[3], device=P.device)
    xs = ox.unsqueeze(2) + torch.arange(P.shape[4], device=P.device)
    inside = ((ys >= 0) & (ys < h)).unsqueeze(3) & ((xs >= 0) & (xs < w)).unsqueeze(2)
    return P * inside.unsqueeze(2)


def _window_index(oy: torch.Tensor, ox: torch.Tensor, kh: int, kw: int, h: int, w: int
                  ) -> torch.Tensor:
    """[b, s, kh * kw]: the flat index of each entry of each row's window (top-left corner
    (oy, ox) [b, s]) in the h x w grid padded by kh - 1 rows and kw - 1 columns on each side.
    A window wholly outside the grid is all zero in P, so it is moved to the nearest place
    that stays on the padded grid."""
    wide = w + 2 * (kw - 1)
    corner = ((oy.clamp(-(kh - 1), h - 1) + kh - 1) * wide
              + ox.clamp(-(kw - 1), w - 1) + kw - 1)
    offsets = (torch.arange(kh, device=oy.device).unsqueeze(1) * wide
               + torch.arange(kw, device=oy.device)).flatten()
    return corner.unsqueeze(2) + offsets


def _windows(t: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, kh: int, kw: int
             ) -> torch.Tensor:
    """[b, s, C, kh, kw]: the window of t [b, C, H, W] with top-left corner (oy, ox) [b, s]
    for each row, zero outside the grid."""
    b, C, H, W = t.shape
    if (kh, kw) == (H, W) and not (oy.any() or ox.any()):
        return t.unsqueeze(1)
    padded = F.pad(t, (kw - 1, kw - 1, kh - 1, kh - 1)).flatten(2).transpose(1, 2)  # [b, n, C]
    index = _window_index(oy, ox, kh, kw, H, W).flatten(1)  # [b, s * kh * kw]
    picked = padded.gather(1, index.unsqueeze(2).expand(-1, -1, C))
    return picked.view(b, *oy.shape[1:], kh, kw, C).permute(0, 1, 4, 2, 3)


def _to_grid(P: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, h: int, w: int
             ) -> torch.Tensor:
    """Windows P [b, s, C, kh, kw] at (oy, ox), zero outside the grid, as [b, s, C, h, w]."""
    b, s, C, kh, kw = P.shape
    index = _window_index(oy, ox, kh, kw, h, w).unsqueeze(2).expand(b, s, C, kh * kw)
    canvas = P.new_zeros(b, s, C, (h + 2 * (kh - 1)) * (w + 2 * (kw - 1)))
    canvas.scatter_(3, index, P.reshape(b, s, C, kh * kw))
    canvas = canvas.view(b, s, C, h + 2 * (kh - 1), w + 2 * (kw - 1))
    return canvas[:, :, :, kh - 1:kh - 1 + h, kw - 1:kw - 1 + w]


def _batchnorm_affine(m: nn.Module, b: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of ``interval_rules.batchnorm_affine`` broadcastable to [b, s, C,
    *spatial]."""
    scale, shift = batchnorm_affine(m, b)
    view = (1, 1, -1) + (1,) * (b.lower.dim() - 2)
    return scale.view(view), shift.view(view)


# ------------------------------------------------------------------------------------------------
# the public API


def bound_pass(model: nn.Module, x: torch.Tensor, eps: float, method: Method = "crown-ibp"
               ) -> _Pass:
    """One IBP forward over the box (and, for full CROWN, the tightened pre-activation bounds)
    from which ``lower`` gives CROWN bounds and ``ibp_margins`` IBP's: training computes both
    from one pass."""
    return _pass(model, x, eps, method)


def crown_margins(run: _Pass, y: torch.Tensor) -> torch.Tensor:
    """``crown_margin_upper_bounds`` from a pass."""
    return -_lower(run, margin_spec(y, _classes(run), run.box.lower.dtype))


def _pass(model: nn.Module, x: torch.Tensor, eps: float, method: Method) -> _Pass:
    if method not in METHODS:
        raise ValueError(f"CROWN method must be one of {', '.join(METHODS)}, got {method!r}")
    run = _Pass(model, _plan(model), _input_box(x, eps))
    if not isinstance(run.env[run.plan.output], Interval):
        raise ValueError(f"CROWN: {type(model).__name__}'s output does not depend on its input")
    if method == "crown":
        run.tighten()
    return run


def _lower(run: _Pass, spec: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(run.lower(run.plan.output, spec), nan=-math.inf, posinf=math.inf,
                            neginf=-math.inf)


def _classes(run: _Pass) -> int:
    return run.env[run.plan.output].lower.shape[1]


def crown_lower(model: nn.Module, x: torch.Tensor, eps: float,
                spec: torch.Tensor | Callable[[int], torch.Tensor],
                method: Method = "crown-ibp") -> torch.Tensor:
    """Lower bounds [b, s] of ``spec[:, i] . z(x')`` for every x' in the L-inf box of radius
    eps around x (clipped to [0, 1]); ``spec`` is [b, s, classes], or a function of the class
    count giving it. Differentiable in the model's parameters (CROWN-IBP training
    backpropagates through it)."""
    run = _pass(model, x, eps, method)
    return _lower(run, spec(_classes(run)) if callable(spec) else spec)


def crown_bounds(model: nn.Module, x: torch.Tensor, eps: float,
                 method: Method = "crown-ibp") -> Interval:
    """(lower, upper) logit bounds [b, classes] by CROWN."""

    def both(k: int) -> torch.Tensor:
        eye = torch.eye(k, dtype=x.dtype, device=x.device)
        return torch.cat([eye, -eye]).expand(x.shape[0], -1, -1)

    bound = crown_lower(model, x, eps, both, method)
    k = bound.shape[1] // 2
    return Interval(bound[:, :k], -bound[:, k:])


def margin_spec(y: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, classes, classes]: row j is ``e_y - e_j`` (zero at j = y)."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    return eye[y][:, None, :] - eye[None, :, :]


def alpha_crown_margins(run: _Pass, y: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Upper bounds [b, classes] of ``z_j - z_y`` by alpha-CROWN (``_Pass.alpha_lower``)."""
    spec = margin_spec(y, _classes(run), run.box.lower.dtype)
    bound = run.alpha_lower(run.plan.output, spec, iterations)
    return -torch.nan_to_num(bound, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def crown_margin_upper_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                              method: Method = "crown-ibp") -> torch.Tensor:
    """Upper bounds [b, classes] of ``z_j - z_y`` (0 at j = y), the form of
    ``defenses.ibp.elided_upper_bounds``: the negated CROWN lower bounds of ``z_y - z_j``."""
    return crown_margins(_pass(model, x, eps, method), y)


def _proven(worst: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (worst.scatter(1, y[:, None], -math.inf) <= 0).all(dim=1)


def verified_crown(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                   method: Method = "crown-ibp") -> torch.Tensor:
    """Bool [b]: CROWN proves no input in the eps-box changes the label from y."""
    with torch.no_grad():
        return _proven(crown_margin_upper_bounds(model, x, y, eps, method), y)


@torch.no_grad()
def certificates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                 method: Method = "crown-ibp", alpha: bool = False) -> dict[str, torch.Tensor]:
    """Bool [b] per certificate: ``ibp`` (IBP with the last layer elided), ``crown`` (CROWN
    alone), with ``alpha`` also ``alpha_crown`` (alpha-CROWN on the same pre-activation
    bounds), and ``best``: every margin ``z_j - z_y`` bounded by the smallest of the upper
    bounds (all are sound, so their minimum is; neither IBP nor CROWN is always the tighter:
    CROWN's linear lower lines dip below the interval at wide boxes, Zhang et al. 2020
    section 3)."""
    run = _pass(model, x, eps, method)
    ibp, crown = run.ibp_margins(y), crown_margins(run, y)
    out = {"ibp": _proven(ibp, y), "crown": _proven(crown, y)}
    tightest = torch.minimum(ibp, crown)
    if alpha:
        optimised = alpha_crown_margins(run, y)
        out["alpha_crown"] = _proven(optimised, y)
        tightest = torch.minimum(tightest, optimised)
    out["best"] = _proven(tightest, y)
    return out


def check_crown(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Refuse a model whose CROWN bounds cannot be computed (after ``defenses.ibp.check_bounds``
    accepted it): in eval mode, at eps 0 on a batch of 2 random inputs, CROWN-IBP's lower
    bounds of ``c . z`` and ``-c . z`` for a random direction c (two specification rows, so the
    check costs two backward rows whatever the class count) must equal the forward's. The
    model is left as it was.

    Raises:
        ValueError: naming the node where the backward pass fails, or the mismatch.
    """
    gen = torch.Generator().manual_seed(0)
    x = probe_input(model, input_shape, gen)
    name = type(model).__name__
    with torch.no_grad(), eval_mode(model):
        out = model(x)
        c = torch.randn(out.shape[1:], generator=gen).to(out)
        spec = torch.stack([c, -c]).expand(x.shape[0], -1, -1)
        try:
            lower = crown_lower(model, x, 0.0, spec)
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f"CROWN bounds: {name} fails on inputs of shape {tuple(x.shape)} "
                             f"({type(err).__name__}: {str(err).strip().splitlines()[0]})"
                             ) from err
    value = out @ c
    scale = float(1e-4 * (1 + value.abs().max()))
    if not (torch.allclose(lower[:, 0], value, atol=scale, rtol=1e-4)
            and torch.allclose(-lower[:, 1], value, atol=scale, rtol=1e-4)):
        raise ValueError(f"CROWN bounds: {name}'s bounds at eps 0 differ from its forward")
