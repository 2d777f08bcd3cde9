"""L-infinity attacks in pixel space: FGSM and PGD (SPEC.md section 3).

The model runs in eval mode during an attack (its mode is restored after) and gradients are
taken with respect to the input only: nothing accumulates in the model's parameters.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fgsm", "pgd", "robust_accuracy"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(eps: float, x: torch.Tensor) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("inputs must be pixels in [0, 1]")


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of the summed loss w.r.t. x, per-sample loss), parameters untouched."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        per_sample = loss_fn(model(x), y)
        (grad,) = torch.autograd.grad(per_sample.sum(), x)
    return grad, per_sample.detach()


def _per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


class _EvalMode:
    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         loss_fn: LossFn = _per_sample_ce) -> torch.Tensor:
    """``clip(x + eps * sign(grad_x loss), 0, 1)`` (Goodfellow et al. 2015)."""
    _check(eps, x)
    with _EvalMode(model):
        grad, _ = _input_grad(model, x, y, loss_fn)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
        steps: int, random_start: bool = True, restarts: int = 1,
        generator: torch.Generator | None = None, loss_fn: LossFn = _per_sample_ce
        ) -> torch.Tensor:
    """Projected gradient ascent on the loss in the L-inf eps-ball, inside [0, 1] (Madry et al.).

    Args:
        alpha: step size; steps: iterations per restart.
        random_start: start uniformly in the eps-ball (else at x).
        restarts: independent runs; per sample, keep the run with the highest final loss
            (a misclassifying one first).
        generator: randomness of the starts (a CPU generator).
    """
    _check(eps, x)
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got {steps} and {restarts}")
    x = x.detach()
    best = x.clone()
    best_key = torch.full((x.shape[0],), -float("inf"), device=x.device)
    with _EvalMode(model):
        for _ in range(restarts):
            if random_start:
                noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
                adv = (x + eps * noise).clamp(0.0, 1.0)
            else:
                adv = x.clone()
            for _ in range(steps):
                grad, _ = _input_grad(model, adv, y, loss_fn)
                adv = adv + alpha * grad.sign()
                adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0)
            with torch.no_grad():
                logits = model(adv)
                loss = loss_fn(logits, y)
                # misclassified beats any loss value; then the larger loss
                key = loss + (logits.argmax(1) != y).float() * 1e6
            better = key > best_key
            best[better] = adv[better]
            best_key = torch.where(better, key, best_key)
    return best.detach()


def robust_accuracy(model: nn.Module, data, eps: float, alpha: float, steps: int,
                    restarts: int = 1, batch_size: int = 256, seed: int = 0,
                    device: torch.device | str | None = None) -> float:
    """Accuracy of ``model`` on PGD examples of ``data`` (a Dataset or iterable of batches)."""
    from defenses.activations import batches

    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for x, y in batches(data, batch_size):
        x, y = x.to(device), y.to(device)
        adv = pgd(model, x, y, eps, alpha, steps, restarts=restarts, generator=gen)
        with torch.no_grad(), _EvalMode(model):
            correct += int((model(adv).argmax(1) == y).sum())
        total += y.numel()
    return correct / max(total, 1)
