"""The pure step -> value schedules of training: each a function of the step and its settings
only, so a resumed run recomputes the same value from the step it restarts at.

The learning rate: constant, cosine annealing to 0, or multiplied by ``gamma`` at each milestone.
The IBP ramps (Gowal et al. 2018): the training eps grows from 0 and the weight of the nominal
loss shrinks from 1 after a warmup, linearly or along a smoothstep.
"""

from __future__ import annotations

import enum
import math
from typing import Sequence

__all__ = ["LRSchedule", "learning_rate", "Ramp", "ramp", "eps_schedule", "kappa_schedule"]


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"
    STEP = "step"  # multiply by gamma at each of the milestones (in optimiser steps)


def learning_rate(step: int, total_steps: int, lr: float,
                  schedule: LRSchedule | str = LRSchedule.CONSTANT,
                  milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """The learning rate at optimiser step ``step`` of ``total_steps``."""
    schedule = LRSchedule(schedule)
    if schedule is LRSchedule.COSINE:
        return 0.5 * lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule is LRSchedule.STEP:
        return lr * gamma ** sum(step >= m for m in milestones)
    return lr


class Ramp(str, enum.Enum):
    LINEAR = "linear"
    SMOOTH = "smooth"  # smoothstep 3t^2 - 2t^3: no kink at either end of the ramp


def ramp(step: int, warmup: int, rampup: int, kind: Ramp | str = Ramp.LINEAR) -> float:
    """0 until ``warmup``, then up to 1 over ``rampup`` steps, then 1."""
    if rampup <= 0:
        return 0.0 if step < warmup else 1.0
    t = min(max((step - warmup) / rampup, 0.0), 1.0)
    return t if Ramp(kind) is Ramp.LINEAR else t * t * (3 - 2 * t)


def eps_schedule(step: int, eps_train: float, warmup: int, rampup: int,
                 kind: Ramp | str = Ramp.LINEAR) -> float:
    """Training eps: 0 during warmup, ramps to ``eps_train``."""
    return eps_train * ramp(step, warmup, rampup, kind)


def kappa_schedule(step: int, kappa_final: float, warmup: int, rampup: int,
                   kind: Ramp | str = Ramp.LINEAR) -> float:
    """Weight of the nominal loss: 1 during warmup, ramps to ``kappa_final`` (0.5)."""
    return 1.0 + (kappa_final - 1.0) * ramp(step, warmup, rampup, kind)
