"""A training trial (``TrainingFamily``): one model per seed of ``search.repeats``, trained in
step epoch by epoch from scratch or from the space's checkpoint, each epoch's figures reported
and every seed's state checkpointed (a restored trial continues from its newest intact
checkpoint); the attack suite once, on the final models."""

from __future__ import annotations

import io
import tempfile
from typing import Any

import torch
from ray import tune
from torch.utils.data import Dataset

from defenses.data import Splits
from defenses.evaluation import evaluate_robustness
from defenses.intervals import rate_interval
from defenses.trainer import Trainer
from orchestrator.lesci_stages import space_model
from orchestrator.params import resolve
from orchestrator.space import SweepSpec
from orchestrator.storage import Storage
from orchestrator.trainables import console, over_seeds, repeat_trials, setup

__all__ = ["training_trial", "evaluate_training", "newest_checkpoint", "trial_models",
           "with_intervals", "complete_verification", "verification_metrics",
           "VERIFICATION_METRICS"]

# what complete verification adds to a front trial's test figures, each with its 95% interval
# (over ``verify_samples``); the bracket's top is proved plus undecided
VERIFICATION_METRICS = ("verified_complete_accuracy", "falsified_rate", "undecided_rate")


_STATE_FILE = "trainer.pt"  # with its manifest trainer.pt.json: sha256, epoch, metrics


def newest_checkpoint(trial_storage: Storage) -> tuple[bytes, dict[str, float]] | None:
    """(trainer state, metrics) of a trial's newest intact checkpoint in its folder, if any.

    Tune restores a trial from the checkpoint named in its last saved experiment state, which
    it writes every few seconds; a driver that died later leaves newer checkpoints in the
    trial's folder. All of them are read (checked against their manifests) and the latest
    epoch wins, so no finished epoch is redone.
    """
    found = [trial_storage.get_verified(f"{name}/{_STATE_FILE}")
             for name in trial_storage.list("") if name.startswith("checkpoint_")]
    intact = [item for item in found if item is not None]
    if not intact:
        return None
    data, manifest = max(intact, key=lambda item: item[1]["epoch"])
    return data, manifest["metrics"]


def trial_models(spec: SweepSpec, splits: Splits, state: bytes, device
                 ) -> list[torch.nn.Module]:
    """A training trial's models, one per seed, with the weights of its trainer states
    (``newest_checkpoint``)."""
    models = []
    for one in torch.load(io.BytesIO(state), map_location=device, weights_only=True):
        # built as the trial built it (a checkpoint of ours keeps its own normalisation)
        model = space_model(spec, splits, weights=True,
                            options=one.get("model_options")).to(device)
        model.load_state_dict(one["model"])
        models.append(model.eval())
    return models


def with_intervals(metrics: dict[str, float], samples: int) -> dict[str, float]:
    """A training trial's rates with their 95% intervals (Wilson) over ``samples``."""
    out = dict(metrics)
    for name, value in metrics.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = rate_interval(value, samples)
    out["samples"] = float(samples)
    return out


def _checkpoint(trainers: list[Trainer], metrics: dict[str, float], folder: str,
                options: dict[str, Any]) -> tune.Checkpoint:
    """Every seed's trainer state, as one file."""
    buffer = io.BytesIO()
    # with the trial's model options (IBP's batch_norm), so the final models are rebuilt alike
    torch.save([{**trainer.state_dict(), "model_options": options} for trainer in trainers],
               buffer)
    Storage.from_uri(folder).put_verified(_STATE_FILE, buffer.getvalue(),
                                          {"epoch": trainers[0].epoch, "metrics": metrics})
    return tune.Checkpoint.from_directory(folder)


def evaluate_training(spec: SweepSpec, model: torch.nn.Module, data: Dataset, seed: int,
                      final: bool = True) -> dict[str, float]:
    """A training trial's figures on ``data``: nominal, PGD and (IBP) verified accuracy; with
    ``final``, the attack suite's worst case and each attack's figure too, and alpha-CROWN
    among the certificates (too slow for every epoch), every figure with its 95% interval."""
    attack = spec.attack
    evaluated = evaluate_robustness(model, data, attack.eps, attack.steps, attack.alpha,
                                    attack.restarts, verify=spec.defense.verifies, seed=seed,
                                    suite=attack.attack_suite() if final else None,
                                    alpha_crown=final)
    metrics = {k: float(v) for k, v in evaluated.items() if k in spec.defense.metrics}
    return with_intervals(metrics, len(data)) if final else metrics


def complete_verification(spec: SweepSpec, model: torch.nn.Module, data: Dataset,
                          log=print) -> bytes:
    """``verify.complete``: the first ``verify.samples`` of ``data`` proved, falsified or
    undecided (``defenses.complete.verify_complete``) at the attack's eps, as the bytes of
    ``verification.npz``: ``index`` (into the split), ``status`` (0 undecided, 1 proved,
    2 falsified), ``by`` (what decided each), ``seconds``, and for the falsified samples
    ``falsified`` (their indices), ``x``, ``x_adv`` and ``y``."""
    import time

    import numpy as np

    from defenses.complete import FALSIFIED, verify_complete
    from orchestrator.lesci_stages import split_tensors

    x, y = split_tensors(data, spec.verify.samples)
    began, last = time.perf_counter(), [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            left = (now - began) / done * (total - done)
            log(f"complete verification: {done} of {total} samples, about {left:.0f} s left")

    device = next(model.parameters()).device
    result = verify_complete(model, x.to(device), y.to(device), spec.attack.eps,
                             time_limit=spec.verify.time_limit, seed=spec.training.seed,
                             progress=progress)
    falsified = np.flatnonzero(result.status == FALSIFIED)
    decided_by = ", ".join(f"{name} {result.by.count(name)}" for name in dict.fromkeys(result.by))
    log(f"complete verification at eps {spec.attack.eps:g}: proved {result.proved_rate:.3f}, "
        f"falsified {result.falsified_rate:.3f}, undecided {result.undecided_rate:.3f} of "
        f"{len(y)} samples ({decided_by}; {spec.verify.time_limit:g} s limit, longest "
        f"{result.seconds.max():.1f} s)")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, index=np.arange(len(y)), status=result.status,
                        by=np.array(result.by), seconds=result.seconds, falsified=falsified,
                        x=x.numpy()[falsified], x_adv=result.x_adv[falsified],
                        y=y.numpy()[falsified], eps=np.float64(spec.attack.eps))
    return buffer.getvalue()


def verification_metrics(data: bytes) -> dict[str, float]:
    """``VERIFICATION_METRICS`` of a ``verification.npz``, each with its 95% interval."""
    import numpy as np

    from defenses.complete import FALSIFIED, PROVED, UNDECIDED

    status = np.load(io.BytesIO(data))["status"]
    rates = {name: float(np.mean(status == value)) for name, value in zip(
        VERIFICATION_METRICS, (PROVED, FALSIFIED, UNDECIDED))}
    out = with_intervals(rates, len(status))
    out["verify_samples"] = out.pop("samples")  # the test figures' own count stays "samples"
    return out


def training_trial(config: dict[str, Any], spec_json: dict[str, Any], storage_uri: str) -> None:
    """Train the trial's model (one per seed of ``search.repeats``, in step, epoch by epoch),
    report each epoch's figures (the mean over seeds) and checkpoint every seed's state."""
    spec, splits, device = setup(spec_json)
    trainers = []
    trial = resolve(spec, config)
    options = trial.params.model_options()
    for one in repeat_trials(spec, trial):
        torch.manual_seed(one.training.seed)
        # from the space's checkpoint, when it has one: fine-tuning; else freshly initialised
        model = space_model(spec, splits, weights=True, options=one.params.model_options())
        if not spec.model.checkpoint:
            one.params.prepare(model)
        trainers.append(Trainer(model, splits.train, one.training, one.params.build(),
                                device=device))
    newest = newest_checkpoint(Storage(storage_uri).child(
        tune.get_context().get_storage().trial_dir_name))
    if newest is not None:
        state, last_metrics = newest
        for trainer, saved in zip(trainers, torch.load(io.BytesIO(state), map_location=device,
                                                       weights_only=True), strict=True):
            trainer.load_state_dict(saved)
        console(Storage(storage_uri))(f"resumed from epoch {trainers[0].epoch}")
        # that epoch's result again: a driver that died may not have tracked it yet (the MLflow
        # callback skips epochs it has), and a trial that finished after Tune's last state
        # save ends here
        with tempfile.TemporaryDirectory() as folder:
            tune.report(last_metrics, checkpoint=_checkpoint(trainers, last_metrics, folder,
                                                               options))
    while trainers[0].epoch < trainers[0].config.epochs:
        runs = []
        for r, trainer in enumerate(trainers):
            train_metrics = trainer.run_epoch()
            last = trainer.epoch == trainer.config.epochs  # the suite, once, on the final model
            metrics = evaluate_training(spec, trainer.model, splits.val,
                                        seed=trainer.epoch + 1000 * r, final=last)
            metrics.update({k: float(v) for k, v in train_metrics.items()})
            # early stopping counts rungs only past the space's longest eps ramp
            metrics["optimizer_steps"] = float(trainer.step)
            runs.append(metrics)
        metrics = over_seeds(runs)
        with tempfile.TemporaryDirectory() as folder:
            tune.report(metrics, checkpoint=_checkpoint(trainers, metrics, folder, options))
