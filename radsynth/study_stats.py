"""Statistics of a reader study (the visual Turing test): small pure functions, standard library only.

- :func:`proportion`: a share with its binomial confidence interval, Wilson score
  (:func:`wilson_interval`, the default) or exact Clopper-Pearson (:func:`exact_interval`).
- :func:`binomial_test`: exact two-sided p-value of ``k`` successes in ``n`` against ``p``.
- :func:`rating_scale` and :func:`roc_auc`: the two answers of an item (real or synthetic, and a
  1-5 confidence) as one ordinal rating from "certainly real" to "certainly synthetic", and the
  area under the ROC curve it gives (Mann-Whitney, ties counted one half), with the
  Hanley-McNeil standard error (:func:`auc_interval`).
- :func:`fleiss_kappa`: agreement among several readers beyond chance.

Every function returns ``None`` where the value is undefined (no data, one category only),
never a number that only looks like one.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist
from typing import Sequence

CI_METHODS = ("wilson", "exact")


@dataclasses.dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` with a two-sided confidence interval."""

    k: int
    n: int
    value: float | None                        # k / n (None when n == 0)
    low: float | None
    high: float | None
    level: float                               # e.g. 0.95
    method: str                                # wilson | exact

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(1.0 - (1.0 - level) / 2.0)


def _check(k: int, n: int) -> None:
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of ``k / n`` (good coverage at small ``n``, never outside [0, 1]).

    Returns:
        ``(low, high)``, or ``None`` when ``n == 0``.
    """
    _check(k, n)
    if n == 0:
        return None
    z = _z(level)
    z2 = z * z
    centre = (k + z2 / 2.0) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4.0)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _log_pmf(i: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if i == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if i == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p))


def _cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return min(1.0, sum(math.exp(_log_pmf(i, n, p)) for i in range(0, k + 1)))


def _bisect(f, target: float, increasing: bool) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def exact_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Clopper-Pearson ("exact") interval: the ``p`` at which the observed ``k`` sits in a
    binomial tail of ``(1 - level) / 2``. Conservative (coverage at least ``level``).

    Returns:
        ``(low, high)``, or ``None`` when ``n == 0``.
    """
    _check(k, n)
    if n == 0:
        return None
    alpha = (1.0 - level) / 2.0
    _z(level)
    low = 0.0 if k == 0 else _bisect(lambda p: 1.0 - _cdf(k - 1, n, p), alpha, increasing=True)
    high = 1.0 if k == n else _bisect(lambda p: _cdf(k, n, p), alpha, increasing=False)
    return low, high


def proportion(k: int, n: int, level: float = 0.95, method: str = "wilson") -> Proportion:
    """``k / n`` with its interval (``method``: ``wilson`` or ``exact``)."""
    if method not in CI_METHODS:
        raise ValueError(f"unknown interval method {method!r}; use one of {', '.join(CI_METHODS)}")
    bounds = (wilson_interval if method == "wilson" else exact_interval)(k, n, level)
    low, high = bounds if bounds is not None else (None, None)
    return Proportion(k=int(k), n=int(n), value=(k / n if n else None), low=low, high=high, level=level, method=method)


def binomial_test(k: int, n: int, p: float = 0.5) -> float | None:
    """Exact two-sided binomial test: the probability, under ``Binomial(n, p)``, of an outcome
    no more likely than ``k`` (the convention of R's ``binom.test`` and SciPy's ``binomtest``).

    Returns:
        The p-value, or ``None`` when ``n == 0``.
    """
    _check(k, n)
    if n == 0:
        return None
    observed = _log_pmf(k, n, p)
    tolerance = 1e-7  # relative, so that outcomes equally likely up to rounding count
    total = sum(math.exp(lp) for lp in (_log_pmf(i, n, p) for i in range(n + 1)) if lp <= observed + tolerance)
    return min(1.0, total)


def rating_scale(call: str, confidence: int, levels: int = 5) -> int:
    """One ordinal rating ``1 .. 2 * levels`` from a call and its confidence.

    ``1`` is "real, certain", ``levels`` "real, unsure", ``levels + 1`` "synthetic, unsure",
    ``2 * levels`` "synthetic, certain": higher means more synthetic.
    """
    if not 1 <= confidence <= levels:
        raise ValueError(f"confidence must be in 1..{levels}, got {confidence!r}")
    if call == "real":
        return levels + 1 - confidence
    if call == "synthetic":
        return levels + confidence
    raise ValueError(f"call must be 'real' or 'synthetic', got {call!r}")


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` class: the probability that
    a random positive scores above a random negative, ties counted one half (Mann-Whitney U).

    Returns:
        The AUC, or ``None`` without at least one positive and one negative.
    """
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores but {len(positive)} labels")
    ranked = sorted(zip(scores, positive), key=lambda pair: pair[0])
    n_pos = sum(1 for _, pos in ranked if pos)
    n_neg = len(ranked) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        mid_rank = (i + j) / 2.0 + 1.0
        rank_sum += mid_rank * sum(1 for m in range(i, j + 1) if ranked[m][1])
        i = j + 1
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def auc_interval(auc: float | None, n_pos: int, n_neg: int, level: float = 0.95) -> tuple[float, float] | None:
    """Normal-approximation interval of an AUC from the Hanley-McNeil (1982) standard error.

    Returns:
        ``(low, high)`` clipped to [0, 1], or ``None`` when the AUC is undefined or exactly 0 or 1
        (where the formula's standard error is zero, an interval it cannot honestly give).
    """
    if auc is None or n_pos < 1 or n_neg < 1 or auc <= 0.0 or auc >= 1.0:
        return None
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1.0 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    half = _z(level) * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of ``counts[item][category]`` (how many readers put the item in the category).

    Every item must have the same number of readers, at least two. ``1`` is perfect agreement,
    ``0`` agreement at chance, negative values less than chance.

    Returns:
        Kappa, or ``None`` when undefined (no items, or every answer in one category).
    """
    rows = [list(map(int, row)) for row in counts]
    if not rows:
        return None
    raters = sum(rows[0])
    if raters < 2:
        raise ValueError(f"Fleiss' kappa needs at least two readers per item, got {raters}")
    if any(sum(row) != raters for row in rows) or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("every item needs the same number of readers and categories")
    n_items = len(rows)
    p_bar = sum((sum(c * c for c in row) - raters) / (raters * (raters - 1)) for row in rows) / n_items
    shares = [sum(row[j] for row in rows) / (n_items * raters) for j in range(len(rows[0]))]
    p_e = sum(s * s for s in shares)
    if p_e >= 1.0 - 1e-12:
        return None
    return (p_bar - p_e) / (1.0 - p_e)
