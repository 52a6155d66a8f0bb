"""Recovered fraction of a patching experiment with a query-bootstrap interval (array math only).

For queries q with target log-odds t_q (the unpatched target prompt), source log-odds s_q (the unpatched source
prompt of the same query) and patched log-odds p_q (the target run with the patch):

    recovered = sum_q (p_q - t_q) / sum_q (s_q - t_q)

the patch's mean move as a fraction of the mean clean-vs-corrupt difference (a ratio of means: a query with a tiny
gap does not blow it up). 1 = the patch moves the target all the way to the source, 0 = nothing. The interval
resamples queries with replacement (`metrics.bootstrap_weights`) and takes percentiles.
"""
from __future__ import annotations

import numpy as np

from afprobe.probes.metrics import bootstrap_weights


def recovered_fraction(patched: np.ndarray, target: np.ndarray, source: np.ndarray, n_boot: int = 2000,
                       ci: float = 0.95, seed: int = 0) -> dict:
    """patched, target, source: [n queries] log-odds. Returns {"recovered", "ci_lo", "ci_hi", "n"} (NaN when there
    is no query or the mean gap is 0)."""
    p, t, s = (np.asarray(x, dtype=np.float64) for x in (patched, target, source))
    n = p.size
    if n == 0:
        return {"recovered": float("nan"), "ci_lo": float("nan"), "ci_hi": float("nan"), "n": 0}
    move, gap = p - t, s - t
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(move.sum() / gap.sum()) if gap.sum() != 0 else float("nan")
        w = bootstrap_weights(np.arange(n), n_boot, seed)  # [B, n]
        boot = (w @ move) / (w @ gap)
    boot = boot[np.isfinite(boot)]
    lo, hi = (np.quantile(boot, [0.5 - ci / 2, 0.5 + ci / 2]) if boot.size else (np.nan, np.nan))
    return {"recovered": point, "ci_lo": float(lo), "ci_hi": float(hi), "n": int(n)}
