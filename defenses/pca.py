"""Streaming (incremental) PCA: a scikit-learn estimator with a torch backend for any device.

``StreamingPCA`` has ``sklearn.decomposition.IncrementalPCA``'s parameters (``n_components``,
``whiten``, ``copy``, ``batch_size``), attributes and methods (``fit``, ``partial_fit``,
``transform``, ``fit_transform``, ``inverse_transform``, ``get_covariance``, ``get_precision``,
``get_params`` / ``set_params``, ``get_feature_names_out``); scikit-learn's own
``test_incremental_pca.py`` runs against it (``tests/test_sklearn_ipca.py``). Two backends:

- ``sklearn`` wraps ``IncrementalPCA.partial_fit`` (the reference);
- ``torch`` runs the same recurrence (Ross et al. 2008, as scikit-learn implements it) on any
  torch device. Each update stacks ``M = [diag(S) V; X - batch_mean; mean_correction]``,
  ``(k + b + 1) x d``, and factorises it by the cheapest route that is exact to the state's
  precision (``_factorise``): the small Gram matrix ``M M^T`` (float64, column block by column
  block) and ``eigh`` when it resolves the k-th singular value; else a tall-skinny QR of
  ``M^T`` block by block and an SVD of its small R (float64 activations, whose strong leading
  directions the Gram matrix squares past float64's resolution); an SVD of ``M`` itself (what
  scikit-learn does) only for a narrow or rank-deficient ``M``. A batch of more than
  ``max(512, 2k)`` rows with fewer rows than
  features is folded in slices of that size, so an update costs ``O((k + 512)^2 d)`` per slice:
  linear in the batch, where a whole-batch update costs ``O(b^2 d)``.

Inputs and outputs keep their kind and precision: numpy in, numpy out; a torch tensor in, a
tensor on its device; float32 stays float32 and float64 stays float64 (``dtype=None``). The
fitted attributes are numpy arrays when the fit was fed numpy, tensors on ``device_`` when it was
fed tensors (and after ``load``/``from_bytes``).

Truncation is not an m-component fit. ``truncate(m)`` keeps the first m components of a
k-component fit. For exact PCA the two are the same thing; for incremental PCA they are not: an
m-component fit keeps only m directions from one batch to the next, so a direction that ranks
just below m early on and gains weight later is lost, while a k-component fit carries k
directions and loses less of the spectrum. Measured on the demo's activations
(``benchmarks/pca_truncation.py``: digits, ``resnet_digits`` after 5 epochs, 1,437 samples in
batches of 256, every depth, k = 32, m = 4, 8, 16), against exact PCA: the truncated fit's
subspace has a smallest principal cosine of at least 0.998 and its explained variances are
within 0.8%; the m-component fits' smallest cosine goes down to 0.37 (layer1, m = 16, whose
subspace still holds 99.8% of the variance exact PCA's holds: the direction it misses is a weak
one) and their explained variances are up to 12% off; the truncated and the m-component fit
differ as much from each other (smallest cosine 0.38). The LESCI sweep
fits once per depth at the largest ``n_components`` and truncates per trial: the closer of the
two to exact PCA, and one fit instead of one per ``n_components``.

One difference from ``IncrementalPCA`` by default: a first batch with fewer than
``n_components`` rows is held (``n_samples_pending_``) until enough rows arrive, instead of
raising (``hold_first_batch=False`` raises as scikit-learn does). After the first update every
``partial_fit`` takes effect at once, whatever its size; ``flush()`` folds anything held.
"""

from __future__ import annotations

import enum
import math
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils import gen_batches

from defenses._io import BlobError, atomic_write_bytes, npz_bytes, read_file_bytes, read_npz

__all__ = ["PCABackend", "PCAError", "PCANotFittedError", "StreamingPCA"]

FILE_FORMAT = "robust-sweeps-pca/1"
_BLOCK = 8192  # columns per float64 block of an update: bounded extra memory
_MIN_SLICE = 512  # rows per update slice of a wide batch (at least 2k)
# The Gram route is taken when its predicted relative error on the k-th singular value,
# eps64 * max(m, sqrt(d)) * S_0^2 / S_{k-1}^2, stays below this: float32's own resolution for a
# float32 state (its components carry an error of eps32 * S_0 anyway), 1e-13 for float64.
_GRAM_TARGET = {torch.float32: float(torch.finfo(torch.float32).eps), torch.float64: 1e-13}
# TSQR's V_k = diag(1 / S_k) U_k^T M carries an error of about eps64 * max(m, sqrt(d)) *
# S_0 / S_{k-1}: taken below float32's resolution for a float32 state, 1e-11 for float64
_TSQR_TARGET = {torch.float32: float(torch.finfo(torch.float32).eps), torch.float64: 1e-11}


class PCABackend(str, enum.Enum):
    TORCH = "torch"
    SKLEARN = "sklearn"


class PCAError(ValueError):
    """A batch or a parameter does not fit the PCA (a missing or malformed PCA file is a
    ``defenses._io.BlobError``)."""


class PCANotFittedError(PCAError, NotFittedError):
    """The PCA has no fitted state yet (also an ``AttributeError``, so ``hasattr`` is False)."""


# ------------------------------------------------------------------------------------------
# the math: pure functions on torch tensors


def _svd_flip_rows_(V: torch.Tensor) -> torch.Tensor:
    """Sign convention of sklearn's ``svd_flip(u_based_decision=False)``, in place: each row's
    largest absolute entry is positive."""
    idx = V.abs().argmax(dim=1)
    signs = torch.sign(V.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return V.mul_(signs)


def _column_moments(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column sum and unnormalised variance of X [n, d], in float64, block by block."""
    d = X.shape[1]
    total = torch.empty(d, dtype=torch.float64, device=X.device)
    unnormalized_var = torch.empty_like(total)
    for start in range(0, d, _BLOCK):
        block = X[:, start:start + _BLOCK].to(torch.float64)
        total[start:start + _BLOCK] = block.sum(dim=0)
        centred = block - block.mean(dim=0)
        unnormalized_var[start:start + _BLOCK] = (centred * centred).sum(dim=0)
    return total, unnormalized_var


def _stacked_blocks(X: torch.Tensor, batch_mean: torch.Tensor, head: torch.Tensor | None,
                    components: torch.Tensor | None, correction: torch.Tensor | None
                    ) -> Iterator[tuple[slice, torch.Tensor]]:
    """(columns, M[:, columns]) in float64 for M = [diag(head) components; X - batch_mean;
    correction] ([m, d], m = k + n + 1; just ``X - batch_mean`` on a first update), one column
    block at a time, so M never exists whole."""
    for start in range(0, X.shape[1], _BLOCK):
        cols = slice(start, start + _BLOCK)
        centred = X[:, cols].to(torch.float64) - batch_mean[cols]
        if head is None:
            yield cols, centred
        else:
            top = head[:, None] * components[:, cols].to(torch.float64)
            yield cols, torch.cat([top, centred, correction[None, cols]])


def _gram_factorise(blocks, m: int, d: int, k: int, dtype: torch.dtype, device: torch.device,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Singular values [m] and the top-k right singular vectors [k, d] of M via G = M M^T
    (written into ``out`` if given: column block j of M is read before block j is written).

    Returns None when G cannot resolve S_{k-1} to the state's precision: G's eigenvalues carry
    an absolute error of about eps * S_0^2, so S_i's relative error grows with (S_0 / S_i)^2.
    """
    G = torch.zeros((m, m), dtype=torch.float64, device=device)
    for _, block in blocks():
        G.addmm_(block, block.T)
    eigenvalues, U = torch.linalg.eigh(G)  # ascending
    eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
    U = U.flip(1)
    predicted_error = (torch.finfo(torch.float64).eps * max(m, math.sqrt(d))
                       * float(eigenvalues[0]) / max(float(eigenvalues[k - 1]), 1e-300))
    if predicted_error > _GRAM_TARGET[dtype]:
        return None
    S = eigenvalues.sqrt()
    projector = U[:, :k].T / S[:k, None]  # [k, m]: V_k = diag(1 / S_k) U_k^T M
    V = torch.empty((k, d), dtype=dtype, device=device) if out is None else out
    for cols, block in blocks():
        V[:, cols] = (projector @ block).to(dtype)
    return S, V


def _tsqr_factorise(blocks, m: int, d: int, k: int, dtype: torch.dtype,
                    device: torch.device, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Singular values [m] and the top-k right singular vectors [k, d] of a wide M [m, d]
    from a tall-skinny QR of M^T (TSQR, Demmel et al. 2012): each column block of M is reduced
    to the R factor of its transpose, the stacked R factors to one R [m, m], and M = R^T Q^T
    has R^T's singular values and left singular vectors U (an SVD of the small R). Then
    V_k = diag(1 / S_k) U_k^T M, read block by block (written into ``out`` if given). Householder
    QR and the SVD are backward stable, so S carries an error of about eps * S_0 (the SVD of M
    itself does no better), without G's squaring; the projection adds an error of about
    eps * S_0 / S_{k-1} to V_k. About 2 m^2 d flops, and never M whole: one block and the
    stacked R factors (at most 2m + block rows) at a time.

    Returns None when that projection cannot keep V_k to the state's precision (S_{k-1}
    tiny next to S_0: a rank-deficient batch)."""
    R = None
    for _, block in blocks():
        stacked = block.T if R is None else torch.cat([R, block.T])
        R = torch.linalg.qr(stacked, mode="r").R[:m]
    U, S, _ = torch.linalg.svd(R.T)
    predicted_error = (torch.finfo(torch.float64).eps * max(m, math.sqrt(d))
                       * float(S[0]) / max(float(S[k - 1]), 1e-300))
    if predicted_error > _TSQR_TARGET[dtype]:
        return None
    projector = U[:, :k].T / S[:k, None]  # [k, m]
    V = torch.empty((k, d), dtype=dtype, device=device) if out is None else out
    for cols, block in blocks():
        V[:, cols] = (projector @ block).to(dtype)
    return S, V


def _svd_factorise(blocks, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values [min(m, d)] and the top-k right singular vectors [k, d] of M from an SVD
    of M itself (backward stable at any spectrum; holds M whole in float64)."""
    M = torch.cat([block for _, block in blocks()], dim=1)
    _, S, Vt = torch.linalg.svd(M, full_matrices=False)
    return S, Vt[:k].to(dtype)


def _factorise(blocks, m: int, d: int, k: int, dtype: torch.dtype, device: torch.device,
               out: torch.Tensor | None = None, last_route: str = ""
               ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(S, V_k, route), V_k written into ``out`` if given. A wide M: the Gram route when it
    resolves S_{k-1} to the state's precision, else TSQR (``_tsqr_factorise``); the SVD of M
    when M is narrow or TSQR cannot keep V_k (a rank-deficient batch). A stream whose last
    update needed TSQR goes to it directly (the spectrum's shape persists from batch to
    batch: a Gram pass that is then thrown away costs half of TSQR)."""
    if m <= d:
        if last_route != "tsqr":
            found = _gram_factorise(blocks, m, d, k, dtype, device, out)
            if found is not None:
                return (*found, "gram")
        found = _tsqr_factorise(blocks, m, d, k, dtype, device, out)
        if found is not None:
            return (*found, "tsqr")
    return (*_svd_factorise(blocks, k, dtype), "svd")


class _State:
    """A fitted PCA as torch tensors on one device: the statistics in float64, the components
    in the state's precision. ``update`` is sklearn's partial_fit recurrence."""

    def __init__(self, k: int, device: torch.device, dtype: torch.dtype):
        self.k = k
        self.device = device
        self.dtype = dtype
        self.n_samples_seen: int | float = 0
        self.mean: torch.Tensor | None = None  # [d]
        self.var: torch.Tensor | None = None  # [d]
        self.components: torch.Tensor | None = None  # [k, d] dtype
        self.singular_values: torch.Tensor | None = None  # [k]
        self.explained_variance: torch.Tensor | None = None  # [k]
        self.explained_variance_ratio: torch.Tensor | None = None  # [k]
        self.noise_variance = 0.0  # mean of the explained variances beyond k
        self.noise_dims = 0  # how many explained variances that mean is over
        self.last_route = ""
        # components handed out (an attribute read, a truncated copy) are never overwritten;
        # until then an update writes the new components over the old ones (k x d less memory)
        self.components_shared = False

    @torch.no_grad()
    def update(self, X: torch.Tensor) -> None:
        """Fold a batch [n, d] in; a wide batch of more than max(512, 2k) rows in slices."""
        n, d = X.shape
        rows = max(_MIN_SLICE, 2 * self.k)
        if n > rows and self.k + n + 1 <= d:
            for start in range(0, n, rows):
                self._update(X[start:start + rows])
        else:
            self._update(X)

    def _update(self, X: torch.Tensor) -> None:
        X = X.to(self.device, self.dtype)
        n, d = X.shape
        last_n = self.n_samples_seen
        total = last_n + n
        batch_sum, batch_unnormalized_var = _column_moments(X)
        batch_mean = batch_sum / n
        if last_n == 0:
            mean, unnormalized_var = batch_mean, batch_unnormalized_var
            head = correction = None
            m = n
        else:
            last_sum = self.mean * last_n
            mean = (last_sum + batch_sum) / total
            # Chan et al.'s pairwise update, as in sklearn.utils.extmath._incremental_mean_and_var
            unnormalized_var = (self.var * last_n + batch_unnormalized_var
                                + (last_n / n) / total * (last_sum / (last_n / n) - batch_sum) ** 2)
            correction = math.sqrt(last_n / total * n) * (self.mean - batch_mean)
            head = self.singular_values
            m = self.k + n + 1

        def blocks():
            return _stacked_blocks(X, batch_mean, head, self.components, correction)

        reuse = self.components if head is not None and not self.components_shared else None
        S, V, self.last_route = _factorise(blocks, m, d, self.k, self.dtype, self.device, reuse,
                                           self.last_route)
        explained = S * S / (total - 1)
        self.components = _svd_flip_rows_(V)
        self.components_shared = False
        self.singular_values = S[:self.k]
        self.mean = mean
        self.var = unnormalized_var / total
        self.n_samples_seen = total
        self.explained_variance = explained[:self.k]
        self.explained_variance_ratio = S[:self.k] ** 2 / (self.var * total).sum()
        # as sklearn: the mean of the discarded explained variances, 0 when k is n or d
        if self.k not in (n, d) and S.numel() > self.k:
            self.noise_variance = float(explained[self.k:].mean())
            self.noise_dims = S.numel() - self.k
        else:
            self.noise_variance, self.noise_dims = 0.0, 0

    def truncated(self, m: int) -> "_State":
        """The first m components; the noise variance becomes the mean over every discarded
        direction (the k - m dropped here and the ``noise_dims`` dropped by the fit)."""
        state = _State(m, self.device, self.dtype)
        self.components_shared = state.components_shared = True
        state.n_samples_seen = self.n_samples_seen
        state.mean, state.var = self.mean, self.var
        state.components = self.components[:m]
        state.singular_values = self.singular_values[:m]
        state.explained_variance = self.explained_variance[:m]
        state.explained_variance_ratio = self.explained_variance_ratio[:m]
        dropped = self.explained_variance[m:]
        state.noise_dims = dropped.numel() + self.noise_dims
        state.noise_variance = (float((dropped.sum() + self.noise_variance * self.noise_dims)
                                      / state.noise_dims) if state.noise_dims else 0.0)
        return state


def _state_from_sklearn(ipca, device: torch.device, dtype: torch.dtype, rows: int) -> _State:
    """A snapshot of a fitted ``IncrementalPCA`` after an update with ``rows`` stacked rows, as
    a ``_State`` (no copy where dtypes match)."""
    def t(name: str) -> torch.Tensor:
        return torch.as_tensor(np.asarray(getattr(ipca, name), dtype=np.float64))

    state = _State(int(ipca.n_components_), device, dtype)
    state.n_samples_seen = ipca.n_samples_seen_
    state.components = t("components_").to(dtype)
    for key in ("mean", "var", "singular_values", "explained_variance",
                "explained_variance_ratio"):
        setattr(state, key, t(f"{key}_"))
    state.noise_variance = float(ipca.noise_variance_)
    # sklearn's noise variance is a mean over min(rows, d) - k directions (0 when k is n or d)
    state.noise_dims = (max(min(rows, state.components.shape[1]) - state.k, 0)
                        if state.noise_variance else 0)
    return state


# ------------------------------------------------------------------------------------------
# input and output: numpy or torch, float32 or float64


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a batch of ``dtype`` is fitted in: float32 and float64 as they are, half
    precision as float32, anything else (integers, bool) as float64 (sklearn's choice)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _as_tensor(X: Any, what: str) -> tuple[torch.Tensor, str]:
    """(X as a tensor sharing memory where it can, "torch" or "numpy"): the kind answers are
    given back in."""
    if isinstance(X, torch.Tensor):
        return X, "torch"
    array = np.asarray(X)
    if array.dtype.kind == "c":
        raise PCAError(f"{what}: Complex data not supported (got dtype {array.dtype})")
    if array.dtype.kind == "O":
        array = array.astype(np.float64)  # numbers stored as objects; anything else raises
    if array.dtype.kind not in "biuf":
        raise PCAError(f"{what}: expected real numbers, got an array of dtype {array.dtype}")
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype.kind != "f":
        array = array.astype(np.float64)
    with warnings.catch_warnings():  # a read-only array is fine: nothing here writes into X
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array), "numpy"


def _check_2d(shape: tuple, what: str) -> None:
    """One clear error for a batch that is not [samples >= 1, features >= 1]."""
    if len(shape) != 2:
        raise PCAError(f"{what}: expected a 2-D [samples, features] batch, got shape {shape}; "
                       f"Reshape your data with X.reshape(1, -1) for a single sample")
    if shape[1] == 0:
        raise PCAError(f"{what}: 0 feature(s) (shape={shape}) while a minimum of 1 is "
                       f"required.")


def _to_kind(t: torch.Tensor, kind: str, dtype: torch.dtype | None = None) -> Any:
    t = t if dtype is None else t.to(dtype)
    return t.detach().cpu().numpy() if kind == "numpy" else t


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    allowed = {None: None, torch.float32: torch.float32, torch.float64: torch.float64,
               "float32": torch.float32, "float64": torch.float64}
    key = dtype
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        key = np.dtype(dtype).name
    if not isinstance(key, (str, torch.dtype, type(None))) or key not in allowed:
        raise PCAError(f"dtype must be None, torch.float32 or torch.float64, got {dtype!r}")
    return allowed[key]


# ------------------------------------------------------------------------------------------
# the estimator


class StreamingPCA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Incremental PCA with a torch or scikit-learn backend; a scikit-learn estimator.

    Args:
        n_components: number of principal components k; None: ``min(n_samples, n_features)`` of
            the first batch (as ``IncrementalPCA``).
        backend: ``"torch"`` (any device) or ``"sklearn"`` (``IncrementalPCA``, on the CPU).
        device: torch backend only: where the state lives and updates run (default: the device
            of the first torch batch, else the CPU).
        dtype: precision of the fit, ``torch.float32`` or ``torch.float64``; None (default):
            the first batch's (half precision is fitted in float32, integers in float64).
        whiten: scale the transformed components to unit variance (as ``IncrementalPCA``).
        copy: accepted for ``IncrementalPCA`` compatibility; inputs are never modified.
        batch_size: rows per ``partial_fit`` in ``fit``; None: ``5 * n_features``.
        hold_first_batch: a first batch with fewer than k rows waits for more (True) or raises
            ``PCAError`` as ``IncrementalPCA`` does (False).

    Attributes (numpy arrays if the fit was fed numpy, else tensors on ``device_``; in the fit's
    precision): ``components_`` [k, d], ``mean_`` [d], ``var_`` [d], ``singular_values_`` [k],
    ``explained_variance_`` [k], ``explained_variance_ratio_`` [k], ``noise_variance_`` (float),
    ``n_components_``, ``n_samples_seen_``, ``n_features_in_``, ``batch_size_`` (after ``fit``),
    ``n_samples_pending_``, ``device_``.
    """

    def __init__(self, n_components: int | None = None, backend: str | PCABackend = "torch",
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
                 whiten: bool = False, copy: bool = True, batch_size: int | None = None,
                 hold_first_batch: bool = True):
        self.n_components = n_components
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.whiten = whiten
        self.copy = copy
        self.batch_size = batch_size
        self.hold_first_batch = hold_first_batch
        self._check_params()
        self._reset()

    def _reset(self) -> None:
        self._pending: list[torch.Tensor] = []
        self._n_features: int | None = None
        self._kind = "torch"
        self._state: _State | None = None
        self._sklearn = None
        self._fitted_with: tuple | None = None

    def _check_params(self) -> tuple[PCABackend, torch.dtype | None]:
        """Validate the parameters (at construction and again at fit: ``set_params`` skips
        ``__init__``); the backend and the dtype, resolved."""
        k = self.n_components
        if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool)
                              or k < 1):
            raise PCAError(f"n_components must be a positive integer or None, got {k!r}")
        try:
            backend = PCABackend(self.backend)
        except ValueError:
            raise PCAError(f"unknown PCA backend {self.backend!r}; allowed: torch, sklearn") \
                from None
        if backend is PCABackend.SKLEARN and self.device not in (None, "cpu") \
                and torch.device(self.device).type != "cpu":
            raise PCAError("the sklearn backend runs on the CPU only; use backend='torch'")
        dtype = _resolve_dtype(self.dtype)
        b = self.batch_size
        if b is not None and (not isinstance(b, (int, np.integer)) or isinstance(b, bool)
                              or b < 1):
            raise PCAError(f"batch_size must be a positive integer or None, got {b!r}")
        return backend, dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # fit and transform densify batch by batch
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> "StreamingPCA":
        """Fit from scratch on X [n, d] (numpy, torch or scipy sparse) in batches of
        ``batch_size`` rows (default ``5 * n_features``); the last batch is merged into the one
        before if it has fewer than ``n_components`` rows, as ``IncrementalPCA.fit`` does."""
        self._check_params()
        self._reset()
        if sparse.issparse(X):
            X = X if X.format in ("csr", "csc", "lil") else X.tocsr()  # rows can be sliced
        elif not isinstance(X, torch.Tensor):
            X = np.asarray(X)
        _check_2d(tuple(X.shape), "fit")
        n, d = X.shape
        if n == 0:
            raise PCAError(f"fit: Found array with 0 sample(s) (shape={tuple(X.shape)}) while "
                           f"a minimum of 1 is required.")
        self.batch_size_ = 5 * d if self.batch_size is None else int(self.batch_size)
        for batch in gen_batches(n, self.batch_size_, min_batch_size=self.n_components or 0):
            chunk = X[batch]
            self._partial_fit(chunk.toarray() if sparse.issparse(chunk) else chunk)
        return self.flush()

    def partial_fit(self, X: Any, y: Any = None, check_input: bool = True) -> "StreamingPCA":
        """Fold a batch [b, d] (torch tensor or numpy array) into the fit; after the first
        update it takes effect at once, whatever its size. ``check_input=False`` skips the
        finiteness check."""
        if sparse.issparse(X):
            name = type(self).__name__
            raise TypeError(f"{name}.partial_fit does not support sparse input. Either convert "
                            f"data to dense or use {name}.fit to do so in batches.")
        return self._partial_fit(X, check_input)

    def _partial_fit(self, X: Any, check_input: bool = True) -> "StreamingPCA":
        backend, dtype = self._check_params()
        X, kind = _as_tensor(X, "partial_fit")
        _check_2d(tuple(X.shape), "partial_fit")
        X = X.detach()
        n, d = X.shape
        k = self.n_components
        if self._n_features is None:
            if k is not None and d < k:
                raise PCAError(f"n_components={k} invalid for n_features={d}, need more rows "
                               f"than columns for IncrementalPCA processing: n_components "
                               f"exceeds the number of features")
            self._n_features, self._kind = d, kind
        elif d != self._n_features:
            raise PCAError(f"partial_fit: X has {d} features, but {type(self).__name__} is "
                           f"expecting {self._n_features} features as input")
        fitted_with = (backend, self.dtype, self.device)
        if self._fitted_with is not None and fitted_with != self._fitted_with:
            raise PCAError(f"backend, dtype or device changed since the fit began (now "
                           f"{fitted_with}, fitted with {self._fitted_with}); call fit() to "
                           f"start over")
        if self._state is not None and k is not None and k != self._state.k:
            raise PCAError(f"n_components={k}, but the fit holds {self._state.k} components; "
                           f"call fit() to start over, or truncate({k}) for fewer")
        if n == 0:
            return self
        # a finite sum means every value is finite (NaN and inf propagate); only a sum that
        # is not (those, or an overflow) needs the elementwise check, 50x slower
        if check_input and not bool(torch.isfinite(X.sum())) and not bool(
                torch.isfinite(X).all()):
            raise PCAError("batch contains NaN or infinite values")
        if self._state is None and k is not None and not self.hold_first_batch and n < k:
            raise PCAError(f"n_components={k} must be less or equal to the batch number of "
                           f"samples {n} for the first partial_fit call.")
        self._pending.append(X)
        if self._state is not None or k is None or self.n_samples_pending_ >= k:
            self._fold(backend, dtype)
        return self

    def flush(self) -> "StreamingPCA":
        """Fold rows still held: a first batch smaller than ``n_components`` waits for more
        rows; ``PCAError`` if all the rows seen are still fewer than ``n_components``."""
        if self._pending:
            if self._state is None and self.n_samples_pending_ < (self.n_components or 0):
                raise PCAError(f"{self.n_samples_pending_} samples are fewer than "
                               f"n_components={self.n_components}")
            self._fold(*self._check_params())
        return self

    def _fold(self, backend: PCABackend, dtype: torch.dtype | None) -> None:
        first = self._pending[0]
        X = first if len(self._pending) == 1 else torch.cat(
            [p.to(first.device) for p in self._pending])
        self._pending = []
        if self._state is None:
            self._fitted_with = (backend, self.dtype, self.device)
            dtype = dtype or _float_dtype(X.dtype)
            if backend is PCABackend.SKLEARN:
                device = torch.device("cpu")
            else:
                device = torch.device(self.device) if self.device is not None else X.device
        else:
            dtype, device = self._state.dtype, self._state.device
        if backend is PCABackend.SKLEARN:
            if self._sklearn is None:
                from sklearn.decomposition import IncrementalPCA

                self._sklearn = IncrementalPCA(n_components=self.n_components)
            rows = X.shape[0] + (0 if self._state is None else self._state.k + 1)
            self._sklearn.partial_fit(X.cpu().to(dtype).numpy())
            self._state = _state_from_sklearn(self._sklearn, device, dtype, rows)
            return
        if self._state is None:
            k = self.n_components if self.n_components is not None else min(X.shape)
            self._state = _State(int(k), device, dtype)
        self._state.update(X)

    # -- fitted state ------------------------------------------------------------------------

    def __sklearn_is_fitted__(self) -> bool:
        return self._state is not None

    def _fitted(self) -> _State:
        if self._state is None:
            raise PCANotFittedError(f"this {type(self).__name__} is not fitted yet (no batch "
                                    f"folded in): call fit or partial_fit first")
        return self._state

    def _public(self, name: str) -> Any:
        state = self._fitted()
        state.components_shared |= name == "components"
        return _to_kind(getattr(state, name), self._kind, state.dtype)

    components_ = property(lambda self: self._public("components"))
    mean_ = property(lambda self: self._public("mean"))
    var_ = property(lambda self: self._public("var"))
    singular_values_ = property(lambda self: self._public("singular_values"))
    explained_variance_ = property(lambda self: self._public("explained_variance"))
    explained_variance_ratio_ = property(lambda self: self._public("explained_variance_ratio"))
    noise_variance_ = property(lambda self: self._fitted().noise_variance)
    n_components_ = property(lambda self: self._fitted().k)
    device_ = property(lambda self: self._fitted().device)

    @property
    def n_samples_seen_(self) -> int | float:
        return self._state.n_samples_seen if self._state is not None else 0

    @n_samples_seen_.setter
    def n_samples_seen_(self, value: int | float) -> None:
        self._fitted().n_samples_seen = value
        if self._sklearn is not None:
            self._sklearn.n_samples_seen_ = value

    @property
    def n_samples_pending_(self) -> int:
        return sum(p.shape[0] for p in self._pending)

    @property
    def n_features_in_(self) -> int:
        if self._n_features is None:
            raise PCANotFittedError(f"this {type(self).__name__} has seen no batch yet")
        return self._n_features

    n_features_ = n_features_in_  # the name before the estimator API

    @property
    def _n_features_out(self) -> int:
        return self._fitted().k

    # -- use -------------------------------------------------------------------------------

    def _input(self, X: Any, what: str) -> tuple[torch.Tensor, str, torch.dtype]:
        """(X as a 2-D tensor, its kind, the dtype answers come back in: X's own if float32 or
        float64, else the fit's)."""
        state = self._fitted()
        Xt, kind = _as_tensor(X, what)
        _check_2d(tuple(Xt.shape), what)
        # tensors are not checked: attacks project through transform, and a check would
        # synchronise the device at every step
        if kind == "numpy" and not np.isfinite(Xt.numpy()).all():
            raise PCAError(f"{what}: Input contains NaN or infinity")
        out_dtype = Xt.dtype if Xt.dtype in (torch.float32, torch.float64) else state.dtype
        return Xt, kind, out_dtype

    def _scale(self, m: int, dtype: torch.dtype) -> torch.Tensor:
        """sqrt(explained_variance_[:m]), clipped below at eps (sklearn's whitening scale)."""
        scale = self._state.explained_variance[:m].sqrt().to(dtype)
        return scale.clamp_min(torch.finfo(dtype).eps)

    def transform(self, X: Any, n_components: int | None = None, center: bool = True) -> Any:
        """Project a batch: ``(X - mean_) @ components_[:m].T`` (divided by
        ``sqrt(explained_variance_[:m])`` when ``whiten``; ``center=False``: without the mean,
        ``X @ components_[:m].T``, as the original LESCI entry projected).

        Returns the input's kind and precision: numpy in, numpy out; a torch tensor in, a
        tensor on its device, differentiable with respect to that tensor (attacks project
        through it). Sparse input is projected ``batch_size_`` rows at a time.
        """
        state = self._fitted()
        m = state.k if n_components is None else int(n_components)
        if not 1 <= m <= state.k:
            raise PCAError(f"n_components must be in 1..{state.k}, got {m}")
        if sparse.issparse(X):
            X = X if X.format in ("csr", "csc", "lil") else X.tocsr()
            rows = getattr(self, "batch_size_", None) or 5 * X.shape[1]
            return np.vstack([self.transform(X[batch].toarray(), m, center)
                              for batch in gen_batches(X.shape[0], rows)])
        Xt, kind, out_dtype = self._input(X, "transform")
        if Xt.shape[1] != self._n_features:
            raise PCAError(f"transform: X has {Xt.shape[1]} features, but "
                           f"{type(self).__name__} is expecting {self._n_features} features "
                           f"as input")
        work = torch.promote_types(out_dtype, state.dtype)
        components = state.components[:m].to(work)
        out = Xt.to(state.device, work)
        if center:
            out = out - state.mean.to(work)
        out = out @ components.T
        if self.whiten:
            out = out / self._scale(m, work)
        out = out.to(out_dtype)
        return out.detach().cpu().numpy() if kind == "numpy" else out.to(Xt.device)

    def inverse_transform(self, X: Any, center: bool = True) -> Any:
        """Map codes [b, m] (m <= n_components) back to the input space:
        ``X @ components_[:m] + mean_`` (whitening undone first); the input's kind and
        precision."""
        state = self._fitted()
        Xt, kind, out_dtype = self._input(X, "inverse_transform")
        m = Xt.shape[1]
        if not 1 <= m <= state.k:
            raise PCAError(f"inverse_transform: codes have {m} columns, the PCA {state.k} "
                           f"components")
        work = torch.promote_types(out_dtype, state.dtype)
        codes = Xt.to(state.device, work)
        if self.whiten:
            codes = codes * self._scale(m, work)
        out = codes @ state.components[:m].to(work)
        if center:
            out = out + state.mean.to(work)
        out = out.to(out_dtype)
        return out.detach().cpu().numpy() if kind == "numpy" else out.to(Xt.device)

    def _model_parts(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(components [k, d] float64, whitened if so, explained variance minus noise clipped
        at 0, noise variance): the probabilistic PCA model of get_covariance/get_precision."""
        state = self._fitted()
        components = state.components.to(torch.float64)
        explained = state.explained_variance
        if self.whiten:
            components = components * explained.sqrt()[:, None]
        noise = state.noise_variance
        return components, (explained - noise).clamp_min(0.0), noise

    def get_covariance(self) -> Any:
        """``components_.T @ diag(explained_variance_ - noise) @ components_ + noise * I``
        [d, d] (as ``IncrementalPCA``)."""
        components, diff, noise = self._model_parts()
        cov = (components.T * diff) @ components
        cov.diagonal().add_(noise)
        return _to_kind(cov, self._kind, self._state.dtype)

    def get_precision(self) -> Any:
        """The inverse of ``get_covariance()`` by the matrix inversion lemma [d, d]."""
        components, diff, noise = self._model_parts()
        if noise == 0.0:
            cov = (components.T * diff) @ components
            return _to_kind(torch.linalg.inv(cov), self._kind, self._state.dtype)
        precision = components @ components.T / noise
        precision.diagonal().add_(1.0 / diff)
        precision = components.T @ torch.linalg.inv(precision) @ components
        precision /= -(noise ** 2)
        precision.diagonal().add_(1.0 / noise)
        return _to_kind(precision, self._kind, self._state.dtype)

    def truncate(self, n_components: int) -> "StreamingPCA":
        """The first ``n_components`` components of this fit, as a torch-backend copy on the
        same device (not what an m-component fit would find: see the module docstring)."""
        state = self._fitted()
        if not 1 <= n_components <= state.k:
            raise PCAError(f"n_components must be in 1..{state.k}, got {n_components}")
        pca = StreamingPCA(n_components, backend="torch", device=self.device,
                           dtype=self.dtype, whiten=self.whiten)
        pca._adopt(state.truncated(int(n_components)), self._kind)
        return pca

    def _adopt(self, state: _State, kind: str) -> None:
        self._state = state
        self._n_features = state.components.shape[1]
        self._kind = kind
        self._fitted_with = (PCABackend(self.backend), self.dtype, self.device)

    # -- persistence: plain arrays, no pickle ----------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        state = self._fitted()

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float64)

        return {
            "backend": np.array(PCABackend(self.backend).value),
            "n_components": np.array(state.k),
            "n_samples_seen": np.array(state.n_samples_seen),
            "components": state.components.detach().cpu().numpy(),
            "mean": arr(state.mean),
            "var": arr(state.var),
            "singular_values": arr(state.singular_values),
            "explained_variance": arr(state.explained_variance),
            "explained_variance_ratio": arr(state.explained_variance_ratio),
            "noise_variance": np.array(state.noise_variance, dtype=np.float64),
            "noise_dims": np.array(state.noise_dims),
            "whiten": np.array(bool(self.whiten)),
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
        """Rebuild from ``to_bytes()`` (attributes as tensors on ``device``); every array is
        checked for shape and finiteness (``BlobError`` naming ``source`` if one fails)."""
        arrays = read_npz(data, FILE_FORMAT, source)
        keys = ("components", "n_samples_seen", "mean", "var", "singular_values",
                "explained_variance", "explained_variance_ratio")
        missing = [key for key in keys if key not in arrays]
        if missing or arrays["components"].ndim != 2 \
                or arrays["components"].dtype not in (np.float32, np.float64):
            raise BlobError(f"{source}: malformed PCA (missing {missing} or components not a "
                            f"2-D float array)")
        k, d = arrays["components"].shape
        for key, shape in (("mean", (d,)), ("var", (d,)), ("singular_values", (k,)),
                           ("explained_variance", (k,)), ("explained_variance_ratio", (k,)),
                           ("noise_variance", ())):
            if key not in arrays and key == "noise_variance":
                continue  # written before noise_variance_ was kept: loads as 0
            if arrays[key].shape != shape or not np.isfinite(arrays[key]).all():
                raise BlobError(f"{source}: {key} should be finite with shape {shape}")
        if not np.isfinite(arrays["components"]).all():
            raise BlobError(f"{source}: components are not finite")
        m = k if n_components is None else int(n_components)
        if not 1 <= m <= k:
            raise BlobError(f"{source}: holds {k} components, {m} asked for")
        components = torch.from_numpy(np.ascontiguousarray(arrays["components"]))
        target = torch.device(device) if device is not None else torch.device("cpu")
        state = _State(k, target, components.dtype)
        state.n_samples_seen = arrays["n_samples_seen"].item()
        state.components = components.to(target)
        for key in ("mean", "var", "singular_values", "explained_variance",
                    "explained_variance_ratio"):
            setattr(state, key, torch.from_numpy(np.asarray(arrays[key], np.float64)).to(target))
        state.noise_variance = float(arrays.get("noise_variance", 0.0))
        state.noise_dims = int(arrays.get("noise_dims", 0))
        pca = cls(m, backend="torch", device=device, dtype=components.dtype,
                  whiten=bool(arrays.get("whiten", False)))
        pca._adopt(state.truncated(m) if m < k else state, "torch")
        return pca
