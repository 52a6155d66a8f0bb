"""Statistics for compliance rates and gaps: Wilson and Newcombe intervals, paired bootstrap,
exact McNemar. numpy/scipy only; every resampling takes a seed and is deterministic.

Conventions:
- Outcomes are 1 (complied), 0 (refused) or unparsed (None or nan).
- `rate` is over parsed outcomes by default and reports the unparsed count next to it;
  `strict=True` counts unparsed as non-compliance (rate over all outcomes).
- Paired statistics use only queries where both conditions parsed; the number dropped is reported.
- The paired compliance gap has a Newcombe interval that agrees with the exact McNemar test
  (`gap_interval`); means of continuous values (log-odds) have percentile bootstrap intervals.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
from scipy import stats as sps

from afprobe.errors import BadInput

Outcomes = Union[Sequence[Optional[float]], np.ndarray]
_NAN = float("nan")
_BOOT_CHUNK = 4_000_000  # max resampled values held in memory at once


def _z(ci: float) -> float:
    if not 0 < ci < 1:
        raise BadInput(f"confidence level must be in (0, 1), got {ci}")
    return float(sps.norm.ppf(0.5 + ci / 2))


def _as_outcomes(values: Outcomes, name: str) -> np.ndarray:
    """Float array with nan for unparsed; refuses values other than 0, 1 and unparsed."""
    arr = np.array([_NAN if v is None else v for v in values], dtype=float)
    bad = ~np.isnan(arr) & (arr != 0) & (arr != 1)
    if bad.any():
        raise BadInput(f"{name}: outcomes must be 0, 1 or unparsed (None/nan), got {arr[bad][0]!r}")
    return arr


def wilson_ci(k: int, n: int, ci: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n; (nan, nan) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise BadInput(f"Wilson interval needs 0 <= k <= n, got k={k}, n={n}")
    z = _z(ci)
    if n == 0:
        return (_NAN, _NAN)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clip float noise so k == 0 gives exactly 0 and k == n exactly 1.
    return (max(0.0, centre - half) if k else 0.0, min(1.0, centre + half) if k < n else 1.0)


def rate(outcomes: Outcomes, ci: float = 0.95, strict: bool = False) -> dict:
    """Compliance rate with a Wilson interval.

    Default: rate = k / n over parsed outcomes, n = parsed count, unparsed reported separately.
    strict=True: unparsed count as non-compliance, so n = all outcomes.
    Returns {"rate", "ci": [lo, hi], "n", "k", "unparsed"}.
    """
    arr = _as_outcomes(outcomes, "rate")
    parsed = ~np.isnan(arr)
    k = int(arr[parsed].sum())
    unparsed = int((~parsed).sum())
    n = int(arr.size if strict else parsed.sum())
    lo, hi = wilson_ci(k, n, ci)
    return {"rate": k / n if n else _NAN, "ci": [lo, hi], "n": n, "k": k, "unparsed": unparsed}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b vs c discordant pairs at 1/2."""
    m = b + c
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * sps.binom.cdf(min(b, c), m, 0.5)))


def _percentile_ci(boot: np.ndarray, ci: float) -> list[float]:
    lo, hi = np.quantile(boot, [0.5 - ci / 2, 0.5 + ci / 2])
    return [float(lo), float(hi)]


def _paired_pairs(train: Outcomes, deploy: Outcomes) -> tuple[np.ndarray, np.ndarray, int]:
    t = _as_outcomes(train, "training outcomes")
    d = _as_outcomes(deploy, "deployment outcomes")
    if t.shape != d.shape:
        raise BadInput(f"paired outcomes differ in length: training {t.size}, deployment {d.size}")
    both = ~np.isnan(t) & ~np.isnan(d)
    return t[both], d[both], int(t.size - both.sum())


def paired_gap(train: Outcomes, deploy: Outcomes, ci: float = 0.95) -> dict:
    """Compliance gap (training minus deployment) over queries where both conditions parsed.

    The per-cue rates (with Wilson intervals) are computed on the same paired set as the gap.
    p-value: exact McNemar on the discordant pairs (1 when there are none).
    Interval: `gap_interval` (Newcombe's method 10, made to agree with the exact test).
    discordant = [b, c]: b = complied only under training, c = complied only under deployment.
    With no parsed pair, gap, interval and p-value are nan.
    """
    t, d, dropped = _paired_pairs(train, deploy)
    n = int(t.size)
    a = int(np.sum((t == 1) & (d == 1)))
    b = int(np.sum((t == 1) & (d == 0)))
    c = int(np.sum((t == 0) & (d == 1)))
    return dict(gap_from_table(a, b, c, n - a - b - c, ci), unparsed_pairs=dropped)


def gap_from_table(a: int, b: int, c: int, d: int, ci: float = 0.95) -> dict:
    """The paired gap from the 2x2 table of (training, deployment) outcomes: a = both complied, b = training
    only, c = deployment only, d = neither. Keys: gap, ci, p_value, n_pairs, discordant, rate_training,
    rate_training_ci, rate_deployment, rate_deployment_ci, interval_method."""
    n = a + b + c + d
    out: dict = {"gap": _NAN, "ci": [_NAN, _NAN], "p_value": _NAN, "n_pairs": n, "discordant": [b, c],
                 "rate_training": _NAN, "rate_training_ci": [_NAN, _NAN], "rate_deployment": _NAN,
                 "rate_deployment_ci": [_NAN, _NAN], "interval_method": GAP_INTERVAL_METHOD}
    if n == 0:
        return out
    p = mcnemar_exact(b, c)
    out.update(gap=(b - c) / n, p_value=p, ci=list(gap_interval(a, b, c, d, ci, p)),
               rate_training=(a + b) / n, rate_training_ci=list(wilson_ci(a + b, n, ci)),
               rate_deployment=(a + c) / n, rate_deployment_ci=list(wilson_ci(a + c, n, ci)))
    return out


GAP_INTERVAL_METHOD = "newcombe10, reaching 0 when exact McNemar does not reject"


def gap_interval(a: int, b: int, c: int, d: int, ci: float = 0.95, p_value: Optional[float] = None
                 ) -> tuple[float, float]:
    """Interval for the paired difference of proportions (b - c) / n that agrees with the exact McNemar test.

    Newcombe's (1998) method 10 combines the Wilson intervals of the two margins with the table's phi. With no
    discordant pair it collapses to [0, 0] (phi = 1); the gap is then bounded by the discordant fraction, so the
    interval is +-(Wilson upper bound of 0 discordant pairs out of n). With few discordant pairs Newcombe can
    exclude 0 while the exact test does not reject at 1 - ci (e.g. 4 vs 0 discordant pairs: p = 0.125); then the
    interval is extended to reach 0, so that it excludes 0 exactly when the exact test rejects. The converse
    (the test rejects but the interval covers 0) did not occur in an exhaustive check of every table with
    n <= 60 at ci = 0.95 (a test repeats it for n <= 24). Never zero width for n > 0."""
    n = a + b + c + d
    if n == 0:
        return (_NAN, _NAN)
    if b + c == 0:
        bound = wilson_ci(0, n, ci)[1]
        return (-bound, bound)
    lo, hi = _newcombe(a, b, c, d, ci)
    p = mcnemar_exact(b, c) if p_value is None else p_value
    if p >= 1 - ci:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return (lo, hi)


def _newcombe(a: int, b: int, c: int, d: int, ci: float) -> tuple[float, float]:
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_ci(a + b, n, ci)
    l2, u2 = wilson_ci(a + c, n, ci)
    denom = float(a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    lower = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (max(-1.0, lower), min(1.0, upper))


def newcombe_paired_ci(train: Outcomes, deploy: Outcomes, ci: float = 0.95) -> tuple[float, float]:
    """Newcombe (1998) method 10 interval for a paired difference of proportions, on the pairs where both
    conditions parsed (without the agreement step of `gap_interval`)."""
    t, d, _ = _paired_pairs(train, deploy)
    n = t.size
    if n == 0:
        return (_NAN, _NAN)
    a = int(np.sum((t == 1) & (d == 1)))
    b = int(np.sum((t == 1) & (d == 0)))
    c = int(np.sum((t == 0) & (d == 1)))
    return _newcombe(a, b, c, n - a - b - c, ci)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of p-values; nan entries stay nan and do not count."""
    idx = [i for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    out = [_NAN] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (len(idx) - rank) * float(p_values[i])))
        out[i] = running
    return out


def mcnemar_paired(before: Outcomes, after: Outcomes) -> dict:
    """Exact McNemar of two conditions on the same units (pairs with an unparsed member are dropped):
    {"p_value", "n_pairs", "discordant": [changed 0 -> 1, changed 1 -> 0]}."""
    x, y, _ = _paired_pairs(after, before)
    up, down = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
    return {"p_value": mcnemar_exact(up, down) if x.size else _NAN, "n_pairs": int(x.size),
            "discordant": [up, down]}


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of n_boot resamples of x (with replacement), in memory-bounded chunks."""
    n = x.size
    step = max(1, _BOOT_CHUNK // max(n, 1))
    out = np.empty(n_boot)
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        out[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def mean_ci(values: Sequence[float], n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> dict:
    """Mean of the finite values with a bootstrap percentile interval: {"mean", "ci", "n"}."""
    _z(ci)
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": _NAN, "ci": [_NAN, _NAN], "n": 0}
    boot = _boot_means(x, n_boot, np.random.default_rng(seed))
    return {"mean": float(x.mean()), "ci": _percentile_ci(boot, ci), "n": int(x.size)}


def mean_diff_ci(
    a: Sequence[float], b: Sequence[float], paired: bool = True,
    n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
) -> dict:
    """Mean difference a - b (e.g. log-odds, training minus deployment) with a bootstrap interval.

    paired=True: a[i] and b[i] belong to the same query; pairs with a non-finite member are
    dropped and the resampling is over pairs. paired=False: the two samples are resampled
    independently. Returns {"diff", "ci": [lo, hi], "n", "n_a", "n_b"}.
    """
    _z(ci)
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    if paired:
        if x.shape != y.shape:
            raise BadInput(f"paired samples differ in length: {x.size} vs {y.size}")
        keep = np.isfinite(x) & np.isfinite(y)
        d = x[keep] - y[keep]
        n = int(d.size)
        out = {"diff": _NAN, "ci": [_NAN, _NAN], "n": n, "n_a": n, "n_b": n}
        if n:
            out["diff"] = float(d.mean())
            out["ci"] = _percentile_ci(_boot_means(d, n_boot, rng), ci)
        return out
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    out = {"diff": _NAN, "ci": [_NAN, _NAN], "n": int(min(x.size, y.size)),
           "n_a": int(x.size), "n_b": int(y.size)}
    if x.size and y.size:
        out["diff"] = float(x.mean() - y.mean())
        boot = _boot_means(x, n_boot, rng) - _boot_means(y, n_boot, rng)
        out["ci"] = _percentile_ci(boot, ci)
    return out
