"""Cosine-similarity k-nearest-neighbour search and majority vote over a fixed embedding space:
``KnnIndex`` (torch or faiss backend) and the one-shot ``knn_vote``."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from defenses.surface import vote_counts

__all__ = ["KnnIndex", "knn_vote"]


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
