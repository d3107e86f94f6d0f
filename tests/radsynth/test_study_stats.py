"""The reader-study statistics against closed forms and published values."""

import math
import random
from statistics import NormalDist

import pytest

from radsynth import study_stats as st

Z = NormalDist().inv_cdf(0.975)


def test_wilson_interval_closed_forms_and_published_value():
    n = 12
    assert st.wilson_interval(n, n) == (pytest.approx(n / (n + Z * Z), abs=1e-12), 1.0)       # k = n
    assert st.wilson_interval(0, n) == (0.0, pytest.approx(Z * Z / (n + Z * Z), abs=1e-12))   # k = 0
    low, high = st.wilson_interval(n // 2, n)                                                 # k = n/2: centred
    half = Z / (2 * math.sqrt(n + Z * Z))
    assert (low, high) == (pytest.approx(0.5 - half, abs=1e-12), pytest.approx(0.5 + half, abs=1e-12))
    assert st.wilson_interval(8, 10) == (pytest.approx(0.49016, abs=1e-5), pytest.approx(0.94332, abs=1e-5))  # Newcombe 1998
    assert st.wilson_interval(3, 5, level=0.99)[0] < st.wilson_interval(3, 5, level=0.9)[0]
    assert st.wilson_interval(0, 0) is None


def test_exact_interval_closed_forms_and_published_value():
    n = 10
    assert st.exact_interval(0, n) == (0.0, pytest.approx(1 - 0.025 ** (1 / n), abs=1e-9))
    assert st.exact_interval(n, n) == (pytest.approx(0.025 ** (1 / n), abs=1e-9), 1.0)
    assert st.exact_interval(8, 10) == (pytest.approx(0.44390, abs=1e-5), pytest.approx(0.97479, abs=1e-5))
    wilson, exact = st.wilson_interval(8, 10), st.exact_interval(8, 10)
    assert exact[0] < wilson[0] and exact[1] > wilson[1]          # Clopper-Pearson is the conservative one
    assert st.exact_interval(0, 0) is None


def test_proportion_record_and_bad_arguments():
    p = st.proportion(3, 4, method="exact")
    assert (p.k, p.n, p.value, p.method, p.level) == (3, 4, 0.75, "exact", 0.95)
    assert st.proportion(0, 0).value is None and st.proportion(0, 0).low is None
    with pytest.raises(ValueError, match="unknown interval method"):
        st.proportion(1, 2, method="wald")
    with pytest.raises(ValueError):
        st.wilson_interval(5, 4)
    with pytest.raises(ValueError):
        st.wilson_interval(1, 2, level=1.5)


def test_binomial_test_exact_values():
    assert st.binomial_test(8, 10) == pytest.approx(112 / 1024, abs=1e-12)   # 2 * (1 + 10 + 45) / 2**10
    assert st.binomial_test(12, 12) == pytest.approx(2 / 4096, abs=1e-15)
    assert st.binomial_test(5, 10) == pytest.approx(1.0)
    assert st.binomial_test(6, 12) == pytest.approx(1.0)
    assert st.binomial_test(3, 7, 0.3) == pytest.approx(0.4352848, abs=1e-7)  # R: binom.test(3, 7, 0.3)
    assert st.binomial_test(0, 0) is None


def test_rating_scale_orders_certainly_real_to_certainly_synthetic():
    ratings = [st.rating_scale("real", c) for c in (5, 4, 3, 2, 1)] + [st.rating_scale("synthetic", c) for c in (1, 2, 3, 4, 5)]
    assert ratings == list(range(1, 11))
    with pytest.raises(ValueError):
        st.rating_scale("maybe", 3)
    with pytest.raises(ValueError):
        st.rating_scale("real", 6)


def test_roc_auc_closed_forms_and_brute_force():
    assert st.roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert st.roc_auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert st.roc_auc([3, 3, 3, 3], [False, True, False, True]) == 0.5       # all tied: no information
    assert st.roc_auc([1, 2, 2, 3], [False, True, False, True]) == 0.875     # one tie counts one half
    rng = random.Random(3)
    scores = [rng.randint(1, 10) for _ in range(60)]
    labels = [rng.random() < 0.4 for _ in range(60)]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    brute = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert st.roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert st.roc_auc([1, 2], [True, True]) is None


def test_auc_interval():
    assert st.auc_interval(1.0, 6, 6) is None and st.auc_interval(None, 6, 6) is None
    auc, n = 0.75, 20
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)                       # Hanley & McNeil (1982), eq. 2
    se = math.sqrt((auc * (1 - auc) + (n - 1) * (q1 - auc ** 2) + (n - 1) * (q2 - auc ** 2)) / (n * n))
    assert st.auc_interval(auc, n, n) == (pytest.approx(auc - Z * se), pytest.approx(auc + Z * se))
    small, large = st.auc_interval(auc, 5, 5), st.auc_interval(auc, 50, 50)
    assert small[1] - small[0] > large[1] - large[0]


WIKIPEDIA = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_fleiss_kappa_published_example_and_closed_forms():
    assert st.fleiss_kappa(WIKIPEDIA) == pytest.approx(0.20993, abs=1e-5)     # Fleiss (1971) worked example
    assert st.fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)   # perfect agreement
    # Two readers, one always right and one always "real", on n synthetic + n real items:
    # P_bar = 1/2, category shares 1/4 and 3/4, P_e = 10/16 -> kappa = (1/2 - 5/8) / (3/8) = -1/3.
    n = 6
    assert st.fleiss_kappa([[1, 1]] * n + [[2, 0]] * n) == pytest.approx(-1 / 3)
    assert st.fleiss_kappa([[2, 0], [2, 0]]) is None                          # one category only: undefined
    assert st.fleiss_kappa([]) is None
    with pytest.raises(ValueError, match="same number"):
        st.fleiss_kappa([[2, 0], [1, 0]])
    with pytest.raises(ValueError, match="at least two"):
        st.fleiss_kappa([[1, 0]])
