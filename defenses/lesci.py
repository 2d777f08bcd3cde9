"""LESCI: a kNN-vote projection layer on PCA-compressed activations (docs/search-spaces.md,
"Parameters of `lesci`").

At a named depth of a trained classifier, compress the activation with PCA, find its ``k`` most
cosine-similar rows of an *embedding space* (compressed activations of correctly classified
training samples) and, if at least ``threshold`` of those neighbours share a label, answer that
label ("projection"); otherwise answer what the network says ("identity").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defenses.activations import stream_activations
from defenses.embedding_space import EmbeddingSpace
from defenses.knn import KnnIndex, knn_vote
from defenses.pca import StreamingPCA
from defenses.surface import THRESHOLD_SLACK

__all__ = [
    "LESCIResult",
    "knn_vote",  # defenses.knn's, re-exported under LESCI's name
    "project_mask",
    "lesci_predict",
    "lesci_metrics",
    "fit_pca_at_depth",
    "collect_votes",
    "evaluate_lesci",
    "METRIC_NAMES",
]

METRIC_NAMES = ("accuracy", "projection_rate", "accuracy_projected", "accuracy_identity")


# ----------------------------------------------------------------------------------------------
# the decision


def check_threshold(threshold: float) -> None:
    """A vote fraction is at most 1; a negative threshold means "always project"."""
    if threshold > 1:
        raise ValueError(f"threshold must be at most 1, got {threshold}")


def project_mask(vote_fraction: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which samples LESCI projects: ``vote_fraction >= threshold``; a negative threshold
    projects everything."""
    check_threshold(threshold)
    if threshold < 0:
        return torch.ones_like(vote_fraction, dtype=torch.bool)
    return vote_fraction >= threshold - THRESHOLD_SLACK


def lesci_predict(model_prediction: torch.Tensor, majority: torch.Tensor,
                  vote_fraction: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, projected): the majority label where projected, else the model's own."""
    projected = project_mask(vote_fraction, threshold)
    return torch.where(projected, majority, model_prediction), projected


def lesci_metrics(labels: torch.Tensor, prediction: torch.Tensor, projected: torch.Tensor
                  ) -> dict[str, float]:
    """The four LESCI metrics; an empty group's accuracy is NaN (nothing to be right about)."""
    correct = prediction == labels
    n_projected = int(projected.sum())
    n_identity = int((~projected).sum())
    return {
        "accuracy": float(correct.float().mean()) if correct.numel() else math.nan,
        "projection_rate": n_projected / max(correct.numel(), 1),
        "accuracy_projected": (float(correct[projected].float().mean()) if n_projected
                               else math.nan),
        "accuracy_identity": (float(correct[~projected].float().mean()) if n_identity
                              else math.nan),
    }


# ----------------------------------------------------------------------------------------------
# stages: PCA at a depth, the evaluation


def fit_pca_at_depth(model: nn.Module, depth: str, data: Dataset | DataLoader | Iterable,
                     n_components: int, batch_size: int = 256, backend: str = "torch",
                     device: str | torch.device | None = None, max_samples: int | None = None,
                     progress=None) -> StreamingPCA:
    """Fit a StreamingPCA on the activations at ``depth`` of correctly classified samples.

    ``progress(samples_seen)`` is called after each batch when given (long early-layer fits).
    """
    pca = StreamingPCA(n_components, backend=backend, device=device)
    seen = 0
    for batch in stream_activations(model, depth, data, batch_size, device, only_correct=True,
                                    max_samples=max_samples):
        pca.partial_fit(batch.activations)
        seen += batch.activations.shape[0]
        if progress is not None:
            progress(seen)
    if seen == 0:
        raise ValueError(f"no correctly classified sample to fit the PCA at depth {depth!r}")
    return pca.flush()


@dataclass(frozen=True)
class LESCIResult:
    """Per-sample outcome of a LESCI evaluation, reusable for any threshold."""

    labels: torch.Tensor
    model_prediction: torch.Tensor
    majority: torch.Tensor
    vote_fraction: torch.Tensor

    def metrics(self, threshold: float) -> dict[str, float]:
        prediction, projected = lesci_predict(self.model_prediction, self.majority,
                                              self.vote_fraction, threshold)
        return lesci_metrics(self.labels, prediction, projected)


def collect_votes(model: nn.Module, depth: str, pca: StreamingPCA, space: EmbeddingSpace, k: int,
                  data: Dataset | DataLoader | Iterable, batch_size: int = 256,
                  device: str | torch.device | None = None, center: bool = True) -> LESCIResult:
    """Stream ``data`` once: model predictions and kNN votes (k neighbours) for every sample."""
    space.check_pca(pca)
    num_classes = int(space.labels.max()) + 1
    parts: dict[str, list[torch.Tensor]] = {"labels": [], "pred": [], "maj": [], "frac": []}
    index = None
    for batch in stream_activations(model, depth, data, batch_size, device):
        codes = pca.transform(batch.activations, n_components=space.n_components, center=center)
        if index is None:  # the embedding space indexed once, on the activations' device
            index = KnnIndex(space.embeddings, space.labels, num_classes=num_classes,
                             device=codes.device)
        majority, fraction = index.vote(codes, k)
        parts["labels"].append(batch.labels.cpu())
        parts["pred"].append(batch.predictions.cpu())
        parts["maj"].append(majority.cpu())
        parts["frac"].append(fraction.cpu())
    return LESCIResult(*(torch.cat(parts[key]) for key in ("labels", "pred", "maj", "frac")))


def evaluate_lesci(model: nn.Module, depth: str, pca: StreamingPCA, space: EmbeddingSpace, k: int,
                   threshold: float, data: Dataset | DataLoader | Iterable, batch_size: int = 256,
                   device: str | torch.device | None = None, center: bool = True
                   ) -> dict[str, float]:
    """The four LESCI metrics (accuracy, projection_rate, accuracy_projected,
    accuracy_identity) on ``data`` (usually the validation split)
    at one (k, threshold); ``defenses.surface`` gives every (k, m) at once."""
    check_threshold(threshold)  # before any work
    return collect_votes(model, depth, pca, space, k, data, batch_size, device,
                         center).metrics(threshold)
