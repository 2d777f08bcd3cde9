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


def test_transform_returns_input_kind():
    batches = low_rank_stream()
    pca = fit("torch", batches, 4)
    out = pca.transform(batches[0].numpy())
    assert isinstance(out, np.ndarray) and out.shape == (64, 4)
    assert isinstance(pca.transform(batches[0]), torch.Tensor)
    sk = fit("sklearn", batches, 4)
    assert np.allclose(np.abs(sk.transform(batches[0].numpy())), np.abs(out), atol=1e-3)


def test_small_batches_are_held_until_n_components_rows():
    batches = low_rank_stream(batch=64)
    pca = StreamingPCA(8)
    pca.partial_fit(batches[0][:5])
    assert (pca.n_samples_seen_, pca.n_samples_pending_) == (0, 5)
    pca.partial_fit(batches[0][5:9])
    assert (pca.n_samples_seen_, pca.n_samples_pending_) == (9, 0)
    pca.partial_fit(batches[1][:3])
    pca.flush()  # torch folds a small remainder once fitted
    assert pca.n_samples_seen_ == 12
    sk = StreamingPCA(8, backend="sklearn")
    sk.partial_fit(batches[0][:20])
    sk.partial_fit(batches[1][:3])
    with pytest.warns(UserWarning, match="dropping the last 3 samples"):
        sk.flush()
    with pytest.raises(PCAError, match="fewer than n_components"):
        StreamingPCA(8).partial_fit(batches[0][:3]).flush()


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
    with pytest.raises(PCAError, match="exceeds the number of features 5"):
        pca.partial_fit(torch.rand(20, 5))
    pca = StreamingPCA(2).partial_fit(torch.rand(10, 6))
    with pytest.raises(PCAError, match="batch has 7 features"):
        pca.partial_fit(torch.rand(10, 7))
    bad = torch.rand(10, 6)
    bad[3, 2] = float("nan")
    with pytest.raises(PCAError, match="NaN"):
        pca.partial_fit(bad)
    with pytest.raises(PCAError, match="not fitted"):
        StreamingPCA(2).components_


def test_rank_deficient_stream_gives_zero_components_not_nan():
    x = torch.zeros(20, 10)
    x[:, 0] = torch.arange(20.0)
    pca = StreamingPCA(3).partial_fit(x)
    assert torch.isfinite(pca.components_).all()
    assert float(pca.components_[0].abs()[0]) == pytest.approx(1.0)
    assert torch.equal(pca.components_[1:], torch.zeros(2, 10))


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
