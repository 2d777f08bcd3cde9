"""Streaming (incremental) PCA whose memory grows with (n_components + batch) x dim.

Two backends with one interface:

- ``sklearn`` wraps ``sklearn.decomposition.IncrementalPCA.partial_fit`` (the reference);
- ``torch`` runs the same recurrence (Ross et al. 2008, as scikit-learn implements it) on any
  torch device. Each update stacks ``M = [diag(S) V; X - batch_mean; mean_correction]``, a
  ``(k + b + 1) x d`` matrix with ``k + b + 1 << d``, and takes its SVD through the small Gram
  matrix ``M M^T`` (accumulated in float64, column block by column block) and ``eigh``: about
  ``2 (k+b)^2 d`` flops instead of an SVD of the wide matrix.

Components are nested: the first m components of a k-component fit are what an m-component fit
keeps, so one fit at the largest ``n_components`` serves every smaller one (``truncate``).

Like scikit-learn, an update needs at least ``n_components`` rows: smaller batches are held back
and folded into the next one (``n_samples_pending_``); ``flush()`` folds what is left.
"""

from __future__ import annotations

import enum
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defenses._io import BlobError, atomic_write_bytes, npz_bytes, read_file_bytes, read_npz

__all__ = ["PCABackend", "PCAError", "StreamingPCA"]

FILE_FORMAT = "robust-sweeps-pca/1"
_BLOCK = 8192  # columns per float64 block of an update: bounded extra memory


class PCABackend(str, enum.Enum):
    TORCH = "torch"
    SKLEARN = "sklearn"


class PCAError(ValueError):
    """A batch does not fit the PCA, or the PCA is not fitted (a missing or malformed PCA file
    is a ``defenses._io.BlobError``)."""


def _as_tensor(X: Any) -> torch.Tensor:
    if isinstance(X, torch.Tensor):
        return X.detach()
    return torch.as_tensor(np.asarray(X))


def _svd_flip_rows(V: torch.Tensor) -> torch.Tensor:
    """Sign convention of sklearn's ``svd_flip(u_based_decision=False)``: each row's largest
    absolute entry is positive."""
    idx = V.abs().argmax(dim=1)
    signs = torch.sign(V.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return V * signs


class _TorchState:
    """The torch backend's fitted state and its update (sklearn's partial_fit recurrence)."""

    def __init__(self, n_components: int, device: torch.device, dtype: torch.dtype):
        self.k = n_components
        self.device = device
        self.dtype = dtype
        self.n_samples_seen = 0
        self.mean: torch.Tensor | None = None  # [d] float64
        self.var: torch.Tensor | None = None  # [d] float64
        self.components: torch.Tensor | None = None  # [k, d] dtype
        self.singular_values: torch.Tensor | None = None  # [k] float64
        self.explained_variance: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None
        self.noise_variance = 0.0

    def _blocks(self, X: torch.Tensor, batch_mean: torch.Tensor, correction: torch.Tensor | None):
        """Yield (columns, M[:, columns]) in float64, M = [diag(S) V; X - batch_mean; correction],
        one column block at a time, so M [k + b + 1, d] never exists whole."""
        for start in range(0, X.shape[1], _BLOCK):
            cols = slice(start, start + _BLOCK)
            Xc = X[:, cols].to(torch.float64) - batch_mean[cols]
            if correction is None:
                yield cols, Xc
            else:
                head = self.singular_values[:, None] * self.components[:, cols].to(torch.float64)
                yield cols, torch.cat([head, Xc, correction[None, cols]])

    @torch.no_grad()
    def update(self, X: torch.Tensor) -> None:
        """Fold a batch [n, d] in (sklearn's IncrementalPCA.partial_fit, same recurrence)."""
        X = X.to(self.device, self.dtype)
        n, d = X.shape
        last_n = self.n_samples_seen
        total = last_n + n
        # Pass 1: per-column batch statistics (float64, block by block).
        batch_sum = torch.empty(d, dtype=torch.float64, device=self.device)
        batch_unnormalized_var = torch.empty_like(batch_sum)
        for start in range(0, d, _BLOCK):
            block = X[:, start:start + _BLOCK].to(torch.float64)
            batch_sum[start:start + _BLOCK] = block.sum(dim=0)
            centred = block - block.mean(dim=0)
            batch_unnormalized_var[start:start + _BLOCK] = (centred * centred).sum(dim=0)
        batch_mean = batch_sum / n
        if last_n == 0:
            mean, unnormalized_var, correction = batch_mean, batch_unnormalized_var, None
        else:
            last_sum = self.mean * last_n
            mean = (last_sum + batch_sum) / total
            # Chan et al.'s pairwise update, as in sklearn.utils.extmath._incremental_mean_and_var
            unnormalized_var = (self.var * last_n + batch_unnormalized_var
                                + (last_n / n) / total * (last_sum / (last_n / n) - batch_sum) ** 2)
            correction = math.sqrt(last_n / total * n) * (self.mean - batch_mean)
        # Pass 2: the Gram matrix G = M M^T [m, m], m = k + n + 1 (n on the first batch).
        m = n if correction is None else self.k + n + 1
        G = torch.zeros((m, m), dtype=torch.float64, device=self.device)
        for _, block in self._blocks(X, batch_mean, correction):
            G.addmm_(block, block.T)
        eigenvalues, U = torch.linalg.eigh(G)  # ascending
        eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
        U = U.flip(1)
        S = eigenvalues.sqrt()
        # Pass 3: V_k = diag(1/S_k) U_k^T M, the right singular vectors (rows of unit norm).
        # Directions the data does not span yet (S ~ 0: fewer distinct samples than k, dead
        # units) get zero rows, which project everything to 0 rather than to noise.
        top = S[:self.k]
        spanned = top > max(float(S[0]), 1e-30) * 1e-6
        inverse = torch.where(spanned, 1.0 / top.clamp_min(1e-300), torch.zeros_like(top))
        projector = U[:, :self.k].T * inverse[:, None]  # [k, m]
        V = torch.empty((self.k, d), dtype=self.dtype, device=self.device)
        for cols, block in self._blocks(X, batch_mean, correction):
            V[:, cols] = (projector @ block).to(self.dtype)
        explained = eigenvalues / (total - 1)
        self.components = _svd_flip_rows(V)
        self.singular_values = top
        self.mean = mean
        self.var = unnormalized_var / total
        self.n_samples_seen = total
        self.explained_variance = explained[:self.k]
        self.explained_variance_ratio = eigenvalues[:self.k] / (self.var * total).sum()
        rank = min(m, d)
        self.noise_variance = (float(explained[self.k:rank].mean())
                               if self.k not in (n, d) and rank > self.k else 0.0)


class StreamingPCA:
    """Incremental PCA with a torch or scikit-learn backend.

    Args:
        n_components: number of principal components k.
        backend: ``"torch"`` (any device, float32 updates with a float64 Gram) or ``"sklearn"``.
        device: torch backend only: where the state lives and updates run (default: the device
            of the first torch batch, else CPU).
        dtype: torch backend only: precision of the batch and the components (float32).

    Attributes (torch tensors; the sklearn backend's on the CPU):
        components_ [k, d], mean_ [d], explained_variance_ [k], explained_variance_ratio_ [k],
        singular_values_ [k], var_ [d], n_samples_seen_, n_samples_pending_.
    """

    def __init__(self, n_components: int, backend: str | PCABackend = "torch",
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        if not isinstance(n_components, (int, np.integer)) or isinstance(n_components, bool) \
                or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
        try:
            self.backend = PCABackend(backend)
        except ValueError:
            raise ValueError(f"unknown PCA backend {backend!r}; allowed: torch, sklearn") from None
        if self.backend is PCABackend.SKLEARN and device not in (None, "cpu"):
            raise ValueError("the sklearn backend runs on the CPU only; use backend='torch'")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.n_components = int(n_components)
        self.dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self._pending: list[torch.Tensor] = []
        self._n_features: int | None = None
        self._torch: _TorchState | None = None
        self._sklearn = None
        if self.backend is PCABackend.SKLEARN:
            from sklearn.decomposition import IncrementalPCA

            self._sklearn = IncrementalPCA(n_components=self.n_components)

    # -- fitting ---------------------------------------------------------------------------

    def partial_fit(self, X: Any) -> "StreamingPCA":
        """Fold a batch [b, d] (torch tensor or numpy array) into the fit."""
        X = _as_tensor(X)
        if X.ndim != 2:
            raise PCAError(f"a batch must be 2-D [batch, features], got shape {tuple(X.shape)}")
        if self._n_features is None:
            if X.shape[1] < self.n_components:
                raise PCAError(f"n_components={self.n_components} exceeds the number of "
                               f"features {X.shape[1]}")
            self._n_features = X.shape[1]
            if self._device is None:
                self._device = X.device if self.backend is PCABackend.TORCH else torch.device("cpu")
        elif X.shape[1] != self._n_features:
            raise PCAError(f"batch has {X.shape[1]} features, the PCA was fitted on "
                           f"{self._n_features}")
        if X.shape[0] == 0:
            return self
        if not torch.isfinite(X).all():
            raise PCAError("batch contains NaN or infinite values")
        self._pending.append(X)
        if self.n_samples_pending_ >= self.n_components:
            self._fold()
        return self

    def flush(self) -> "StreamingPCA":
        """Fold rows held back for being fewer than n_components.

        The torch backend folds any number once fitted; scikit-learn refuses updates smaller than
        n_components, so its backend drops such a remainder with a warning.
        """
        if not self._pending:
            return self
        if self.n_samples_pending_ >= self.n_components or (
                self.backend is PCABackend.TORCH and self.n_samples_seen_ > 0):
            self._fold()
        elif self.n_samples_seen_ == 0:
            raise PCAError(f"{self.n_samples_pending_} samples are fewer than "
                           f"n_components={self.n_components}")
        else:
            warnings.warn(f"sklearn backend: dropping the last {self.n_samples_pending_} samples "
                          f"(fewer than n_components={self.n_components})", stacklevel=2)
            self._pending.clear()
        return self

    def _fold(self) -> None:
        X = self._pending[0] if len(self._pending) == 1 else torch.cat(
            [p.to(self._pending[0].device) for p in self._pending])
        self._pending = []
        if self.backend is PCABackend.SKLEARN:
            self._sklearn.partial_fit(X.cpu().numpy())
            return
        if self._torch is None:
            self._torch = _TorchState(self.n_components, self._device, self.dtype)
        self._torch.update(X)

    # -- state -----------------------------------------------------------------------------

    @property
    def n_samples_pending_(self) -> int:
        return sum(p.shape[0] for p in self._pending)

    @property
    def n_samples_seen_(self) -> int:
        if self.backend is PCABackend.SKLEARN:
            return int(getattr(self._sklearn, "n_samples_seen_", 0))
        return self._torch.n_samples_seen if self._torch is not None else 0

    @property
    def n_features_(self) -> int | None:
        return self._n_features

    @property
    def device(self) -> torch.device:
        return self._device or torch.device("cpu")

    def _attr(self, name: str) -> torch.Tensor:
        if self.n_samples_seen_ == 0:
            raise PCAError("the PCA is not fitted yet (no batch folded in)")
        if self.backend is PCABackend.SKLEARN:
            return torch.as_tensor(np.asarray(getattr(self._sklearn, name)))
        return getattr(self._torch, name.rstrip("_"))

    components_ = property(lambda self: self._attr("components_"))
    mean_ = property(lambda self: self._attr("mean_"))
    var_ = property(lambda self: self._attr("var_"))
    singular_values_ = property(lambda self: self._attr("singular_values_"))
    explained_variance_ = property(lambda self: self._attr("explained_variance_"))
    explained_variance_ratio_ = property(lambda self: self._attr("explained_variance_ratio_"))

    # -- use -------------------------------------------------------------------------------

    def transform(self, X: Any, n_components: int | None = None, center: bool = True) -> Any:
        """Project a batch: ``(X - mean_) @ components_[:m].T`` (``center=False``: without the
        mean, ``X @ components_[:m].T``, as the original LESCI entry projected).

        Returns the input's kind: numpy in, numpy out; a torch tensor in, a tensor on its device,
        differentiable with respect to that tensor (attacks project through it).
        """
        m = self.n_components if n_components is None else int(n_components)
        if not 1 <= m <= self.n_components:
            raise ValueError(f"n_components must be in 1..{self.n_components}, got {m}")
        is_numpy = not isinstance(X, torch.Tensor)
        Xt = _as_tensor(X) if is_numpy else X
        if Xt.ndim != 2 or Xt.shape[1] != self._n_features:
            raise PCAError(f"expected a batch [b, {self._n_features}], got {tuple(Xt.shape)}")
        components = self.components_[:m]
        out = Xt.to(components.device, components.dtype)
        if center:
            out = out - self.mean_.to(components.dtype)
        out = out @ components.T
        if is_numpy:
            return out.cpu().numpy()
        return out.to(Xt.device)

    def truncate(self, n_components: int) -> "StreamingPCA":
        """The m-component PCA contained in this fit (a torch-backend copy on the same device)."""
        if not 1 <= n_components <= self.n_components:
            raise ValueError(f"n_components must be in 1..{self.n_components}, got {n_components}")
        return self._from_arrays(self._arrays(), n_components, self.device)

    # -- persistence: plain arrays, no pickle ----------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy()

        return {
            "backend": np.array(self.backend.value),
            "n_components": np.array(self.n_components),
            "n_samples_seen": np.array(self.n_samples_seen_),
            "components": arr(self.components_),
            "mean": arr(self.mean_).astype(np.float64),
            "var": arr(self.var_).astype(np.float64),
            "singular_values": arr(self.singular_values_).astype(np.float64),
            "explained_variance": arr(self.explained_variance_).astype(np.float64),
            "explained_variance_ratio": arr(self.explained_variance_ratio_).astype(np.float64),
        }

    def to_bytes(self) -> bytes:
        """The fitted state as ``.npz`` bytes of plain arrays (no pickle)."""
        if self._pending:
            raise PCAError(f"{self.n_samples_pending_} samples are pending: call flush() first")
        return npz_bytes(FILE_FORMAT, self._arrays())

    def save(self, path: str | Path) -> None:
        """Write ``to_bytes()`` to ``path`` atomically."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None,
             n_components: int | None = None) -> "StreamingPCA":
        """Read a saved PCA as a torch-backend PCA (optionally its first ``n_components``);
        ``BlobError`` if the file is missing or malformed."""
        return cls.from_bytes(read_file_bytes(path, "PCA"), str(path), device, n_components)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<PCA bytes>",
                   device: str | torch.device | None = None,
                   n_components: int | None = None) -> "StreamingPCA":
        """Rebuild from ``to_bytes()``; every array is checked for shape and finiteness
        (``BlobError`` naming ``source`` if one fails)."""
        arrays = read_npz(data, FILE_FORMAT, source)
        keys = ("components", "n_samples_seen", "mean", "var", "singular_values",
                "explained_variance", "explained_variance_ratio")
        missing = [key for key in keys if key not in arrays]
        if missing or arrays["components"].ndim != 2:
            raise BlobError(f"{source}: malformed PCA (missing {missing} or components not 2-D)")
        k, d = arrays["components"].shape
        for key, shape in (("mean", (d,)), ("var", (d,)), ("singular_values", (k,)),
                           ("explained_variance", (k,)), ("explained_variance_ratio", (k,))):
            if arrays[key].shape != shape or not np.isfinite(arrays[key]).all():
                raise BlobError(f"{source}: {key} should be finite with shape {shape}")
        if not np.isfinite(arrays["components"]).all():
            raise BlobError(f"{source}: components are not finite")
        m = k if n_components is None else int(n_components)
        if not 1 <= m <= k:
            raise BlobError(f"{source}: holds {k} components, {m} asked for")
        return cls._from_arrays(arrays, m, torch.device(device) if device is not None else None)

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], m: int,
                     device: torch.device | None) -> "StreamingPCA":
        components = torch.from_numpy(np.ascontiguousarray(arrays["components"][:m]))
        pca = cls(m, backend="torch", device=device, dtype=components.dtype)
        device = pca.device
        state = _TorchState(m, device, components.dtype)
        state.n_samples_seen = int(arrays["n_samples_seen"])
        state.components = components.to(device)
        for key in ("mean", "var", "singular_values", "explained_variance",
                    "explained_variance_ratio"):
            value = torch.from_numpy(np.asarray(arrays[key], dtype=np.float64))
            setattr(state, key, (value if key in ("mean", "var") else value[:m]).to(device))
        pca._torch = state
        pca._n_features = components.shape[1]
        pca._device = device
        return pca

    def __repr__(self) -> str:
        return (f"StreamingPCA(n_components={self.n_components}, backend={self.backend.value!r}, "
                f"n_features={self._n_features}, n_samples_seen={self.n_samples_seen_})")
