"""StreamingPCA as a scikit-learn estimator: kinds and dtypes in and out, the estimator API
(clone, get/set_params, Pipeline, GridSearchCV), and what save/load/truncate keep."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.decomposition import IncrementalPCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from defenses.pca import PCAError, PCANotFittedError, StreamingPCA


def data(n=300, d=20, seed=0, dtype=np.float64):
    rng = np.random.RandomState(seed)
    return ((rng.randn(n, d) * np.linspace(4, 0.5, d)) @ np.linalg.qr(rng.randn(d, d))[0]
            + 3).astype(dtype)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out_in_the_same_dtype(backend, dtype):
    X = data(dtype=dtype)
    pca = StreamingPCA(5, backend=backend, batch_size=100).fit(X)
    for name in ("components_", "mean_", "var_", "singular_values_", "explained_variance_",
                 "explained_variance_ratio_"):
        value = getattr(pca, name)
        assert isinstance(value, np.ndarray) and value.dtype == dtype, name
    codes = pca.transform(X)
    assert isinstance(codes, np.ndarray) and codes.dtype == dtype and codes.shape == (300, 5)
    back = pca.inverse_transform(codes)
    assert isinstance(back, np.ndarray) and back.dtype == dtype and back.shape == X.shape
    assert pca.get_covariance().dtype == dtype and pca.get_precision().dtype == dtype
    # the other precision in: answers in that precision, computed in the wider of the two
    other = np.float64 if dtype == np.float32 else np.float32
    assert pca.transform(X.astype(other)).dtype == other
    assert pca.fit_transform(X).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensors_in_tensors_out_on_their_device_in_the_same_dtype(dtype):
    X = torch.from_numpy(data()).to(dtype)
    pca = StreamingPCA(5).fit(X)
    assert isinstance(pca.components_, torch.Tensor) and pca.components_.dtype == dtype
    assert pca.device_ == X.device
    codes = pca.transform(X)
    assert isinstance(codes, torch.Tensor) and codes.dtype == dtype and codes.device == X.device
    back = pca.inverse_transform(codes)
    assert isinstance(back, torch.Tensor) and back.dtype == dtype
    assert isinstance(pca.get_covariance(), torch.Tensor)
    # numpy into a tensor-fitted PCA: numpy out
    assert isinstance(pca.transform(X.numpy()), np.ndarray)


def test_float64_stays_float64_and_matches_incremental_pca_to_rounding():
    X = data(n=600, d=30)
    ours = StreamingPCA(6, batch_size=100).fit(X)
    reference = IncrementalPCA(6, batch_size=100).fit(X)
    assert ours.components_.dtype == np.float64
    assert np.allclose(ours.components_, reference.components_, atol=1e-12)
    assert np.allclose(ours.explained_variance_, reference.explained_variance_, rtol=1e-12)
    assert ours.noise_variance_ == pytest.approx(reference.noise_variance_, rel=1e-12)
    assert np.allclose(ours.transform(X), reference.transform(X), atol=1e-11)
    assert ours.n_samples_seen_ == reference.n_samples_seen_ and ours.batch_size_ == 100


def test_integer_input_is_fitted_in_float64():
    X = np.round(data() * 10).astype(np.int64)
    pca = StreamingPCA(3).fit(X)
    assert pca.components_.dtype == np.float64 and pca.transform(X).dtype == np.float64


def test_dtype_parameter_sets_the_fit_precision():
    X = data()
    pca = StreamingPCA(4, dtype=torch.float32).fit(X)
    assert pca.components_.dtype == np.float32
    assert pca.transform(X).dtype == np.float64  # the input's precision
    with pytest.raises(PCAError, match="dtype must be None, torch.float32 or torch.float64"):
        StreamingPCA(4, dtype=torch.int32)


def test_whiten_gives_unit_variance_codes_and_inverts():
    X = data(n=2000)
    pca = StreamingPCA(4, whiten=True, batch_size=500).fit(X)
    codes = pca.transform(X)
    assert np.allclose(codes.var(axis=0, ddof=1), 1.0, rtol=0.05)
    full = StreamingPCA(20, whiten=True, batch_size=500).fit(X)
    assert np.allclose(full.inverse_transform(full.transform(X)), X, atol=1e-8)


def test_get_params_set_params_and_clone():
    pca = StreamingPCA(7, backend="sklearn", whiten=True, batch_size=50)
    params = pca.get_params()
    assert params == {"n_components": 7, "backend": "sklearn", "device": None, "dtype": None,
                      "whiten": True, "copy": True, "batch_size": 50, "hold_first_batch": True}
    twin = clone(pca.fit(data()))
    assert twin.get_params() == params and not hasattr(twin, "components_")
    with pytest.raises(PCANotFittedError, match="not fitted"):
        twin.transform(data())
    assert repr(twin) == "StreamingPCA(backend='sklearn', batch_size=50, n_components=7, " \
                         "whiten=True)"


def test_set_params_then_partial_fit_with_another_n_components_raises():
    X = data()
    pca = StreamingPCA(10).fit(X)
    pca.set_params(n_components=5)
    with pytest.raises(PCAError, match="n_components=5, but the fit holds 10 components"):
        pca.partial_fit(X)
    pca.set_params(backend="sklearn", n_components=10)
    with pytest.raises(PCAError, match="backend, dtype or device changed"):
        pca.partial_fit(X)
    pca.fit(X)  # fit starts over with the new parameters
    assert pca.n_samples_seen_ == 300


def test_in_a_pipeline_and_a_grid_search():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    pipe = make_pipeline(StreamingPCA(whiten=True, batch_size=500),
                         LogisticRegression(max_iter=1000))
    search = GridSearchCV(pipe, {"streamingpca__n_components": [8, 16],
                                 "streamingpca__backend": ["torch", "sklearn"]}, cv=3)
    search.fit(X, y)
    assert search.best_score_ > 0.85
    assert search.best_params_["streamingpca__n_components"] == 16
    fitted = search.best_estimator_[0]
    assert fitted.n_components_ == 16 and fitted.n_features_in_ == 64
    names = search.best_estimator_[:-1].get_feature_names_out()
    assert list(names[:2]) == ["streamingpca0", "streamingpca1"]


def test_partial_fit_declines_sparse_input_with_a_clear_error_and_fit_takes_it():
    from scipy import sparse

    X = sparse.csr_matrix(data())
    with pytest.raises(TypeError, match="StreamingPCA.partial_fit does not support sparse"):
        StreamingPCA(3).partial_fit(X)
    pca = StreamingPCA(3, batch_size=100).fit(X)
    assert np.allclose(pca.transform(X), pca.transform(X.toarray()))


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_save_load_and_truncate_keep_noise_variance(tmp_path, backend):
    X = data(n=400, d=30)
    pca = StreamingPCA(8, backend=backend, batch_size=100).fit(X)
    reference = IncrementalPCA(8, batch_size=100).fit(X)
    assert pca.noise_variance_ == pytest.approx(reference.noise_variance_, rel=1e-10)
    pca.save(tmp_path / "pca.npz")
    loaded = StreamingPCA.load(tmp_path / "pca.npz")
    assert loaded.noise_variance_ == pytest.approx(pca.noise_variance_, rel=1e-12)
    assert np.allclose(loaded.get_covariance().numpy(), pca.get_covariance(), atol=1e-10)
    # the truncated model's noise: the mean over every direction it leaves out, i.e. the
    # k - m dropped variances and the 30 - 8 that the 8-component fit had left out
    small = pca.truncate(3)
    dropped = pca.explained_variance_[3:]
    assert small.noise_variance_ == pytest.approx(
        (dropped.sum() + pca.noise_variance_ * (30 - 8)) / (30 - 3), rel=1e-10)
    assert StreamingPCA.load(tmp_path / "pca.npz", n_components=3).noise_variance_ == \
        pytest.approx(small.noise_variance_, rel=1e-12)
    assert isinstance(small.components_, np.ndarray)  # the kind of the fit it came from


def test_n_samples_seen_and_unfitted_state():
    pca = StreamingPCA(3)
    assert pca.n_samples_seen_ == 0 and not hasattr(pca, "components_")
    assert not hasattr(pca, "n_features_in_")
    with pytest.raises(PCANotFittedError):
        pca.get_covariance()
    pca.partial_fit(data()[:50])
    assert pca.n_features_in_ == 20 and pca.n_samples_seen_ == 50


# scikit-learn's generic estimator checks. The one deviation, on purpose: the constructor
# validates its parameters (one clear error at the boundary, the project's rule), and fit
# validates them again after set_params.
EXPECTED_FAILED_CHECKS = {
    "check_do_not_raise_errors_in_init_or_set_params":
        "StreamingPCA validates its parameters in the constructor (and again at fit)"}


@parametrize_with_checks([StreamingPCA(), StreamingPCA(backend="sklearn")],
                         expected_failed_checks=lambda estimator: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
