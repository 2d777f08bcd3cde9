"""Complete verification (``defenses.complete``): exact on tiny networks, sound everywhere.

On networks of at most 11 (leaky) ReLUs over a 2-D input, the exact minimum of each margin over
the box is found by enumerating the activation patterns (one linear program per linear region):
the verifier must prove exactly the samples whose minimum margin is positive and falsify the
others, with counterexamples inside the ball that the network misclassifies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from torch import nn

from defenses.attacks import default_alpha, pgd
from defenses.complete import (FALSIFIED, PROVED, UNDECIDED, check_complete,
                               verify_complete)


def _tiny(seed: int, slope: float = 0.0, inputs: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    act = (lambda: nn.LeakyReLU(slope)) if slope else nn.ReLU
    net = nn.Sequential(nn.Linear(inputs, 6), act(), nn.Linear(6, 5), act(), nn.Linear(5, 3))
    with torch.no_grad():  # steep enough that the eps-balls below cross regions
        net[0].weight.mul_(4)
        net[2].weight.mul_(2)
    return net.eval()


def _exact_min_margins(net: nn.Sequential, x: np.ndarray, eps: float, y: int,
                       slope: float) -> float:
    """min over the box of min_j z_y - z_j, by one LP per activation pattern and class."""
    (w1, b1), (w2, b2), (w3, b3) = [(net[i].weight.detach().double().numpy(),
                                     net[i].bias.detach().double().numpy()) for i in (0, 2, 4)]
    box = list(zip(np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)))
    best = np.inf
    for p1 in itertools.product([0, 1], repeat=len(b1)):
        d1 = np.array(p1) + (1 - np.array(p1)) * slope
        a2, c2 = w2 @ (d1[:, None] * w1), w2 @ (d1 * b1) + b2
        s1 = 1 - 2 * np.array(p1)  # active: -(w1 x + b1) <= 0
        if linprog(np.zeros(len(x)), A_ub=s1[:, None] * w1, b_ub=-s1 * b1, bounds=box,
                   method="highs").status != 0:
            continue  # no point of the box has this pattern
        for p2 in itertools.product([0, 1], repeat=len(b2)):
            d2 = np.array(p2) + (1 - np.array(p2)) * slope
            a3, c3 = w3 @ (d2[:, None] * a2), w3 @ (d2 * c2) + b3
            s2 = 1 - 2 * np.array(p2)
            a_ub = np.vstack([s1[:, None] * w1, s2[:, None] * a2])
            b_ub = np.concatenate([-s1 * b1, -s2 * c2])
            for j in range(len(b3)):
                if j == y:
                    continue
                r = linprog(a3[y] - a3[j], A_ub=a_ub, b_ub=b_ub, bounds=box, method="highs")
                if r.status == 0:
                    best = min(best, r.fun + c3[y] - c3[j])
    return best


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_agrees_with_the_exact_enumeration_of_linear_regions(slope):
    decided_by_program = 0
    for seed in range(4):
        net = _tiny(seed, slope)
        x = torch.rand(6, 2, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = net(x).argmax(1)
        result = verify_complete(net, x, y, 0.1, time_limit=20, attack_steps=0)
        for i in range(len(x)):
            minimum = _exact_min_margins(net, x[i].double().numpy(), 0.1, int(y[i]), slope)
            assert abs(minimum) > 1e-4  # no sample on the decision boundary
            expected = PROVED if minimum > 0 else FALSIFIED
            assert result.status[i] == expected, (seed, i, minimum, result.by[i])
            decided_by_program += result.by[i] == "milp"
    assert decided_by_program >= 3  # the program decided, not only the bounds


def test_counterexamples_are_in_the_ball_and_misclassified_and_a_clean_error_is_its_own():
    net = _tiny(0)
    x = torch.rand(16, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # misclassified as it stands
    result = verify_complete(net, x, y, 0.15, time_limit=20, attack_steps=0)
    assert result.status[0] == FALSIFIED and result.by[0] == "clean"
    falsified = np.flatnonzero(result.status == FALSIFIED)
    assert len(falsified) >= 3
    for i in falsified:
        adv = torch.from_numpy(result.x_adv[i])
        assert (adv - x[i]).abs().max() <= 0.15 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert int(net(adv[None]).argmax(1)) != int(y[i])
    assert np.isnan(result.x_adv[result.status != FALSIFIED]).all()
    assert (result.status != UNDECIDED).all()
    assert result.proved_rate + result.falsified_rate == pytest.approx(1.0)


def test_the_programs_decide_a_conv_net_through_its_convolution_and_flatten():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(x).argmax(1)
    eps = 0.1
    result = verify_complete(net, x, y, eps, time_limit=20, attack_steps=0)
    assert (result.status != UNDECIDED).all()
    by_program = [i for i, by in enumerate(result.by) if by == "milp"]
    assert by_program  # the bounds alone leave some samples to the programs
    for i in by_program:
        if result.status[i] == FALSIFIED:  # a counterexample that the network confirms
            adv = torch.from_numpy(result.x_adv[i])
            assert (adv - x[i]).abs().max() <= eps + 1e-6
            assert int(net(adv[None]).argmax(1)) != int(y[i])
        else:  # a proof that dense sampling of the ball does not contradict
            points = (x[i] + eps * (2 * torch.rand(4000, 1, 8, 8) - 1)).clamp(0, 1)
            assert (net(points).argmax(1) == y[i]).all()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), eps=st.floats(0.02, 0.3))
def test_a_proved_sample_is_never_broken_by_an_attack(seed, eps):
    net = _tiny(seed, inputs=4)
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = net(x).argmax(1)
    result = verify_complete(net, x, y, eps, time_limit=20, attack_steps=0)
    proved = torch.from_numpy(result.status == PROVED)
    if not proved.any():
        return
    # an independent attack: PGD with many restarts, and a dense sample of the box's corners
    adv = pgd(net, x[proved], y[proved], eps, default_alpha(eps, 40), 40, restarts=8,
              generator=torch.Generator().manual_seed(seed))
    assert (net(adv).argmax(1) == y[proved]).all()
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)))
    for xi, yi in zip(x[proved], y[proved]):
        points = (xi + eps * corners).clamp(0, 1)
        assert (net(points).argmax(1) == yi).all()
    for i in np.flatnonzero(result.status == FALSIFIED):
        adv_i = torch.from_numpy(result.x_adv[i])
        assert (adv_i - x[i]).abs().max() <= eps + 1e-6
        assert int(net(adv_i[None]).argmax(1)) != int(y[i])


def test_an_operation_without_an_exact_encoding_is_refused_naming_it():
    net = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"cannot encode .*Sigmoid") as err:
        check_complete(net, (4,))
    assert "\n" not in str(err.value)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                           nn.Linear(2 * 3 * 3, 3))
    with pytest.raises(ValueError, match=r"cannot encode .*MaxPool2d"):
        check_complete(pooled, (1, 8, 8))
    check_complete(_tiny(0), (2,))  # affine and ReLU: accepted


def test_bad_arguments():
    net = _tiny(0)
    with pytest.raises(ValueError, match="time_limit"):
        verify_complete(net, torch.rand(2, 2), torch.zeros(2, dtype=torch.long), 0.1,
                        time_limit=0)


def test_a_sample_whose_programs_run_out_of_time_is_undecided_never_misjudged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                        nn.Linear(40, 3)).eval()
    with torch.no_grad():
        net[0].weight.mul_(3)
    x = torch.rand(10, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    hurried = verify_complete(net, x, y, 0.1, time_limit=1e-3, attack_steps=0)
    patient = verify_complete(net, x, y, 0.1, time_limit=60, attack_steps=0)
    assert (patient.status != UNDECIDED).all() and "milp" in patient.by
    undecided = hurried.status == UNDECIDED
    assert undecided.any() and all(hurried.by[i] == "time limit" for i in np.flatnonzero(undecided))
    decided = ~undecided  # what the hurried run decided, it decided as the patient one did
    assert (hurried.status[decided] == patient.status[decided]).all()
