"""L-infinity attacks in pixel space: FGSM, PGD, APGD with the cross-entropy or DLR loss
(untargeted or targeted), and the black-box Square attack (Goodfellow et al. 2015; Madry et
al. 2018; Croce & Hein 2020; Andriushchenko et al. 2020).

The model runs in eval mode during an attack (its mode is restored after) and gradients are
taken with respect to the input only: nothing accumulates in the model's parameters. Every
attack ascends an *objective* ``(x_adv [n, ...], rows [n]) -> (loss [n], success [n] bool)``;
``cross_entropy_objective`` is the usual one.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defenses.activations import batches
from defenses.models import eval_mode

__all__ = ["fgsm", "pgd", "apgd", "square", "robust_accuracy", "default_alpha",
           "cross_entropy_objective", "dlr_objective", "dlr_loss", "margin", "top_wrong_classes",
           "Objective", "PerSampleLoss"]

# (x_adv [n, ...], rows [n]: their indices into the attacked batch) -> (loss [n] to ascend,
# success [n] bool: x_adv already fools the decision under attack)
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# x_adv [b, ...] -> per-sample loss [b] to ascend
PerSampleLoss = Callable[[torch.Tensor], torch.Tensor]


def default_alpha(eps: float, steps: int) -> float:
    """PGD's step when none is given: 2.5 eps / steps, so the steps can cross the ball
    (Madry et al.); the one place this default lives."""
    return 2.5 * eps / max(steps, 1)


def _check(eps: float, x: torch.Tensor) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("inputs must be pixels in [0, 1]")


def cross_entropy_objective(model: nn.Module, y: torch.Tensor) -> Objective:
    """The cross-entropy of ``model(x_adv)`` against ``y[rows]``; success: misclassified."""
    def objective(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(z)
        return (F.cross_entropy(logits, y[rows], reduction="none"),
                logits.argmax(1) != y[rows])
    return objective


def _loss_objective(loss: PerSampleLoss) -> Objective:
    """A per-sample loss as an objective that never declares success."""
    def objective(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loss(z), torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    return objective


def _evaluate(objective: Objective, z: torch.Tensor, rows: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, success, gradient of the summed loss w.r.t. z), all detached; parameters
    untouched."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, success = objective(z, rows)
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), success.detach(), grad.detach()


def _uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None
                   ) -> torch.Tensor:
    """x plus uniform noise in [-eps, eps] (drawn on the CPU generator), not yet projected."""
    return x + eps * (torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         loss: PerSampleLoss | None = None) -> torch.Tensor:
    """``clip(x + eps * sign(grad_x loss), 0, 1)`` (Goodfellow et al. 2015): one PGD step of
    size eps from x."""
    return pgd(model, x, y, eps, eps, 1, random_start=False, loss=loss)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
        steps: int, random_start: bool = True, restarts: int = 1,
        generator: torch.Generator | None = None, loss: PerSampleLoss | None = None
        ) -> torch.Tensor:
    """Projected gradient ascent on a loss in the L-inf eps-ball, inside [0, 1] (Madry et al.).

    Args:
        alpha: step size; steps: iterations per restart.
        random_start: start uniformly in the eps-ball (else at x).
        restarts: independent runs; per sample, keep the run with the highest final loss
            (with the default loss, a misclassifying one first).
        generator: randomness of the starts (a CPU generator).
        loss: ``x_adv [b, ...] -> [b]`` per-sample losses to maximise (any objective: a
            margin, a feature distance, ...); default the cross-entropy of ``model(x_adv)``
            against ``y``. The model is in eval mode while it runs.

    Returns:
        x_adv, the same shape as x, detached.
    """
    _check(eps, x)
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got {steps} and {restarts}")
    objective = cross_entropy_objective(model, y) if loss is None else _loss_objective(loss)
    x = x.detach()
    rows = torch.arange(x.shape[0], device=x.device)
    low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    best, best_key = x.clone(), torch.full((x.shape[0],), -math.inf, device=x.device)
    with eval_mode(model):
        for _ in range(restarts):
            adv = _uniform_start(x, eps, generator).clamp(0.0, 1.0) if random_start else x
            for _ in range(steps):
                _, _, grad = _evaluate(objective, adv, rows)
                adv = torch.min(torch.max(adv + alpha * grad.sign(), low), high)
            if restarts == 1:  # nothing to choose from
                return adv.detach()
            with torch.no_grad():
                value, success = objective(adv, rows)
                key = value + success.to(value.dtype) * 1e6  # success beats any loss value
            better = key > best_key
            best[better] = adv[better]
            best_key = torch.where(better, key, best_key)
    return best.detach()


def robust_accuracy(model: nn.Module, data, eps: float, alpha: float, steps: int,
                    restarts: int = 1, batch_size: int = 256, seed: int = 0,
                    device: torch.device | str | None = None) -> float:
    """Accuracy of ``model`` on PGD examples of ``data`` (a Dataset or iterable of batches)."""
    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for x, y in batches(data, batch_size):
        x, y = x.to(device), y.to(device)
        adv = pgd(model, x, y, eps, alpha, steps, restarts=restarts, generator=gen)
        with torch.no_grad(), eval_mode(model):
            correct += int((model(adv).argmax(1) == y).sum())
        total += y.numel()
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------------------
# APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness ...")


def _apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), times ``steps``."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p[1:] if q <= 1})


def apgd(objective: Objective, x: torch.Tensor, eps: float, steps: int = 100,
         restarts: int = 1, generator: torch.Generator | None = None, rho: float = 0.75,
         momentum: float = 0.75, starts: Sequence[torch.Tensor] = ()
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """L-inf APGD: gradient ascent on ``objective`` with APGD's step-size schedule and momentum.

    Args:
        objective: ``(x_adv [n, ...], rows [n]) -> (loss [n], success [n] bool)``, ``rows``
            the indices into ``x`` of the samples in ``x_adv`` (to pick their labels). The loss
            is ascended; ``success`` says, on the real decision, whether ``x_adv`` already fools
            it. A sample that succeeds keeps that point and leaves the attack.
        eps: L-inf radius in pixel units; every iterate stays in the eps-ball and in [0, 1].
        steps: iterations per run; restarts: runs from uniform random starts. Every run
            attacks only the samples no earlier run fooled.
        rho, momentum: APGD's constants (0.75 each in the paper).
        starts: runs before the random ones, each from the given points (e.g. another
            attack's examples [b, ...], projected to the ball).

    Returns:
        (x_adv [b, ...], succeeded [b] bool): the first fooling point per sample, else the point
        of the highest loss seen.
    """
    _check(eps, x)
    if steps < 1 or restarts < 0 or len(starts) + restarts < 1:
        raise ValueError(f"need steps >= 1 and at least one run (starts + restarts), got "
                         f"{steps} steps, {len(starts)} starts and {restarts} restarts")
    x = x.detach()
    best = x.clone()
    with torch.no_grad():
        best_loss, succeeded = objective(x, torch.arange(x.shape[0], device=x.device))
    best_loss, succeeded = best_loss.detach().clone(), succeeded.detach().clone()
    best[succeeded] = x[succeeded]
    checkpoints = set(_apgd_checkpoints(steps))
    for run in range(len(starts) + restarts):
        rows = torch.nonzero(~succeeded).flatten()
        if rows.numel() == 0:
            break
        if run < len(starts):
            begin = starts[run].detach()[rows].to(x.device, x.dtype)
        else:
            begin = _uniform_start(x[rows], eps, generator)
        run = _APGDRun(objective, x, rows, eps, begin)
        for it in range(1, steps + 1):
            run.step(momentum if it > 1 else 1.0)
            run.retire(best, best_loss, succeeded)
            if run.empty:
                break
            if it in checkpoints:
                run.checkpoint(rho)
        run.retire(best, best_loss, succeeded, everyone=True)
    return best.detach(), succeeded


class _APGDRun:
    """One APGD restart over the samples ``rows``; samples that succeed leave the batch."""

    def __init__(self, objective: Objective, x: torch.Tensor, rows: torch.Tensor, eps: float,
                 start: torch.Tensor):
        self.objective, self.rows = objective, rows
        self.low, self.high = (x[rows] - eps).clamp(0, 1), (x[rows] + eps).clamp(0, 1)
        self.view = (-1,) + (1,) * (x.ndim - 1)
        self.current = self.project(start)
        self.previous = self.current
        self.eta = torch.full((rows.numel(),), 2.0 * eps, device=x.device, dtype=x.dtype)
        self.loss, self.hit, self.grad = _evaluate(self.objective, self.current, self.rows)
        self.best, self.best_loss = self.current.clone(), self.loss.clone()
        self.increases = torch.zeros_like(self.eta)
        self.last_check, self.loss_at_check = 0, self.best_loss.clone()
        self.eta_at_check = self.eta.clone()
        self.steps_taken = 0

    @property
    def empty(self) -> bool:
        return self.rows.numel() == 0

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return torch.min(torch.max(z, self.low), self.high)

    def step(self, momentum: float) -> None:
        z = self.project(self.current + self.eta.view(self.view) * self.grad.sign())
        proposal = self.project(self.current + momentum * (z - self.current)
                                + (1 - momentum) * (self.current - self.previous))
        self.previous, self.current = self.current, proposal
        loss, self.hit, self.grad = _evaluate(self.objective, self.current, self.rows)
        self.increases += (loss > self.loss).to(self.increases.dtype)
        self.loss = loss
        better = loss > self.best_loss
        self.best[better] = self.current[better]
        self.best_loss = torch.where(better, loss, self.best_loss)
        self.steps_taken += 1

    def checkpoint(self, rho: float) -> None:
        """Halve the step of samples whose loss rose in fewer than rho of the steps since the
        last checkpoint, or whose step and best loss both stood still; they go on from their
        best point."""
        window = self.steps_taken - self.last_check
        stalled = self.increases < rho * window
        stuck = (self.eta == self.eta_at_check) & (self.best_loss == self.loss_at_check)
        halve = stalled | stuck
        self.eta_at_check = self.eta.clone()
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        if bool(halve.any()):
            mask = halve.view(self.view)
            self.current = torch.where(mask, self.best, self.current)
            self.previous = torch.where(mask, self.current, self.previous)
            self.loss, self.hit, self.grad = _evaluate(self.objective, self.current, self.rows)
        self.increases.zero_()
        self.last_check, self.loss_at_check = self.steps_taken, self.best_loss.clone()

    def retire(self, best: torch.Tensor, best_loss: torch.Tensor, succeeded: torch.Tensor,
               everyone: bool = False) -> None:
        """Write back the samples that succeeded (their fooling point), or with ``everyone``
        all of them (their best point, where it beats earlier restarts); drop them."""
        leave = torch.ones_like(self.hit) if everyone else self.hit
        if not bool(leave.any()):
            return
        rows = self.rows[leave]
        hit = self.hit[leave]
        chosen = torch.where(hit.view(self.view), self.current[leave], self.best[leave])
        improve = hit | (self.best_loss[leave] > best_loss[rows])
        best[rows[improve]] = chosen[improve]
        best_loss[rows[improve]] = torch.where(hit, torch.full_like(self.best_loss[leave],
                                               math.inf), self.best_loss[leave])[improve]
        succeeded[rows] |= hit
        keep = ~leave
        for name in ("rows", "low", "high", "current", "previous", "eta", "loss", "hit", "grad",
                     "best", "best_loss", "increases", "loss_at_check", "eta_at_check"):
            setattr(self, name, getattr(self, name)[keep])


# ------------------------------------------------------------------------------------------------
# the losses of AutoAttack (Croce & Hein 2020): DLR, untargeted and targeted, and the margin


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per sample: negative when another class scores higher, 0 at
    a tie (success is judged by ``argmax != y`` everywhere, as the decision is)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return true - other


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
             ) -> torch.Tensor:
    """The Difference of Logits Ratio to ascend (Croce & Hein 2020, eqs. 6 and 7): untargeted
    ``-(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3)``; toward ``target`` t,
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, pi the logits sorted in decreasing
    order. Invariant to shifting and scaling the logits. Needs at least 3 (targeted: 4)
    classes."""
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        if logits.shape[1] < 3:
            raise ValueError(f"DLR needs at least 3 classes, got {logits.shape[1]}")
        return -margin(logits, y) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    if logits.shape[1] < 4:
        raise ValueError(f"targeted DLR needs at least 4 classes, got {logits.shape[1]}")
    aimed = logits.gather(1, target[:, None]).squeeze(1)
    return -(true - aimed) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)


def dlr_objective(model: nn.Module, y: torch.Tensor, target: torch.Tensor | None = None
                  ) -> Objective:
    """The DLR loss of ``model(x_adv)`` (toward ``target[rows]`` if given); success:
    misclassified (any wrong class, also in the targeted run)."""
    def objective(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(z)
        loss = dlr_loss(logits, y[rows], None if target is None else target[rows])
        return loss, logits.argmax(1) != y[rows]
    return objective


def top_wrong_classes(logits: torch.Tensor, y: torch.Tensor, count: int) -> torch.Tensor:
    """[b, count]: the ``count`` likeliest wrong classes of each sample, likeliest first
    (APGD-T's targets)."""
    count = min(count, logits.shape[1] - 1)
    return logits.scatter(1, y[:, None], -math.inf).topk(count, dim=1).indices


# ------------------------------------------------------------------------------------------------
# Square (Andriushchenko et al. 2020): score-based black box, L-inf


def _square_fraction(p_init: float, query: int, queries: int) -> float:
    """The share of pixels a square covers at ``query`` of ``queries``: the paper's schedule
    for 10,000 queries, rescaled to the budget."""
    i = int(query / queries * 10_000)
    for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                           (4000, 64), (6000, 128), (8000, 256)):
        if i <= bound:
            return p_init / divisor
    return p_init / 512


@torch.no_grad()
def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
           queries: int = 1000, restarts: int = 1, p_init: float = 0.8,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L-inf Square attack: random search over vertices of the eps-box, one square window
    at a time, keeping a change only if it lowers the margin loss; it uses the model's
    outputs only (no gradients, so gradient masking does not stop it).

    Args:
        queries: model evaluations per sample and restart (the first is the stripes init).
        restarts: independent runs; every run attacks only the samples no earlier one fooled.
        p_init: the starting share of pixels a square covers (0.8 as in AutoAttack).
        generator: a CPU generator for every random draw.

    Returns:
        (x_adv [b, ...], succeeded [b] bool): a fooling point where one was found, else the
        point of the lowest margin.
    """
    _check(eps, x)
    if x.ndim != 4:
        raise ValueError(f"square needs images [b, c, h, w], got shape {tuple(x.shape)}")
    if queries < 1 or restarts < 1:
        raise ValueError(f"queries and restarts must be >= 1, got {queries} and {restarts}")
    x = x.detach()
    b, c, h, w = x.shape
    low, high = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)

    def draw(*shape: int) -> torch.Tensor:  # uniform {-1, +1}
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(x.device, x.dtype)

    def loss(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(z)  # (margin to lower, fooled: the decision is wrong)
        return margin(logits, y[rows]), logits.argmax(1) != y[rows]

    with eval_mode(model):
        best = x.clone()
        best_loss, succeeded = loss(x, torch.arange(b, device=x.device))
        for _ in range(restarts):
            rows = torch.nonzero(~succeeded).flatten()
            if rows.numel() == 0:
                break
            # vertical stripes of +-eps: the init of the paper
            current = torch.min(torch.max(x[rows] + eps * draw(rows.numel(), c, 1, w),
                                          low[rows]), high[rows])
            current_loss, fooled = loss(current, rows)
            for query in range(1, queries):
                alive = ~fooled
                if not bool(alive.any()):
                    break
                side = max(int(round(math.sqrt(_square_fraction(p_init, query, queries)
                                               * h * w))), 1)
                side = min(side, h, w)
                top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
                idx = torch.nonzero(alive).flatten()
                window = (slice(None), slice(None), slice(top, top + side),
                          slice(left, left + side))
                centre = x[rows[idx]][window]
                box_low, box_high = low[rows[idx]][window], high[rows[idx]][window]
                old = current[idx][window]
                # a new +-eps per channel over the window (around x, clipped to the box),
                # drawn again where it would leave the window as it is (a wasted query)
                new = torch.min(torch.max(centre + eps * draw(idx.numel(), c, 1, 1), box_low),
                                box_high)
                for _ in range(10):
                    same = (new - old).abs().flatten(1).amax(1) < 1e-7
                    if not bool(same.any()):
                        break
                    redraw = torch.min(torch.max(
                        centre[same] + eps * draw(int(same.sum()), c, 1, 1), box_low[same]),
                        box_high[same])
                    new[same] = redraw
                proposal = current[idx].clone()
                proposal[window] = new
                new_loss, new_fooled = loss(proposal, rows[idx])
                better = (new_loss < current_loss[idx]) | new_fooled
                current[idx[better]] = proposal[better]
                current_loss[idx[better]] = new_loss[better]
                fooled[idx[better]] = new_fooled[better]
            improve = fooled | (current_loss < best_loss[rows])
            best[rows[improve]] = current[improve]
            best_loss[rows[improve]] = current_loss[improve]
            succeeded[rows] |= fooled
    return best.detach(), succeeded
