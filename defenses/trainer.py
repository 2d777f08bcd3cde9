"""One training loop with pluggable objectives, resumable exactly from a checkpoint.

Randomness (shuffling, augmentation, attack starts) comes from generators seeded by
``(seed, epoch)`` and ``(seed, step)``, so a run resumed from a checkpoint at any step makes the
same updates as one that was never interrupted.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from defenses.data import Augmentation, augment_batch
from defenses.objectives import Objective, StandardParams
from defenses.schedules import LRSchedule, learning_rate

__all__ = ["Optimizer", "TrainConfig", "Trainer", "step_generator"]


class Optimizer(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"


class TrainConfig(BaseModel):
    """What a training run needs besides the model, the data and the objective; every default
    lives here.

    batch_size is the virtual batch (one optimiser step); physical_batch_size, when smaller,
    splits it into accumulated micro-batches of the same total gradient.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=64, ge=1)
    physical_batch_size: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    optimizer: Optimizer = Optimizer.ADAM
    momentum: float = Field(default=0.9, ge=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    lr_milestones: tuple[int, ...] = ()  # optimiser steps (lr_schedule step)
    lr_gamma: float = Field(default=0.1, gt=0.0)
    seed: int = 0
    augmentation: Augmentation = Field(default_factory=Augmentation)

    @model_validator(mode="after")
    def _physical_within_batch(self) -> "TrainConfig":
        if self.physical_batch_size is not None and self.physical_batch_size > self.batch_size:
            raise ValueError(f"physical_batch_size must be in 1..batch_size={self.batch_size}, "
                             f"got {self.physical_batch_size}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate at optimiser step ``step`` of ``total_steps``."""
        return learning_rate(step, total_steps, self.lr, self.lr_schedule, self.lr_milestones,
                             self.lr_gamma)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for everything random in one step; same seed and step, same draws."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return gen


class Trainer:
    """Runs epochs of ``objective`` on ``model``; ``state_dict``/``load_state_dict`` resume it.

    The state (model, optimiser, step, epoch) is a dict of tensors and plain values, loadable
    with ``torch.load(..., weights_only=True)``.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, config: TrainConfig,
                 objective: Objective | None = None, device: torch.device | str | None = None):
        self.model = model
        self.data = train_data
        self.config = config
        self.objective = objective or StandardParams().build()
        self.device = torch.device(device) if device is not None else next(
            model.parameters()).device
        self.model.to(self.device)
        if config.optimizer is Optimizer.SGD:
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=config.lr, momentum=config.momentum,
                weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                              weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.step = 0
        self.epoch = 0

    # -- the loop --------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
        return torch.randperm(len(self.data), generator=gen)

    def _fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.data[int(i)] for i in indices))
        return torch.stack(xs).to(self.device), torch.as_tensor(ys).to(self.device)

    def run_epoch(self, on_step: Callable[[int, dict[str, float]], None] | None = None
                  ) -> dict[str, float]:
        """Train until the end of the current epoch (resuming mid-epoch if need be).

        Returns the epoch's mean training metrics plus ``epoch`` and ``lr``.
        """
        if self.epoch >= self.config.epochs:
            raise RuntimeError(f"training already ran its {self.config.epochs} epochs")
        cfg = self.config
        order = self._epoch_order(self.epoch)
        first = self.step - self.epoch * self.steps_per_epoch
        sums: dict[str, float] = {}
        count = 0
        self.model.train()
        for batch_index in range(first, self.steps_per_epoch):
            indices = order[batch_index * cfg.batch_size:(batch_index + 1) * cfg.batch_size]
            metrics = self._train_step(indices)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            if on_step is not None:
                on_step(self.step, metrics)
        self.epoch += 1
        out = {key: value / max(count, 1) for key, value in sums.items()}
        out.update(epoch=float(self.epoch), lr=cfg.lr_at(self.step, self.total_steps))
        return out

    def fit(self) -> list[dict[str, float]]:
        """Run the remaining epochs; returns each epoch's metrics."""
        return [self.run_epoch() for _ in range(self.epoch, self.config.epochs)]

    def _train_step(self, indices: torch.Tensor) -> dict[str, float]:
        cfg = self.config
        lr = cfg.lr_at(self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        gen = step_generator(cfg.seed, self.step)
        physical = cfg.physical_batch_size or cfg.batch_size
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for start in range(0, len(indices), physical):
            micro = indices[start:start + physical]
            x, y = self._fetch(micro)
            x = augment_batch(x, cfg.augmentation, gen)
            loss, metrics = self.objective.loss(self.model, x, y, self.step, gen)
            # Weighted by micro-batch size: the accumulated gradient equals the full batch's.
            (loss * (len(micro) / len(indices))).backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * len(micro) / len(indices)
        self.optimizer.step()
        self.step += 1
        return sums

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "epoch": self.epoch, "config": self.config.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_config = TrainConfig.model_validate(state["config"])
        if saved_config.model_copy(update={"epochs": self.config.epochs}) != self.config:
            raise ValueError("checkpoint was trained with another configuration: "
                             f"{saved_config} vs {self.config}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
