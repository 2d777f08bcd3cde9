"""One training loop with pluggable objectives, resumable exactly from a checkpoint.

Randomness (shuffling, augmentation, attack starts) comes from generators seeded by
``(seed, epoch)`` and ``(seed, step)``, so a run resumed from a checkpoint at any step makes the
same updates as one that was never interrupted.
"""

from __future__ import annotations

import enum
import inspect
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defenses.attacks import fgsm, pgd, robust_accuracy
from defenses.data import Augmentation, augment_batch
from defenses.ibp import Ramp, eps_schedule, ibp_loss, kappa_schedule, verified

__all__ = [
    "Optimizer",
    "LRSchedule",
    "TrainConfig",
    "Objective",
    "StandardObjective",
    "FGSMObjective",
    "FastFGSMObjective",
    "PGDObjective",
    "AdversarialRegularization",
    "IBPObjective",
    "ObjectiveName",
    "make_objective",
    "objective_parameters",
    "evaluate_robustness",
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
        return loss, {"train_loss": float(loss.detach()), "train_accuracy": _acc(logits, y)}


class FGSMObjective:
    """FGSM adversarial training: ``mix * L(x) + (1 - mix) * L(fgsm(x))`` (Goodfellow et al.)."""

    name = "fgsm"

    def __init__(self, eps: float, mix: float = 0.5):
        _check_range("eps", eps, 0.0, 1.0)
        _check_range("mix", mix, 0.0, 1.0)
        self.eps, self.mix = eps, mix

    def loss(self, model, x, y, step, generator):
        adv = fgsm(model, x, y, self.eps)
        logits, adv_logits = model(x), model(adv)
        loss = self.mix * F.cross_entropy(logits, y) + (1 - self.mix) * F.cross_entropy(
            adv_logits, y)
        return loss, {"train_loss": float(loss.detach()),
                      "train_accuracy": _acc(logits, y), "train_adv_accuracy": _acc(adv_logits, y)}


class FastFGSMObjective:
    """FGSM from a random start, trained on the adversarial input only (Wong et al. 2020)."""

    name = "fast_fgsm"

    def __init__(self, eps: float, alpha: float | None = None):
        _check_range("eps", eps, 0.0, 1.0)
        self.eps = eps
        self.alpha = 1.25 * eps if alpha is None else alpha
        _check_range("alpha", self.alpha, 0.0, 1.0)

    def loss(self, model, x, y, step, generator):
        adv = pgd(model, x, y, self.eps, self.alpha, steps=1, random_start=True,
                  generator=generator)
        logits = model(adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_loss": float(loss.detach()), "train_adv_accuracy": _acc(logits, y)}


class PGDObjective:
    """PGD adversarial training on the worst case found by ``steps`` of PGD (Madry et al.)."""

    name = "pgd"

    def __init__(self, eps: float, alpha: float, steps: int, restarts: int = 1):
        _check_range("eps", eps, 0.0, 1.0)
        _check_range("alpha", alpha, 0.0, 1.0)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.eps, self.alpha, self.steps, self.restarts = eps, alpha, steps, restarts

    def loss(self, model, x, y, step, generator):
        adv = pgd(model, x, y, self.eps, self.alpha, self.steps, restarts=self.restarts,
                  generator=generator)
        logits = model(adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_loss": float(loss.detach()), "train_adv_accuracy": _acc(logits, y)}


class GradientNorm(str, enum.Enum):
    L2 = "l2"
    L1 = "l1"
    INF = "inf"


class AdversarialRegularization:
    """``L(x) + multiplier * L(x + adv_step_size * d)``, d the unit-norm loss gradient
    direction, ``x_adv`` a constant (Neural Structured Learning's adversarial regularisation).

    Defaults for [0, 1] pixels: the l-infinity direction scaled so its largest entry is 1 and a
    step of 0.05, i.e. no pixel moves by more than 0.05.
    """

    name = "adv_reg"

    def __init__(self, multiplier: float = 0.2, adv_step_size: float = 0.05,
                 norm: GradientNorm | str = GradientNorm.INF):
        if multiplier < 0:
            raise ValueError(f"multiplier must be >= 0, got {multiplier}")
        _check_range("adv_step_size", adv_step_size, 0.0, 1.0)
        try:
            self.norm = GradientNorm(norm)
        except ValueError:
            raise ValueError(f"norm must be one of l2, l1, inf, got {norm!r}") from None
        self.multiplier, self.adv_step_size = multiplier, adv_step_size

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        flat = grad.flatten(1)
        order = {GradientNorm.L2: 2, GradientNorm.L1: 1, GradientNorm.INF: float("inf")}[self.norm]
        norms = torch.linalg.vector_norm(flat, ord=order, dim=1).clamp_min(1e-12)
        return (flat / norms[:, None]).view_as(grad)

    def loss(self, model, x, y, step, generator):
        x_req = x.detach().requires_grad_(True)
        logits = model(x_req)
        clean = F.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(clean, x_req, retain_graph=True)
        adv = (x + self.adv_step_size * self.direction(grad)).clamp(0.0, 1.0).detach()
        adv_logits = model(adv)
        loss = clean + self.multiplier * F.cross_entropy(adv_logits, y)
        return loss, {"train_loss": float(loss.detach()), "train_accuracy": _acc(logits, y),
                      "train_adv_accuracy": _acc(adv_logits, y)}


class IBPObjective:
    """Interval Bound Propagation training with ramped ``eps`` and ``kappa`` (Gowal et al.)."""

    name = "ibp"

    def __init__(self, eps_train: float, warmup: int = 0, rampup: int = 0,
                 kappa_final: float = 0.5, ramp: Ramp | str = Ramp.LINEAR):
        _check_range("eps_train", eps_train, 0.0, 1.0)
        _check_range("kappa_final", kappa_final, 0.0, 1.0)
        if warmup < 0 or rampup < 0:
            raise ValueError(f"warmup and rampup must be >= 0, got {warmup} and {rampup}")
        self.eps_train, self.warmup, self.rampup = eps_train, warmup, rampup
        self.kappa_final, self.ramp = kappa_final, Ramp(ramp)

    def loss(self, model, x, y, step, generator):
        eps = eps_schedule(step, self.eps_train, self.warmup, self.rampup, self.ramp)
        kappa = kappa_schedule(step, self.kappa_final, self.warmup, self.rampup, self.ramp)
        loss, logits, worst = ibp_loss(model, x, y, eps, kappa)
        return loss, {"train_loss": float(loss.detach()), "train_accuracy": _acc(logits, y),
                      "eps": eps, "kappa": kappa}


class ObjectiveName(str, enum.Enum):
    STANDARD = "standard"
    FGSM = "fgsm"
    FAST_FGSM = "fast_fgsm"
    PGD = "pgd"
    ADV_REG = "adv_reg"
    IBP = "ibp"


_OBJECTIVES = {ObjectiveName.STANDARD: StandardObjective, ObjectiveName.FGSM: FGSMObjective,
               ObjectiveName.FAST_FGSM: FastFGSMObjective, ObjectiveName.PGD: PGDObjective,
               ObjectiveName.ADV_REG: AdversarialRegularization, ObjectiveName.IBP: IBPObjective}


def _objective_class(name: str | ObjectiveName) -> type:
    try:
        return _OBJECTIVES[ObjectiveName(name)]
    except ValueError:
        allowed = ", ".join(o.value for o in ObjectiveName)
        raise ValueError(f"unknown objective {name!r}; allowed: {allowed}") from None


def objective_parameters(name: str | ObjectiveName) -> set[str]:
    """The parameters ``make_objective(name, ...)`` accepts."""
    return set(inspect.signature(_objective_class(name)).parameters)


def make_objective(name: str | ObjectiveName, **params: Any) -> Objective:
    """Build an objective by name; unknown names or parameters raise ``ValueError``."""
    cls = _objective_class(name)
    accepted = objective_parameters(name)
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"objective {cls.name!r} takes no parameter(s) {sorted(unknown)}; "
                         f"allowed: {sorted(accepted) or 'none'}")
    return cls(**params)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


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

    def fit(self) -> list[dict[str, float]]:
        """Run the remaining epochs; returns each epoch's metrics."""
        return [self.run_epoch() for _ in range(self.epoch, self.config.epochs)]

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


@torch.no_grad()
def evaluate_robustness(model: nn.Module, data: Dataset, eps: float, pgd_steps: int = 20,
                        pgd_alpha: float | None = None, restarts: int = 1, verify: bool = False,
                        batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Clean, PGD (random start) and, with ``verify``, IBP-verified accuracy at ``eps``.

    Keys: ``clean_accuracy``, ``pgd_accuracy`` and, with verify, ``nominal_accuracy`` (the same
    as clean) and ``verified_accuracy`` (DESIGN.md metric names).
    """
    alpha = pgd_alpha if pgd_alpha is not None else 2.5 * eps / max(pgd_steps, 1)
    clean = accuracy(model, data, batch_size)
    with torch.enable_grad():
        robust = robust_accuracy(model, data, eps, alpha, pgd_steps, restarts, batch_size, seed)
    out = {"clean_accuracy": clean, "pgd_accuracy": robust}
    if verify:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        proven = total = 0
        for x, y in DataLoader(data, batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            proven += int(verified(model, x, y, eps).sum())
            total += y.numel()
        model.train(was_training)
        out.update(nominal_accuracy=clean, verified_accuracy=proven / max(total, 1))
    return out
