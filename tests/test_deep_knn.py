"""LESCI over several depths (Deep k-NN, Papernot & McDaniel 2018): the summed vote, its exact
margin and the calibrated credibility, each against a brute-force computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.embedding_space import EmbeddingSpace
from defenses.lesci_attack import (LESCIDecision, count_margins, model_margin, total_margins,
                                   wrong_margin)
from defenses.pca import StreamingPCA
from defenses.surface import credibility, surface_points, true_label_totals

CLASSES = 4
DEPTHS = ["1", "3", "5"]  # the three ReLUs of the net below


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                         nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, CLASSES)).eval()


def activations(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each depth's output, by running the layers one by one (no hooks)."""
    out, h = {}, x
    for name, layer in model.named_children():
        h = layer(h)
        out[name] = h
    return out


@pytest.fixture(scope="module")
def multi_depth():
    """A decision over three depths of a small net: each depth its own PCA (3 components)
    and an embedding space of 12 random labelled activations (few per class, so votes tie
    and fall short of m often)."""
    model = net()
    gen = torch.Generator().manual_seed(1)
    x_fit = torch.randn(200, 5, generator=gen)
    reference = torch.randn(12, 5, generator=gen)
    labels = torch.randint(0, CLASSES, (12,), generator=gen)
    labels[:CLASSES] = torch.arange(CLASSES)
    with torch.no_grad():
        fit_acts, ref_acts = activations(model, x_fit), activations(model, reference)
    pcas, spaces = [], []
    for depth in DEPTHS:
        pca = StreamingPCA(3).fit(fit_acts[depth])
        pcas.append(pca)
        spaces.append(EmbeddingSpace(pca.transform(ref_acts[depth]), labels, depth))
    return model, pcas, spaces


def brute_force(model, pcas, spaces, depths, x, k):
    """[q, C]: T(c), the votes for c among the k most cosine-similar embeddings at each of
    ``depths``, summed, by sorting every similarity."""
    with torch.no_grad():
        acts = activations(model, x)
    totals = torch.zeros(x.shape[0], CLASSES, dtype=torch.long)
    for depth in depths:
        i = DEPTHS.index(depth)
        codes = pcas[i].transform(acts[depth])
        sims = F.normalize(codes, dim=1) @ F.normalize(spaces[i].embeddings, dim=1).T
        for row in range(x.shape[0]):
            order = sorted(range(sims.shape[1]), key=lambda j: -float(sims[row, j]))[:k]
            for j in order:
                totals[row, int(spaces[i].labels[j])] += 1
    return totals


def decision_over(multi_depth, depths, k_max):
    model, pcas, spaces = multi_depth
    chosen = [DEPTHS.index(d) for d in depths]
    return LESCIDecision(model, depths, [pcas[i] for i in chosen], [spaces[i] for i in chosen],
                         k_max, num_classes=CLASSES)


@pytest.mark.parametrize("depths", [DEPTHS[:2], DEPTHS, [DEPTHS[2], DEPTHS[0]]])
def test_every_point_of_the_surface_is_the_summed_brute_force_vote(multi_depth, depths):
    x = torch.randn(150, 5, generator=torch.Generator().manual_seed(2))
    decision = decision_over(multi_depth, depths, k_max=5)
    L = len(depths)
    points = surface_points([1, 2, 4, 5], depths=L)
    assert {p.min_votes for p in points if p.k == 4} == set(range(1, 4 * L + 1))
    prediction, projected = decision.decide(x, points)
    with torch.no_grad():
        model_says = multi_depth[0](x).argmax(1)
    ties = 0
    for i, point in enumerate(points):
        totals = brute_force(*multi_depth, depths, x, point.k)
        top = totals.max(1).values
        majority = torch.tensor([min(c for c in range(CLASSES) if totals[r, c] == top[r])
                                 for r in range(x.shape[0])])  # ties: the lowest label
        ties += int(((totals == top[:, None]).sum(1) > 1).sum())
        expect_projected = top >= point.min_votes
        assert torch.equal(projected[:, i], expect_projected), point
        assert torch.equal(prediction[:, i], torch.where(expect_projected, majority, model_says))
        assert point.threshold == point.min_votes / (L * point.k)
    assert ties > 0  # the case that needs the rule was exercised


def test_one_depth_is_single_depth_lesci(multi_depth):
    """L = 1: the same points, decisions and margins as the one-depth decision."""
    model, pcas, spaces = multi_depth
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(3))
    one = LESCIDecision(model, DEPTHS[1], pcas[1], spaces[1], 4, num_classes=CLASSES)
    listed = decision_over(multi_depth, [DEPTHS[1]], 4)
    points = surface_points([2, 4])
    assert points == surface_points([2, 4], depths=1)
    for a, b in zip(one.decide(x, points), listed.decide(x, points)):
        assert torch.equal(a, b)
    codes, _ = one.forward(x)
    g = count_margins(*one.layers[0].tops(codes[0], 4), 4)
    assert torch.equal(total_margins([g]), g)


def test_total_margins_are_positive_exactly_when_the_votes_reach_n():
    """G_c(n) > 0 iff T(c) >= n, on random per-depth margins with the structure of real ones
    (g_c(j) > 0 iff count_l(c) >= j)."""
    gen = torch.Generator().manual_seed(4)
    b, k = 300, 4
    for depths in (2, 3):
        counts = torch.randint(0, k + 1, (b, CLASSES, depths), generator=gen)
        gs = []
        for l in range(depths):
            j = torch.arange(1, k + 1)
            size = torch.rand(b, CLASSES, k, generator=gen) + 0.01
            sign = torch.where(counts[:, :, l, None] >= j, 1.0, -1.0)
            gs.append((sign * size).sort(dim=2, descending=True).values)  # non-increasing
        G = total_margins(gs)
        assert G.shape == (b, CLASSES, depths * k)
        totals = counts.sum(2)
        for n in range(1, depths * k + 1):
            assert torch.equal(G[:, :, n - 1] > 0, totals >= n), (depths, n)


@pytest.mark.parametrize("depths", [DEPTHS[:2], DEPTHS])
def test_the_sign_of_the_multi_depth_loss_is_the_vote_being_wrong(multi_depth, depths):
    """On random inputs (ties and abstentions included): loss > 0 iff the real multi-depth
    decision is wrong, at every (k, m); and proj_c > 0 exactly for the projected class."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(400, 5, generator=gen)
    y = torch.randint(0, CLASSES, (400,), generator=gen)
    decision = decision_over(multi_depth, depths, k_max=5)
    L = len(depths)
    codes, logits = decision.forward(x)
    seen = {"abstain": 0, "tie": 0, "wrong": 0, "right": 0}
    for k in (1, 2, 3, 5):
        points = surface_points([k], depths=L)
        prediction, projected = decision.decide(x, points)
        totals = brute_force(*multi_depth, depths, x, k)
        all_m = decision.projections(codes, k)
        for i, point in enumerate(points):
            proj = decision.projections(codes, k, point.min_votes)
            assert torch.allclose(proj, all_m[:, :, point.min_votes - 1])
            assert torch.equal((proj > 0).any(1), projected[:, i]), point
            p = projected[:, i]
            assert torch.equal(proj.argmax(1)[p], prediction[p, i])
            loss = wrong_margin(proj, model_margin(logits, y), y)
            wrong = prediction[:, i] != y
            assert torch.equal(loss > 0, wrong), point
            top2 = totals.topk(2, dim=1).values
            seen["tie"] += int(((top2[:, 0] == top2[:, 1]) & p).sum())
            seen["abstain"] += int((~p).sum())
            seen["wrong"] += int(wrong.sum())
            seen["right"] += int((~wrong).sum())
    assert all(v > 0 for v in seen.values()), seen


def test_the_smoothed_multi_depth_margin_approaches_the_exact_one(multi_depth):
    decision = decision_over(multi_depth, DEPTHS[:2], k_max=3)
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(6))
    codes, _ = decision.forward(x)
    exact = decision.projections(codes, 3)
    smooth = decision.projections(codes, 3, tau=1e-4)
    assert torch.allclose(exact, smooth, atol=2e-3)


def test_the_multi_depth_margin_has_gradients(multi_depth):
    decision = decision_over(multi_depth, DEPTHS, k_max=3)
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(7), requires_grad=True)
    codes, logits = decision.forward(x)
    y = torch.zeros(20, dtype=torch.long)
    loss = wrong_margin(decision.projections(codes, 3, 4), model_margin(logits, y), y)
    loss.sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_credibility_is_deep_knn_p_value_by_brute_force():
    """Deep k-NN (Papernot & McDaniel 2018): nonconformity alpha(x, j) = L*k - T(j), the
    calibration scores A = {alpha(x_i, y_i)}, p_j(x) = |{a in A: a >= alpha(x, j)}| / |A|,
    credibility = p of the prediction. The surface's column at (k, m) is the credibility of
    a prediction with m votes, and "T(prediction) >= m" is "credibility >= that"."""
    gen = torch.Generator().manual_seed(8)
    L, k_max, n_cal = 2, 3, 37
    cal_neighbours = torch.randint(0, CLASSES, (n_cal, L, k_max), generator=gen)
    cal_labels = torch.randint(0, CLASSES, (n_cal,), generator=gen)
    ks = [1, 3]
    cal_totals = true_label_totals(cal_neighbours, cal_labels, ks, CLASSES)
    points = surface_points(ks, depths=L)
    column = credibility(cal_totals, ks, points)
    test_neighbours = torch.randint(0, CLASSES, (50, L, k_max), generator=gen)
    for k in ks:
        votes = L * k
        scores = []  # A, by the definition
        for i in range(n_cal):
            t = sum(int(cal_neighbours[i, l, j] == cal_labels[i]) for l in range(L)
                    for j in range(k))
            scores.append(votes - t)
        for row in range(50):
            totals = [sum(int(test_neighbours[row, l, j] == c) for l in range(L)
                          for j in range(k)) for c in range(CLASSES)]
            predicted = max(range(CLASSES), key=lambda c: (totals[c], -c))
            alpha = votes - totals[predicted]
            p = sum(a >= alpha for a in scores) / n_cal
            at_m = [i for i, pt in enumerate(points) if pt.k == k
                    and pt.min_votes == totals[predicted]]
            assert column[at_m[0]].item() == pytest.approx(p)
            for i, point in enumerate(points):  # the credibility axis is the m axis:
                if point.k != k:  # "credibility >= c" is "T >= the smallest m with c"
                    continue
                lowest = min(q.min_votes for j, q in enumerate(points)
                             if q.k == k and column[j] == column[i])
                assert (p >= column[i].item()) == (totals[predicted] >= lowest)
    # non-decreasing in m at each k; no calibration: NaN
    for k in ks:
        values = [column[i].item() for i, p in enumerate(points) if p.k == k]
        assert values == sorted(values) and values[-1] == 1.0
    assert torch.isnan(credibility(cal_totals[:0], ks, points)).all()


def test_a_decision_needs_one_pca_and_space_per_depth(multi_depth):
    model, pcas, spaces = multi_depth
    with pytest.raises(ValueError, match="one PCA and one embedding space per depth"):
        LESCIDecision(model, DEPTHS, pcas[:2], spaces, 3)
    with pytest.raises(ValueError, match="each depth once"):
        LESCIDecision(model, [DEPTHS[0]] * 2, pcas[:1] * 2, spaces[:1] * 2, 3)
