"""The refusal direction and its relation to the training-awareness direction (array math only).

The refusal direction at a cell is the difference of means of harmful and benign requests' activations
(harmful minus benign: it points toward refusing). Its overlap with the training-awareness direction is the
cosine of the two unit vectors, compared with a random baseline: the |cosine| of the awareness direction with
seeded Gaussian random directions, which by rotation symmetry is the distribution of |cosine| between two
random unit vectors in d dimensions (about N(0, 1/d) in d large: 95th percentile near 1.96 / sqrt(d)).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from afprobe.probes.splits import derive_seed


def mean_difference(harmful: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """Harmful minus benign mean of harmful [n, d] and benign [m, d]: the unnormalised refusal vector [d]."""
    return np.asarray(harmful, np.float64).mean(0) - np.asarray(benign, np.float64).mean(0)


def unit(v: np.ndarray) -> np.ndarray:
    """v [d] scaled to unit norm (float64)."""
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors [d]."""
    return float(unit(a) @ unit(b))


def project_out(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unit vector along a [d] with its component along b [d] removed (a minus its projection on b)."""
    ub = unit(b)
    a = np.asarray(a, np.float64)
    return unit(a - (a @ ub) * ub)


def random_abs_cosines(direction: np.ndarray, n: int, seed: int) -> np.ndarray:
    """[n] |cosine| of `direction` [d] with n seeded Gaussian random directions."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((n, np.asarray(direction).shape[0]))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    return np.abs(r @ unit(direction))


def bootstrap_cosines(harmful: np.ndarray, benign: np.ndarray, harmful_groups: np.ndarray,
                      benign_groups: np.ndarray, awareness: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot] cosines of `awareness` [d] with the refusal vector recomputed on resampled queries: harmful
    [n, d] and benign [m, d] rows are resampled by query (their `*_groups` [n] / [m]), each set on its own."""
    rng = np.random.default_rng(seed)
    aw = unit(awareness)

    def sums(x: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = list(dict.fromkeys(groups.tolist()))
        index = {g: i for i, g in enumerate(ids)}
        total = np.zeros((len(ids), x.shape[1]))
        np.add.at(total, np.array([index[g] for g in groups.tolist()]), np.asarray(x, np.float64))
        count = np.bincount([index[g] for g in groups.tolist()], minlength=len(ids)).astype(float)
        return total, count

    h_sum, h_n = sums(harmful, harmful_groups)
    b_sum, b_n = sums(benign, benign_groups)
    out = np.empty(n_boot)
    for k in range(n_boot):
        hi = rng.integers(0, len(h_n), len(h_n))
        bi = rng.integers(0, len(b_n), len(b_n))
        diff = h_sum[hi].sum(0) / h_n[hi].sum() - b_sum[bi].sum(0) / b_n[bi].sum()
        out[k] = float(unit(diff) @ aw)
    return out


def alignment(awareness: np.ndarray, harmful: np.ndarray, benign: np.ndarray, harmful_groups: np.ndarray,
              benign_groups: np.ndarray, n_random: int, n_boot: int, ci: float, seed: int,
              layer: Optional[int] = None) -> dict:
    """Cosine of the awareness direction [d] with the refusal direction from harmful [n, d] and benign [m, d]
    rows, with a basic query-bootstrap interval (it may lie beyond the estimate, which noise biases toward 0), and the random baseline (|cosine| with n_random random
    directions: median, 95th percentile, and the permutation-style p = (1 + #{random >= observed}) / (1 + n))."""
    tag = 0 if layer is None else int(layer)
    cos = cosine(awareness, mean_difference(harmful, benign))
    boots = bootstrap_cosines(harmful, benign, harmful_groups, benign_groups, awareness, n_boot,
                              derive_seed(seed, 31, tag))
    rand = random_abs_cosines(awareness, n_random, derive_seed(seed, 32, tag))
    tail = (1 - ci) / 2
    lo, hi = [None, None]
    if n_boot:  # basic (reverse-percentile) interval: noise in the means pulls |cosine| toward 0, this undoes it
        q_lo, q_hi = np.quantile(boots, [tail, 1 - tail])
        lo, hi = float(np.clip(2 * cos - q_hi, -1, 1)), float(np.clip(2 * cos - q_lo, -1, 1))
    return {"cosine": cos, "cosine_ci": [lo, hi], "random_abs_median": float(np.median(rand)),
            "random_abs_q95": float(np.quantile(rand, 0.95)),
            "p_random": float((1 + np.sum(rand >= abs(cos))) / (1 + n_random))}
