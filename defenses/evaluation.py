"""Evaluation of a trained classifier: clean accuracy, PGD accuracy, IBP-verified accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defenses.attacks import default_alpha, robust_accuracy
from defenses.ibp import verified
from defenses.models import eval_mode

__all__ = ["accuracy", "evaluate_robustness"]


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 512,
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode."""
    device = device or next(model.parameters()).device
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    correct = total = 0
    with eval_mode(model):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    return correct / max(total, 1)


@torch.no_grad()
def evaluate_robustness(model: nn.Module, data: Dataset, eps: float, steps: int = 20,
                        alpha: float | None = None, restarts: int = 1, verify: bool = False,
                        batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Clean, PGD (random start) and, with ``verify``, IBP-verified accuracy at ``eps``.

    Keys (DESIGN.md metric names): ``nominal_accuracy`` (clean inputs), ``pgd_accuracy``
    (``steps`` of PGD of step ``alpha``, by default ``default_alpha(eps, steps)``, with
    ``restarts`` random starts) and, with verify, ``verified_accuracy``.
    """
    alpha = default_alpha(eps, steps) if alpha is None else alpha
    out = {"nominal_accuracy": accuracy(model, data, batch_size)}
    with torch.enable_grad():
        out["pgd_accuracy"] = robust_accuracy(model, data, eps, alpha, steps, restarts,
                                              batch_size, seed)
    if verify:
        device = next(model.parameters()).device
        proven = total = 0
        with eval_mode(model):
            for x, y in DataLoader(data, batch_size=batch_size):
                x, y = x.to(device), y.to(device)
                proven += int(verified(model, x, y, eps).sum())
                total += y.numel()
        out["verified_accuracy"] = proven / max(total, 1)
    return out
