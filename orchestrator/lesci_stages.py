"""The shared stages of a LESCI sweep, declared as a graph apart from the trial function.

    base model ──> pca (depth, largest n_components) ──> embedding space (size, center)
        └────────> attacks on the bare model (the space's attack), on val; on test at the end

A trial voting over several depths reads the PCA and space of each (the same stages as a
single-depth trial there). With ``calibration``, the PCAs and spaces are built from the
training split less its calibration samples (their keys say so).

Each stage's output is keyed by everything it depends on (its inputs, which name the inputs of
the stages it reads), so trials that share a depth share its PCA and space, and a stage is
computed once per sweep (``orchestrator.stages.StageCache``). A trial truncates the PCA and
the space to its own n_components and embedding size.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset

from defenses.attacks import apgd, cross_entropy_objective, pgd
from defenses.checkpoints import checkpoint_bytes, load_checkpoint, load_model
from defenses.data import Splits
from defenses.embedding_space import EmbeddingSpace, build_embedding_space
from defenses.lesci import fit_pca_at_depth
from defenses.models import eval_mode
from defenses.pca import StreamingPCA
from defenses.trainer import TrainConfig, Trainer
from orchestrator.params import Trial
from orchestrator.progress import ProgressLine
from orchestrator.space import SweepSpec
from orchestrator.stages import StageCache

__all__ = ["LESCIStages", "calibration_split", "space_model", "train_base_model", "craft_transfer_set",
           "split_tensors", "predict", "SPLITS"]

# the splits a sweep evaluates on: val while it searches, test once at the end
SPLITS = ("val", "test")


def space_model(spec: SweepSpec, splits: Splits, weights: bool = False,
                options: dict | None = None) -> torch.nn.Module:
    """A model of the space's architecture for the dataset (``ModelSpec.build``), with a
    trial's further built-in ``options`` (IBP's ``batch_norm``); with ``weights``, that of the
    space's checkpoint (``load_model``: ours is rebuilt as it was saved, anyone else's weights
    load into a fresh model)."""
    source = spec.model
    if options:
        source = source.model_copy(update={"options": {**source.options, **options}})

    def fresh() -> torch.nn.Module:
        return source.build(splits.num_classes, splits.input_shape, splits.mean, splits.std)

    if weights and source.checkpoint:
        return load_model(source.checkpoint, fresh)
    return fresh()


def split_tensors(data: Dataset, samples: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A split (its first ``samples``, when given) as tensors."""
    n = len(data) if samples is None else min(samples, len(data))
    xs, ys = zip(*(data[i] for i in range(n)))
    return torch.stack(xs), torch.as_tensor(ys)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    """The model's labels for ``x`` [n, ...], on the CPU."""
    return torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x.split(512)])


def train_base_model(spec: SweepSpec, splits: Splits, device,
                     training: TrainConfig) -> torch.nn.Module:
    """The LESCI base model, trained with the trial's ``training`` (the space's ``training``
    and any training field the trial searches), standard objective."""
    torch.manual_seed(training.seed)
    model = space_model(spec, splits)
    Trainer(model, splits.train, training, device=device).fit()
    return model


def craft_transfer_set(model: torch.nn.Module, data: Dataset, attack, device) -> bytes:
    """``_craft_transfer_set`` with the model in eval mode."""
    with eval_mode(model):
        return _craft_transfer_set(model, data, attack, device)


def _craft_transfer_set(model: torch.nn.Module, data: Dataset, attack, device) -> bytes:
    """Attacks on the bare base model (``torch.save`` bytes of plain tensors), shared by every
    LESCI trial of a sweep: PGD (the transfer set) and APGD-CE (the suite's steps, 2 starts),
    which also warm-start the attacks on the vote; and the bare model's figures beside LESCI's:
    ``base_accuracy`` (the whole split) and ``base_robust_accuracy`` (the per-sample worst
    case of clean, PGD and APGD-CE on the attacked samples, each sample's outcome kept as
    ``base_robust`` for paired comparisons)."""
    x_val, y_val = split_tensors(data, attack.samples)
    gen = torch.Generator().manual_seed(0)
    transfer = torch.cat([pgd(model, x.to(device), y.to(device), attack.eps, attack.alpha,
                              attack.steps, restarts=attack.restarts, generator=gen).cpu()
                          for x, y in zip(x_val.split(256), y_val.split(256))])
    base_apgd = []
    for x, y in zip(x_val.split(256), y_val.split(256)):
        x, y = x.to(device), y.to(device)
        base_apgd.append(apgd(cross_entropy_objective(model, y), x, attack.eps,
                              attack.apgd.steps, 2, gen)[0].cpu())
    base_apgd = torch.cat(base_apgd)
    right = torch.ones(len(y_val), dtype=torch.bool)
    for inputs in (x_val, transfer, base_apgd):
        right &= predict(model, inputs, device) == y_val
    x_all, y_all = split_tensors(data)
    buffer = io.BytesIO()
    torch.save({"adversarial": transfer, "base_apgd": base_apgd, "labels": y_val,
                "base_accuracy": float((predict(model, x_all, device) == y_all).double().mean()),
                "base_robust_accuracy": float(right.double().mean()), "base_robust": right,
                "samples": len(y_all)}, buffer)
    return buffer.getvalue()


def _largest(spec: SweepSpec, key: str, default: Any) -> Any:
    values = spec.values_of(key)
    if values is None:
        return default
    return max(values) if isinstance(values, list) else values[1]


def calibration_count(n: int, calibration: int | float) -> int:
    """How many of ``n`` training samples ``calibration`` (a fraction or a count) holds out;
    ``ValueError`` unless it holds out some and leaves some."""
    count = round(calibration * n) if isinstance(calibration, float) else int(calibration)
    if not 1 <= count < n:
        raise ValueError(f"params.calibration: {calibration} holds out {count} of the {n} "
                         "training samples; it must hold out at least one and leave at least "
                         "one for the embedding spaces")
    return count


def calibration_split(train: Dataset, calibration: int | float | None, seed: int
                      ) -> tuple[Dataset, Dataset | None]:
    """(reference, calibration): ``calibration`` samples of the training split (a fraction or a
    count, drawn with ``seed``) held out of the PCAs and embedding spaces, and the rest
    (Deep k-NN's calibration, Papernot & McDaniel 2018); None: the whole split and no
    calibration."""
    if calibration is None:
        return train, None
    n = len(train)
    count = calibration_count(n, calibration)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = sorted(order[:count].tolist())
    kept = sorted(order[count:].tolist())
    return Subset(train, kept), Subset(train, held)


class LESCIStages:
    """One trial's view of the graph: each method returns its stage's output, computed by
    the first trial that needs it and read back by the others. Several depths: a PCA and an
    embedding space per depth, each the stage a single-depth trial at that depth uses."""

    def __init__(self, spec: SweepSpec, trial: Trial, splits: Splits, device,
                 cache: StageCache, log: Callable[[str], None] = print):
        self.spec, self.trial, self.splits, self.device = spec, trial, splits, device
        self.cache, self.log = cache, log
        params = trial.params
        self.depths = params.depths
        self.max_components = int(_largest(spec, "n_components", params.n_components))
        max_size = _largest(spec, "embedding_size", None)
        self.max_size = None if max_size is None else int(max_size)
        self.reference, self.calibration = calibration_split(
            splits.train, params.calibration, spec.dataset.split_seed)
        # the graph: each stage's key names its own settings and its inputs' keys
        self.base_inputs = {"dataset": spec.dataset.model_dump(), "model": spec.model.model_dump(),
                            "training": trial.training.as_dict()}
        self.attack_inputs = (None if spec.attack is None else
                              {"base": self.base_inputs, "attack": spec.attack.model_dump()})
        self._model: torch.nn.Module | None = None

    def pca_inputs(self, depth: str) -> dict[str, Any]:
        inputs = {"base": self.base_inputs, "depth": depth, "n_components": self.max_components}
        if self.calibration is not None:  # the PCA sees the reference samples only
            inputs["calibration"] = self.trial.params.calibration
        return inputs

    def space_inputs(self, depth: str) -> dict[str, Any]:
        return {"pca": self.pca_inputs(depth), "embedding_size": self.max_size,
                "center": self.trial.params.center}

    # -- base model: trained once, or loaded from the space's checkpoint -------------------

    def _train_base(self) -> bytes:
        if self.spec.model.checkpoint:
            return checkpoint_bytes(space_model(self.spec, self.splits, weights=True))
        return checkpoint_bytes(train_base_model(self.spec, self.splits, self.device,
                                                 self.trial.training).cpu())

    def model(self) -> torch.nn.Module:
        if self._model is None:
            stored = self.cache.get("base", self.base_inputs, self._train_base)
            self._model, _ = load_checkpoint(stored, map_location=self.device,
                                             name="base model stage")
            self._model.eval()
        return self._model

    # -- PCA at a depth, with the largest n_components of the space ------------------------

    def _fit_pca(self, depth: str) -> bytes:
        # early layers take long: say how far the fit is, how fast, and how long is left
        progress = ProgressLine(f"PCA at {depth} ({self.max_components} components)",
                                len(self.reference), "samples", self.log)
        return fit_pca_at_depth(self.model(), depth, self.reference, self.max_components,
                                device=self.device, progress=progress).to_bytes()

    def pca(self, depth: str, truncated: bool = True) -> StreamingPCA:
        """The PCA stage at ``depth``, truncated to the trial's n_components (unless
        ``truncated`` is False)."""
        n = self.trial.params.n_components if truncated else None
        stored = self.cache.get("pca", self.pca_inputs(depth), lambda: self._fit_pca(depth),
                                depth)
        return StreamingPCA.from_bytes(stored, "PCA stage", device=self.device, n_components=n)

    # -- the embedding space of that PCA, at the largest embedding size --------------------

    def _build_space(self, depth: str) -> bytes:
        return build_embedding_space(self.model(), depth, self.pca(depth, truncated=False),
                                     self.reference, self.max_size, device=self.device,
                                     center=self.trial.params.center).to_bytes()

    def embedding_space(self, depth: str) -> EmbeddingSpace:
        """The space stage at ``depth``, truncated to the trial's n_components and embedding
        size."""
        space = EmbeddingSpace.from_bytes(
            self.cache.get("space", self.space_inputs(depth), lambda: self._build_space(depth),
                           depth), "embedding-space stage")
        size = self.trial.params.embedding_size
        return space.truncate(self.trial.params.n_components,
                              None if size is None else min(size, len(space)))

    # -- attacks on the bare base model ----------------------------------------------------

    def attacks(self, split: str = "val") -> dict[str, Any] | None:
        """The transfer set, the bare model's APGD-CE examples and its figures on ``split``
        (``val`` while searching, ``test`` in the final evaluation); None without an attack in
        the space."""
        if self.attack_inputs is None:
            return None
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        inputs = {**self.attack_inputs, "split": split}
        stored = self.cache.get("transfer", inputs,
                                lambda: craft_transfer_set(self.model(), getattr(self.splits, split),
                                                           self.spec.attack, self.device),
                                "" if split == "val" else split)
        return torch.load(io.BytesIO(stored), weights_only=True)
