"""LESCI: a kNN-vote projection layer on PCA-compressed activations (SPEC.md section 1).

At a named depth of a trained classifier, compress the activation with PCA, find its ``k`` most
cosine-similar rows of an *embedding space* (compressed activations of correctly classified
training samples) and, if at least ``threshold`` of those neighbours share a label, answer that
label ("projection"); otherwise answer what the network says ("identity").
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defenses._io import atomic_write_bytes
from defenses.activations import stream_activations
from defenses.pca import StreamingPCA
from defenses.surface import vote_counts

__all__ = [
    "EmbeddingSpace",
    "LESCIResult",
    "knn_vote",
    "KnnIndex",
    "project_mask",
    "lesci_predict",
    "lesci_metrics",
    "fit_pca_at_depth",
    "build_embedding_space",
    "collect_votes",
    "evaluate_lesci",
    "METRIC_NAMES",
]

METRIC_NAMES = ("accuracy", "projection_rate", "accuracy_projected", "accuracy_identity")
# Vote fractions are count / k; this slack makes "exactly at the threshold" project despite the
# float rounding of thresholds like 0.3 (SPEC: project iff o / k >= threshold).
_THRESHOLD_SLACK = 1e-6
_SPACE_FORMAT = "robust-sweeps-embedding-space/1"


@dataclass(frozen=True)
class EmbeddingSpace:
    """Compressed activations [n, m] of correctly classified training samples and labels [n]."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    depth: str

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.labels.shape != (self.embeddings.shape[0],):
            raise ValueError(f"embeddings [n, m] and labels [n] expected, got "
                             f"{tuple(self.embeddings.shape)} and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def n_components(self) -> int:
        return self.embeddings.shape[1]

    def truncate(self, n_components: int | None = None, size: int | None = None
                 ) -> "EmbeddingSpace":
        """The space an m-component PCA and a smaller ``embedding_size`` would have built.

        PCA components are nested and the samples come in stream order, so both are prefixes.
        """
        m = self.n_components if n_components is None else n_components
        n = len(self) if size is None else size
        if not 1 <= m <= self.n_components:
            raise ValueError(f"n_components must be in 1..{self.n_components}, got {m}")
        if not 1 <= n <= len(self):
            raise ValueError(f"embedding size must be in 1..{len(self)}, got {n}")
        return EmbeddingSpace(self.embeddings[:n, :m], self.labels[:n], self.depth)

    def to_bytes(self) -> bytes:
        """``.npz`` bytes of plain arrays (no pickle)."""
        buffer = io.BytesIO()
        np.savez(buffer, format=np.array(_SPACE_FORMAT), depth=np.array(self.depth),
                 embeddings=self.embeddings.cpu().numpy(), labels=self.labels.cpu().numpy())
        return buffer.getvalue()

    def save(self, path: str | Path) -> None:
        """Write ``to_bytes()`` to ``path`` atomically."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingSpace":
        """Read a space written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such embedding-space file")
        return cls.from_bytes(path.read_bytes(), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<embedding-space bytes>") -> "EmbeddingSpace":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if str(npz["format"]) != _SPACE_FORMAT:
                    raise ValueError(f"format {npz['format']} is not {_SPACE_FORMAT}")
                embeddings, labels, depth = npz["embeddings"], npz["labels"], str(npz["depth"])
        except Exception as exc:
            raise ValueError(f"{source}: not an embedding-space file ({exc})") from exc
        if not np.isfinite(embeddings).all():
            raise ValueError(f"{source}: embeddings are not finite")
        return cls(torch.from_numpy(embeddings), torch.from_numpy(labels).long(), depth)


# ----------------------------------------------------------------------------------------------
# the vote


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class KnnIndex:
    """Cosine-similarity k-nearest-neighbour search and vote over a fixed embedding space.

    The embeddings are normalised once; each ``vote`` call only searches. Backends:

    - ``"torch"``: blocked ``queries @ embeddings.T`` with a running top-k, on any device (on a
      GPU this beats faiss's GPU search); memory is bounded by the block sizes.
    - ``"faiss"``: faiss-cpu's exact ``IndexFlatIP`` (BLAS inner products and a heap top-k), the
      fastest exact search on CPU; float32, CPU only.
    - ``"auto"`` (default): faiss for float32 on CPU when it is installed, else torch.

    Both give the same neighbours up to exact similarity ties.
    """

    BACKENDS = ("auto", "torch", "faiss")

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor, backend: str = "auto",
                 embedding_chunk: int = 65536, num_classes: int | None = None,
                 device: str | torch.device | None = None):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings [n, m] expected, got {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        if labels.shape != (n,):
            raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(self.BACKENDS)}, got {backend!r}")
        self.device = torch.device(device) if device is not None else embeddings.device
        self.dtype = torch.promote_types(embeddings.dtype, torch.float32)
        faiss = _faiss()
        if backend == "faiss" and faiss is None:
            raise ValueError("backend 'faiss' needs the faiss-cpu package (pip install faiss-cpu)")
        if backend == "faiss" and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError("backend 'faiss' searches float32 embeddings on the CPU")
        if backend == "auto":
            backend = ("faiss" if faiss is not None and self.device.type == "cpu"
                       and self.dtype == torch.float32 else "torch")
        self.backend = backend
        self.n, self.dim = n, embeddings.shape[1]
        self.labels = labels.to(self.device)
        self.num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        self.embedding_chunk = embedding_chunk
        if backend == "faiss":
            normed = F.normalize(embeddings.detach().to("cpu", torch.float32), dim=1)
            self._index = faiss.IndexFlatIP(self.dim)
            self._index.add(np.ascontiguousarray(normed.numpy()))
        else:
            self._chunks = [F.normalize(embeddings[s:s + embedding_chunk].detach().to(
                self.device, self.dtype), dim=1) for s in range(0, n, embedding_chunk)]

    def __len__(self) -> int:
        return self.n

    def _check(self, queries: torch.Tensor, k: int) -> None:
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries [q, {self.dim}] expected, got {tuple(queries.shape)}")
        if not isinstance(k, int) or not 1 <= k <= self.n:
            raise ValueError(f"k must be an integer in 1..{self.n} (the embedding space size), "
                             f"got {k!r}")

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, query_chunk: int = 1024
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities [q, k], indices [q, k]) of each query's k most similar embeddings,
        most similar first, on the index's device."""
        self._check(queries, k)
        if self.backend == "faiss":
            faiss = _faiss()
            faiss.omp_set_num_threads(torch.get_num_threads())  # a trial's CPU share, no more
            q = F.normalize(queries.detach().to("cpu", torch.float32), dim=1)
            sims, idx = self._index.search(np.ascontiguousarray(q.numpy()), k)
            return torch.from_numpy(sims), torch.from_numpy(idx)
        sims_out, idx_out = [], []
        for qs in range(0, queries.shape[0], query_chunk):
            q = F.normalize(queries[qs:qs + query_chunk].detach().to(self.device, self.dtype),
                            dim=1)
            best_sim = torch.full((q.shape[0], 0), -math.inf, dtype=self.dtype, device=self.device)
            best_idx = torch.empty((q.shape[0], 0), dtype=torch.long, device=self.device)
            for ci, e in enumerate(self._chunks):
                sim = q @ e.T
                sim_top, idx_top = sim.topk(min(k, sim.shape[1]), dim=1)
                if ci == 0:
                    best_sim, best_idx = sim_top, idx_top
                    continue
                merged_sim = torch.cat([best_sim, sim_top], dim=1)
                merged_idx = torch.cat([best_idx, idx_top + ci * self.embedding_chunk], dim=1)
                best_sim, order = merged_sim.topk(min(k, merged_sim.shape[1]), dim=1)
                best_idx = merged_idx.gather(1, order)
            sims_out.append(best_sim)
            idx_out.append(best_idx)
        return torch.cat(sims_out), torch.cat(idx_out)

    @torch.no_grad()
    def vote(self, queries: torch.Tensor, k: int, query_chunk: int = 1024
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(majority_label [q] long, vote_fraction [q] float32) on the queries' device: the most
        common label among the k neighbours (ties: the lowest label) and its count / k."""
        _, idx = self.search(queries, k, query_chunk)
        majority, count = vote_counts(self.labels[idx.to(self.device)], [k], self.num_classes)
        return (majority[:, 0].to(queries.device),
                (count[:, 0].to(torch.float32) / k).to(queries.device))


def knn_vote(queries: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, k: int,
             query_chunk: int = 1024, embedding_chunk: int = 65536,
             num_classes: int | None = None, backend: str = "auto"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority label among the k most cosine-similar embeddings of each query.

    Args:
        queries: [q, m]; embeddings: [n, m]; labels: [n] integer labels of the embeddings.
        k: neighbours per query, 1 <= k <= n.
        query_chunk, embedding_chunk: torch backend: work in [query_chunk, embedding_chunk]
            similarity blocks, keeping a running top-k, so memory is bounded for any q and n.
        backend: see ``KnnIndex`` ("auto": faiss on CPU when installed, else torch).

    Returns:
        (majority_label [q] long, vote_fraction [q] float32): the most common label among the k
        neighbours (ties: the lowest label) and its count / k; on the queries' device.

    To vote many batches against one embedding space, build a ``KnnIndex`` once instead.
    """
    if queries.ndim != 2 or embeddings.ndim != 2 or queries.shape[1] != embeddings.shape[1]:
        raise ValueError(f"queries [q, m] and embeddings [n, m] expected, got "
                         f"{tuple(queries.shape)} and {tuple(embeddings.shape)}")
    index = KnnIndex(embeddings, labels, backend, embedding_chunk, num_classes,
                     device=queries.device)
    return index.vote(queries, k, query_chunk)


def check_threshold(threshold: float) -> None:
    """A vote fraction is at most 1; a negative threshold means "always project"."""
    if threshold > 1:
        raise ValueError(f"threshold must be at most 1, got {threshold}")


def project_mask(vote_fraction: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which samples LESCI projects: ``vote_fraction >= threshold``; a negative threshold
    projects everything (SPEC.md section 1, step 4)."""
    check_threshold(threshold)
    if threshold < 0:
        return torch.ones_like(vote_fraction, dtype=torch.bool)
    return vote_fraction >= threshold - _THRESHOLD_SLACK


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
# stages: PCA at a depth, the embedding space, the evaluation


def fit_pca_at_depth(model: nn.Module, depth: str, data: Dataset | DataLoader | Iterable,
                     n_components: int, batch_size: int = 256, backend: str = "torch",
                     device: str | torch.device | None = None, max_samples: int | None = None,
                     progress=None) -> StreamingPCA:
    """Fit a StreamingPCA on the activations at ``depth`` of correctly classified samples.

    ``progress(samples_seen)`` is called after each batch when given (long early-layer fits).
    """
    pca = StreamingPCA(n_components, backend=backend, device=device)
    seen = 0
    for batch in stream_activations(model, depth, data, batch_size, device, only_correct=True):
        acts = batch.activations
        if max_samples is not None:
            acts = acts[: max_samples - seen]
        pca.partial_fit(acts)
        seen += acts.shape[0]
        if progress is not None:
            progress(seen)
        if max_samples is not None and seen >= max_samples:
            break
    if seen == 0:
        raise ValueError(f"no correctly classified sample to fit the PCA at depth {depth!r}")
    return pca.flush()


def build_embedding_space(model: nn.Module, depth: str, pca: StreamingPCA,
                          data: Dataset | DataLoader | Iterable, embedding_size: int | None = None,
                          batch_size: int = 256, device: str | torch.device | None = None,
                          center: bool = True) -> EmbeddingSpace:
    """Compressed activations of (up to ``embedding_size``) correctly classified samples
    (``center``: project with the PCA mean, see ``StreamingPCA.transform``)."""
    chunks, labels, total = [], [], 0
    for batch in stream_activations(model, depth, data, batch_size, device, only_correct=True):
        take = batch.activations.shape[0] if embedding_size is None else min(
            batch.activations.shape[0], embedding_size - total)
        chunks.append(pca.transform(batch.activations[:take], center=center).cpu())
        labels.append(batch.labels[:take].cpu())
        total += take
        if embedding_size is not None and total >= embedding_size:
            break
    if total == 0:
        raise ValueError(f"no correctly classified sample for the embedding space at {depth!r}")
    return EmbeddingSpace(torch.cat(chunks), torch.cat(labels), depth)


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
    if space.n_components > pca.n_components:
        raise ValueError(f"embedding space has {space.n_components} components, the PCA only "
                         f"{pca.n_components}")
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
    """The four LESCI metrics of SPEC.md section 1 on ``data`` (usually the validation split)
    at one (k, threshold); ``defenses.surface`` gives every (k, m) at once."""
    check_threshold(threshold)  # before any work
    return collect_votes(model, depth, pca, space, k, data, batch_size, device,
                         center).metrics(threshold)
