"""Attacking LESCI's real decision: an exact margin of the kNN vote, APGD on it, and a suite
whose per-sample worst case over every (k, m) point of a surface is the robust accuracy
(docs/search-spaces.md, "Parameters of `lesci`").

The margin. With s_c(j) the j-th largest cosine similarity between the query's code and class
c's embeddings, and s_~c(r) the r-th largest over every other class, "at least j of the k
nearest neighbours are of class c" holds iff ``g_c(j) = s_c(j) - s_~c(k - j + 1) > 0``. The vote
projects to c at point (k, m) iff c is the majority (ties: the lowest label) with at least m
votes, which is exactly

    proj_c = max_{j = m..k} min( g_c(j), min_{d < c} -g_d(j), min_{d > c} -g_d(j + 1) ) > 0

(some j >= m with at least j votes for c, fewer than j for every lower label and at most j for
every higher one). LESCI is wrong iff it projects to a wrong class, or abstains (no proj_c > 0)
while the model is wrong, so

    loss = max( max_{c != y} proj_c, min(-proj_y, model_margin) )

is positive exactly when LESCI is wrong (up to exact similarity ties, a null set), and it is
differentiable almost everywhere: APGD can climb it. ``model_margin`` is the model's DLR-scaled
logit margin (positive iff the model is wrong), so both paths are on a comparable scale.

Several depths (Deep k-NN, Papernot & McDaniel 2018). With g^l the margins above at depth l
(g^l(0) = +C, g^l(j) = -C for j > k), "T(c) >= n" (at least n of the L*k votes for c) holds iff
``G_c(n) > 0``, where G_c(n) is the max over j_1 + ... + j_L = n of min_l g_c^l(j_l), computed
by the (max, min) recursion ``H_l(n) = max_{0 <= j <= min(k, n)} min(H_{l-1}(n - j), g^l(j))``
(``total_margins``). The projection margin is then the one above with G for g, over
n = m..L*k (``projections``). L = 1 gives G = g: the single-depth margin, unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from defenses.attacks import apgd
from defenses.capture import capture
from defenses.embedding_space import EmbeddingSpace
from defenses.knn import KnnIndex
from defenses.models import eval_mode
from defenses.pca import StreamingPCA
from defenses.surface import SurfacePoint, surface_decisions, true_label_totals

__all__ = ["LESCIDecision", "projection_margins", "count_margins", "total_margins",
           "projections", "wrong_margin", "targeted_margin", "model_margin", "SuiteResult",
           "VoteSuite", "attack_surface"]

# Below any cosine similarity: the similarity of an embedding a class does not have.
_ABSENT = -3.0
# Above any margin of similarities: "certainly true" in the min/max of the margin.
_CERTAIN = 8.0


def model_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(max_{c != y} z_c - z_y) / (z_(1) - z_(3)): positive iff the model is wrong; the DLR
    scaling (Croce & Hein 2020) makes it invariant to the logits' scale. [b]"""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -torch.inf).max(dim=1).values
    ordered = logits.sort(dim=1, descending=True).values
    spread = ordered[:, 0] - ordered[:, min(2, logits.shape[1] - 1)] + 1e-12
    return (others - true) / spread


def _max(x: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    """max over ``dim``, or at ``tau > 0`` its log-sum-exp smoothing (>= the max)."""
    return tau * torch.logsumexp(x / tau, dim=dim) if tau > 0 else x.max(dim=dim).values


def _min(x: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    return -_max(-x, dim, tau)


def _cummin(x: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    return (-tau * torch.logcumsumexp(-x / tau, dim=dim) if tau > 0
            else x.cummin(dim=dim).values)


def count_margins(class_tops: torch.Tensor, other_tops: torch.Tensor, k: int) -> torch.Tensor:
    """g of the module docstring: [b, C, k], ``g[:, c, j - 1] = s_c(j) - s_~c(k - j + 1)``,
    > 0 iff at least j of the k nearest neighbours are of class c.

    Args:
        class_tops: [b, C, >= k] s_c(1..) per class, most similar first (absent: < -1).
        other_tops: [b, C, >= k] s_~c(1..) per class, most similar first.
    """
    return class_tops[:, :, :k] - other_tops[:, :, :k].flip(-1)


def total_margins(gs: Sequence[torch.Tensor], tau: float = 0.0) -> torch.Tensor:
    """G of the module docstring: [b, C, L*k], ``G[:, c, n - 1] > 0`` iff at least n of the
    L*k votes over the depths are for class c. ``gs``: each depth's ``count_margins``
    [b, C, k]; one depth: its g itself. ``tau``: as in ``projections``."""
    g0 = gs[0]
    if len(gs) == 1:
        return g0
    k = g0.shape[2]
    certain = torch.full_like(g0[:, :, :1], _CERTAIN)
    h = torch.cat([certain, g0], dim=2)  # H_1(n), n = 0..k
    steps = torch.arange(k + 1, device=g0.device)
    for g in gs[1:]:
        g_j = torch.cat([certain, g], dim=2)  # g(j), j = 0..k
        top = h.shape[2] - 1 + k  # the new largest total
        # H_{l-1}(n - j) for n = 0..top, j = 0..k; outside 0..(old top): "certainly false"
        padded = torch.cat([torch.full_like(h[:, :, :1], -_CERTAIN).expand(-1, -1, k), h,
                            torch.full_like(h[:, :, :1], -_CERTAIN).expand(-1, -1, k)], dim=2)
        index = torch.arange(top + 1, device=g0.device)[:, None] - steps[None, :] + k
        before = padded[:, :, index]  # [b, C, top + 1, k + 1]
        pair = torch.stack([before, g_j[:, :, None, :].expand_as(before)])
        h = _max(_min(pair, 0, tau), 3, tau)
    return h[:, :, 1:]


def projections(g: torch.Tensor, m: int | None = None, tau: float = 0.0) -> torch.Tensor:
    """proj_c of the module docstring from the count margins ``g`` [b, C, N] (N = k for one
    depth, ``count_margins``; L*k for several, ``total_margins``): > 0 iff the vote
    projects to class c with at least m of its N votes.

    Args:
        m: the minimum votes; None: every m = 1..N at once.
        tau: 0 for the exact margin; > 0 replaces every max and min by a log-sum-exp at that
            temperature (a smooth surrogate whose gradient reaches the runners-up too).

    Returns:
        [b, C] for one m; [b, C, N] (m = 1..N along the last axis) for None.
    """
    votes = g.shape[2]
    if m is not None and not 1 <= m <= votes:
        raise ValueError(f"need 1 <= m <= {votes} (the votes), got m={m}")
    not_g = -g
    certain = torch.full_like(g[:, :1], _CERTAIN)
    # min over d < c of -g_d(j): exclusive prefix minimum over classes
    lower = torch.cat([certain, _cummin(not_g[:, :-1], 1, tau)], dim=1)
    # min over d > c of -g_d(j + 1) (g_d(N + 1): nobody has N + 1 of N votes)
    shifted = torch.cat([not_g[:, :, 1:], torch.full_like(g[:, :, :1], _CERTAIN)], dim=2)
    higher = torch.cat([_cummin(shifted[:, 1:].flip(1), 1, tau).flip(1), certain], dim=1)
    terms = _min(torch.stack([g, lower, higher]), 0, tau)  # [b, C, N] over j
    if m is not None:
        return _max(terms[:, :, m - 1:], 2, tau)
    # max over j >= m for every m: a reverse cumulative maximum
    flipped = terms.flip(-1)
    return (-_cummin(-flipped, 2, tau)).flip(-1)


def projection_margins(class_tops: torch.Tensor, other_tops: torch.Tensor, k: int,
                       m: int | None = None, tau: float = 0.0) -> torch.Tensor:
    """proj_c of one depth's vote at (k, m): ``projections(count_margins(...))``.

    Returns:
        [b, C] for one m; [b, C, k] (m = 1..k along the last axis) for None.
    """
    if m is not None and not 1 <= m <= k:
        raise ValueError(f"need 1 <= m <= k, got m={m}, k={k}")
    return projections(count_margins(class_tops, other_tops, k), m, tau)


def wrong_margin(proj: torch.Tensor, model_margin_: torch.Tensor, y: torch.Tensor,
                 tau: float = 0.0) -> torch.Tensor:
    """> 0 iff LESCI is wrong: it projects to a wrong class, or abstains and the model is
    wrong. ``proj`` [b, C] gives [b]; [b, C, M] (several m) gives [b, M]. ``tau``: as in
    ``projection_margins``."""
    index = y.view(-1, 1, *([1] * (proj.ndim - 2))).expand(-1, 1, *proj.shape[2:])
    true = proj.gather(1, index)[:, 0]
    wrong = _max(proj.scatter(1, index, -torch.inf), 1, tau)
    margin = model_margin_.view(-1, *([1] * (proj.ndim - 2))).expand_as(true)
    return _max(torch.stack([wrong, _min(torch.stack([-true, margin]), 0, tau)]), 0, tau)


def targeted_margin(proj: torch.Tensor, logits: torch.Tensor, target: torch.Tensor
                    ) -> torch.Tensor:
    """> 0 only if LESCI answers ``target``: it projects there, or abstains while the model
    answers ``target`` (a sufficient condition for a wrong answer when target != y).
    ``proj`` [b, C] gives [b]; [b, C, M] gives [b, M]."""
    index = target.view(-1, 1, *([1] * (proj.ndim - 2))).expand(-1, 1, *proj.shape[2:])
    to_target = proj.gather(1, index)[:, 0]
    abstains = -proj.max(dim=1).values
    answers = -model_margin(logits, target).view(-1, *([1] * (proj.ndim - 2)))
    return torch.maximum(to_target, torch.minimum(abstains, answers))


class _VoteLayer:
    """One depth of the vote: its PCA, its embedding space by class (for the differentiable
    similarities) and its kNN index (for the real decision)."""

    def __init__(self, depth: str, pca: StreamingPCA, space: EmbeddingSpace, k_max: int,
                 num_classes: int):
        if not 1 <= k_max <= len(space):
            raise ValueError(f"k_max must be in 1..{len(space)} (the embedding space at "
                             f"{depth!r}), got {k_max}")
        space.check_pca(pca)
        components = pca.components_
        if not isinstance(components, torch.Tensor):
            raise TypeError("LESCIDecision needs a PCA fitted on torch tensors (its components "
                            "on the model's device), got one fitted on numpy arrays")
        self.depth, self.pca, self.space, self.num_classes = depth, pca, space, num_classes
        self.device = components.device
        e = F.normalize(space.embeddings.to(components.device, components.dtype), dim=1)
        labels = space.labels.to(components.device)
        # the embeddings by class, padded to one block [C, n_max, m] (padding masked out)
        counts = torch.bincount(labels, minlength=num_classes)
        n_max = int(counts.max())
        order = torch.argsort(labels, stable=True)
        slot = torch.arange(len(labels), device=labels.device) - torch.cumsum(
            counts, 0).sub(counts)[labels[order]]
        self.blocks = e.new_zeros((num_classes, n_max, e.shape[1]))
        self.blocks[labels[order], slot] = e[order]
        self.padding = torch.arange(n_max, device=labels.device)[None, :] >= counts[:, None]
        self._index: KnnIndex | None = None

    @property
    def index(self) -> KnnIndex:
        if self._index is None:
            self._index = KnnIndex(self.space.embeddings, self.space.labels,
                                   num_classes=self.num_classes, device=self.device)
        return self._index

    def neighbours(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """[b, k] labels of the k nearest embeddings, most similar first."""
        _, idx = self.index.search(codes.detach(), k)
        return self.index.labels[idx.to(self.index.device)]

    def tops(self, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_c(1..k), s_~c(1..k)), each [b, C, k], most similar first; absent: below -1."""
        q = F.normalize(codes, dim=1)
        sims = torch.einsum("bm,cnm->bcn", q, self.blocks).masked_fill(self.padding[None],
                                                                        _ABSENT)
        class_tops = sims.topk(min(k, sims.shape[2]), dim=2).values  # [b, C, k]
        if class_tops.shape[2] < k:
            class_tops = torch.cat([class_tops, class_tops.new_full(
                (*class_tops.shape[:2], k - class_tops.shape[2]), _ABSENT)], dim=2)
        # s_~c(1..k): the first k entries not of class c in the merged top-2k of all classes'
        # lists (class c holds at most k of them, so k others are always among the 2k)
        b, c = class_tops.shape[:2]
        width = min(2 * k, c * k)
        merged, where = class_tops.reshape(b, c * k).topk(width, dim=1)  # [b, 2k]
        owner = where // k
        classes = torch.arange(c, device=codes.device)
        mine = owner[:, None, :] == classes[None, :, None]  # [b, C, 2k]
        position = torch.arange(width, device=codes.device)
        # entries of other classes first, each group in merged (descending) order
        order = (mine.long() * width + position).argsort(dim=2)[:, :, :k]
        others = merged[:, None, :].expand(b, c, width).gather(2, order)
        others = others.masked_fill(mine.gather(2, order), _ABSENT)  # fewer than k others
        return class_tops, others


@dataclass
class LESCIDecision:
    """LESCI of one trial as a function of the input: the real decision through the kNN
    indexes, and the differentiable similarities of the margin.

    ``depth``, ``pca`` and ``space`` are one depth's, or sequences of equal length: a vote
    over several depths (Deep k-NN, Papernot & McDaniel 2018), each depth with its own PCA and
    space."""

    model: nn.Module
    depth: str | Sequence[str]
    pca: StreamingPCA | Sequence[StreamingPCA]
    space: EmbeddingSpace | Sequence[EmbeddingSpace]
    k_max: int
    center: bool = True
    num_classes: int | None = None
    layers: list[_VoteLayer] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        depths = [self.depth] if isinstance(self.depth, str) else list(self.depth)
        pcas = [self.pca] if isinstance(self.pca, StreamingPCA) else list(self.pca)
        spaces = [self.space] if isinstance(self.space, EmbeddingSpace) else list(self.space)
        if not depths or not len(depths) == len(pcas) == len(spaces):
            raise ValueError(f"one PCA and one embedding space per depth: got {len(depths)} "
                             f"depth(s), {len(pcas)} PCA(s), {len(spaces)} space(s)")
        if len(set(depths)) != len(depths):
            raise ValueError(f"each depth once, got {depths}")
        self.num_classes = self.num_classes or max(int(s.labels.max()) for s in spaces) + 1
        self.layers = [_VoteLayer(d, p, s, self.k_max, self.num_classes)
                       for d, p, s in zip(depths, pcas, spaces)]
        self._device = self.layers[0].device

    @property
    def depths(self) -> list[str]:
        return [layer.depth for layer in self.layers]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(codes [b, m] at each depth, logits [b, classes]), differentiable w.r.t. x; the
        model must be in eval mode. One forward pass captures every depth."""
        with capture(self.model, self.depths) as captured:
            logits = self.model(x)
        codes = []
        for layer in self.layers:
            acts = captured[layer.depth][0].reshape(x.shape[0], -1)
            # in the PCA's precision, the embeddings' (transform keeps its input's dtype)
            acts = acts.to(layer.device, layer.blocks.dtype)
            codes.append(layer.pca.transform(acts, layer.space.n_components, self.center))
        return codes, logits

    def neighbours(self, codes: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """[b, L, k]: each depth's k nearest neighbours' labels, most similar first."""
        return torch.stack([layer.neighbours(c, k).to(self._device)
                            for layer, c in zip(self.layers, codes)], dim=1)

    def margins(self, codes: Sequence[torch.Tensor], k: int, tau: float = 0.0) -> torch.Tensor:
        """G [b, C, L*k]: > 0 at (c, n - 1) iff at least n of the votes are for c."""
        return total_margins([count_margins(*layer.tops(c, k), k)
                              for layer, c in zip(self.layers, codes)], tau)

    def projections(self, codes: Sequence[torch.Tensor], k: int, m: int | None = None,
                    tau: float = 0.0) -> torch.Tensor:
        """proj_c at (k, m): [b, C] (or [b, C, L*k] for every m): > 0 iff the vote projects
        to c."""
        return projections(self.margins(codes, k, tau), m, tau)

    @torch.no_grad()
    def decide(self, x: torch.Tensor, points: Sequence[SurfacePoint]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The real decision at every point: (prediction [b, P], projected [b, P])."""
        codes, logits = self.forward(x)
        neighbours = self.neighbours(codes, max(p.k for p in points))
        return surface_decisions(neighbours, logits.argmax(1).to(neighbours.device), points,
                                 self.num_classes)

    @torch.no_grad()
    def true_totals(self, x: torch.Tensor, y: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
        """[b, len(ks)]: T(y) at each k, the votes for the sample's own label (calibration)."""
        codes, _ = self.forward(x)
        return true_label_totals(self.neighbours(codes, max(ks)), y, ks, self.num_classes)

    def margin_objective(self, y: torch.Tensor, k: int, ms: Sequence[int],
                         points: Sequence[SurfacePoint], fooled: torch.Tensor,
                         target: torch.Tensor | None = None, tau: float = 0.0):
        """``(x, rows) -> (loss, success)`` for ``defenses.attacks.apgd``, attacking the points
        (k, m) for m in ``ms`` in one run.

        Every iterate is judged on the real vote at every one of ``points``, and ``fooled``
        ([len(y), len(points)] bool) records which samples any iterate fooled where (each
        iterate is an adversarial example in the ball). The loss is the exact wrong-margin (or
        the targeted one; smoothed at ``tau`` > 0) of the sample's easiest point among ``ms``
        not fooled yet; a sample succeeds, and leaves the run, once every point of ``ms`` is
        fooled.
        """
        column = {(p.k, p.min_votes): i for i, p in enumerate(points)}
        cols = torch.tensor([column[k, m] for m in ms])
        m_index = torch.tensor([m - 1 for m in ms])
        k_search = max(p.k for p in points)

        def objective(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            codes, logits = self.forward(x)
            proj = self.projections(codes, k, tau=tau)[:, :, m_index.to(x.device)]
            if target is None:
                margins = wrong_margin(proj, model_margin(logits, y[rows]), y[rows], tau)
            else:
                margins = targeted_margin(proj, logits, target[rows])
            with torch.no_grad():
                neighbours = self.neighbours(codes, k_search)
                prediction, _ = surface_decisions(neighbours, logits.argmax(1).to(
                    neighbours.device), points, self.num_classes)
                cpu_rows = rows.to(fooled.device)
                fooled[cpu_rows] |= (prediction != y[rows, None].to(prediction.device)).to(
                    fooled.device)
                open_ = ~fooled[cpu_rows][:, cols].to(margins.device)
            # the easiest point still standing (all fooled: the sample leaves the run)
            loss = margins.masked_fill(~open_, -torch.inf).max(dim=1).values
            loss = torch.where(open_.any(dim=1), loss, margins.max(dim=1).values)
            return loss, ~open_.any(dim=1)

        return objective


class VoteSuite(BaseModel):
    """The budget of the APGD runs of ``attack_surface`` on the vote's margin: ``steps`` per
    run; ``restarts`` random starts of each untargeted run (after its warm starts); a targeted
    run toward each of the ``targets`` likeliest wrong classes; a run on the margin smoothed at
    temperature ``smooth`` (0: none), each over ``group`` consecutive m."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=100, ge=1)
    restarts: int = Field(default=0, ge=0)
    targets: int = Field(default=1, ge=0)
    smooth: float = Field(default=0.01, ge=0.0)
    group: int = Field(default=2, ge=1)


@dataclass
class SuiteResult:
    """Per attack, which samples LESCI still gets right at each point ([q, P] bool).

    The clean inputs and the pool sets are scored on their own; each APGD run attacks only
    what the attacks before it left standing, so its entry is "not newly fooled by this run".
    The worst case, ``robust()``, is exact either way."""

    points: list[SurfacePoint]
    correct: dict[str, torch.Tensor]
    budget: dict[str, float | int]

    def robust(self) -> torch.Tensor:
        """[q, P]: right under every attack of the suite (the per-sample worst case)."""
        return functools.reduce(torch.logical_and, self.correct.values())

    def accuracy(self, name: str | None = None) -> torch.Tensor:
        """[P] float64: the worst case of the suite (None), or one entry of ``correct``."""
        c = self.robust() if name is None else self.correct[name]
        return c.double().mean(0)


def attack_surface(decision: LESCIDecision, x: torch.Tensor, y: torch.Tensor,
                   points: Sequence[SurfacePoint], eps: float, suite: VoteSuite = VoteSuite(),
                   attack_points: Sequence[SurfacePoint] | None = None,
                   pool: dict[str, torch.Tensor] | None = None, starts: Sequence[str] = (),
                   generator: torch.Generator | None = None, batch_size: int = 512,
                   progress=None) -> SuiteResult:
    """Robustness of LESCI at every point of a surface.

    The suite: the clean inputs; the given ``pool`` of precomputed adversarial sets (transfer
    attacks); and, for each k of ``attack_points`` (default: every point), one APGD run over all
    its m at once (``LESCIDecision.margin_objective``), at the budget of ``suite``, on
      - the exact margin ("apgd"),
      - the margin smoothed at temperature ``suite.smooth`` ("apgd_smooth"; 0 leaves it out),
        ``suite.group`` consecutive m per run,
      - the targeted margin toward each of the ``suite.targets`` likeliest wrong classes
        ("apgd_targeted").
    The untargeted runs start from each pool set named in ``starts`` and then from
    ``suite.restarts`` random points; the targeted ones from ``max(restarts, 1)`` random
    points. Every
    iterate of every run and every example of the pool is judged on the real vote at every
    point, so a sample counts as robust at a point only if nothing fooled LESCI there.

    Args:
        x, y: the clean samples [q, ...] in [0, 1] and labels [q].
        pool: name -> adversarial inputs [q, ...] (same order as x), e.g. the transfer set.
        starts: names of ``pool`` sets that warm-start the untargeted runs (the bare model's
            APGD examples already fool the identity path).
        progress: ``progress(done, total)`` after each APGD run over the whole batch.
    """
    points = list(points)
    steps, restarts, targets = suite.steps, suite.restarts, suite.targets
    smooth, group = suite.smooth, suite.group
    attack_points = list(points if attack_points is None else attack_points)
    pool = dict(pool or {})
    if not starts and restarts < 1:
        raise ValueError("the untargeted runs need a start: give starts or restarts >= 1")
    unknown = [name for name in starts if name not in pool]
    if unknown:
        raise ValueError(f"starts {unknown} are not in the pool ({', '.join(pool) or 'empty'})")
    correct: dict[str, torch.Tensor] = {}

    def score(name: str, adv: torch.Tensor) -> None:
        parts = []
        for s in range(0, adv.shape[0], batch_size):
            prediction, _ = decision.decide(adv[s:s + batch_size], points)
            parts.append(prediction.cpu() == y[s:s + batch_size, None].cpu())
        correct[name] = torch.cat(parts)

    by_k: dict[int, list[int]] = {}
    for point in attack_points:
        by_k.setdefault(point.k, []).append(point.min_votes)

    # (name, tau, target rank): the runs of the suite for each k
    runs = [("apgd", 0.0, 0)] + ([("apgd_smooth", smooth, 0)] if smooth > 0 else []) + [
        ("apgd_targeted", 0.0, rank) for rank in range(1, targets + 1)]
    smooth_runs = sum(math.ceil(len(ms) / group) for ms in by_k.values()) if smooth > 0 else 0
    total, done = len(by_k) * (1 + targets) + smooth_runs, 0
    with eval_mode(decision.model):
        score("clean", x)
        for name, adv in pool.items():
            if adv.shape != x.shape:
                raise ValueError(f"pool {name!r}: shape {tuple(adv.shape)} is not the "
                                 f"inputs' {tuple(x.shape)}")
            score(name, adv)
        # what the clean inputs and the pool already fool needs no attack: each run attacks
        # only the (sample, point) pairs nothing before it fooled
        fooled = ~functools.reduce(torch.logical_and, correct.values())
        for name, tau, rank in runs:
            before = fooled.clone()
            todo = sorted(by_k.items())
            if tau > 0:  # the smoothed runs focus on a few neighbouring m each
                todo = [(k, ms[i:i + group]) for k, ms in todo for i in range(0, len(ms), group)]
            for k, ms in todo:
                for s in range(0, x.shape[0], batch_size):
                    xb, yb = x[s:s + batch_size], y[s:s + batch_size]
                    target = _likeliest_wrong(decision, xb, yb, k, min(ms), rank) if rank else None
                    objective = decision.margin_objective(yb, k, ms, points,
                                                          fooled[s:s + batch_size], target, tau)
                    # the untargeted runs, exact and smoothed, start from each pool set in
                    # starts (then from restarts random points); the targeted ones at random
                    names = [] if rank else starts
                    warm = [pool[n][s:s + batch_size] for n in names]
                    apgd(objective, xb, eps, steps, max(restarts, 1) if rank else restarts,
                         generator, starts=warm)
                done += 1
                if progress is not None:
                    progress(done, total)
            found = fooled & ~before  # what this run fooled that nothing before it had
            correct[name] = correct[name] & ~found if name in correct else ~found
    budget = {"eps": eps, "apgd_steps": steps, "apgd_starts": ",".join(starts),
              "apgd_restarts": restarts, "apgd_smooth": smooth, "apgd_group": group,
              "apgd_targets": targets, "apgd_runs": total, "attacked_points": len(attack_points)}
    return SuiteResult(points, correct, budget)


def _likeliest_wrong(decision: LESCIDecision, x: torch.Tensor, y: torch.Tensor, k: int,
                     m: int, rank: int) -> torch.Tensor:
    """The ``rank``-th likeliest wrong class of each sample at (k, m) (1 = likeliest): by its
    projection margin, then the model's probability."""
    with torch.no_grad():
        codes, logits = decision.forward(x)
        proj = decision.projections(codes, k, m)
        score = proj + 1e-3 * logits.softmax(1).to(proj.dtype)
        score = score.scatter(1, y[:, None], -torch.inf)
        return score.topk(min(rank, score.shape[1] - 1), dim=1).indices[:, -1]
