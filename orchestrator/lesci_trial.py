"""A LESCI trial (``LESCIFamily``): its decision from the sweep's shared stages, its whole
(k, m) surface on the validation split (or, in the final evaluation, its front points on the
test split) with the attack suite on the real vote, the calibration's credibility, and the
operating point it reports to the searcher."""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
from ray import tune
from torch.utils.data import Dataset

from defenses.data import Splits
from defenses.embedding_space import EmbeddingSpace
from defenses.intervals import paired_difference, rate_interval
from defenses.lesci_attack import LESCIDecision, attack_surface
from defenses.racing import race_surface
from defenses.surface import SurfacePoint, credibility, surface_metrics
from orchestrator.lesci_stages import LESCIStages, split_tensors
from orchestrator.params import Trial, resolve
from orchestrator.pareto import BASE_METRICS, front_of
from orchestrator.progress import ProgressLine
from orchestrator.racing import SurfaceRace
from orchestrator.space import SweepSpec
from orchestrator.stages import StageCache
from orchestrator.storage import Storage
from orchestrator.trainables import console, over_seeds, repeat_trials, setup, sweep_coordinator

__all__ = ["lesci_trial", "lesci_surface", "lesci_decision", "lesci_figures", "calibrated",
           "surface_rows", "attack_progress", "operating_point", "base_figures"]


def _stage_cache(storage: Storage, log: Callable[[str], None]) -> StageCache:
    # outside a sweep driver there is no coordinator: storage alone dedups across runs
    return StageCache(storage, sweep_coordinator(storage),
                      owner=tune.get_context().get_trial_id() or "", log=log)


def _stored_result(storage: Storage) -> tuple[str, dict[str, float] | None]:
    """(path, metrics a previous run of this trial already finished with, if any).

    Tune saves its experiment state every few seconds: a trial that finished after the last
    save is launched again on resume. Its stored result is reported instead of recomputed.
    """
    path = f"results/{tune.get_context().get_trial_id()}.json"
    found = storage.get_verified(path)
    return path, (json.loads(found[0]) if found is not None else None)


def _rates_with_intervals(metrics: dict[str, list[float]], sizes: dict[str, list[int]]
                          ) -> dict[str, list[float]]:
    """``<metric>_ci_low`` and ``_ci_high`` (Wilson, 95%) of each rate, from its sample count."""
    out: dict[str, list[float]] = {}
    for name, values in metrics.items():
        bounds = [rate_interval(v, n) for v, n in zip(values, sizes[name])]
        out[f"{name}_ci_low"] = [low for low, _ in bounds]
        out[f"{name}_ci_high"] = [high for _, high in bounds]
    return out


def lesci_surface(spec: SweepSpec, decision: LESCIDecision, points: list[SurfacePoint],
                  data: Dataset, attacks: dict[str, Any] | None, device, progress=None,
                  generator_seed: int = 1, race: SurfaceRace | None = None
                  ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Every point's metrics ({name: [P] values}) on ``data`` (the val split while the sweep
    searches, the test split in its final evaluation) and the attack budget.

    The four LESCI metrics on the whole split; with an attack, ``transfer_robust_accuracy`` (the
    PGD transfer set alone) and ``robust_accuracy``, the per-sample worst case of the whole
    suite on the real vote (``defenses.lesci_attack.attack_surface``) on its first
    ``attack.samples``, and ``robust_gain``, robust accuracy minus the bare model's on the same
    samples (``attacks``: the bare model's stage on this split). Each figure comes with its 95%
    interval (``<name>_ci_low``, ``_ci_high``: Wilson; the gain's: Newcombe's paired interval)
    and the counts behind it (``samples``, ``attacked_samples``).

    With ``race`` (``scheduler: mo_asha``), the suite is raced (``defenses.racing``): a point
    stopped early (``raced_out`` True) has its robust figures on the ``attacked_samples`` it was
    attacked on, the others on every attack sample; the transfer figure is every point's on
    every attack sample.
    """
    x_all, y_all = split_tensors(data)
    prediction, projected = [], []
    for xb in x_all.split(512):
        p, pr = decision.decide(xb.to(device), points)
        prediction.append(p.cpu())
        projected.append(pr.cpu())
    projected_all = torch.cat(projected)
    metrics = {name: values.tolist() for name, values in surface_metrics(
        y_all, torch.cat(prediction), projected_all).items()}
    n = len(y_all)
    n_projected = projected_all.sum(0).tolist()
    sizes = {"accuracy": [n] * len(points), "projection_rate": [n] * len(points),
             "accuracy_projected": n_projected,
             "accuracy_identity": [n - p for p in n_projected]}
    budget: dict[str, Any] = {}
    extra: dict[str, list[float]] = {"samples": [n] * len(points)}
    if spec.attack is not None and attacks is not None:
        attack = spec.attack
        x_att, y_att = split_tensors(data, attack.samples)
        pool = {"transfer": attacks["adversarial"], "base_apgd": attacks["base_apgd"]}
        pool = {k: v.to(device) for k, v in pool.items()}
        generator = torch.Generator().manual_seed(generator_seed)
        if race is None:
            suite = attack_surface(decision, x_att.to(device), y_att.to(device), points,
                                   attack.eps, attack.apgd.vote_suite(), pool=pool,
                                   starts=("base_apgd", "transfer"), progress=progress,
                                   generator=generator)
            robust = [column for column in suite.robust().T]
            transfer = suite.accuracy("transfer").tolist()
            budget = dict(suite.budget)
        else:
            race.measured(metrics)
            raced = race_surface(decision, x_att.to(device), y_att.to(device), points,
                                 attack.eps, race.rungs(len(y_att)), race,
                                 attack.apgd.vote_suite(), pool=pool,
                                 starts=("base_apgd", "transfer"), generator=generator,
                                 progress=race.progress)
            robust = raced.robust
            transfer = raced.pool_accuracy("transfer")
            budget = dict(raced.budget)
            extra["raced_out"] = [i in raced.stopped for i in range(len(points))]
        attacked = [len(r) for r in robust]
        metrics["robust_accuracy"] = [float(r.double().mean()) for r in robust]
        metrics["transfer_robust_accuracy"] = transfer
        sizes["robust_accuracy"] = attacked
        sizes["transfer_robust_accuracy"] = [len(y_att)] * len(points)
        base = attacks["base_robust"].numpy()
        gains = [paired_difference(r.numpy(), base[:len(r)]) for r in robust]
        extra.update({"robust_gain": [g[0] for g in gains],
                      "robust_gain_ci_low": [g[1] for g in gains],
                      "robust_gain_ci_high": [g[2] for g in gains],
                      "attacked_samples": attacked})
        budget.update({"samples": len(y_att), "transfer": f"PGD-{attack.steps}",
                       "suite": "clean, transfer PGD, bare-model APGD-CE (2 starts), APGD on "
                                "the exact and on the smoothed vote margin (started from "
                                "both), targeted APGD"})
        budget.setdefault("point_samples", sum(attacked))
        budget.setdefault("full_point_samples", len(y_att) * len(points))
        budget.setdefault("apgd_run_samples", int(budget["apgd_runs"]) * len(y_att))
    return {**metrics, **_rates_with_intervals(metrics, sizes), **extra}, budget


def operating_point(rows: list[dict[str, Any]], optimize: dict[str, str]) -> dict[str, Any]:
    """The point a trial reports as its own: the largest sum of the metrics it optimizes (a minimised
    one counts as 1 - value), ties to the smaller k, then the smaller min_votes."""
    def score(row: dict[str, Any]) -> float:
        values = [row[m] if mode == "max" else 1 - row[m] for m, mode in optimize.items()]
        return sum(v for v in values if v == v)  # NaN counts as nothing

    return max(rows, key=lambda r: (score(r), -r["k"], -r["min_votes"]))


def base_figures(attacks: dict[str, Any]) -> dict[str, float]:
    """The bare model's figures on a split (its attack stage), with their intervals."""
    sizes = {"base_accuracy": int(attacks["samples"]),
             "base_robust_accuracy": len(attacks["labels"])}
    out: dict[str, float] = {}
    for key in BASE_METRICS:
        value = float(attacks[key])
        out[key] = value
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = rate_interval(value, sizes[key])
    return out


def lesci_decision(spec: SweepSpec, trial: Trial, splits: Splits, device, cache: StageCache,
                   log: Callable[[str], None], k_max: int
                   ) -> tuple[LESCIStages, LESCIDecision, list[EmbeddingSpace]]:
    """A trial's LESCI decision from the sweep's shared stages (base model, and a PCA and an
    embedding space per depth), with its stages (for the bare model's attacks and the
    calibration split) and its embedding spaces."""
    stages = LESCIStages(spec, trial, splits, device, cache, log=log)
    model = stages.model()
    pcas = [stages.pca(depth) for depth in stages.depths]
    spaces = [stages.embedding_space(depth) for depth in stages.depths]
    for depth, space in zip(stages.depths, spaces):
        if k_max > len(space):
            raise ValueError(f"k={k_max} exceeds the embedding space at {depth!r} "
                             f"({len(space)} samples)")
    params = trial.params
    decision = LESCIDecision(model, stages.depths, pcas, spaces, k_max, center=params.center,
                             num_classes=splits.num_classes)
    return stages, decision, spaces


def calibrated(decision: LESCIDecision, calibration: Dataset | None,
               points: list[SurfacePoint], device) -> tuple[list[float], int]:
    """(each point's credibility, the calibration's size): Deep k-NN's p-value of the point's
    m votes among the calibration samples' true-label totals (``defenses.surface.
    credibility``); NaN without a calibration split."""
    ks = sorted({p.k for p in points})
    if calibration is None:
        return credibility(torch.zeros(0, len(ks)), ks, points).tolist(), 0
    x, y = split_tensors(calibration)
    totals = torch.cat([decision.true_totals(xb.to(device), yb.to(device), ks).cpu()
                        for xb, yb in zip(x.split(512), y.split(512))])
    return credibility(totals, ks, points).tolist(), len(y)


def attack_progress(spec: SweepSpec, data: Dataset, label: str,
                    log: Callable[[str], None]) -> Callable[[int, int], None]:
    """``progress(done, total)`` of ``attack_surface`` as a console line in sample-runs."""
    samples = len(data) if spec.attack is None or spec.attack.samples is None else min(
        spec.attack.samples, len(data))
    line: list[ProgressLine] = []

    def progress(done: int, total: int) -> None:  # attack runs over the attacked samples
        if not line:
            line.append(ProgressLine(label, total * samples, "sample-runs", log))
        line[0](done * samples)

    return progress


def surface_rows(trial: Trial, space_size: int, points: list[SurfacePoint],
                 metrics: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per point: the trial's LESCI parameters, the point, its figures."""
    params = trial.params
    rows = []
    for i, point in enumerate(points):
        row = {"depth": params.depth, "n_components": params.n_components,
               "embedding_size": space_size, "center": params.center, "k": point.k,
               "min_votes": point.min_votes, "votes": point.votes,
               "threshold": point.threshold}
        row.update({name: values[i] for name, values in metrics.items()})
        rows.append(row)
    return rows


def lesci_figures(spec: SweepSpec, trial: Trial, points: list[SurfacePoint], splits: Splits,
                  split: str, device, cache: StageCache, log: Callable[[str], None],
                  race: SurfaceRace | None = None
                  ) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, float], int]:
    """A LESCI trial's figures at ``points`` on ``split`` (``val`` while searching, ``test``
    in the final evaluation), over its seeds (``search.repeats``): (metrics per point, with
    each point's ``credibility`` and the ``calibration_samples`` behind it; the attack budget;
    the bare model's figures; the smallest of its embedding spaces' sizes). ``race``: the
    attacks raced (the val split of a ``scheduler: mo_asha`` sweep, one seed; the test split
    is never raced)."""
    if race is not None and (split != "val" or spec.search.repeats != 1):
        raise ValueError("the attack race runs on the val split of one seed")
    runs, bases, budget, size = [], [], {}, 0
    seeded = repeat_trials(spec, trial)
    for r, one in enumerate(seeded):
        stages, decision, spaces = lesci_decision(spec, one, splits, device, cache, log,
                                                  max(p.k for p in points))
        attacks = stages.attacks(split)
        seed = f", seed {one.training.seed}" if len(seeded) > 1 else ""
        where = "" if split == "val" else f" ({split})"
        progress = attack_progress(spec, getattr(splits, split),
                                   f"attacks on the vote at {one.params.depth}{where}{seed}", log)
        metrics, budget = lesci_surface(spec, decision, points, getattr(splits, split),
                                        attacks, device, progress, generator_seed=1 + r,
                                        race=race)
        metrics["credibility"], n_cal = calibrated(decision, stages.calibration, points, device)
        metrics["calibration_samples"] = [n_cal] * len(points)
        runs.append(metrics)
        if attacks is not None:
            bases.append(base_figures(attacks))
        size = min(len(space) for space in spaces)
    return over_seeds(runs), budget, over_seeds(bases) if bases else {}, size


def lesci_trial(config: dict[str, Any], spec_json: dict[str, Any], storage_uri: str) -> None:
    storage = Storage(storage_uri)
    log = console(storage)
    result_path, done = _stored_result(storage)
    if done is not None:
        log("finished in an earlier run: reporting its stored result")
        tune.report(done["report"])
        return
    spec, splits, device = setup(spec_json)
    trial = resolve(spec, config)
    points = spec.defense.surface_points(spec, len(trial.params.depths))
    race = None
    if spec.scheduler.name == "mo_asha":  # race the attacks against every trial's points
        race = SurfaceRace(storage, tune.get_context().get_trial_id() or "trial",
                           trial.params.depth, json.dumps(config, sort_keys=True, default=str),
                           points, spec.optimize, {}, spec.scheduler.grace_period,
                           spec.scheduler.reduction_factor, log,
                           points_compared=spec.trial_count * spec.defense.largest_surface(spec))
    metrics, budget, base, size = lesci_figures(spec, trial, points, splits, "val", device,
                                                _stage_cache(storage, log), log, race)
    rows = surface_rows(trial, size, points, metrics)
    full = [row for row in rows if not row.get("raced_out")]
    # the trial's hypervolume counts a raced-out point at its figure on the samples it was
    # attacked on (the searcher's view of the whole surface); its operating point is one that
    # was attacked on every sample, when it has one
    on_front, volume = front_of(rows, spec.optimize)
    best = operating_point(full or rows, spec.optimize)
    report = {name: float(best[name]) for name in metrics}
    report.update({"hypervolume": volume, "surface_points": len(rows),
                   "surface_front_points": int(on_front.sum()), "operating_k": best["k"],
                   "operating_min_votes": best["min_votes"],
                   "operating_threshold": best["threshold"]})
    if race is not None:  # what the race spent and stopped (orchestrator.families.lesci)
        stops = [at for _, at in race.stopped]
        report.update({"attack_point_samples": int(budget["point_samples"]),
                       "attack_point_samples_full": int(budget["full_point_samples"]),
                       "surface_full_points": len(full), "raced_points": len(rows) - len(full),
                       "race_stopped_at": max(stops) if stops else 0})
    report.update(base)  # the bare model's figures, from the shared stage
    storage.put_verified(result_path, json.dumps({"report": report, "surface": rows,
                                                  "budget": budget}).encode(),
                         {"config": config})
    tune.report(report)
