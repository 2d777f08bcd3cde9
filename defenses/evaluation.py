"""Evaluation of a trained classifier: clean accuracy, PGD accuracy, the worst case of an
AutoAttack-style suite, verified accuracy (IBP, CROWN-IBP and the best of the two)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defenses.activations import batches
from defenses.attacks import (apgd, cross_entropy_objective, default_alpha, dlr_objective, pgd,
                              robust_accuracy, square, top_wrong_classes)
from defenses.crown import certificates
from defenses.models import eval_mode

__all__ = ["accuracy", "evaluate_robustness", "verified_accuracy", "AttackSuite",
           "suite_accuracy"]


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
                        batch_size: int = 256, seed: int = 0,
                        suite: AttackSuite | None = None, alpha_crown: bool = False
                        ) -> dict[str, float]:
    """Clean, PGD (random start) and, with ``verify``, verified accuracy at ``eps``.

    Keys (the metric names a sweep reports): ``nominal_accuracy`` (clean inputs), ``pgd_accuracy``
    (``steps`` of PGD of step ``alpha``, by default ``default_alpha(eps, steps)``, with
    ``restarts`` random starts) and, with verify, ``verified_accuracy`` and each certificate's
    figure (``verified_accuracy``'s function). With ``suite``, the
    keys of ``suite_accuracy`` too, its PGD run (the suite's steps, alpha and restarts) giving
    ``pgd_accuracy``: PGD runs once. With ``alpha_crown`` (and verify), alpha-CROWN joins the
    certificates (``verified_alpha_crown_accuracy``, and in ``verified_accuracy``'s best).
    """
    out = {"nominal_accuracy": accuracy(model, data, batch_size)}
    if suite is not None:
        out.update(suite_accuracy(model, data, eps, suite, batch_size, seed))
    else:
        alpha = default_alpha(eps, steps) if alpha is None else alpha
        with torch.enable_grad():
            out["pgd_accuracy"] = robust_accuracy(model, data, eps, alpha, steps, restarts,
                                                  batch_size, seed)
    if verify:
        out.update(verified_accuracy(model, data, eps, batch_size, alpha=alpha_crown))
    return out


@torch.no_grad()
def verified_accuracy(model: nn.Module, data: Dataset, eps: float, batch_size: int = 256,
                      alpha: bool = False) -> dict[str, float]:
    """The fraction of ``data`` proven robust at ``eps``: ``verified_ibp_accuracy`` (IBP),
    ``verified_crown_accuracy`` (CROWN-IBP: CROWN's backward pass on IBP's pre-activation
    bounds), with ``alpha`` ``verified_alpha_crown_accuracy`` (alpha-CROWN on the same
    bounds), and ``verified_accuracy``, the best sound certificate: each margin bounded by the
    tightest of them (``defenses.crown.certificates``), so never below any."""
    device = next(model.parameters()).device
    proven = {"ibp": 0, "crown": 0, "best": 0, **({"alpha_crown": 0} if alpha else {})}
    total = 0
    with eval_mode(model):
        for x, y in DataLoader(data, batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            for name, hit in certificates(model, x, y, eps, alpha=alpha).items():
                proven[name] += int(hit.sum())
            total += y.numel()
    names = {"best": "verified_accuracy", "ibp": "verified_ibp_accuracy",
             "crown": "verified_crown_accuracy", "alpha_crown": "verified_alpha_crown_accuracy"}
    return {names[k]: v / max(total, 1) for k, v in proven.items()}


class AttackSuite(BaseModel):
    """The budget of the suite behind ``robust_accuracy``, AutoAttack-style (APGD-CE, APGD-T,
    Square; no FAB-T) at a reduced default budget (standard AutoAttack: 9 targets, 5,000 Square
    queries), plus PGD: PGD (``steps`` of step ``alpha``, ``restarts`` random starts), APGD-CE,
    APGD-T toward each of the ``targets`` likeliest wrong classes (DLR loss), and Square
    (``square_queries`` model queries per run; 0: off). Every APGD attack makes
    ``1 + apgd_restarts`` runs from random starts; Square ``square_restarts`` runs. A sample
    counts as robust only if every attack of the suite fails on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=20, ge=1)
    alpha: float | None = Field(default=None, gt=0.0)
    restarts: int = Field(default=1, ge=1)
    apgd_steps: int = Field(default=100, ge=1)
    apgd_restarts: int = Field(default=1, ge=0)
    targets: int = Field(default=3, ge=0)
    square_queries: int = Field(default=1000, ge=0)  # 0: no Square
    square_restarts: int = Field(default=1, ge=1)

    def described(self) -> dict[str, str | int | float]:
        """The budget as flat parameters (``attack.*`` on a sweep's parent run)."""
        return {"pgd": f"{self.steps} steps x {self.restarts}",
                "apgd_ce": f"{self.apgd_steps} steps x {1 + self.apgd_restarts}",
                "apgd_t": (f"{self.targets} targets x {self.apgd_steps} steps x "
                           f"{1 + self.apgd_restarts}"
                           if self.targets else "off"),
                "square": (f"{self.square_queries} queries x {self.square_restarts}"
                           if self.square_queries else "off")}


def suite_accuracy(model: nn.Module, data: Dataset, eps: float, suite: AttackSuite | None = None,
                   batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Accuracy under each attack of ``suite`` and under their per-sample worst case.

    Keys: ``pgd_accuracy``, ``apgd_ce_accuracy``, ``apgd_t_accuracy``, ``square_accuracy``
    (each attack alone, on all samples; an attack that does not run, APGD-T with no targets or
    fewer than 4 classes, Square with no queries, has no key) and ``robust_accuracy`` (a sample
    counts only if it is classified right clean and under every attack). Since PGD is in the
    suite, the worst case is never above ``pgd_accuracy``.
    """
    suite = suite or AttackSuite()
    alpha = default_alpha(eps, suite.steps) if suite.alpha is None else suite.alpha
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    right: dict[str, int] = {"robust": 0}
    total = 0
    with eval_mode(model):
        for x, y in batches(data, batch_size):
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                clean_logits = model(x)
            robust = clean_logits.argmax(1) == y
            with torch.enable_grad():
                adv = pgd(model, x, y, eps, alpha, suite.steps, restarts=suite.restarts,
                          generator=gen)
            with torch.no_grad():
                held = model(adv).argmax(1) == y
            fooled = {"pgd": ~held}
            runs = 1 + suite.apgd_restarts
            _, fooled["apgd_ce"] = apgd(cross_entropy_objective(model, y), x, eps,
                                        suite.apgd_steps, runs, gen)
            if suite.targets and clean_logits.shape[1] >= 4:
                targeted = torch.zeros_like(robust)
                for target in top_wrong_classes(clean_logits, y, suite.targets).T:
                    _, hit = apgd(dlr_objective(model, y, target), x, eps, suite.apgd_steps,
                                  runs, gen)
                    targeted |= hit
                fooled["apgd_t"] = targeted
            if suite.square_queries:
                _, fooled["square"] = square(model, x, y, eps, suite.square_queries,
                                             suite.square_restarts, generator=gen)
            worst = robust.clone()
            for name, hit in fooled.items():
                right[name] = right.get(name, 0) + int((robust & ~hit).sum())
                worst &= ~hit
            right["robust"] += int(worst.sum())
            total += y.numel()
    return {f"{name}_accuracy": count / max(total, 1) for name, count in right.items()}
