"""StreamingPCA: torch vs sklearn vs exact PCA on the same stream, nesting, persistence, memory."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from defenses._io import BlobError
from defenses.pca import PCAError, StreamingPCA


def low_rank_stream(d=300, rank=8, n_batches=6, batch=64, noise=0.05, seed=0):
    """Batches of a rank-``rank`` signal with decaying scales, plus noise and an offset."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))[0].T
    scales = torch.logspace(1.2, 0, rank, dtype=torch.float64)
    offset = torch.rand(d, generator=gen, dtype=torch.float64)
    return [((torch.randn(batch, rank, generator=gen, dtype=torch.float64) * scales) @ basis
             + noise * torch.randn(batch, d, generator=gen, dtype=torch.float64) + offset).float()
            for _ in range(n_batches)]


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of a [k, d] and b [k, d]."""
    qa = torch.linalg.qr(a.double().T)[0]
    qb = torch.linalg.qr(b.double().T)[0]
    return torch.linalg.svdvals(qa.T @ qb)


def fit(backend, batches, k):
    pca = StreamingPCA(k, backend=backend)
    for batch in batches:
        pca.partial_fit(batch)
    return pca.flush()


def test_torch_agrees_with_sklearn_and_exact_pca():
    batches = low_rank_stream()
    k = 8
    torch_pca, sk_pca = fit("torch", batches, k), fit("sklearn", batches, k)
    X = torch.cat(batches).double()
    mean = X.mean(0)
    _, S, Vt = torch.linalg.svd(X - mean, full_matrices=False)
    exact_components, exact_variance = Vt[:k], S[:k] ** 2 / (X.shape[0] - 1)

    for pca in (torch_pca, sk_pca):
        assert pca.n_samples_seen_ == X.shape[0]
        assert torch.allclose(pca.mean_.double(), mean, atol=1e-5)
        assert float(principal_cosines(pca.components_, exact_components).min()) >= 0.999
        assert torch.allclose(pca.explained_variance_.double(), exact_variance, rtol=1e-3)
    # Component by component, up to sign, torch and sklearn are the same vectors.
    dots = (torch_pca.components_.double() * sk_pca.components_.double()).sum(1).abs()
    assert float(dots.min()) > 0.9999
    assert torch.allclose(torch_pca.explained_variance_ratio_.double(),
                          sk_pca.explained_variance_ratio_.double(), rtol=1e-4)
    assert torch.allclose(torch_pca.singular_values_.double(),
                          sk_pca.singular_values_.double(), rtol=1e-4)


def test_components_are_orthonormal_and_sign_convention_matches_sklearn():
    pca = fit("torch", low_rank_stream(d=500, rank=12), 10)
    C = pca.components_.double()
    assert torch.allclose(C @ C.T, torch.eye(10, dtype=torch.float64), atol=1e-5)
    largest = C.abs().argmax(1)
    assert bool((C.gather(1, largest[:, None]) > 0).all())


def test_nested_components_truncate():
    batches = low_rank_stream()
    big = fit("torch", batches, 12)
    small = big.truncate(5)
    assert small.components_.shape == (5, 300)
    X = batches[0]
    assert torch.allclose(small.transform(X), big.transform(X)[:, :5], atol=1e-5)
    assert torch.allclose(big.transform(X, n_components=5), small.transform(X), atol=1e-6)
    # The first 5 of a 12-component fit span what a 5-component fit finds.
    direct = fit("sklearn", batches, 5)
    assert float(principal_cosines(small.components_, direct.components_).min()) >= 0.999


def test_components_read_out_are_not_overwritten_by_later_updates():
    """An update writes over the old components only while nobody has been handed them."""
    batches = low_rank_stream()
    pca = StreamingPCA(4).partial_fit(batches[0]).partial_fit(batches[1])
    before = pca.components_
    saved = before.clone()
    pca.partial_fit(batches[2])
    assert pca._state.last_route == "gram"
    assert torch.equal(before, saved) and not torch.equal(pca.components_, saved)
    small = pca.truncate(2)
    kept = small.components_.clone()
    pca.partial_fit(batches[3])
    assert torch.equal(small.components_, kept)


def test_transform_returns_input_kind():
    batches = low_rank_stream()
    pca = fit("torch", batches, 4)
    out = pca.transform(batches[0].numpy())
    assert isinstance(out, np.ndarray) and out.shape == (64, 4)
    assert isinstance(pca.transform(batches[0]), torch.Tensor)
    sk = fit("sklearn", batches, 4)
    assert np.allclose(np.abs(sk.transform(batches[0].numpy())), np.abs(out), atol=1e-3)


def test_first_batch_is_held_until_n_components_rows_then_every_batch_counts():
    batches = low_rank_stream(batch=64)
    for backend in ("torch", "sklearn"):
        pca = StreamingPCA(8, backend=backend)
        pca.partial_fit(batches[0][:5])
        assert (pca.n_samples_seen_, pca.n_samples_pending_) == (0, 5)
        pca.partial_fit(batches[0][5:9])
        assert (pca.n_samples_seen_, pca.n_samples_pending_) == (9, 0)
        pca.partial_fit(batches[1][:3])  # after the first update: at once, any size
        assert (pca.n_samples_seen_, pca.n_samples_pending_) == (12, 0)
    with pytest.raises(PCAError, match="fewer than n_components"):
        StreamingPCA(8).partial_fit(batches[0][:3]).flush()
    with pytest.raises(PCAError, match="must be less or equal to the batch number of samples 3"):
        StreamingPCA(8, hold_first_batch=False).partial_fit(batches[0][:3])


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_a_tail_smaller_than_n_components_is_folded_like_sklearn(backend):
    """2,000 samples in batches of 130: a 50-row tail, fewer than the 64 components."""
    from sklearn.decomposition import IncrementalPCA

    rng = np.random.RandomState(0)
    X = rng.randn(2000, 100) @ np.diag(np.linspace(3, 0.1, 100)) + 5
    ours, reference = StreamingPCA(64, backend=backend), IncrementalPCA(64)
    for start in range(0, 2000, 130):
        ours.partial_fit(X[start:start + 130])
        reference.partial_fit(X[start:start + 130])
    ours.flush()
    assert X[1950:].shape[0] == 50 and ours.n_samples_seen_ == reference.n_samples_seen_ == 2000
    assert np.allclose(ours.explained_variance_, reference.explained_variance_, rtol=1e-10)
    assert np.allclose(ours.singular_values_, reference.singular_values_, rtol=1e-10)
    assert ours.noise_variance_ == pytest.approx(reference.noise_variance_, rel=1e-10)
    assert np.allclose(ours.transform(X[:300]), reference.transform(X[:300]), atol=1e-8)


def test_n_components_none_and_n_components_():
    X = np.random.RandomState(1).rand(10, 50)
    pca = StreamingPCA().partial_fit(X)
    assert pca.n_components is None and pca.n_components_ == 10
    pca.partial_fit(X)
    assert pca.n_components_ == 10 and pca.components_.shape == (10, 50)


def test_save_load_round_trip(tmp_path):
    batches = low_rank_stream()
    for backend in ("torch", "sklearn"):
        pca = fit(backend, batches, 6)
        pca.save(tmp_path / f"{backend}.npz")
        loaded = StreamingPCA.load(tmp_path / f"{backend}.npz")
        assert loaded.n_samples_seen_ == pca.n_samples_seen_
        assert torch.allclose(loaded.transform(batches[1]), pca.transform(batches[1]), atol=1e-4)
        assert StreamingPCA.load(tmp_path / f"{backend}.npz", n_components=3).n_components == 3
    # A loaded fit keeps learning like the original.
    pca = fit("torch", batches[:3], 6)
    pca.save(tmp_path / "part.npz")
    resumed = StreamingPCA.load(tmp_path / "part.npz")
    for batch in batches[3:]:
        pca.partial_fit(batch)
        resumed.partial_fit(batch)
    assert torch.allclose(resumed.components_, pca.components_, atol=1e-5)


def test_corrupt_pca_file(tmp_path):
    pca = fit("torch", low_rank_stream(), 4)
    pca.save(tmp_path / "p.npz")
    raw = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(BlobError, match="bad.npz: not a robust-sweeps-pca/1 blob"):
        StreamingPCA.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", components=np.array([object()], dtype=object))
    with pytest.raises(BlobError, match="obj.npz: not a robust-sweeps-pca/1 blob"):
        StreamingPCA.load(tmp_path / "obj.npz")
    with pytest.raises(BlobError, match="gone.npz: no such PCA file"):
        StreamingPCA.load(tmp_path / "gone.npz")


def test_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        StreamingPCA(0)
    with pytest.raises(ValueError, match="allowed: torch, sklearn"):
        StreamingPCA(3, backend="faiss")
    pca = StreamingPCA(8)
    with pytest.raises(PCAError, match="n_components=8 invalid for n_features=5"):
        pca.partial_fit(torch.rand(20, 5))
    pca = StreamingPCA(2).partial_fit(torch.rand(10, 6))
    with pytest.raises(PCAError, match="X has 7 features, but StreamingPCA is expecting 6"):
        pca.partial_fit(torch.rand(10, 7))
    bad = torch.rand(10, 6)
    bad[3, 2] = float("nan")
    with pytest.raises(PCAError, match="NaN"):
        pca.partial_fit(bad)
    with pytest.raises(PCAError, match="not fitted"):
        StreamingPCA(2).components_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_stream_keeps_orthonormal_components_like_sklearn(dtype):
    """k = 6 components of data of rank 2: the weak directions are kept orthonormal with
    singular values ~0 (as scikit-learn), not zeroed with a non-zero variance."""
    from sklearn.decomposition import IncrementalPCA

    gen = torch.Generator().manual_seed(0)
    X = (torch.randn(200, 2, generator=gen, dtype=torch.float64)
         @ torch.randn(2, 10, generator=gen, dtype=torch.float64) + 1.0)
    pca, reference = StreamingPCA(6, dtype=dtype), IncrementalPCA(6)
    for start in range(0, 200, 40):
        pca.partial_fit(X[start:start + 40])
        reference.partial_fit(X[start:start + 40].numpy())
    C = pca.components_.double()
    assert torch.isfinite(C).all()
    assert torch.allclose(C @ C.T, torch.eye(6, dtype=torch.float64), atol=1e-5)
    S = pca.singular_values_.double()
    eps = torch.finfo(dtype).eps
    assert torch.allclose(S[:2], torch.from_numpy(reference.singular_values_[:2]), rtol=10 * eps)
    assert float(S[2:].max()) < 100 * eps * float(S[0])
    # the variance follows the singular value: no direction with S ~ 0 and a variance > 0
    assert torch.allclose(pca.explained_variance_.double(), S ** 2 / 199, rtol=1e-5, atol=0)
    codes = pca.transform(X.to(dtype))
    assert float(codes[:, 2:].abs().max()) < 1e3 * eps * float(codes[:, 0].abs().max())


@pytest.mark.parametrize("ratio", [1e3, 1e7])
def test_steep_spectrum_matches_sklearn(ratio):
    """Singular values from 1 down to 1/ratio: the Gram route would lose the last ones
    (error ~ eps * ratio^2), so the update falls back to an SVD of the stacked matrix."""
    from sklearn.decomposition import IncrementalPCA

    rng = np.random.RandomState(0)
    d, k = 60, 12
    basis = np.linalg.qr(rng.randn(d, d))[0]
    scales = np.concatenate([np.logspace(0, -np.log10(ratio), k), np.full(d - k, 1e-2 / ratio)])
    X = (rng.randn(1000, d) * scales) @ basis.T
    batches = [X[i:i + 100] for i in range(0, 1000, 100)]
    pca, reference = StreamingPCA(k), IncrementalPCA(k)
    for batch in batches:
        pca.partial_fit(batch)
        reference.partial_fit(batch)
    exact = np.linalg.svd(X - X.mean(0), compute_uv=False)[:k]
    assert pca._state.last_route == "svd"
    assert np.allclose(pca.singular_values_, reference.singular_values_, rtol=1e-6, atol=0)
    assert np.allclose(pca.singular_values_, exact, rtol=1e-3, atol=0)
    cosines = np.abs(np.sum(pca.components_ * reference.components_, axis=1))
    assert cosines.min() > 1 - 1e-6


def test_well_conditioned_wide_updates_take_the_gram_route_and_agree_with_sklearn():
    from sklearn.decomposition import IncrementalPCA

    batches = low_rank_stream(d=2000, rank=8, batch=100, noise=0.5)
    pca, reference = StreamingPCA(8), IncrementalPCA(8)
    for batch in batches:
        pca.partial_fit(batch)
        reference.partial_fit(batch.numpy())
    assert pca._state.last_route == "gram" and pca.components_.dtype == torch.float32
    assert np.allclose(pca.singular_values_.numpy(), reference.singular_values_, rtol=1e-5)
    dots = np.abs(np.sum(pca.components_.double().numpy() * reference.components_, axis=1))
    assert dots.min() > 1 - 1e-5


def test_float64_activations_take_the_tsqr_route_and_keep_float64_accuracy():
    """A realistic float64 stream (a few strong directions over a noise floor, as activations
    are): the Gram matrix cannot resolve the k-th singular value to float64's precision, so the
    updates take TSQR, which agrees with scikit-learn's SVD of the stacked matrix to 1e-10 and
    never holds that matrix whole."""
    from sklearn.decomposition import IncrementalPCA

    batches = [b.double() for b in low_rank_stream(d=20_000, rank=16, batch=100, noise=0.5)]
    pca, reference = StreamingPCA(16), IncrementalPCA(16)
    routes = []
    for batch in batches:
        pca.partial_fit(batch)
        reference.partial_fit(batch.numpy())
        routes.append(pca._state.last_route)
    assert routes[1:] == ["tsqr"] * (len(batches) - 1)
    assert np.allclose(pca.singular_values_.numpy(), reference.singular_values_, rtol=1e-10,
                       atol=0)
    cosines = principal_cosines(pca.components_, torch.from_numpy(reference.components_))
    assert float(1 - cosines.min()) < 1e-10
    rows = np.abs(np.sum(pca.components_.numpy() * reference.components_, axis=1))
    assert float(1 - rows.min()) < 1e-10  # each component, not just the subspace


def test_a_large_wide_batch_is_folded_in_slices_at_linear_cost():
    """4,000 rows of 1,200 features in one partial_fit: slices of 512 rows (the Gram matrix
    of the whole batch would be 4,000^2); the subspace is exact PCA's."""
    gen = torch.Generator().manual_seed(0)
    signal = torch.randn(4000, 6, generator=gen, dtype=torch.float64) * torch.tensor(
        [20.0, 15, 10, 8, 6, 4], dtype=torch.float64)
    X = signal @ torch.randn(6, 1200, generator=gen, dtype=torch.float64) \
        + 0.01 * torch.randn(4000, 1200, generator=gen, dtype=torch.float64)
    pca = StreamingPCA(6)
    seen = []
    update = pca._fold

    def spy(*args):
        update(*args)
        seen.append(pca.n_samples_seen_)
    pca._fold = spy
    pca.partial_fit(X)
    assert seen == [4000] and pca.n_samples_seen_ == 4000
    centred = X - X.mean(0)
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred)
    assert float(principal_cosines(pca.components_, vectors[:, -6:].T).min()) > 1 - 1e-9
    assert torch.allclose(pca.singular_values_, eigenvalues[-6:].flip(0).sqrt(), rtol=1e-6)


def test_slices_of_a_large_batch():
    """The slicing itself: 1,100 rows fold as 512 + 512 + 76, each one update."""
    from defenses.pca import _State

    state = _State(4, torch.device("cpu"), torch.float64)
    sizes = []
    state._update = lambda X: sizes.append(X.shape[0])
    state.update(torch.zeros(1100, 2000, dtype=torch.float64))
    assert sizes == [512, 512, 76]
    sizes.clear()
    state.update(torch.zeros(1100, 600, dtype=torch.float64))  # more rows than features: whole
    assert sizes == [1100]


@pytest.mark.slow
def test_fits_262144_dims_under_4gb():
    """The early-ResNet width the original LESCI could not reach, in a fresh process."""
    script = textwrap.dedent("""
        import resource, torch
        from defenses.pca import StreamingPCA
        d, k = 262_144, 32
        gen = torch.Generator().manual_seed(0)
        basis = torch.randn(8, d, generator=gen)
        pca = StreamingPCA(k)
        for i in range(4):
            x = torch.randn(256, 8, generator=gen) @ basis
            x += 0.1 * torch.randn(256, d, generator=gen)
            pca.partial_fit(x)
            del x
        assert pca.components_.shape == (k, d) and pca.n_samples_seen_ == 1024
        assert torch.isfinite(pca.components_).all()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    peak_kb = int(out.stdout.split()[-1])
    assert peak_kb < 4 * 1024 * 1024, f"peak RSS {peak_kb / 1e6:.2f} GB"


def test_transform_is_differentiable_for_a_tensor_input():
    pca = fit("torch", low_rank_stream(), 4)
    X = torch.randn(3, pca.n_features_, requires_grad=True)
    codes = pca.transform(X, n_components=2)
    (grad,) = torch.autograd.grad(codes.sum(), X)
    assert torch.allclose(grad, pca.components_[:2].sum(0).expand(3, -1))
