"""Certified training between the adversarial and the verified loss: SABR's small boxes and the
expressive losses.

SABR (Mueller et al. 2023, "Certified Training: Small Boxes are All You Need", ICLR). IBP's
loss, taken not over the whole eps-box around x but over a small box of radius ``lam * eps``
(0 < lam <= 1) around an adversarial point x', found by PGD in the L-inf ball of radius
``(1 - lam) * eps`` around x (inside [0, 1]). Every point of the small box is then in the eps-ball
around x, and the box is where the attack says the worst case lies; its IBP bound is far
tighter than the whole box's, so the loss sits between the adversarial and the verified loss.
``lam = 1`` is IBP's box and loss exactly.

The expressive losses (De Palma et al. 2024, "Expressive Losses for Verified Robustness via
Convex Combinations", ICLR), with ``L_adv`` the cross-entropy at an adversarial point x_adv (PGD
in the eps-ball) and ``L_ver`` IBP's cross-entropy of the worst-case margins, for alpha in
[0, 1] (0: the adversarial loss, 1: IBP's):

- MTL-IBP: ``(1 - alpha) L_adv + alpha L_ver``;
- CC-IBP: the cross-entropy of the convex combination of the margins, ``(1 - alpha) (z(x_adv)
  - z_y(x_adv)) + alpha z_worst`` (z_worst the upper bounds of ``z_j - z_y``, 0 at j = y);
- Exp-IBP: ``L_adv^(1 - alpha) L_ver^alpha`` of the batch's mean losses (the convex
  combination of their logarithms; over the batch means, as the paper's code takes it).
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from defenses.attacks import default_alpha, pgd
from defenses.ibp import box_upper_bounds, elided_upper_bounds

__all__ = ["Expressive", "small_box", "sabr_margins", "adversarial_point", "expressive_loss"]

# Exp-IBP's losses are raised to fractional powers: a cross-entropy that underflows to 0 is
# taken as this instead (its gradient stays finite)
_TINY = 1e-12


class Expressive(str, enum.Enum):
    MTL = "mtl"
    CC = "cc"
    EXP = "exp"


def small_box(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float,
              steps: int, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """SABR's box (lower, upper): radius ``lam * eps`` around PGD's point in the ball of radius
    ``(1 - lam) * eps`` around x (``steps`` steps of ``default_alpha``, one random start),
    clipped to [0, 1]; lam 1, or eps 0, gives the eps-box around x."""
    if not 0 < lam <= 1:
        raise ValueError(f"lam must be in (0, 1], got {lam}")
    inner = (1 - lam) * eps
    centre = x
    if inner > 0 and steps > 0:
        centre = pgd(model, x, y, inner, default_alpha(inner, steps), steps, random_start=True,
                     generator=generator).detach()
    radius = lam * eps
    return (centre - radius).clamp(0.0, 1.0), (centre + radius).clamp(0.0, 1.0)


def sabr_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float,
                 steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Upper bounds [b, classes] of ``z_j - z_y`` over SABR's small box (``small_box``), IBP
    with the last layer elided: the logits of SABR's loss."""
    if lam == 1 or eps == 0:
        return elided_upper_bounds(model, x, y, eps)
    lower, upper = small_box(model, x, y, eps, lam, steps, generator)
    return box_upper_bounds(model, lower, upper, y)


def adversarial_point(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD's point in the eps-ball (one random start, step ``default_alpha``); x itself at eps
    0."""
    if eps == 0:
        return x
    return pgd(model, x, y, eps, default_alpha(eps, steps), steps, random_start=True,
               generator=generator).detach()


def expressive_loss(kind: Expressive, alpha: float, adv_logits: torch.Tensor | None,
                    worst: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """MTL-IBP's, CC-IBP's or Exp-IBP's loss (module docstring) from the logits at the
    adversarial point and IBP's worst-case margins ``worst`` (upper bounds of ``z_j - z_y``);
    at alpha 0 ``worst`` is not needed, at alpha 1 ``adv_logits`` is not (either may be
    None)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0:
        return F.cross_entropy(adv_logits, y)
    if alpha == 1:
        return F.cross_entropy(worst, y)
    kind = Expressive(kind)
    if kind is Expressive.CC:
        adv_margins = adv_logits - adv_logits.gather(1, y[:, None])
        return F.cross_entropy((1 - alpha) * adv_margins + alpha * worst, y)
    adv, ver = F.cross_entropy(adv_logits, y), F.cross_entropy(worst, y)
    if kind is Expressive.MTL:
        return (1 - alpha) * adv + alpha * ver
    return adv.clamp_min(_TINY).pow(1 - alpha) * ver.clamp_min(_TINY).pow(alpha)
