"""Statistics checked against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from afprobe.analysis import stats
from afprobe.errors import BadInput


def test_wilson_known_values() -> None:
    # 8/10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10), half-width 1.96*0.16/1.38415.
    lo, hi = stats.wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = stats.wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert stats.wilson_ci(10, 10)[1] == 1.0
    lo, hi = stats.wilson_ci(8, 10, ci=0.99)
    assert lo < 0.4902 and hi > 0.9433
    assert all(math.isnan(v) for v in stats.wilson_ci(0, 0))
    with pytest.raises(BadInput):
        stats.wilson_ci(3, 2)


def test_rate_default_and_strict() -> None:
    outcomes = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, None, float("nan")]
    r = stats.rate(outcomes)
    assert (r["rate"], r["n"], r["k"], r["unparsed"]) == (0.8, 10, 8, 2)
    assert r["ci"] == pytest.approx([0.4902, 0.9433], abs=1e-4)
    s = stats.rate(outcomes, strict=True)
    assert (s["rate"], s["n"], s["unparsed"]) == (pytest.approx(8 / 12), 12, 2)
    empty = stats.rate([None, None])
    assert math.isnan(empty["rate"]) and empty["n"] == 0 and empty["unparsed"] == 2
    with pytest.raises(BadInput):
        stats.rate([0, 2])


def test_mcnemar_exact() -> None:
    # b=8, c=2: 2 * P(X <= 2 | Bin(10, 1/2)) = 2 * 56/1024.
    assert stats.mcnemar_exact(8, 2) == pytest.approx(0.109375)
    assert stats.mcnemar_exact(2, 8) == pytest.approx(0.109375)
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(5, 5) == 1.0
    assert stats.mcnemar_exact(6, 0) == pytest.approx(2 / 64)


def _pairs(b: int, c: int, both: int, neither: int) -> tuple[list, list]:
    train = [1] * b + [0] * c + [1] * both + [0] * neither
    deploy = [0] * b + [1] * c + [1] * both + [0] * neither
    return train, deploy


def test_paired_gap_hand_case() -> None:
    train, deploy = _pairs(b=8, c=2, both=5, neither=5)
    g = stats.paired_gap(train + [None], deploy + [1])
    assert g["gap"] == pytest.approx((8 - 2) / 20)
    assert g["discordant"] == [8, 2] and g["n_pairs"] == 20 and g["unparsed_pairs"] == 1
    assert g["p_value"] == pytest.approx(0.109375)
    assert g["rate_training"] == pytest.approx(13 / 20) and g["rate_deployment"] == pytest.approx(7 / 20)
    assert g["rate_training_ci"] == pytest.approx(list(stats.wilson_ci(13, 20)))
    # p >= 0.05, so the interval reaches 0 (Newcombe alone would give the same here: it covers 0 already)
    assert g["ci"][0] <= 0 < g["gap"] < g["ci"][1]


def test_paired_gap_identical_conditions_has_width() -> None:
    x = np.array([1, 0, 1, np.nan, 0, 1, 1])
    g = stats.paired_gap(x, x.copy())
    assert g["gap"] == 0.0 and g["p_value"] == 1.0 and g["discordant"] == [0, 0] and g["n_pairs"] == 6
    assert g["ci"][0] < 0 < g["ci"][1]  # never a zero-width interval for a finite sample
    for all_same in ([1] * 10, [0] * 10):
        g = stats.paired_gap(all_same, all_same)
        assert g["ci"][0] < 0 < g["ci"][1]


def test_gap_interval_agrees_with_exact_mcnemar() -> None:
    """The reviewer's case: 4 vs 0 discordant pairs, p = 0.125: the interval must include 0."""
    g = stats.gap_from_table(a=40, b=4, c=0, d=6)
    assert g["p_value"] == pytest.approx(0.125) and g["ci"][0] <= 0 < g["ci"][1]
    assert stats._newcombe(40, 4, 0, 6, 0.95)[0] > 0  # Newcombe alone would have excluded 0
    # every 2x2 table with n <= 24: the interval excludes 0 exactly when the exact test rejects, and has width
    for n in range(1, 25):
        for a in range(n + 1):
            for b in range(n + 1 - a):
                for c in range(n + 1 - a - b):
                    g = stats.gap_from_table(a, b, c, n - a - b - c)
                    excludes = g["ci"][0] > 0 or g["ci"][1] < 0
                    assert excludes == (g["p_value"] < 0.05), (a, b, c, n)
                    assert g["ci"][1] - g["ci"][0] > 0 and g["ci"][0] <= g["gap"] <= g["ci"][1]


def test_paired_gap_edge_cases() -> None:
    g = stats.paired_gap([None, 1], [0, None])
    assert g["n_pairs"] == 0 and math.isnan(g["gap"]) and math.isnan(g["p_value"])
    with pytest.raises(BadInput):
        stats.paired_gap([1, 0], [1])


def test_holm() -> None:
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = stats.holm([0.5, float("nan"), 0.01])
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 capped at 1; monotone


def test_mcnemar_paired() -> None:
    before, after = [0, 0, 0, 0, 1, None], [1, 1, 1, 1, 1, 0]
    m = stats.mcnemar_paired(before, after)
    assert m["discordant"] == [4, 0] and m["n_pairs"] == 5 and m["p_value"] == pytest.approx(0.125)


def test_newcombe_paired() -> None:
    train, deploy = _pairs(b=8, c=2, both=5, neither=5)
    lo, hi = stats.newcombe_paired_ci(train, deploy)
    assert -1 <= lo < 0.3 < hi <= 1
    # Large n: close to the Wald interval of the paired difference.
    train, deploy = _pairs(b=300, c=200, both=1000, neither=1500)
    lo, hi = stats.newcombe_paired_ci(train, deploy)
    n, d = 3000, 100 / 3000
    se = math.sqrt((300 + 200) / n - d * d) / math.sqrt(n)
    assert lo == pytest.approx(d - 1.96 * se, abs=2e-3) and hi == pytest.approx(d + 1.96 * se, abs=2e-3)
    assert all(math.isnan(v) for v in stats.newcombe_paired_ci([None], [1]))


def test_mean_diff_ci() -> None:
    a = [1.0, 2.0, 3.0, 4.0]
    same = stats.mean_diff_ci(a, list(a), n_boot=300)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0]
    p = stats.mean_diff_ci(a, [0.0, 0.0, 1.0, 5.0, ], n_boot=2000, seed=0)
    assert p["diff"] == pytest.approx(1.0) and p["n"] == 4
    assert p["ci"][0] <= 1.0 <= p["ci"][1]
    # Paired drops a pair with a nan member; unpaired keeps each sample's finite values.
    q = stats.mean_diff_ci([1.0, np.nan, 3.0], [0.0, 5.0, 1.0], n_boot=300)
    assert q["diff"] == pytest.approx(1.5) and q["n"] == 2
    u = stats.mean_diff_ci([1.0, np.nan, 3.0], [0.0, 5.0, 1.0], paired=False, n_boot=300)
    assert u["diff"] == pytest.approx(2.0 - 2.0) and (u["n_a"], u["n_b"]) == (2, 3)
    assert stats.mean_diff_ci(a, a[::-1], seed=4) == stats.mean_diff_ci(a, a[::-1], seed=4)
    with pytest.raises(BadInput):
        stats.mean_diff_ci([1.0], [1.0, 2.0])
