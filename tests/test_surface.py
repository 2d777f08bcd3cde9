"""LESCI's (k, m) surface: every point equals knn_vote + project_mask at k and threshold m/k."""

import pytest
import torch

from defenses.knn import KnnIndex, knn_vote
from defenses.lesci import lesci_metrics, lesci_predict
from defenses.surface import (SurfacePoint, surface_decisions, surface_metrics, surface_points,
                              vote_counts)
from orchestrator.loading import load_space


def hand_made_space(seed=0, n=60, dim=4, classes=4):
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    labels[:2] = classes - 1  # a class with few embeddings
    labels[labels == classes - 1] = torch.where(
        torch.rand(int((labels == classes - 1).sum()), generator=gen) < 0.2, classes - 1, 0)
    labels[:2] = classes - 1
    queries = torch.randn(300, dim, generator=gen)
    model_prediction = torch.randint(0, classes, (300,), generator=gen)
    truth = torch.randint(0, classes, (300,), generator=gen)
    return embeddings, labels, queries, model_prediction, truth


def test_every_surface_point_equals_knn_vote_and_project_mask():
    embeddings, labels, queries, model_prediction, truth = hand_made_space()
    ks = [1, 2, 3, 4, 7, 10]  # even k: vote ties go to the lowest label
    points = surface_points(ks)
    assert len(points) == sum(ks)
    index = KnnIndex(embeddings, labels, backend="torch", num_classes=4)
    _, idx = index.search(queries, max(ks))  # one k_max search for the whole surface
    prediction, projected = surface_decisions(labels[idx], model_prediction, points, 4)
    metrics = surface_metrics(truth, prediction, projected)
    for i, point in enumerate(points):
        majority, fraction = knn_vote(queries, embeddings, labels, point.k, backend="torch",
                                      num_classes=4)
        expected, mask = lesci_predict(model_prediction, majority, fraction, point.threshold)
        assert torch.equal(projected[:, i], mask), point
        assert torch.equal(prediction[:, i], expected), point
        brute = lesci_metrics(truth, expected, mask)
        for name, value in brute.items():
            assert metrics[name][i].item() == pytest.approx(value, nan_ok=True), (point, name)


def test_vote_counts_by_hand():
    # neighbours of one query, most similar first: 2, 1, 1, 2, 0
    labels = torch.tensor([[2, 1, 1, 2, 0]])
    majority, count = vote_counts(labels, [1, 2, 3, 4, 5], num_classes=3)
    assert majority.tolist() == [[2, 1, 1, 1, 1]]  # k=2, k=4: a tie goes to the lowest label
    assert count.tolist() == [[1, 1, 2, 2, 2]]


def test_surface_points_and_threshold_ranges():
    assert surface_points([3]) == [SurfacePoint(3, 1), SurfacePoint(3, 2), SurfacePoint(3, 3)]
    ranged = surface_points([3, 10], (0.5, 1.0))
    assert [(p.k, p.min_votes) for p in ranged] == [(3, 2), (3, 3)] + [(10, m) for m in
                                                                       range(5, 11)]
    assert SurfacePoint(10, 6).threshold == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no \\(k, m\\) point"):
        surface_points([3], (0.7, 0.9))


def test_a_space_lists_its_surface(tmp_path):
    demo = load_space("demo", check_model=False)
    assert demo.defense.surface_ks(demo) == [3, 10]
    assert len(demo.defense.surface_points(demo)) == 8
    assert demo.trial_count == 4  # one trial per depth: k and threshold are not trials
    assert "k" not in demo.searched() and "k" not in demo.fixed()
    text = (tmp_path / "s.yaml")
    body = demo.as_dict()
    body["params"] = {"depth": "pool", "n_components": 8, "k": {"int": [2, 4]},
                      "threshold": [0.6, 0.0]}
    import yaml

    text.write_text(yaml.safe_dump(body))
    spec = load_space(text, check_model=False)
    # each threshold t is the rule m = ceil(t k); t <= 0 always projects (m = 1)
    assert [(p.k, p.min_votes) for p in spec.defense.surface_points(spec)] == [
        (2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 3)]


def test_min_votes_is_the_decisions_threshold_rule_at_every_k():
    """One rule, one tolerance: "at least min_votes_for(t, k) of k votes" projects exactly when
    LESCI's decision (vote fraction >= t) does, thresholds like 0.3 and 2/3 included."""
    from defenses.lesci import project_mask
    from defenses.surface import min_votes_for

    for t in (-0.5, 0.0, 0.1, 0.3, 1 / 3, 0.5, 0.6, 2 / 3, 0.7, 0.9, 1.0):
        for k in range(1, 31):
            counts = torch.arange(1, k + 1)  # the majority has at least one vote
            projects = project_mask(counts.double() / k, t)
            assert torch.equal(projects, counts >= min_votes_for(t, k)), (t, k)
    assert min_votes_for(0.3, 10) == 3 and min_votes_for(0.7, 10) == 7
    assert min_votes_for(2 / 3, 3) == 2 and min_votes_for(1.0, 5) == 5
