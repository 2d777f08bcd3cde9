"""Certified training beyond plain IBP: the CROWN-IBP bound (Zhang et al. 2020) and the fast-IBP
recipe (Shi et al. 2021, "Fast Certified Robust Training with Short Warmup", NeurIPS).

CROWN-IBP (Zhang et al. 2020, eq. 7). With m(x, eps) the lower bounds of the margins
``z_y - z_j``, the robust loss is the cross-entropy of ``-[(1 - beta) m_IBP + beta m_CROWN-IBP]``;
``beta`` ramps from ``beta_start`` (1 in the paper) to ``beta_end`` (0) over the eps ramp, so the
tighter but costlier and less stable CROWN-IBP bound guides the start and IBP the end. In the
form ``defenses.ibp.elided_upper_bounds`` uses (upper bounds of ``z_j - z_y``):
``worst = beta * crown + (1 - beta) * ibp``.

IBP initialisation (Shi et al. 2021, section 3.1, eq. 6). Each weight of every linear and
convolutional layer but the last is drawn from N(0, sigma^2) with ``sigma = sqrt(2 pi) / n_in``
(``n_in`` the layer's fan-in), which keeps the expected interval width of a layer's output equal
to its input's at initialisation (instead of growing by a factor of about sqrt(n_in)); a layer
fed by a residual sum gets half of that, as the sum doubles the width. Biases keep their
initialisation.

The warm-up regularisers (Shi et al. 2021, section 3.3, eqs. 8-10), over the m activation
layers, with the pre-activation interval [l_i, u_i] of layer i, its centres c and radii r:

- tightness: ``L_tight = 1/m sum_i ReLU(tau - mean(r_0) / mean(r_i)) / tau``, r_0 the radius of
  the first layer's input; it keeps bounds from growing layer by layer;
- ReLU balance: with A the active (l > 0) and I the inactive (u < 0) neurons,
  ``L_relu = 1/m sum_i [ReLU(tau - min(rho_mean, 1/rho_mean)) + ReLU(tau - min(rho_var,
  1/rho_var))] / tau``, ``rho_mean = mean(c 1_A) / -mean(c 1_I)``, ``rho_var = sum((c -
  mean c)^2 1_A) / sum((c - mean c)^2 1_I)``; it keeps IBP from killing most neurons.

Their sum is weighted by ``lambda = lambda_0 (1 - eps_t / eps_train)`` while eps ramps up (zero
before and after), ``tau = 0.5``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from defenses.crown import bound_pass, crown_margins
from defenses.ibp import _plan

__all__ = ["ibp_init", "certified_margins", "fast_regularizer", "TAU"]

TAU = 0.5  # Shi et al.'s target ratio for both regularisers

_SUMS = (operator.add, operator.iadd, torch.add)


@torch.no_grad()
def ibp_init(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Shi et al.'s IBP initialisation of ``model``'s linear and convolutional layers (every one
    but the output layer), in place; returns the model."""
    plan = _plan(model)
    layers = [(node, model.get_submodule(node.target)) for node, _ in plan.full
              if node.op == "call_module" and isinstance(
                  model.get_submodule(node.target), (nn.Linear, nn.Conv1d, nn.Conv2d))]
    last = plan.output.target if plan.output.op == "call_module" else None
    for node, layer in layers:
        if node.target == last:
            continue
        fan_in = layer.weight[0].numel()
        std = math.sqrt(2 * math.pi) / fan_in
        source = node.args[0]
        if getattr(source, "op", None) in ("call_function", "call_method") and (
                source.target in _SUMS or source.target == "add"):
            std /= 2
        layer.weight.normal_(0.0, std, generator=generator)
    return model


def fast_regularizer(run, tau: float = TAU) -> torch.Tensor:
    """``L_tight + L_relu`` of a bound pass (``defenses.crown.bound_pass``), 0 without
    activations."""
    inputs = run.activation_inputs()
    if not inputs:
        return run.box.lower.new_zeros(())
    first = run.first_layer_input()
    reference = ((first.upper - first.lower) / 2).mean()
    total = run.box.lower.new_zeros(())
    for lower, upper in inputs:
        centre, radius = (upper + lower) / 2, ((upper - lower) / 2).mean()
        total = total + F.relu(tau - reference / radius.clamp(min=1e-12)) / tau
        active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
        mean_ratio = (centre * active).mean() / -(centre * inactive).mean()
        spread = (centre - centre.mean()) ** 2
        var_ratio = (spread * active).sum() / (spread * inactive).sum()
        balance = 0
        for ratio in (mean_ratio, var_ratio):
            ratio = torch.minimum(ratio, 1 / ratio.clamp(min=1e-12))
            balance = balance + F.relu(tau - ratio) / tau
        if bool(torch.isfinite(balance)):  # no active or no inactive neuron: nothing to balance
            total = total + balance
    return total / len(inputs)


def certified_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      beta: float = 0.0, regularize: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upper bounds [b, classes] of ``z_j - z_y``, ``beta * CROWN-IBP + (1 - beta) * IBP``, and
    with ``regularize`` Shi et al.'s ``L_tight + L_relu``, from one IBP pass (CROWN's backward
    pass only when beta > 0)."""
    run = bound_pass(model, x, eps)
    worst = run.ibp_margins(y)
    if beta > 0:
        crown = crown_margins(run, y)
        worst = crown if beta >= 1 else beta * crown + (1 - beta) * worst
    return worst, fast_regularizer(run) if regularize else None
