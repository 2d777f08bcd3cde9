"""One training loop with pluggable objectives, resumable exactly from a checkpoint.

Randomness (shuffling, augmentation, attack starts) comes from generators seeded by
``(seed, epoch)`` and ``(seed, step)``, so a run resumed from a checkpoint at any step makes the
same updates as one that was never interrupted.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defenses.data import Augmentation, augment_batch

__all__ = [
    "Optimizer",
    "LRSchedule",
    "TrainConfig",
    "Objective",
    "StandardObjective",
    "Trainer",
    "learning_rate",
    "accuracy",
    "step_generator",
]


class Optimizer(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"
    STEP = "step"  # multiply by lr_gamma at each of lr_milestones (in steps)


@dataclass(frozen=True)
class TrainConfig:
    """What a training run needs besides the model, the data and the objective.

    batch_size is the virtual batch (one optimiser step); physical_batch_size, when smaller,
    splits it into accumulated micro-batches of the same total gradient.
    """

    epochs: int = 20
    batch_size: int = 64
    physical_batch_size: int | None = None
    lr: float = 1e-3
    optimizer: Optimizer = Optimizer.ADAM
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", Optimizer(self.optimizer))
        object.__setattr__(self, "lr_schedule", LRSchedule(self.lr_schedule))
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.physical_batch_size is not None and not (
                1 <= self.physical_batch_size <= self.batch_size):
            raise ValueError(f"physical_batch_size must be in 1..batch_size={self.batch_size}, "
                             f"got {self.physical_batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["optimizer"] = self.optimizer.value
        d["lr_schedule"] = self.lr_schedule.value
        return d


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimiser step ``step`` (a pure function of the step)."""
    if config.lr_schedule is LRSchedule.COSINE:
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if config.lr_schedule is LRSchedule.STEP:
        return config.lr * config.lr_gamma ** sum(step >= m for m in config.lr_milestones)
    return config.lr


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for everything random in one step; same seed and step, same draws."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return gen


class Objective(Protocol):
    """A training objective: the loss of one (micro-)batch at a given optimiser step.

    ``loss`` returns (scalar loss, metrics of that batch as floats); it may run attacks or
    bound propagation, drawing randomness only from ``generator``.
    """

    name: str

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        ...


class StandardObjective:
    """Cross-entropy on clean inputs."""

    name = "standard"

    def loss(self, model, x, y, step, generator):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_loss": float(loss.detach()),
                      "train_accuracy": float((logits.argmax(1) == y).float().mean())}


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 512,
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode."""
    device = device or next(model.parameters()).device
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    model.train(was_training)
    return correct / max(total, 1)


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
        self.objective = objective or StandardObjective()
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
        out.update(epoch=float(self.epoch), lr=learning_rate(cfg, self.step, self.total_steps))
        return out

    def _train_step(self, indices: torch.Tensor) -> dict[str, float]:
        cfg = self.config
        lr = learning_rate(cfg, self.step, self.total_steps)
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
        saved = dict(state["config"])
        saved["augmentation"] = Augmentation(**saved["augmentation"])
        saved["lr_milestones"] = tuple(saved["lr_milestones"])
        saved_config = TrainConfig(**saved)
        if replace(saved_config, epochs=self.config.epochs) != self.config:
            raise ValueError("checkpoint was trained with another configuration: "
                             f"{saved_config} vs {self.config}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
