"""AUROC (rank based, ties count one half), accuracy, and bootstrap intervals over queries.

Everything is vectorised: many score vectors and many bootstrap resamples go through one sort each.
A bootstrap resample draws QUERIES with replacement; a row's weight is how often its query was drawn.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats as sps

from afprobe.errors import BadInput

_CHUNK_ELEMS = 2_000_000  # rows x resamples x n held in memory at once by weighted_auroc


def weighted_auroc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mann-Whitney AUROC of many score vectors under many row weightings.

    scores: [R, n]; y: [R, n] or [n] (1 = positive); weights: [B, n] or [R, B, n] non-negative row
    weights (None = all ones, B = 1). Ties between a positive and a negative count one half.
    Returns [R, B] float64; NaN where a class has zero total weight.
    """
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if s.ndim != 2:
        raise BadInput(f"scores must be [R, n], got shape {tuple(s.shape)}")
    R, n = s.shape
    yt = torch.as_tensor(np.broadcast_to(np.asarray(y), (R, n)).astype(np.float64))
    w = torch.ones(1, 1, n, dtype=torch.float64) if weights is None else torch.as_tensor(
        np.asarray(weights, dtype=np.float64))
    if w.ndim == 2:
        w = w[None]
    B = w.shape[1]
    order = torch.argsort(s, dim=-1)
    ss, ys = s.gather(-1, order), yt.gather(-1, order)
    # tie blocks of the sorted scores: [start, end) for every position
    idx = torch.arange(n).expand(R, n)
    step = ss[:, 1:] != ss[:, :-1]
    first = torch.cat([torch.ones(R, 1, dtype=torch.bool), step], dim=1)
    last = torch.cat([step, torch.ones(R, 1, dtype=torch.bool)], dim=1)
    start = torch.where(first, idx, 0).cummax(dim=1).values
    end = torch.where(last, idx + 1, n).flip(1).cummin(dim=1).values.flip(1)
    out = torch.empty(R, B, dtype=torch.float64)
    step_r = max(1, _CHUNK_ELEMS // max(1, B * n))
    for a in range(0, R, step_r):
        b = min(R, a + step_r)
        wr = w[a:b] if w.shape[0] > 1 else w.expand(b - a, B, n)
        wr = wr.gather(-1, order[a:b, None, :].expand(b - a, B, n))
        pos, neg = wr * ys[a:b, None], wr * (1 - ys[a:b, None])
        cum0 = torch.nn.functional.pad(neg.cumsum(-1), (1, 0))  # [r, B, n + 1]
        below = 0.5 * (cum0.gather(-1, start[a:b, None].expand(-1, B, -1))
                       + cum0.gather(-1, end[a:b, None].expand(-1, B, -1)))  # negatives below + half ties
        den = pos.sum(-1) * neg.sum(-1)
        out[a:b] = torch.where(den > 0, (pos * below).sum(-1) / den.clamp_min(1e-300), torch.nan)
    return out.numpy()


def auroc(scores: np.ndarray, y: np.ndarray) -> float | np.ndarray:
    """AUROC of scores [n] (-> float) or [R, n] (-> [R]) against labels y [n] or [R, n]."""
    scores = np.asarray(scores)
    res = weighted_auroc(np.atleast_2d(scores), y)[:, 0]
    return float(res[0]) if scores.ndim == 1 else res


def widen_degenerate(point: np.ndarray | float, lo: np.ndarray | float, hi: np.ndarray | float,
                     n_units: np.ndarray | float, bounds: tuple[float, float] = (0.0, 1.0),
                     ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """A bootstrap interval of zero width (every resample agreed: every query gave the same value, as at
    AUROC 0 or 1) says nothing about sampling error. Where lo == hi, the interval becomes the one implied by
    Wilson's score bound on the fraction of units that might differ from the common value (at most
    z^2 / (n + z^2) when none of n did), each as far as the statistic's `bounds` allow; elsewhere (lo, hi)
    unchanged. At AUROC 1 from n queries this is [n / (n + z^2), 1]."""
    if not 0 < ci < 1:
        raise BadInput(f"confidence level must be in (0, 1), got {ci}")
    z2 = float(sps.norm.ppf(0.5 + ci / 2)) ** 2
    point = np.asarray(point, dtype=np.float64)
    lo, hi, n = (np.asarray(v, dtype=np.float64) for v in (lo, hi, n_units))
    a, b = bounds
    with np.errstate(all="ignore"):
        eps = z2 / (n + z2)
    flat = np.isfinite(lo) & np.isfinite(hi) & (hi - lo <= 1e-12) & (n > 0)
    return np.where(flat, point - (point - a) * eps, lo), np.where(flat, point + (b - point) * eps, hi)


def bootstrap_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] row weights: queries drawn with replacement, each row weighted by its query's count."""
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(int(n_boot), len(uniq)))
    counts = np.zeros((int(n_boot), len(uniq)))
    np.add.at(counts, (np.arange(int(n_boot))[:, None], draws), 1.0)
    return counts[:, inv]


def auroc_ci_batch(scores: np.ndarray, y: np.ndarray, mask: np.ndarray, boot: np.ndarray | None,
                   ci: float = 0.95, n_units: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point AUROC and percentile bootstrap interval for many score vectors over row subsets.

    scores, y, mask: [R, n] (mask selects each vector's rows); boot: [B, n] weights from
    `bootstrap_weights` shared by all vectors (None or B = 0: no interval); n_units: how many queries
    the resamples draw (> 0: a zero-width interval becomes the Wilson score interval, `widen_degenerate`).
    Returns (auroc [R], lo [R], hi [R]); lo/hi are NaN without resamples.
    """
    mask = np.asarray(mask, dtype=np.float64)
    point = weighted_auroc(scores, y, mask[:, None, :])[:, 0]
    if boot is None or len(boot) == 0:
        nan = np.full_like(point, np.nan)
        return point, nan, nan.copy()
    dist = weighted_auroc(scores, y, mask[:, None, :] * np.asarray(boot)[None])
    with np.errstate(all="ignore"):
        lo, hi = np.nanquantile(dist, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=1)
    if n_units > 0:
        lo, hi = widen_degenerate(point, lo, hi, n_units, ci=ci)
    return point, lo, hi


def auroc_ci(scores: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int = 1000,
             ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC, lo, hi) for scores [n] and labels y [n]; the interval resamples groups (queries) [n]."""
    scores = np.asarray(scores, dtype=np.float64)
    y, groups = np.asarray(y), np.asarray(groups)
    if not scores.ndim == y.ndim == groups.ndim == 1 or not len(scores) == len(y) == len(groups):
        raise BadInput("scores, y and groups must be 1-d arrays of one length")
    if not 0 < ci < 1:
        raise BadInput(f"ci must be in (0, 1), got {ci}")
    boot = bootstrap_weights(groups, n_boot, seed) if n_boot > 0 else None
    a, lo, hi = auroc_ci_batch(scores[None], y[None], np.ones((1, len(y))), boot, ci,
                               n_units=len(np.unique(groups)))
    return float(a[0]), float(lo[0]), float(hi[0])


def midpoint_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    """Midpoint between the class means of (training) scores [n] with labels y [n]."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y).astype(bool)
    return 0.5 * float(scores[y].mean() + scores[~y].mean())


def accuracy(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> float:
    """Fraction of rows where (score > threshold) equals the label; scores, y: [n]."""
    return float(np.mean((np.asarray(scores) > threshold) == np.asarray(y).astype(bool)))
