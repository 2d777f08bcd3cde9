"""The exact margin of LESCI's vote, APGD, and the attack suite on the real decision."""

import pytest
import torch
import torch.nn.functional as F

from defenses.attacks import apgd, cross_entropy_objective, default_alpha, pgd
from defenses.embedding_space import EmbeddingSpace, build_embedding_space
from defenses.lesci import fit_pca_at_depth
from defenses.lesci_attack import (LESCIDecision, VoteSuite, attack_surface, model_margin,
                                   projection_margins, targeted_margin, wrong_margin)
from defenses.pca import StreamingPCA
from defenses.racing import race_surface
from defenses.surface import SurfacePoint, surface_decisions, surface_points


def tops_by_brute_force(sims, labels, classes, k):
    """s_c(1..k) and s_~c(1..k) by sorting each class's (and the others') similarities."""
    q = sims.shape[0]
    per, others = [], []
    for c in range(classes):
        own = sims[:, labels == c]
        top = own.topk(min(k, own.shape[1]), dim=1).values
        per.append(torch.cat([top, torch.full((q, k - top.shape[1]), -3.0)], 1))
        others.append(sims[:, labels != c].topk(k, dim=1).values)
    return torch.stack(per, 1), torch.stack(others, 1)


def test_the_sign_of_the_loss_is_lesci_being_wrong():
    gen = torch.Generator().manual_seed(0)
    classes, n, q = 4, 40, 600
    embeddings = F.normalize(torch.randn(n, 3, generator=gen), dim=1)
    labels = torch.randint(0, 3, (n,), generator=gen)
    labels[:2] = 3  # class 3 has only two embeddings: "at least m" is out of its reach
    queries = torch.randn(q, 3, generator=gen)
    y = torch.randint(0, classes, (q,), generator=gen)
    logits = torch.randn(q, classes, generator=gen)
    sims = F.normalize(queries, dim=1) @ embeddings.T
    seen = {"abstain": 0, "tie": 0, "wrong": 0, "right": 0}
    for k in range(1, 12):
        order = sims.topk(k, dim=1).indices
        class_tops, other_tops = tops_by_brute_force(sims, labels, classes, k)
        all_m = projection_margins(class_tops, other_tops, k)
        for m in range(1, k + 1):
            point = SurfacePoint(k, m)
            prediction, projected = surface_decisions(labels[order], logits.argmax(1), [point],
                                                      classes)
            wrong = prediction[:, 0] != y
            proj = projection_margins(class_tops, other_tops, k, m)
            assert torch.equal(proj, all_m[:, :, m - 1])
            # proj_c > 0 exactly for the class the vote projects to
            assert torch.equal((proj > 0).any(1), projected[:, 0])
            assert torch.equal(proj.argmax(1)[projected[:, 0]], prediction[projected[:, 0], 0])
            loss = wrong_margin(proj, model_margin(logits, y), y)
            assert torch.equal(loss > 0, wrong), (k, m)
            # several m at once give the same margins
            both = wrong_margin(all_m[:, :, [m - 1]], model_margin(logits, y), y)
            assert torch.equal(both[:, 0], loss)
            counts = F.one_hot(labels[order], classes).sum(1)
            top2 = counts.topk(2, dim=1).values
            seen["tie"] += int(((top2[:, 0] == top2[:, 1]) & projected[:, 0]).sum())
            seen["abstain"] += int((~projected[:, 0]).sum())
            seen["wrong"] += int(wrong.sum())
            seen["right"] += int((~wrong).sum())
            # targeted: positive only where LESCI answers the target
            target = (y + 1) % classes
            hit = targeted_margin(proj, logits, target) > 0
            assert bool((prediction[hit, 0] == target[hit]).all())
    assert all(v > 50 for v in seen.values()), seen  # ties, abstentions, both outcomes


def test_apgd_stays_in_the_ball_and_is_at_least_as_strong_as_pgd(trained_digits_resnet, digits):
    model = trained_digits_resnet
    x = torch.stack([digits.val[i][0] for i in range(200)])
    y = torch.tensor([digits.val[i][1] for i in range(200)])
    eps = 0.1

    adv, fooled = apgd(cross_entropy_objective(model, y), x, eps, steps=30, restarts=1,
                       generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert torch.equal(model(adv).argmax(1) != y, fooled)  # success on the real decision
        pgd_adv = pgd(model, x, y, eps, default_alpha(eps, 20), 20,
                      generator=torch.Generator().manual_seed(0))
        pgd_acc = float((model(pgd_adv).argmax(1) == y).float().mean())
    assert 1 - float(fooled.float().mean()) <= pgd_acc + 0.01


@pytest.fixture(scope="module")
def layer1_lesci(trained_digits_resnet, digits):
    model, depth = trained_digits_resnet, "layer1"
    pca = fit_pca_at_depth(model, depth, digits.train, n_components=16, batch_size=128)
    space = build_embedding_space(model, depth, pca, digits.train)
    x = torch.stack([digits.val[i][0] for i in range(120)])
    y = torch.tensor([digits.val[i][1] for i in range(120)])
    return LESCIDecision(model, depth, pca, space, k_max=10), x, y


def test_the_margin_objective_judges_the_real_vote(layer1_lesci):
    decision, x, y = layer1_lesci
    points = surface_points([3, 10], (0.5, 1.0))
    fooled = torch.zeros((len(y), len(points)), dtype=torch.bool)
    noisy = (x + 0.3 * (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5)
             ).clamp(0, 1)
    objective = decision.margin_objective(y, 10, [6], points, fooled)
    with torch.no_grad():
        loss, done = objective(noisy, torch.arange(len(y)))
        prediction, _ = decision.decide(noisy, points)
    wrong = prediction != y[:, None]
    assert torch.equal(fooled, wrong)  # every point judged on the real vote
    assert torch.equal(done, wrong[:, points.index(SurfacePoint(10, 6))])
    assert torch.equal(loss > 0, done)  # the sign of the exact margin is the vote being wrong


def test_the_suite_is_the_worst_case_and_beats_noise_and_transfer(layer1_lesci):
    decision, x, y = layer1_lesci
    eps = 0.1
    points = surface_points([3, 10], (0.5, 1.0))
    gen = torch.Generator().manual_seed(0)
    transfer = pgd(decision.model, x, y, eps, default_alpha(eps, 20), 20, generator=gen)
    noise = (x + eps * (torch.rand(x.shape, generator=gen) * 2 - 1).sign()).clamp(0, 1)
    suite = attack_surface(decision, x, y, points, eps,
                           VoteSuite(steps=20, restarts=1, targets=1),
                           pool={"transfer": transfer, "noise": noise}, starts=["transfer"],
                           generator=gen)
    robust = suite.accuracy()
    for name in suite.correct:  # the worst case is never above any single attack
        assert bool((robust <= suite.accuracy(name) + 1e-12).all()), name
    assert set(suite.correct) == {"clean", "transfer", "noise", "apgd", "apgd_smooth",
                                  "apgd_targeted"}
    # attacking the vote itself costs LESCI far more than noise, and more than the transfer
    assert bool((robust < suite.accuracy("noise") - 0.1).all())
    # (and more than the transfer set where the vote projects most: at high m the identity
    # path answers, which the transfer set already attacks)
    assert float(robust.mean()) < float(suite.accuracy("transfer").mean()) - 0.05
    assert float(robust[0]) < float(suite.accuracy("transfer")[0]) - 0.1


def test_a_raced_suite_attacks_the_racing_points_on_every_sample(layer1_lesci):
    """The race (scheduler: mo_asha) attacks each point on a prefix of the samples: all of
    them unless stopped, up to its rung when stopped; nothing the pool sets or the clean
    inputs fooled counts as robust, and the work is what was attacked."""
    decision, x, y = layer1_lesci
    eps, points = 0.1, surface_points([3, 10], (0.5, 1.0))
    transfer = pgd(decision.model, x, y, eps, default_alpha(eps, 10), 10,
                   generator=torch.Generator().manual_seed(0))
    seen = []

    def decide(counts):
        seen.append((counts.rung, counts.racing.sum(), counts.attacked.tolist()))
        return {0: "test"} if counts.rung == 30 else {}

    raced = race_surface(decision, x, y, points, eps, [30, 60, 120], decide,
                         VoteSuite(steps=10, targets=0, smooth=0.0),
                         pool={"transfer": transfer}, starts=["transfer"],
                         generator=torch.Generator().manual_seed(0))
    assert [len(r) for r in raced.robust] == [30] + [120] * (len(points) - 1)
    assert raced.stopped == {0: 30}
    assert [rung for rung, *_ in seen] == [30, 60]  # no decision after the last rung
    assert seen[1][1] == len(points) - 1 and seen[1][2][0] == 30
    standing = raced.pool_correct["clean"] & raced.pool_correct["transfer"]
    for i, robust in enumerate(raced.robust):
        assert not bool((robust & ~standing[:len(robust), i]).any())
    assert raced.budget["point_samples"] == 30 + 120 * (len(points) - 1)
    assert raced.budget["full_point_samples"] == 120 * len(points)
    assert raced.pool_accuracy("transfer") == pytest.approx(
        raced.pool_correct["transfer"].double().mean(0).tolist())


def test_center_false_projects_without_the_mean():
    pca = StreamingPCA(2, backend="torch").partial_fit(torch.randn(50, 5) + 3).flush()
    x = torch.randn(4, 5)
    components, mean = pca.components_.float(), pca.mean_.float()
    assert torch.allclose(pca.transform(x, center=False), x @ components.T, atol=1e-5)
    assert torch.allclose(pca.transform(x), (x - mean) @ components.T, atol=1e-5)
    with pytest.raises(ValueError, match="k_max must be in 1..3"):
        LESCIDecision(None, "stem", pca, EmbeddingSpace(torch.randn(3, 2),
                                                        torch.tensor([0, 1, 0]), "stem"), 4)


@pytest.mark.parametrize("center", [True, False])
def test_queries_and_the_embedding_space_share_the_projection(trained_digits_resnet, digits,
                                                              center):
    """A training sample's code is its own embedding (similarity 1), centred or not."""
    model = trained_digits_resnet
    pca = fit_pca_at_depth(model, "stem", digits.train, n_components=8, batch_size=128)
    space = build_embedding_space(model, "stem", pca, digits.train, embedding_size=50,
                                  center=center)
    x = torch.stack([digits.train[i][0] for i in range(60)])
    with torch.no_grad():
        keep = model(x).argmax(1) == torch.tensor([digits.train[i][1] for i in range(60)])
    x = x[keep][:50]
    decision = LESCIDecision(model, "stem", pca, space, k_max=1, center=center)
    with torch.no_grad():
        codes, _ = decision.forward(x)
    assert torch.allclose(codes[0], space.embeddings.to(codes[0].dtype), atol=1e-4)
    sims, idx = decision.layers[0].index.search(codes[0], 1)
    assert torch.equal(idx[:, 0], torch.arange(50)) and bool((sims > 0.999).all())
