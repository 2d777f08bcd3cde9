"""95% intervals of the figures a sweep reports, from their per-sample outcomes.

Every reported figure is a rate: the fraction of n samples with some outcome (right, projected,
right under every attack). Its interval is Wilson's score interval (Wilson 1927; recommended
over the normal approximation by Newcombe 1998, "Two-sided confidence intervals for the single
proportion", Statistics in Medicine 17: 857-872), which stays inside [0, 1] and keeps close to
its nominal coverage for rates near 0 or 1 and for small n. A difference of two rates measured
on the same samples (LESCI's robust accuracy against the bare model's) gets Newcombe's hybrid
score interval for paired proportions (Newcombe 1998, "Improved confidence intervals for the
difference between binomial proportions based on paired data", Statistics in Medicine 17:
2635-2650, method 10), built from the two Wilson intervals and the pairs' correlation.

Two figures whose intervals overlap are not resolved apart by these samples.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = ["wilson", "clopper_pearson",
           "rate_interval", "paired_difference", "independent_difference",
           "format_interval", "Z95"]

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return Z95 if confidence == 0.95 else NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of the rate ``successes / n``; (nan, nan) when n is 0.

    ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, p = successes / n.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return math.nan, math.nan
    z = _z(confidence)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    low = 0.0 if successes == 0 else max(0.0, (centre - spread) / scale)
    high = 1.0 if successes == n else min(1.0, (centre + spread) / scale)
    return low, high


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper and Pearson's exact interval of the rate ``successes / n`` (Biometrika 26,
    1934): the rates at which seeing at most (at least) ``successes`` has probability
    (1 - confidence) / 2; (nan, nan) when n is 0. Its coverage is at least its level for every
    rate and n (Wilson's can fall well below it at confidences such as 1 - 1e-4 near rates of
    0 or 1), the property a decision taken on many intervals at once needs; it is also valid
    (conservative) for a sample drawn without replacement from a finite set."""
    from scipy.stats import beta

    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - tail, successes + 1, n - successes))
    return low, high


def rate_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """``wilson`` of a rate measured on n samples (its success count is ``rate * n``, an
    integer up to float rounding); (nan, nan) for a NaN rate or n = 0."""
    if n == 0 or rate is None or (isinstance(rate, float) and math.isnan(rate)):
        return math.nan, math.nan
    successes = int(round(rate * n))
    if abs(successes - rate * n) > 1e-6 * max(n, 1):
        raise ValueError(f"{rate} is not a rate of {n} samples")
    return wilson(successes, n, confidence)


def paired_difference(first: Sequence[bool] | np.ndarray, second: Sequence[bool] | np.ndarray,
                      confidence: float = 0.95) -> tuple[float, float, float]:
    """(difference, low, high) of ``mean(first) - mean(second)``, two outcomes per sample.

    Newcombe's method 10: with a = both, b = first only, c = second only, d = neither, the
    Wilson limits (l1, u1) and (l2, u2) of the two rates and phi = (ad - bc) /
    sqrt((a+b)(c+d)(a+c)(b+d)) (0 when a margin is empty),
    ``low = D - sqrt((p1-l1)^2 - 2 phi (p1-l1)(u2-p2) + (u2-p2)^2)`` and
    ``high = D + sqrt((u1-p1)^2 - 2 phi (u1-p1)(p2-l2) + (p2-l2)^2)``.
    """
    x = np.asarray(first, dtype=bool)
    y = np.asarray(second, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two outcomes per sample, got shapes {x.shape} and {y.shape}")
    n = x.size
    if n == 0:
        return math.nan, math.nan, math.nan
    a, b = int((x & y).sum()), int((x & ~y).sum())
    c, d = int((~x & y).sum()), int((~x & ~y).sum())
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, confidence)
    l2, u2 = wilson(a + c, n, confidence)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)
                               + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                                + (p2 - l2) ** 2))
    return diff, max(-1.0, low), min(1.0, high)


def independent_difference(first: float, n_first: int, second: float, n_second: int,
                           confidence: float = 0.95) -> tuple[float, float, float]:
    """(difference, low, high) of two rates measured on separate samples, or whose per-sample
    outcomes are not at hand: Newcombe's method 10 (``paired_difference`` with phi = 0), from
    each rate's Wilson limits. On the same samples it is conservative: wider than the paired
    interval whenever the two outcomes are positively correlated, as two defenses' are."""
    l1, u1 = rate_interval(first, n_first, confidence)
    l2, u2 = rate_interval(second, n_second, confidence)
    diff = first - second
    low = diff - math.sqrt((first - l1) ** 2 + (u2 - second) ** 2)
    high = diff + math.sqrt((u1 - first) ** 2 + (second - l2) ** 2)
    return diff, max(-1.0, low), min(1.0, high)


def format_interval(value: float, low: float, high: float, digits: int = 3,
                    signed: bool = False) -> str:
    """``0.742 (0.70-0.78)``: the figure and its interval (one digit fewer), or the figure
    alone when it has none; a difference that can be negative, or any with ``signed``, reads
    ``+0.050 (-0.01 to +0.11)``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if low is None or math.isnan(low):
        return f"{value:.{digits}f}"
    if low < 0 or signed:
        return f"{value:+.{digits}f} ({low:+.{digits - 1}f} to {high:+.{digits - 1}f})"
    return f"{value:.{digits}f} ({low:.{digits - 1}f}-{high:.{digits - 1}f})"
