"""LESCI's embedding space: the PCA-compressed activations of correctly classified training
samples at one depth, with their labels; built by streaming, stored as an ``.npz`` blob."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defenses._io import (BlobError, atomic_write_bytes, npz_bytes, read_file_bytes,
                          read_npz)
from defenses.activations import stream_activations
from defenses.pca import StreamingPCA

__all__ = ["EmbeddingSpace", "build_embedding_space", "FILE_FORMAT"]

FILE_FORMAT = "robust-sweeps-embedding-space/1"


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

    def check_pca(self, pca: StreamingPCA) -> None:
        """ValueError unless ``pca`` holds the components this space was compressed with."""
        kept = pca.n_components_  # as fitted (n_components may be None: all of them)
        if self.n_components > kept:
            raise ValueError(f"embedding space has {self.n_components} components, the PCA "
                             f"only {kept}")

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
        return npz_bytes(FILE_FORMAT, {"depth": np.array(self.depth),
                                       "embeddings": self.embeddings.cpu().numpy(),
                                       "labels": self.labels.cpu().numpy()})

    def save(self, path: str | Path) -> None:
        """Write ``to_bytes()`` to ``path`` atomically."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingSpace":
        """Read a space written by ``save`` (``BlobError`` if missing or malformed)."""
        return cls.from_bytes(read_file_bytes(path, "embedding-space"), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<embedding-space bytes>") -> "EmbeddingSpace":
        """Rebuild from ``to_bytes()``; ``BlobError`` naming ``source`` if malformed."""
        arrays = read_npz(data, FILE_FORMAT, source)
        try:
            embeddings, labels, depth = arrays["embeddings"], arrays["labels"], str(arrays["depth"])
            if not np.isfinite(embeddings).all():
                raise ValueError("embeddings are not finite")
            return cls(torch.from_numpy(embeddings), torch.from_numpy(labels).long(), depth)
        except (KeyError, TypeError, ValueError) as exc:
            raise BlobError(f"{source}: malformed embedding space ({exc})") from exc


def build_embedding_space(model: nn.Module, depth: str, pca: StreamingPCA,
                          data: Dataset | DataLoader | Iterable, embedding_size: int | None = None,
                          batch_size: int = 256, device: str | torch.device | None = None,
                          center: bool = True) -> EmbeddingSpace:
    """Compressed activations of (up to ``embedding_size``) correctly classified samples
    (``center``: project with the PCA mean, see ``StreamingPCA.transform``)."""
    chunks, labels = [], []
    for batch in stream_activations(model, depth, data, batch_size, device, only_correct=True,
                                    max_samples=embedding_size):
        acts = batch.activations  # in the PCA's precision (transform keeps its input's)
        if isinstance(pca.components_, torch.Tensor):
            acts = acts.to(pca.components_.dtype)
        chunks.append(pca.transform(acts, center=center).cpu())
        labels.append(batch.labels.cpu())
    if not chunks:
        raise ValueError(f"no correctly classified sample for the embedding space at {depth!r}")
    return EmbeddingSpace(torch.cat(chunks), torch.cat(labels), depth)
