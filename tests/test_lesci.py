"""knn_vote on hand-made cases, the projection rule, metrics, and LESCI end to end on digits."""

import math

import pytest
import torch

from defenses._io import BlobError
from defenses.embedding_space import EmbeddingSpace, build_embedding_space
from defenses.knn import KnnIndex
from defenses.lesci import (collect_votes, evaluate_lesci, fit_pca_at_depth, knn_vote,
                            lesci_metrics, lesci_predict, project_mask)
from defenses.models import depth_shapes
from defenses.evaluation import accuracy


def unit(angle_deg):
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


# Embeddings on the unit circle at known angles: cosine similarity orders them by angle distance.
EMB = torch.tensor([unit(0), unit(10), unit(20), unit(30), unit(90), unit(100)])
LAB = torch.tensor([2, 2, 1, 1, 0, 0])
# faiss-cpu is a dependency: both backends are always tested
BACKENDS = ["torch", "faiss"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_vote_counts_nearest_by_cosine_and_scale_does_not_matter(backend):
    majority, fraction = knn_vote(torch.tensor([[5.0, 0.0]]), EMB * 3, LAB, k=3, backend=backend)
    # neighbours of 0 degrees: 0 (2), 10 (2), 20 (1) -> label 2, 2/3
    assert majority.tolist() == [2] and fraction.tolist() == pytest.approx([2 / 3])
    majority, fraction = knn_vote(torch.tensor([unit(95)]), EMB, LAB, k=2, backend=backend)
    assert majority.tolist() == [0] and fraction.tolist() == [1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_label(backend):
    # neighbours of 15 degrees with k=4: 10 (2), 20 (1), 0 (2), 30 (1): two each -> label 1
    majority, fraction = knn_vote(torch.tensor([unit(15)]), EMB, LAB, k=4, backend=backend)
    assert majority.tolist() == [1] and fraction.tolist() == [0.5]
    # k = n: 2, 2, 2 votes for labels 0, 1, 2 -> label 0
    majority, fraction = knn_vote(torch.tensor([unit(45)]), EMB, LAB, k=6, backend=backend)
    assert majority.tolist() == [0] and fraction.tolist() == pytest.approx([1 / 3])


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    queries, emb = torch.randn(37, 5, generator=gen), torch.randn(203, 5, generator=gen)
    labels = torch.randint(0, 4, (203,), generator=gen)
    full = knn_vote(queries, emb, labels, k=7, backend="torch")
    chunked = knn_vote(queries, emb, labels, k=7, query_chunk=5, embedding_chunk=16,
                       backend="torch")
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])
    # against a brute-force reference
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(
        emb, dim=1).T
    top = labels[sims.topk(7, dim=1).indices]
    counts = torch.stack([(top == c).sum(1) for c in range(4)], dim=1)
    assert torch.equal(full[0], counts.argmax(1))
    assert torch.allclose(full[1], counts.max(1).values / 7)


def test_faiss_and_torch_backends_find_the_same_neighbours_and_votes():
    gen = torch.Generator().manual_seed(1)
    emb, queries = torch.randn(3000, 32, generator=gen), torch.randn(500, 32, generator=gen)
    labels = torch.randint(0, 10, (3000,), generator=gen)
    torch_index = KnnIndex(emb, labels, backend="torch", embedding_chunk=700)
    faiss_index = KnnIndex(emb, labels, backend="faiss")
    assert KnnIndex(emb, labels).backend == "faiss"  # the CPU default
    assert KnnIndex(emb.double(), labels).backend == "torch"  # float64 stays exact
    sims_t, idx_t = torch_index.search(queries, 10, query_chunk=128)
    sims_f, idx_f = faiss_index.search(queries, 10)
    assert torch.equal(idx_t, idx_f)
    assert torch.allclose(sims_t, sims_f, atol=1e-5)
    for backend_votes in zip(torch_index.vote(queries, 10), faiss_index.vote(queries, 10)):
        assert torch.equal(*backend_votes)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of auto, torch, faiss"):
        KnnIndex(EMB, LAB, backend="annoy")
    with pytest.raises(ValueError, match="float32 embeddings on the CPU"):
        KnnIndex(EMB.double(), LAB, backend="faiss")
    with pytest.raises(ValueError, match=r"queries \[q, 2\] expected"):
        KnnIndex(EMB, LAB).vote(torch.rand(3, 5), k=1)


def test_vote_fraction_exactly_at_threshold_projects():
    for k in (3, 10, 20):
        for count in range(1, k + 1):
            fraction = torch.tensor([count / k], dtype=torch.float32)
            assert bool(project_mask(fraction, count / k))
            if count > 1:
                assert not bool(project_mask(torch.tensor([(count - 1) / k]), count / k))
    # the float32 of 0.3 vs the python float 0.3
    assert bool(project_mask(torch.tensor([3]) / torch.tensor(10.0), 0.3))


def test_negative_threshold_always_projects_and_threshold_above_one_is_an_error():
    assert project_mask(torch.tensor([0.0, 0.1]), -0.5).all()
    with pytest.raises(ValueError, match="threshold must be at most 1"):
        project_mask(torch.tensor([0.5]), 1.2)


def test_lesci_predict_and_metrics_by_hand():
    labels = torch.tensor([0, 1, 2, 3, 4])
    model_pred = torch.tensor([0, 1, 0, 0, 4])
    majority = torch.tensor([0, 9, 2, 9, 9])
    fraction = torch.tensor([0.9, 0.8, 0.6, 0.2, 0.1])
    pred, projected = lesci_predict(model_pred, majority, fraction, threshold=0.5)
    assert projected.tolist() == [True, True, True, False, False]
    assert pred.tolist() == [0, 9, 2, 0, 4]
    metrics = lesci_metrics(labels, pred, projected)
    assert metrics == pytest.approx({"accuracy": 3 / 5, "projection_rate": 3 / 5,
                                     "accuracy_projected": 2 / 3, "accuracy_identity": 1 / 2})
    none = lesci_metrics(labels, model_pred, torch.zeros(5, dtype=torch.bool))
    assert math.isnan(none["accuracy_projected"]) and none["accuracy_identity"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_k(backend):
    with pytest.raises(ValueError, match=r"k must be an integer in 1..6"):
        knn_vote(torch.rand(2, 2), EMB, LAB, k=7, backend=backend)
    with pytest.raises(ValueError, match=r"k must be an integer in 1..6"):
        knn_vote(torch.rand(2, 2), EMB, LAB, k=0, backend=backend)


def test_embedding_space_truncate_and_save(tmp_path):
    space = EmbeddingSpace(torch.randn(10, 4), torch.arange(10) % 3, "layer1")
    small = space.truncate(n_components=2, size=6)
    assert small.embeddings.shape == (6, 2) and torch.equal(small.labels, space.labels[:6])
    space.save(tmp_path / "space.npz")
    loaded = EmbeddingSpace.load(tmp_path / "space.npz")
    assert torch.equal(loaded.embeddings, space.embeddings) and loaded.depth == "layer1"
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(BlobError, match="bad.npz: not a robust-sweeps-embedding-space/1 blob"):
        EmbeddingSpace.load(tmp_path / "bad.npz")
    with pytest.raises(BlobError, match="gone.npz: no such embedding-space file"):
        EmbeddingSpace.load(tmp_path / "gone.npz")


def test_trained_digits_resnet_reaches_95_percent(trained_digits_resnet, digits):
    assert accuracy(trained_digits_resnet, digits.val) >= 0.95


def test_lesci_on_digits_at_every_depth(trained_digits_resnet, digits):
    model = trained_digits_resnet
    base = accuracy(model, digits.val)
    for depth in depth_shapes(model):
        pca = fit_pca_at_depth(model, depth, digits.train, n_components=16, batch_size=128)
        space = build_embedding_space(model, depth, pca, digits.train, embedding_size=1000)
        assert len(space) == 1000 and space.n_components == 16
        metrics = evaluate_lesci(model, depth, pca, space, k=10, threshold=0.5, data=digits.val)
        assert set(metrics) == {"accuracy", "projection_rate", "accuracy_projected",
                                "accuracy_identity"}
        assert 0.0 <= metrics["projection_rate"] <= 1.0
        # kNN in a good feature space of a 98%-accurate model projects most and stays accurate
        assert metrics["projection_rate"] > 0.8, (depth, metrics)
        assert metrics["accuracy"] > 0.9, (depth, metrics)
        # threshold 1.01 is invalid; threshold -1 always projects; threshold 1 only unanimous
        votes = collect_votes(model, depth, pca, space, 10, digits.val)
        always = votes.metrics(-1)
        assert always["projection_rate"] == 1.0
        assert math.isnan(always["accuracy_identity"])
        unanimous = votes.metrics(1.0)
        assert unanimous["projection_rate"] <= metrics["projection_rate"]
        # accuracy splits into its projected and identity parts
        for m in (metrics, unanimous):
            rate = m["projection_rate"]
            parts = [(rate, m["accuracy_projected"]), (1 - rate, m["accuracy_identity"])]
            assert m["accuracy"] == pytest.approx(sum(w * a for w, a in parts if w > 0))
    assert base >= 0.95
