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
import time
from typing import Any

import ray
import torch
from ray import tune

from defenses.attacks import apgd, pgd
from defenses.data import Augmentation, Splits, load_dataset
from defenses.embedding_space import EmbeddingSpace, build_embedding_space
from defenses.lesci import fit_pca_at_depth
from defenses.lesci_attack import LESCIDecision, attack_surface
from defenses.surface import SurfacePoint, surface_metrics
from defenses.checkpoints import checkpoint_bytes, load_checkpoint
from defenses.models import build_model
from defenses.pca import StreamingPCA
from defenses.training import (ObjectiveName, TrainConfig, Trainer, evaluate_robustness,
                               make_objective, objective_parameters)
from orchestrator.reporting import front_of
from orchestrator.space import FAMILY_METRICS, TRAIN_FIELDS, Family, SweepSpec
from orchestrator.stages import StageCache, coordinator_name
from orchestrator.storage import Storage

__all__ = ["make_trainable", "lesci_trial", "training_trial", "train_base_model",
           "craft_transfer_set", "lesci_surface", "operating_point", "SURFACE_COLUMNS",
           "BASE_METRICS"]


def make_trainable(spec: SweepSpec, sweep_storage: Storage):
    fn = lesci_trial if spec.family is Family.LESCI else training_trial
    bound = tune.with_parameters(fn, spec_json=spec.as_dict(), storage_uri=sweep_storage.uri)
    return tune.with_resources(bound, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _device(spec: SweepSpec) -> torch.device:
    return torch.device("cuda" if spec.resources.gpu > 0 and torch.cuda.is_available() else "cpu")


def _setup(spec_json: dict[str, Any]) -> tuple[SweepSpec, Splits, torch.device]:
    spec = SweepSpec(**spec_json)
    # a trial gets spec.resources.cpu cores: no more threads than that (no oversubscription)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    splits = load_dataset(spec.dataset.name, spec.dataset.root, **spec.dataset.options)
    return spec, splits, _device(spec)


def _train_config(spec: SweepSpec, params: dict[str, Any]) -> TrainConfig:
    values = dict(spec.training)
    values.update({k: v for k, v in params.items() if k in TRAIN_FIELDS})
    if isinstance(values.get("augmentation"), dict):
        values["augmentation"] = Augmentation(**values["augmentation"])
    return TrainConfig(**values)


def _build(spec: SweepSpec, splits: Splits) -> torch.nn.Module:
    return build_model(spec.model.name, splits.num_classes, splits.input_shape, splits.mean,
                       splits.std, **spec.model.options)


def _log(message: str) -> None:
    print(f"[{tune.get_context().get_trial_name() or 'trial'}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# LESCI


def _largest(spec: SweepSpec, key: str, default: Any) -> Any:
    values = spec.values_of(key)
    if values is None:
        return default
    return max(values) if isinstance(values, list) else values[1]


def _stage_cache(storage: Storage) -> StageCache:
    sweep = storage.uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        coordinator = ray.get_actor(coordinator_name(sweep))
    except ValueError:
        coordinator = None  # running outside a sweep driver: storage alone dedups across runs
    return StageCache(storage, coordinator, owner=tune.get_context().get_trial_id() or "", log=_log)


def _stored_result(storage: Storage) -> tuple[str, dict[str, float] | None]:
    """(path, metrics a previous run of this trial already finished with, if any).

    Tune saves its experiment state every few seconds: a trial that finished after the last
    save is launched again on resume. Its stored result is reported instead of recomputed.
    """
    path = f"results/{tune.get_context().get_trial_id()}.json"
    found = storage.get_verified(path)
    return path, (json.loads(found[0]) if found is not None else None)


def train_base_model(spec: SweepSpec, splits: Splits, device,
                     params: dict[str, Any] | None = None) -> torch.nn.Module:
    """The LESCI base model, trained with the space's ``training`` settings (and the training
    fields a trial searches, in ``params``) and seed."""
    config = _train_config(spec, params or {})
    torch.manual_seed(config.seed)
    model = _build(spec, splits)
    Trainer(model, splits.train, config, device=device).fit()
    return model


def craft_transfer_set(model: torch.nn.Module, splits: Splits, attack, device) -> bytes:
    """Attacks on the bare base model (``torch.save`` bytes of plain tensors), shared by every
    LESCI trial of a sweep: PGD (the transfer set) and APGD-CE (the suite's steps, 2 starts),
    which also warm-start the attacks on the vote; and the bare model's figures beside LESCI's:
    ``base_accuracy`` (validation split) and ``base_robust_accuracy`` (the per-sample worst
    case of clean, PGD and APGD-CE on the attacked samples)."""
    x_val, y_val = _validation_tensors(splits, attack.samples)
    gen = torch.Generator().manual_seed(0)
    model.eval()
    transfer = torch.cat([pgd(model, x.to(device), y.to(device), attack.eps, attack.step_size,
                              attack.steps, restarts=attack.restarts, generator=gen).cpu()
                          for x, y in zip(x_val.split(256), y_val.split(256))])
    base_apgd = []
    for x, y in zip(x_val.split(256), y_val.split(256)):
        x, y = x.to(device), y.to(device)

        def cross_entropy(z: torch.Tensor, rows: torch.Tensor, y=y):
            logits = model(z)
            return (torch.nn.functional.cross_entropy(logits, y[rows], reduction="none"),
                    logits.argmax(1) != y[rows])

        base_apgd.append(apgd(cross_entropy, x, attack.eps, attack.apgd.steps, 2, gen)[0].cpu())
    base_apgd = torch.cat(base_apgd)
    right = torch.ones(len(y_val), dtype=torch.bool)
    for inputs in (x_val, transfer, base_apgd):
        right &= _predict(model, inputs, device) == y_val
    x_all, y_all = _validation_tensors(splits)
    buffer = io.BytesIO()
    torch.save({"adversarial": transfer, "base_apgd": base_apgd, "labels": y_val,
                "base_accuracy": float((_predict(model, x_all, device) == y_all).double().mean()),
                "base_robust_accuracy": float(right.double().mean())}, buffer)
    return buffer.getvalue()


# the bare model under the suite's PGD and APGD-CE, logged beside LESCI's figures
BASE_METRICS = ("base_accuracy", "base_robust_accuracy")
# surface.csv: the trial's point, the (k, m) point, then the metrics
SURFACE_COLUMNS = ("depth", "n_components", "embedding_size", "center", "k", "min_votes",
                   "threshold")


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    """The model's labels for ``x`` [n, ...], on the CPU."""
    return torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x.split(512)])


def lesci_surface(spec: SweepSpec, decision: LESCIDecision, points: list[SurfacePoint],
                  splits: Splits, attacks: dict[str, torch.Tensor] | None, device,
                  progress=None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Every point's metrics ({name: [P] values}) and the attack budget: the four of SPEC.md on
    the validation split; with an attack, ``transfer_robust_accuracy`` (the PGD transfer set
    alone) and ``robust_accuracy``, the per-sample worst case of the whole suite on the real
    vote (``defenses.lesci_attack.attack_surface``)."""
    x_val, y_val = _validation_tensors(splits)
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
        x_att, y_att = _validation_tensors(splits, attack.samples)
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


def operating_point(rows: list[dict[str, Any]], objectives: dict[str, str]) -> dict[str, Any]:
    """The point a trial reports as its own: the largest sum of its objectives (a minimised
    one counts as 1 - value), ties to the smaller k, then the smaller min_votes."""
    def score(row: dict[str, Any]) -> float:
        values = [row[m] if mode == "max" else 1 - row[m] for m, mode in objectives.items()]
        return sum(v for v in values if v == v)  # NaN counts as nothing

    return max(rows, key=lambda r: (score(r), -r["k"], -r["min_votes"]))


def lesci_trial(config: dict[str, Any], spec_json: dict[str, Any], storage_uri: str) -> None:
    storage = Storage(storage_uri)
    result_path, done = _stored_result(storage)
    if done is not None:
        _log("finished in an earlier run: reporting its stored result")
        tune.report(done["report"])
        return
    spec, splits, device = _setup(spec_json)
    cache = _stage_cache(storage)
    depth, n_components = config["depth"], int(config["n_components"])
    size = config.get("embedding_size")
    center = bool(config.get("center", True))
    points = spec.surface_points()
    k_max = max(p.k for p in points)

    # Stage 1: the base model (trained once, or loaded from the space's checkpoint).
    training = {**spec.training, **{k: v for k, v in config.items() if k in TRAIN_FIELDS}}
    base_inputs = {"dataset": spec.dataset.model_dump(), "model": spec.model.model_dump(),
                   "training": training}

    def train_base() -> bytes:
        if spec.model.checkpoint:
            model, extra = load_checkpoint(spec.model.checkpoint)
            return checkpoint_bytes(model, extra)
        return checkpoint_bytes(train_base_model(spec, splits, device, config).cpu())

    model, _ = load_checkpoint(cache.get("base", base_inputs, train_base), map_location=device,
                               name="base model stage")
    model.eval()

    # Stage 2: PCA at this depth with the largest n_components of the space (truncated).
    max_components = int(_largest(spec, "n_components", n_components))
    pca_inputs = {"base": base_inputs, "depth": depth, "n_components": max_components}

    def fit_pca() -> bytes:
        logged = [0]

        def progress(seen: int) -> None:  # early layers take long: say how far the fit is
            if seen - logged[0] >= 10_000:
                logged[0] = seen
                _log(f"PCA at {depth} ({max_components} components): {seen} samples folded")

        pca = fit_pca_at_depth(model, depth, splits.train, max_components, device=device,
                               progress=progress)
        return pca.to_bytes()

    pca = StreamingPCA.from_bytes(cache.get("pca", pca_inputs, fit_pca), "PCA stage",
                                  device=device, n_components=n_components)

    # Stage 3: the embedding space of that PCA, at the largest embedding size of the space.
    max_size = _largest(spec, "embedding_size", None)
    space_inputs = {"pca": pca_inputs, "embedding_size": max_size, "center": center}

    def build_space() -> bytes:
        full = StreamingPCA.from_bytes(cache.get("pca", pca_inputs, fit_pca), device=device)
        return build_embedding_space(model, depth, full, splits.train,
                                     None if max_size is None else int(max_size),
                                     device=device, center=center).to_bytes()

    space = EmbeddingSpace.from_bytes(cache.get("space", space_inputs, build_space),
                                      "embedding-space stage")
    space = space.truncate(n_components, None if size is None else min(int(size), len(space)))
    if k_max > len(space):
        raise ValueError(f"k={k_max} exceeds the embedding space's {len(space)} samples")

    attacks = None
    if spec.attack is not None:
        # Stage 4: attacks on the bare base model (a transfer set and the APGD baseline).
        stored = cache.get("transfer", {"base": base_inputs, "attack": spec.attack.model_dump()},
                           lambda: craft_transfer_set(model, splits, spec.attack, device))
        attacks = torch.load(io.BytesIO(stored), weights_only=True)
    decision = LESCIDecision(model, depth, pca, space, k_max, center=center,
                             num_classes=splits.num_classes)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        _log(f"attacks on the vote: {done}/{total} runs, {time.perf_counter() - start:.0f} s")

    metrics, budget = lesci_surface(spec, decision, points, splits, attacks, device, progress)
    rows = []
    for i, point in enumerate(points):
        row = {"depth": depth, "n_components": n_components,
               "embedding_size": len(space), "center": center, "k": point.k,
               "min_votes": point.min_votes, "threshold": point.threshold}
        row.update({name: values[i] for name, values in metrics.items()})
        rows.append(row)
    on_front, volume = front_of(rows, spec.objectives)
    best = operating_point(rows, spec.objectives)
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


def _validation_tensors(splits: Splits, samples: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split (its first ``samples``, when given) as tensors."""
    n = len(splits.val) if samples is None else min(samples, len(splits.val))
    xs, ys = zip(*(splits.val[i] for i in range(n)))
    return torch.stack(xs), torch.as_tensor(ys)


# ------------------------------------------------------------------------------------------------
# IBP and adversarial training


def _objective(spec: SweepSpec, params: dict[str, Any]):
    if spec.family is Family.IBP:
        name = ObjectiveName.IBP.value
    else:
        name = str(params["objective"])
    # the space's params mix training fields and objective parameters: pass the objective its own
    accepted = objective_parameters(name)
    return make_objective(name, **{k: v for k, v in params.items() if k in accepted})


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
    seed = int(config.get("seed", spec.training.get("seed", 0)))
    torch.manual_seed(seed)
    model = _build(spec, splits)
    trainer = Trainer(model, splits.train, _train_config(spec, config), _objective(spec, config),
                      device=device)
    newest = _newest_checkpoint(Storage(storage_uri))
    if newest is not None:
        state, last_metrics = newest
        trainer.load_state_dict(torch.load(io.BytesIO(state), map_location=device,
                                           weights_only=True))
        _log(f"resumed from epoch {trainer.epoch}")
        # that epoch's result again: a driver that died may not have tracked it yet (the MLflow
        # callback skips epochs it has), and a trial that finished after Tune's last state
        # save ends here
        with tempfile.TemporaryDirectory() as folder:
            tune.report(last_metrics, checkpoint=_checkpoint(trainer, last_metrics, folder))
    attack = spec.attack
    wanted = FAMILY_METRICS[spec.family]
    while trainer.epoch < trainer.config.epochs:
        train_metrics = trainer.run_epoch()
        model.eval()
        evaluated = evaluate_robustness(model, splits.val, attack.eps, attack.steps,
                                        attack.step_size, attack.restarts,
                                        verify=spec.family is Family.IBP, seed=trainer.epoch)
        model.train()
        metrics = {k: v for k, v in evaluated.items() if k in wanted}
        metrics.update(train_metrics)
        metrics = {k: float(v) for k, v in metrics.items()}
        with tempfile.TemporaryDirectory() as folder:
            tune.report(metrics, checkpoint=_checkpoint(trainer, metrics, folder))
