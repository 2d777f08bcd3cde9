"""The 95% intervals every reported figure carries (defenses.intervals)."""

import math

import numpy as np
import pytest

from defenses.intervals import (format_interval, independent_difference, paired_difference,
                               rate_interval, wilson)


def test_wilson_matches_the_published_example():
    # Newcombe (1998), single proportion, 81 of 263: Wilson 0.2553 to 0.3662
    low, high = wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    # the edges stay inside [0, 1] and are not degenerate: 0 of 10 is 0 to 0.2775
    assert wilson(0, 10)[0] == 0.0 and round(wilson(0, 10)[1], 4) == 0.2775
    assert round(wilson(10, 10)[0], 4) == 0.7225 and wilson(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_rate_interval_reads_the_count_back_from_a_rate():
    assert rate_interval(81 / 263, 263) == wilson(81, 263)
    assert all(math.isnan(v) for v in rate_interval(float("nan"), 10))
    with pytest.raises(ValueError, match="not a rate of 10"):
        rate_interval(0.333, 10)


def test_about_95_percent_of_wilson_intervals_cover_the_true_rate():
    rng = np.random.default_rng(0)
    coverages = []
    for p in (0.05, 0.3, 0.5, 0.73, 0.98):
        for n in (60, 360):
            draws = rng.binomial(n, p, size=2000)
            covered = [lo <= p <= hi for lo, hi in (wilson(int(k), n) for k in draws)]
            coverages.append(float(np.mean(covered)))
    assert 0.94 <= float(np.mean(coverages)) <= 0.96, coverages
    assert min(coverages) >= 0.90, coverages


def test_paired_difference_is_the_difference_with_an_interval_around_it():
    first = np.array([1, 1, 1, 0, 1, 0, 1, 1, 0, 1] * 6, dtype=bool)
    second = np.array([1, 0, 1, 0, 0, 0, 1, 1, 0, 0] * 6, dtype=bool)
    diff, low, high = paired_difference(first, second)
    assert diff == pytest.approx(first.mean() - second.mean())
    assert low < diff < high
    # swapping the two negates it
    back = paired_difference(second, first)
    assert back == pytest.approx((-diff, -high, -low))
    # no discordant pair: no difference seen, though these samples cannot rule a small one out
    same, low_s, high_s = paired_difference(first, first)
    assert same == 0.0 and -0.05 < low_s < 0 < high_s < 0.05
    # pairing helps: the same marginal rates on unpaired (independent) samples are less sure
    shuffled = np.random.default_rng(1).permutation(second)
    _, low_u, high_u = paired_difference(first, shuffled)
    assert high - low < high_u - low_u


def test_independent_difference_is_the_paired_one_without_correlation():
    first = np.array([1, 1, 1, 0, 1, 0, 1, 1, 0, 1] * 6, dtype=bool)
    second = np.array([1, 0, 1, 0, 0, 0, 1, 1, 0, 0] * 6, dtype=bool)
    n = first.size
    diff, low, high = independent_difference(first.mean(), n, second.mean(), n)
    assert diff == pytest.approx(first.mean() - second.mean()) and low < diff < high
    # the same rates, outcomes uncorrelated (phi = 0): the paired interval exactly
    a, b, c, d = 6, 6, 3, 3  # both, first only, second only, neither: ad - bc = 0
    x = np.array([1] * a + [1] * b + [0] * c + [0] * d, dtype=bool)
    y = np.array([1] * a + [0] * b + [1] * c + [0] * d, dtype=bool)
    assert independent_difference(x.mean(), 18, y.mean(), 18) == pytest.approx(
        paired_difference(x, y))
    # correlated outcomes on the same samples: the paired interval is narrower
    _, low_p, high_p = paired_difference(first, second)
    assert high_p - low_p < high - low
    # different sample counts, and a rate that is not one of them
    assert independent_difference(0.9, 1000, 0.85, 500)[1] < 0.05
    with pytest.raises(ValueError, match="not a rate of 10 samples"):
        independent_difference(0.55, 10, 0.5, 10)


def test_about_95_percent_of_paired_intervals_cover_the_true_difference():
    rng = np.random.default_rng(0)
    coverages = []
    # correlated outcomes, as LESCI's and the bare model's on the same samples
    for both, first_only, second_only, n in ((0.5, 0.2, 0.05, 180), (0.6, 0.1, 0.1, 360),
                                             (0.3, 0.05, 0.3, 100)):
        truth = first_only - second_only
        covered = 0
        for _ in range(1500):
            u = rng.random(n)
            first = u < both + first_only
            second = (u < both) | ((u >= both + first_only) & (u < both + first_only + second_only))
            _, low, high = paired_difference(first, second)
            covered += low <= truth <= high
        coverages.append(covered / 1500)
    assert all(0.93 <= c <= 0.975 for c in coverages), coverages


def test_format_interval():
    assert format_interval(0.7417, 0.695, 0.784) == "0.742 (0.69-0.78)"
    assert format_interval(0.05, -0.012, 0.11) == "+0.050 (-0.01 to +0.11)"
    assert format_interval(0.9, float("nan"), float("nan")) == "0.900"
    assert format_interval(float("nan"), 0.1, 0.2) == "-"
    assert format_interval(0.04, 0.012, 0.07, signed=True) == "+0.040 (+0.01 to +0.07)"


def test_clopper_pearson_is_exact_and_covers_at_its_level():
    from scipy.stats import binom

    from defenses.intervals import clopper_pearson

    # 0 of 10 at 95%: the upper end is 1 - 0.025 ** (1 / 10)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1))
    assert clopper_pearson(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))
    # coverage at least the level for every rate, where Wilson's dips below it (rates near 1
    # at a Bonferroni-sized confidence)
    for n in (1, 5, 30):
        for p in np.linspace(0.001, 0.999, 199):
            covered = sum(binom.pmf(r, n, p) for r in range(n + 1)
                          if clopper_pearson(r, n, 0.999)[0] <= p <= clopper_pearson(
                              r, n, 0.999)[1])
            assert covered >= 0.999 - 1e-9, (n, p)
