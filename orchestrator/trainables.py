"""Ray Tune function trainables for the three families.

Each is a plain ``fn(config)`` that calls ``tune.report``; ``make_trainable`` binds the
validated space and the sweep's storage with ``tune.with_parameters`` and its resources with
``tune.with_resources``. Training trials checkpoint every epoch and continue from
``tune.get_checkpoint()``; LESCI trials take their shared stages from the ``StageCache``.
"""

from __future__ import annotations

import io
import json
import tempfile
from typing import Any, Callable

import ray
import threadpoolctl
import torch
from ray import tune

from defenses.data import Splits
from defenses.evaluation import evaluate_robustness
from defenses.lesci_attack import LESCIDecision, attack_surface
from defenses.surface import SurfacePoint, surface_metrics
from defenses.trainer import Trainer
from orchestrator.lesci_stages import LESCIStages, space_model, validation_tensors
from orchestrator.params import resolve
from orchestrator.progress import ProgressLine
from orchestrator.reporting import BASE_METRICS, front_of
from orchestrator.space import FAMILY_METRICS, Family, SweepSpec
from orchestrator.stages import StageCache, coordinator_name
from orchestrator.storage import Storage

__all__ = ["make_trainable", "lesci_trial", "training_trial",
           "lesci_surface", "operating_point", "limit_threads"]


def make_trainable(spec: SweepSpec, sweep_storage: Storage):
    fn = lesci_trial if spec.family is Family.LESCI else training_trial
    bound = tune.with_parameters(fn, spec_json=spec.as_dict(), storage_uri=sweep_storage.uri)
    return tune.with_resources(bound, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _device(spec: SweepSpec) -> torch.device:
    return torch.device("cuda" if spec.resources.gpu > 0 and torch.cuda.is_available() else "cpu")


def limit_threads(cpus: float) -> int:
    """Size this process's thread pools to the cores a trial reserved (at least one): torch's
    intra-op pool and, through threadpoolctl, every BLAS and OpenMP runtime loaded (numpy's
    and faiss's OpenBLAS, torch's and faiss's OpenMP). Two trials on two cores then run one
    thread each instead of fighting over both. Returns the thread count.

    OpenMP's limit holds for the calling thread: call it from the thread that computes (a Tune
    function trainable runs in a thread of its own)."""
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    threadpoolctl.threadpool_limits(threads)
    return threads


def _setup(spec_json: dict[str, Any]) -> tuple[SweepSpec, Splits, torch.device]:
    spec = SweepSpec(**spec_json)
    limit_threads(spec.resources.cpu)
    splits = spec.dataset.load()
    return spec, splits, _device(spec)


def _coordinator(storage: Storage):
    """The sweep's coordinator actor, or None when the trial runs outside a sweep driver."""
    sweep = storage.uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        return ray.get_actor(coordinator_name(sweep))
    except ValueError:
        return None


def _console(storage: Storage) -> Callable[[str], None]:
    """A trial's console lines: sent to the driver through the sweep's coordinator (printed by
    ``orchestrator.progress.ConsoleProgress``), or printed outside a sweep."""
    coordinator = _coordinator(storage)
    name = tune.get_context().get_trial_id() or "trial"

    def log(message: str) -> None:
        line = f"{name}: {message}"
        if coordinator is None:
            print(line, flush=True)
        else:
            coordinator.note.remote(line)

    return log


# ------------------------------------------------------------------------------------------------
# LESCI


def _stage_cache(storage: Storage, log: Callable[[str], None]) -> StageCache:
    # outside a sweep driver there is no coordinator: storage alone dedups across runs
    return StageCache(storage, _coordinator(storage),
                      owner=tune.get_context().get_trial_id() or "", log=log)


def _stored_result(storage: Storage) -> tuple[str, dict[str, float] | None]:
    """(path, metrics a previous run of this trial already finished with, if any).

    Tune saves its experiment state every few seconds: a trial that finished after the last
    save is launched again on resume. Its stored result is reported instead of recomputed.
    """
    path = f"results/{tune.get_context().get_trial_id()}.json"
    found = storage.get_verified(path)
    return path, (json.loads(found[0]) if found is not None else None)


def lesci_surface(spec: SweepSpec, decision: LESCIDecision, points: list[SurfacePoint],
                  splits: Splits, attacks: dict[str, torch.Tensor] | None, device,
                  progress=None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Every point's metrics ({name: [P] values}) and the attack budget: the four of SPEC.md on
    the validation split; with an attack, ``transfer_robust_accuracy`` (the PGD transfer set
    alone) and ``robust_accuracy``, the per-sample worst case of the whole suite on the real
    vote (``defenses.lesci_attack.attack_surface``)."""
    x_val, y_val = validation_tensors(splits)
    prediction, projected = [], []
    for xb in x_val.split(512):
        p, pr = decision.decide(xb.to(device), points)
        prediction.append(p.cpu())
        projected.append(pr.cpu())
    metrics = {name: values.tolist() for name, values in surface_metrics(
        y_val, torch.cat(prediction), torch.cat(projected)).items()}
    budget: dict[str, Any] = {}
    if spec.attack is not None and attacks is not None:
        attack = spec.attack
        x_att, y_att = validation_tensors(splits, attack.samples)
        pool = {"transfer": attacks["adversarial"], "base_apgd": attacks["base_apgd"]}
        suite = attack_surface(decision, x_att.to(device), y_att.to(device), points, attack.eps,
                               attack.apgd.steps, attack.apgd.restarts, attack.apgd.targets,
                               attack.apgd.smooth, attack.apgd.group,
                               pool={k: v.to(device) for k, v in pool.items()},
                               starts=("base_apgd", "transfer"), progress=progress,
                               generator=torch.Generator().manual_seed(1))
        metrics["robust_accuracy"] = suite.accuracy().tolist()
        metrics["transfer_robust_accuracy"] = suite.accuracy("transfer").tolist()
        budget = {**suite.budget, "samples": len(y_att), "transfer": f"PGD-{attack.steps}",
                  "suite": "clean, transfer PGD, bare-model APGD-CE (2 starts), APGD on the "
                           "exact and on the smoothed vote margin (started from both), "
                           "targeted APGD"}
    return metrics, budget


def operating_point(rows: list[dict[str, Any]], optimize: dict[str, str]) -> dict[str, Any]:
    """The point a trial reports as its own: the largest sum of the metrics it optimizes (a minimised
    one counts as 1 - value), ties to the smaller k, then the smaller min_votes."""
    def score(row: dict[str, Any]) -> float:
        values = [row[m] if mode == "max" else 1 - row[m] for m, mode in optimize.items()]
        return sum(v for v in values if v == v)  # NaN counts as nothing

    return max(rows, key=lambda r: (score(r), -r["k"], -r["min_votes"]))


def lesci_trial(config: dict[str, Any], spec_json: dict[str, Any], storage_uri: str) -> None:
    storage = Storage(storage_uri)
    log = _console(storage)
    result_path, done = _stored_result(storage)
    if done is not None:
        log("finished in an earlier run: reporting its stored result")
        tune.report(done["report"])
        return
    spec, splits, device = _setup(spec_json)
    trial = resolve(spec, config)
    points = spec.surface_points()
    stages = LESCIStages(spec, trial, splits, device, _stage_cache(storage, log), log=log)
    model, pca, space = stages.model(), stages.pca(), stages.embedding_space()
    k_max = max(p.k for p in points)
    if k_max > len(space):
        raise ValueError(f"k={k_max} exceeds the embedding space's {len(space)} samples")
    attacks = stages.attacks()
    params = trial.lesci
    decision = LESCIDecision(model, params.depth, pca, space, k_max, center=params.center,
                             num_classes=splits.num_classes)
    samples = len(splits.val) if spec.attack is None or spec.attack.samples is None else min(
        spec.attack.samples, len(splits.val))
    line: list[ProgressLine] = []

    def progress(done: int, total: int) -> None:  # attack runs over the attacked samples
        if not line:
            line.append(ProgressLine(f"attacks on the vote at {params.depth}", total * samples,
                                     "sample-runs", log))
        line[0](done * samples)

    metrics, budget = lesci_surface(spec, decision, points, splits, attacks, device, progress)
    rows = []
    for i, point in enumerate(points):
        row = {"depth": params.depth, "n_components": params.n_components,
               "embedding_size": len(space), "center": params.center, "k": point.k,
               "min_votes": point.min_votes, "threshold": point.threshold}
        row.update({name: values[i] for name, values in metrics.items()})
        rows.append(row)
    on_front, volume = front_of(rows, spec.optimize)
    best = operating_point(rows, spec.optimize)
    report = {name: float(best[name]) for name in metrics}
    report.update({"hypervolume": volume, "surface_points": len(rows),
                   "surface_front_points": int(on_front.sum()), "operating_k": best["k"],
                   "operating_min_votes": best["min_votes"],
                   "operating_threshold": best["threshold"]})
    if attacks is not None:  # the bare model's figures, from the shared stage
        report.update({key: float(attacks[key]) for key in BASE_METRICS})
    storage.put_verified(result_path, json.dumps({"report": report, "surface": rows,
                                                  "budget": budget}).encode(),
                         {"config": config})
    tune.report(report)


# ------------------------------------------------------------------------------------------------
# IBP and adversarial training


_STATE_FILE = "trainer.pt"  # with its manifest trainer.pt.json: sha256, epoch, metrics


def _newest_checkpoint(sweep_storage: Storage) -> tuple[bytes, dict[str, float]] | None:
    """(trainer state, metrics) of this trial's newest intact checkpoint, if any.

    Tune restores a trial from the checkpoint named in its last saved experiment state, which
    it writes every few seconds; a driver that died later leaves newer checkpoints in the
    trial's folder. All of them are read (checked against their manifests) and the latest
    epoch wins, so no finished epoch is redone.
    """
    trial = sweep_storage.child(tune.get_context().get_storage().trial_dir_name)
    found = [trial.get_verified(f"{name}/{_STATE_FILE}") for name in trial.list("")
             if name.startswith("checkpoint_")]
    intact = [item for item in found if item is not None]
    if not intact:
        return None
    data, manifest = max(intact, key=lambda item: item[1]["epoch"])
    return data, manifest["metrics"]


def _checkpoint(trainer: Trainer, metrics: dict[str, float], folder: str) -> tune.Checkpoint:
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    Storage.from_uri(folder).put_verified(_STATE_FILE, buffer.getvalue(),
                                          {"epoch": trainer.epoch, "metrics": metrics})
    return tune.Checkpoint.from_directory(folder)


def training_trial(config: dict[str, Any], spec_json: dict[str, Any], storage_uri: str) -> None:
    spec, splits, device = _setup(spec_json)
    trial = resolve(spec, config)
    torch.manual_seed(trial.training.seed)
    model = space_model(spec, splits)
    trainer = Trainer(model, splits.train, trial.training, trial.objective.build(),
                      device=device)
    newest = _newest_checkpoint(Storage(storage_uri))
    if newest is not None:
        state, last_metrics = newest
        trainer.load_state_dict(torch.load(io.BytesIO(state), map_location=device,
                                           weights_only=True))
        _console(Storage(storage_uri))(f"resumed from epoch {trainer.epoch}")
        # that epoch's result again: a driver that died may not have tracked it yet (the MLflow
        # callback skips epochs it has), and a trial that finished after Tune's last state
        # save ends here
        with tempfile.TemporaryDirectory() as folder:
            tune.report(last_metrics, checkpoint=_checkpoint(trainer, last_metrics, folder))
    attack = spec.attack
    wanted = FAMILY_METRICS[spec.family]
    while trainer.epoch < trainer.config.epochs:
        train_metrics = trainer.run_epoch()
        last = trainer.epoch == trainer.config.epochs  # the suite, once, on the final model
        evaluated = evaluate_robustness(model, splits.val, attack.eps, attack.steps,
                                        attack.alpha, attack.restarts,
                                        verify=spec.family is Family.IBP, seed=trainer.epoch,
                                        suite=attack.attack_suite() if last else None)
        metrics = {k: v for k, v in evaluated.items() if k in wanted}
        metrics.update(train_metrics)
        metrics = {k: float(v) for k, v in metrics.items()}
        with tempfile.TemporaryDirectory() as folder:
            tune.report(metrics, checkpoint=_checkpoint(trainer, metrics, folder))
