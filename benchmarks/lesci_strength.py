"""Is the default LESCI attack suite strong enough? An independent, stronger re-attack.

``defenses.lesci_attack.attack_surface`` reports LESCI's robust accuracy at every (k, m) point
of a surface as the per-sample worst case of one suite run over the whole surface, called here
exactly as the sweep calls it (``orchestrator.lesci_trial.lesci_surface``): clean inputs, the
transfer PGD-20 set, the bare model's APGD-CE set, APGD on the exact and on the smoothed
kNN-vote margin warm-started from both sets, and targeted APGD. This benchmark re-attacks the
same trained digits model, per depth and per (k, m) point separately, with a stronger suite of
published methods, and reports how much lower the robust accuracy gets:

- ``rand``: APGD (Croce & Hein 2020) on the exact wrong-margin of that one point, more steps,
  several uniformly random starts;
- ``xfer``: APGD on the exact margin of that point started from the transfer PGD-20 examples;
- ``tgt``: targeted APGD (APGD-T) on the exact targeted margin, toward every wrong class (or
  the ``--targets`` likeliest ones), one random start each;
- ``lse``: APGD on a softened margin, every max/min of the exact margin replaced by a
  log-sum-exp at temperature ``--tau`` (a smooth surrogate in the spirit of the soft-kNN
  attacks of Sitawarin & Wagner 2019; implemented here independently of the library's),
  started from the bare model's APGD-CE examples, the transfer examples, then randomly.

Every adversarial example counts only if it lies in the eps-ball and fools the real kNN vote
(``LESCIDecision.decide``). Per point, a sample is robust if neither the default suite nor any
stronger attack fooled it. The table gives both robust accuracies, their gap (default - strong)
and the wall time of each, and, per point, how many extra samples each attack found.

Several depths (``--space lesci_depths``, a depth such as ``stem+layer1``): the vote sums each
depth's k nearest neighbours (Deep k-NN, Papernot & McDaniel 2018); the exact attacks use the
library's margin of the summed vote, and ``lse`` an independent softening of it: every
(j_1, ..., j_L) with j_1 + ... + j_L = n is enumerated, instead of the library's (max, min)
recursion.

Everything else is the space's (``--space``, default ``search_spaces/demo.yaml``), read from it
so the two cannot drift apart: the base model (trained as the sweep trains it, cached under
``--cache``), n_components, the calibration split held out of the embedding spaces, the
surface's (k, m) points, eps, the attacked samples (``--split``), the bare model's attacks
(``orchestrator.lesci_stages.craft_transfer_set``) and the default suite's budget
(``attack.apgd``; each ``--default-*`` option overrides one).

    python -m benchmarks.lesci_strength --depths stem,layer1,pool
    python -m benchmarks.lesci_strength --space lesci_depths --depths stem+layer1,stem
    # a front's points only, on the test split as its final evaluation attacks them (the
    # default suite over each trial's front points together, the strong one per point):
    python -m benchmarks.lesci_strength --space lesci_depths --split test \
        --points layer2@10/8,stem+layer1@3/4
    python -m benchmarks.lesci_strength --depths stem --smoke-test   # < 60 s
    python -m benchmarks.lesci_strength --split test    # the test samples of the final report
    # the earlier default suite (one warm start from base_apgd, a random restart, no smoothing):
    python -m benchmarks.lesci_strength --default-starts base_apgd --default-restarts 1 \
        --default-smooth 0

CPU, one thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from defenses.attacks import apgd
from defenses.embedding_space import build_embedding_space
from defenses.lesci import fit_pca_at_depth
from defenses.lesci_attack import (LESCIDecision, VoteSuite, attack_surface, count_margins,
                                   model_margin)
from defenses.checkpoints import checkpoint_bytes, load_checkpoint
from defenses.surface import SurfacePoint, surface_decisions
from orchestrator.lesci_stages import (calibration_split, craft_transfer_set, split_tensors,
                                       train_base_model)
from orchestrator.families.lesci import DEPTH_JOIN
from orchestrator.loading import load_space

# the space whose sweep is re-attacked (--space; set by main before anything else runs)
DEMO = load_space("demo", check_model=False)
EPS = DEMO.attack.eps
N_COMPONENTS = int(DEMO.values_of("n_components")[0])


def use_space(name: str) -> None:
    global DEMO, EPS, N_COMPONENTS
    DEMO = load_space(name, check_model=False)
    EPS = DEMO.attack.eps
    N_COMPONENTS = int(DEMO.values_of("n_components")[0])
# "certainly true" inside the soft min/max (any margin of similarities is far below it)
CERTAIN = 8.0
STRONG_ATTACKS = ("rand", "xfer", "tgt", "lse")


@dataclass(frozen=True)
class Budget:
    """The stronger suite's budget, per (k, m) point."""

    steps: int = 300
    restarts: int = 4
    targets: int | None = None  # None: every wrong class
    tau: float = 0.01
    lse_restarts: int = 1  # random starts of the softened run, after its two warm starts


@dataclass
class PointResult:
    depth: str
    point: SurfacePoint
    default_acc: float
    strong_acc: float
    default_s: float  # the whole depth's default suite (one call for every point)
    strong_s: float
    found: dict[str, int] = field(default_factory=dict)  # attack -> extra samples it fooled
    only: dict[str, int] = field(default_factory=dict)  # ... that no other attack fooled
    target_ranks: list[int] = field(default_factory=list)  # ranks of successful targets
    unverified: int = 0  # apgd successes the real vote did not confirm (should be 0)

    @property
    def gap(self) -> float:
        return self.default_acc - self.strong_acc


# ----------------------------------------------------------------------------------------------
# the model, the data, the defense


def load_base_model(splits, cache: Path) -> torch.nn.Module:
    """The demo's base model, trained as the sweep trains it, then read from ``cache``."""
    path = cache / f"base-{DEMO.training.seed}-{DEMO.training.epochs}.pt"
    if path.is_file():
        model, _ = load_checkpoint(path.read_bytes())
    else:
        model = train_base_model(DEMO, splits, None, DEMO.training)
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(checkpoint_bytes(model))
    return model.eval()


def build_decision(model, splits, depth: str, k_max: int) -> LESCIDecision:
    """The space's decision at ``depth`` (several: "stem+layer1"), each depth's PCA and
    embedding space built from the training split less the space's calibration split."""
    calibration = DEMO.params.get("calibration")
    if not isinstance(calibration, (int, float, type(None))):
        raise SystemExit(f"{DEMO.name}: params.calibration must be fixed here, got {calibration}")
    reference, _ = calibration_split(splits.train, calibration, DEMO.dataset.split_seed)
    depths = depth.split(DEPTH_JOIN)
    pcas = [fit_pca_at_depth(model, d, reference, N_COMPONENTS) for d in depths]
    spaces = [build_embedding_space(model, d, p, reference) for d, p in zip(depths, pcas)]
    return LESCIDecision(model, depths, pcas, spaces, k_max=k_max)


# ----------------------------------------------------------------------------------------------
# the default suite (exactly the demo's pool and call)


def attack_pool(model, data) -> dict[str, torch.Tensor]:
    """The sweep's attacks on the bare model on the attacked samples of ``data`` (a split;
    ``craft_transfer_set``): ``transfer`` (PGD-20) and ``base_apgd`` (APGD-CE)."""
    pool = torch.load(io.BytesIO(craft_transfer_set(model, data, DEMO.attack, None)),
                      weights_only=True)
    return {"transfer": pool["adversarial"], "base_apgd": pool["base_apgd"]}


def default_suite(decision, x, y, points, pool, args) -> tuple[torch.Tensor, float]:
    """(robust [q, P] bool, seconds) of one ``attack_surface`` call as the sweep makes it."""
    start = time.perf_counter()
    suite = VoteSuite(steps=args.default_steps, restarts=args.default_restarts,
                      targets=args.default_targets, smooth=args.default_smooth,
                      group=args.default_group)
    result = attack_surface(decision, x, y, points, EPS, suite, pool=pool,
                            starts=tuple(args.default_starts.split(",")),
                            generator=torch.Generator().manual_seed(1))
    return result.robust(), time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# the stronger suite: objectives


def _softmax_(x: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    return tau * torch.logsumexp(x / tau, dim=dim)


def _softmin(x: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    return -_softmax_(-x, dim, tau)


def _soft_cummin(x: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    return -tau * torch.logcumsumexp(-x / tau, dim=dim)


def soft_totals(gs: list[torch.Tensor], tau: float) -> torch.Tensor:
    """[b, C, L*k]: soft "at least n of the summed votes are for c", n = 1..L*k: a soft max
    over every (j_1, ..., j_L) with sum n of the soft min of g^l(j_l) (g^l(0): certain),
    enumerated (the library recurses instead). One depth: g itself."""
    if len(gs) == 1:
        return gs[0]
    k = gs[0].shape[2]
    with_zero = [torch.cat([torch.full_like(g[:, :, :1], CERTAIN), g], dim=2) for g in gs]
    tuples = torch.tensor(list(itertools.product(range(k + 1), repeat=len(gs))))  # [T, L]
    mins = _softmin(torch.stack([g[:, :, tuples[:, l]] for l, g in enumerate(with_zero)]),
                    0, tau)  # [b, C, T]
    sums = tuples.sum(1)
    return torch.stack([_softmax_(mins[:, :, sums == n], 2, tau)
                        for n in range(1, len(gs) * k + 1)], dim=2)


def soft_projection_margin(gs: list[torch.Tensor], m: int, tau: float) -> torch.Tensor:
    """The projection margin at (k, m) [b, C] of the summed vote of the depths' count margins
    ``gs`` (each [b, C, k]), with every max/min a log-sum-exp at ``tau``."""
    g = soft_totals(gs, tau)
    certain = torch.full_like(g[:, :1], CERTAIN)
    lower = torch.cat([certain, _soft_cummin(-g[:, :-1], 1, tau)], dim=1)
    shifted = torch.cat([-g[:, :, 1:], torch.full_like(g[:, :, :1], CERTAIN)], dim=2)
    higher = torch.cat([_soft_cummin(shifted[:, 1:].flip(1), 1, tau).flip(1), certain], dim=1)
    terms = _softmin(torch.stack([g, lower, higher]), 0, tau)
    return _softmax_(terms[:, :, m - 1:], 2, tau)


def soft_wrong_margin(proj: torch.Tensor, margin: torch.Tensor, y: torch.Tensor, tau: float
                      ) -> torch.Tensor:
    """``wrong_margin`` with log-sum-exp max/min: max(max_{c != y} proj_c, min(-proj_y, m))."""
    true = proj.gather(1, y[:, None])[:, 0]
    wrong = _softmax_(proj.scatter(1, y[:, None], -torch.inf), 1, tau)
    abstain = _softmin(torch.stack([-true, margin]), 0, tau)
    return _softmax_(torch.stack([wrong, abstain]), 0, tau)


def _real_vote_wrong(decision: LESCIDecision, codes, logits, y, point: SurfacePoint
                     ) -> torch.Tensor:
    """[b] bool: the real kNN vote at ``point`` is wrong (the same rule as ``decide``)."""
    neighbours = decision.neighbours(codes, point.k)
    prediction, _ = surface_decisions(neighbours, logits.argmax(1).to(neighbours.device),
                                      [point], decision.num_classes)
    return (prediction[:, 0] != y.to(prediction.device)).to(y.device)


def soft_objective(decision: LESCIDecision, y: torch.Tensor, point: SurfacePoint, tau: float
                   ) -> Callable:
    """APGD objective: the log-sum-exp wrong-margin; success on the real vote."""
    def objective(x, rows):
        codes, logits = decision.forward(x)
        gs = [count_margins(*layer.tops(c, point.k), point.k)
              for layer, c in zip(decision.layers, codes)]
        proj = soft_projection_margin(gs, point.min_votes, tau)
        loss = soft_wrong_margin(proj, model_margin(logits, y[rows]), y[rows], tau)
        with torch.no_grad():
            success = _real_vote_wrong(decision, codes, logits, y[rows], point)
        return loss, success
    return objective


def exact_objective(decision: LESCIDecision, y, point: SurfacePoint, target=None) -> Callable:
    """APGD objective: the library's exact (targeted) margin at one point."""
    fooled = torch.zeros((y.shape[0], 1), dtype=torch.bool)
    return decision.margin_objective(y, point.k, [point.min_votes], [point], fooled, target)


def wrong_classes_by_likeliness(decision: LESCIDecision, x, y, point: SurfacePoint
                                ) -> torch.Tensor:
    """[b, C - 1]: the wrong classes of each sample, likeliest first (by the exact projection
    margin at ``point`` on the clean input, then the model's probability)."""
    with torch.no_grad():
        codes, logits = decision.forward(x)
        proj = decision.projections(codes, point.k, point.min_votes)
        score = proj + 1e-3 * logits.softmax(1).to(proj.dtype)
        score = score.scatter(1, y[:, None], -torch.inf)
        return score.argsort(dim=1, descending=True)[:, :-1]


# ----------------------------------------------------------------------------------------------
# the stronger suite: attacks, each judged on the real vote


def really_fooled(decision: LESCIDecision, x, adv, y, point: SurfacePoint) -> torch.Tensor:
    """[b] bool: ``adv`` is in the eps-ball and in [0, 1], and LESCI's real decision at
    ``point`` is wrong on it."""
    in_ball = ((adv - x).abs().flatten(1).max(1).values <= EPS + 1e-6) & (
        adv.flatten(1).min(1).values >= 0) & (adv.flatten(1).max(1).values <= 1)
    prediction, _ = decision.decide(adv, [point])
    return in_ball & (prediction[:, 0].cpu() != y.cpu())


def _run(decision, objective, x, y, point, steps, restarts, generator, starts=()
         ) -> tuple[torch.Tensor, int]:
    """APGD from each of ``starts``, then ``restarts`` random points: (really fooled [b], how
    many apgd successes the real vote did not confirm)."""
    adv, succeeded = apgd(objective, x, EPS, steps, restarts, generator, starts=list(starts))
    fooled = really_fooled(decision, x, adv, y, point)
    return fooled, int((succeeded.cpu() & ~fooled).sum())


def strong_suite(decision, x, y, point: SurfacePoint, pool: dict[str, torch.Tensor],
                 budget: Budget, seed: int) -> tuple[dict[str, torch.Tensor], list[int], int]:
    """Every stronger attack on every given sample (so each gets its own credit).

    Returns (attack -> really fooled [b] bool, rank of the target that fooled each sample
    the targeted runs fooled, unconfirmed successes)."""
    generator = torch.Generator().manual_seed(seed)
    found, unverified = {}, 0

    fooled, bad = _run(decision, exact_objective(decision, y, point), x, y, point,
                       budget.steps, budget.restarts, generator)
    found["rand"], unverified = fooled, unverified + bad

    fooled, bad = _run(decision, exact_objective(decision, y, point), x, y, point,
                       budget.steps, 0, generator, starts=[pool["transfer"]])
    found["xfer"], unverified = fooled, unverified + bad

    order = wrong_classes_by_likeliness(decision, x, y, point)
    n_targets = order.shape[1] if budget.targets is None else min(budget.targets, order.shape[1])
    found["tgt"] = torch.zeros_like(fooled)
    rank_of = torch.zeros(x.shape[0], dtype=torch.long)
    for rank in range(n_targets):
        target = order[:, rank]
        fooled, bad = _run(decision, exact_objective(decision, y, point, target), x, y,
                           point, budget.steps, 1, generator)
        rank_of[fooled & ~found["tgt"]] = rank + 1
        found["tgt"] |= fooled
        unverified += bad
    ranks = rank_of[found["tgt"]].tolist()

    fooled, bad = _run(decision, soft_objective(decision, y, point, budget.tau), x, y, point,
                       budget.steps, budget.lse_restarts, generator,
                       starts=[pool["base_apgd"], pool["transfer"]])
    found["lse"], unverified = fooled, unverified + bad
    return found, ranks, unverified


def attack_point(decision, x, y, point, default_robust, pool, budget, seed
                 ) -> tuple[torch.Tensor, PointResult]:
    """Re-attack the samples the default suite left robust at ``point``."""
    rows = torch.nonzero(default_robust).flatten()
    start = time.perf_counter()
    if rows.numel() == 0:  # nothing left to attack
        found = {name: torch.zeros(0, dtype=torch.bool) for name in STRONG_ATTACKS}
        ranks, unverified = [], 0
    else:
        found, ranks, unverified = strong_suite(decision, x[rows], y[rows], point,
                                                {n: a[rows] for n, a in pool.items()},
                                                budget, seed)
    seconds = time.perf_counter() - start
    any_found = torch.zeros(rows.numel(), dtype=torch.bool)
    for fooled in found.values():
        any_found |= fooled
    strong_robust = default_robust.clone()
    strong_robust[rows[any_found]] = False
    only = {name: int((f & ~torch.stack([g for n, g in found.items() if n != name]).any(0))
                      .sum()) for name, f in found.items()}
    result = PointResult("", point, default_robust.double().mean().item(),
                         strong_robust.double().mean().item(), 0.0, seconds,
                         {n: int(f.sum()) for n, f in found.items()}, only, ranks, unverified)
    return strong_robust, result


# ----------------------------------------------------------------------------------------------
# the report


HEADER = (f"{'depth':<18} {'k':>3} {'m':>3} {'thr':>5} {'default':>8} {'strong':>7} {'gap':>7} "
          f"{'def_s*':>7} {'strong_s':>8}  extra samples per attack: found (only this one)")


def format_row(r: PointResult) -> str:
    extras = " ".join(f"{n}={r.found[n]}({r.only[n]})" for n in STRONG_ATTACKS)
    if r.target_ranks:
        extras += f" tgt_ranks={sorted(r.target_ranks)}"
    if r.unverified:
        extras += f" UNCONFIRMED={r.unverified}"
    p = r.point
    return (f"{r.depth:<18} {p.k:>3} {p.min_votes:>3} {p.threshold:>5.2f} {r.default_acc:>8.3f} "
            f"{r.strong_acc:>7.3f} {r.gap:>+7.3f} {r.default_s:>7.1f} {r.strong_s:>8.1f}  "
            f"{extras}")


def print_summary(results: list[PointResult]) -> None:
    print("\n" + HEADER)
    for r in results:
        print(format_row(r))
    print("* def_s: the whole depth's default suite, one attack_surface call for every point")
    for depth in dict.fromkeys(r.depth for r in results):
        worst = max((r for r in results if r.depth == depth), key=lambda r: r.gap)
        print(f"max gap {depth}: {worst.gap:+.3f} at k={worst.point.k} "
              f"m={worst.point.min_votes}")
    worst = max(results, key=lambda r: r.gap)
    print(f"MAX GAP: {worst.gap:+.3f} ({worst.depth} k={worst.point.k} "
          f"m={worst.point.min_votes})")


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="demo",
                        help="the LESCI space whose sweep is re-attacked (default: %(default)s)")
    parser.add_argument("--depths", default=None,
                        help="comma-separated depths of the model, several voting together "
                             "joined by '+' (default: every depth value of the space)")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="the demo's validation samples, as the search attacks them, or the "
                             "test samples, as the final evaluation of its front does "
                             "(default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lesci_strength"),
                        help="where the base model is cached (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=None,
                        help="first N of the attacked samples (default: all of the space's "
                             "attack.samples)")
    parser.add_argument("--default-steps", type=int, default=None)  # None: the space's
    parser.add_argument("--default-restarts", type=int, default=None)
    parser.add_argument("--default-targets", type=int, default=None)
    parser.add_argument("--default-smooth", type=float, default=None)
    parser.add_argument("--default-group", type=int, default=None)
    parser.add_argument("--default-starts", default="base_apgd,transfer",
                        help="pool sets that warm-start the default suite's untargeted runs")
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--restarts", type=int, default=Budget.restarts)
    parser.add_argument("--targets", type=int, default=None,
                        help="targeted runs toward the N likeliest wrong classes (default: all)")
    parser.add_argument("--tau", type=float, default=Budget.tau,
                        help="log-sum-exp temperature of the softened margin")
    parser.add_argument("--lse-restarts", type=int, default=Budget.lse_restarts)
    parser.add_argument("--points", default=None,
                        help="only these points, DEPTH@K/M comma-separated (a front's); with "
                             "--split test the default suite attacks each depth's given points "
                             "together, as the final evaluation does (on val, as the search "
                             "does, the whole surface)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke-test", action="store_true",
                        help="first depth only, 40 samples, 10 steps: a < 60 s pipeline check")
    args = parser.parse_args(argv)
    use_space(args.space)
    for option in ("steps", "restarts", "targets", "smooth", "group"):  # the space's budget
        if getattr(args, f"default_{option}") is None:
            setattr(args, f"default_{option}", getattr(DEMO.attack.apgd, option))
    if args.points is not None:
        chosen: dict[str, list[tuple[int, int]]] = {}
        for entry in args.points.split(","):
            depth, point = entry.split("@")
            k, m = point.split("/")
            chosen.setdefault(depth, []).append((int(k), int(m)))
        args.points = chosen
        args.depths = ",".join(chosen)
    if args.depths is None:
        args.depths = ",".join(DEMO.values_of("depth"))
    if args.smoke_test:
        args.depths = args.depths.split(",")[0]
        args.samples = min(args.samples or 40, 40)
        args.default_steps = args.steps = 10
        args.restarts, args.targets, args.lse_restarts = 1, 2, 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = Budget(args.steps, args.restarts, args.targets, args.tau, args.lse_restarts)
    splits = DEMO.dataset.load()
    model = load_base_model(splits, args.cache)
    data = getattr(splits, args.split)
    pool = attack_pool(model, data)
    x, y = split_tensors(data, DEMO.attack.samples)
    if args.samples is not None:
        x, y = x[:args.samples], y[:args.samples]
        pool = {name: adv[:args.samples] for name, adv in pool.items()}
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double().mean().item()
    print(f"digits: {len(y)} {args.split} samples, clean acc {clean:.3f}, eps {EPS}, "
          f"{N_COMPONENTS} components; default suite steps={args.default_steps} "
          f"restarts={args.default_restarts} targets={args.default_targets} "
          f"smooth={args.default_smooth} group={args.default_group} "
          f"starts={args.default_starts}; strong suite "
          f"{budget}", flush=True)
    results = []
    print(HEADER, flush=True)
    for depth in args.depths.split(","):
        points = DEMO.defense.surface_points(DEMO, len(depth.split(DEPTH_JOIN)))
        chosen = [p for p in points if args.points is None
                  or (p.k, p.min_votes) in args.points[depth]]
        if not chosen:
            raise SystemExit(f"--points: no point of {depth}'s surface among "
                             f"{args.points[depth]}")
        if args.split == "test":  # the final evaluation attacks a trial's front points only
            points = chosen
        decision = build_decision(model, splits, depth, max(p.k for p in points))
        robust, default_s = default_suite(decision, x, y, points, pool, args)
        for i, point in enumerate(points):
            if point not in chosen:
                continue
            _, r = attack_point(decision, x, y, point, robust[:, i], pool, budget,
                                args.seed + 1000 * i)
            r.depth, r.default_s = depth, default_s
            results.append(r)
            print(format_row(r), flush=True)
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
