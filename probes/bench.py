"""Synthetic activations with a planted direction, and a benchmark of `run_sweep` against a
straightforward per-layer scikit-learn loop on the same data and folds."""
from __future__ import annotations

import time
import warnings
from typing import NamedTuple

import numpy as np

from afprobe.errors import BadInput
from afprobe.probes.methods import DEFAULT_CS
from afprobe.probes.splits import fold_ids, inner_fold_seed

Key = tuple[int, str, str]


class SyntheticData(NamedTuple):
    features: dict[Key, np.ndarray]  # (layer, site, position) -> [n, d]
    labels: np.ndarray  # [n] 1 = training
    groups: np.ndarray  # [n] query ids
    families: np.ndarray  # [n] cue family names
    direction: np.ndarray  # [d] planted unit direction


def synthetic_features(n_queries: int, n_layers: int, d: int, signal_layer: int, seed: int, *,
                       positions: tuple[str, ...] = ("last", "cue", "user_mean"),
                       site: str = "resid_post", families: tuple[str, ...] = ("tier",),
                       flipped: tuple[str, ...] = (), signal: float = 3.0,
                       query_scale: float = 2.0, dtype: type = np.float32) -> SyntheticData:
    """Residual-stream-like features with class 1 shifted along one planted unit direction u.

    Rows: for each query, for each family, one "training" (label 1) and one "deployment" row.
    Per row: a shared mean + a query offset (shared by all rows of the query) + a family offset +
    anisotropic noise + label_sign * strength(layer, position) * u, where strength peaks at
    `signal_layer` (`signal` noise standard deviations) and falls off with distance and position
    index (1, 0.6, 0.3, ...). Families in `flipped` carry the shift with the opposite sign (a tag-token
    detector on the swapped-semantics control). Query offsets and the anisotropic part of the noise
    are orthogonal to u, so every method's population optimum is parallel to u.
    """
    if not (n_queries >= 2 and n_layers >= 1 and d >= 2 and 0 <= signal_layer < n_layers):
        raise BadInput("synthetic_features: need n_queries >= 2, d >= 2, 0 <= signal_layer < n_layers")
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    orth = np.eye(d) - np.outer(u, u)  # projector orthogonal to u
    nq, nf = n_queries, len(families)
    labels = np.tile([1, 0], nq * nf)
    groups = np.repeat([f"q{q:05d}" for q in range(nq)], 2 * nf)
    fams = np.tile(np.repeat(np.asarray(families), 2), nq)
    sign = np.where(np.isin(fams, flipped), -1.0, 1.0) * np.where(labels == 1, 0.5, -0.5)
    qidx = np.repeat(np.arange(nq), 2 * nf)
    fidx = np.tile(np.repeat(np.arange(nf), 2), nq)
    rank = min(8, d - 1)
    spectrum = 1.0 + 4.0 * np.exp(-np.arange(rank) / 3.0)  # a few high-variance noise directions
    width = max(1.0, n_layers / 6)
    # slowly varying residual stream: per-row state shared across layers plus per-layer parts
    row_state = rng.normal(size=(len(labels), d))
    q_state = rng.normal(size=(nq, d))
    features: dict[Key, np.ndarray] = {}
    for layer in range(n_layers):
        basis = rng.normal(size=(rank, d)) @ orth
        basis *= (spectrum / np.linalg.norm(basis, axis=1))[:, None]
        mean = rng.normal(size=d) * 2.0
        q_off = (0.7 * q_state + 0.3 * rng.normal(size=(nq, d))) @ orth * query_scale / np.sqrt(d) * 4
        f_off = rng.normal(size=(nf, d)) @ orth
        strength = signal * np.exp(-(((layer - signal_layer) / width) ** 2))
        for pi, pos in enumerate(positions):
            noise = 0.6 * row_state + 0.8 * rng.normal(size=row_state.shape)
            x = (mean + q_off[qidx] + f_off[fidx] + noise
                 + rng.normal(size=(len(labels), rank)) @ basis
                 + np.outer(sign * strength * 0.6**pi * 2, u))
            features[(layer, site, pos)] = x.astype(dtype)
    return SyntheticData(features, labels, groups, fams, u)


def sklearn_loop(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray,
                 families: np.ndarray, folds: int, seed: int, *,
                 methods: tuple[str, ...] = ("diff_means", "logreg", "lda"),
                 cs: tuple[float, ...] = DEFAULT_CS, inner_folds: int = 3,
                 swapped_family: str = "swapped_tier") -> dict[tuple[Key, str], float]:
    """The straightforward reference: for each key, each outer fold, each method, fit on the main
    families' training rows with numpy / scikit-learn and score the held-out rows; pooled AUROC.
    Same outer folds, inner CV folds and relative C grid as `run_sweep`.
    Returns {(key, method): held-out AUROC on the main families}."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegressionCV

    from afprobe.probes.metrics import auroc
    from afprobe.probes.sweep import main_family_mask

    labels, groups = np.asarray(labels), np.asarray(groups)
    main = main_family_mask(np.asarray(families), swapped_family)
    fid = fold_ids(groups, folds, seed)
    out: dict[tuple[Key, str], float] = {}
    for key, feats in features.items():
        X = np.asarray(feats, dtype=np.float64)
        oof = {m: np.zeros(len(labels)) for m in methods}
        for f in range(folds):
            tr, te = np.flatnonzero(main & (fid != f)), np.flatnonzero(main & (fid == f))
            Xtr, ytr = X[tr], labels[tr]
            coef = {}
            if "diff_means" in methods:
                coef["diff_means"] = Xtr[ytr == 1].mean(0) - Xtr[ytr == 0].mean(0)
            if "lda" in methods:
                coef["lda"] = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(Xtr, ytr).coef_[0]
            if "logreg" in methods:
                ifid = fold_ids(groups[tr], inner_folds, inner_fold_seed(seed, f))
                cv = [(np.flatnonzero(ifid != g), np.flatnonzero(ifid == g)) for g in range(inner_folds)]
                s2 = float(((Xtr - Xtr.mean(0)) ** 2).sum(1).mean())
                lr = LogisticRegressionCV(Cs=[c / s2 for c in cs], cv=cv, scoring="neg_log_loss",
                                          l1_ratios=(0.0,), use_legacy_attributes=False, max_iter=1000)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    coef["logreg"] = lr.fit(Xtr, ytr).coef_[0]
            for m, w in coef.items():  # same scoring rule as run_sweep: unit direction minus midpoint
                u = w / np.linalg.norm(w)
                p = Xtr @ u
                m1, m0 = p[ytr == 1].mean(), p[ytr == 0].mean()
                oof[m][te] = np.sign(m1 - m0) * (X[te] @ u - 0.5 * (m1 + m0))
        for m in methods:
            out[(key, m)] = float(auroc(oof[m][main], labels[main]))
    return out


def bench_sweep(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray,
                families: np.ndarray, folds: int = 5, seed: int = 0, *,
                baseline_threads: int | None = 1) -> dict:
    """Time `run_sweep` against `sklearn_loop` on the same data and folds.

    Timed for the sweep: the whole `run_sweep(..., n_boot=0)` call, which besides the held-out AUROC of
    every key x method also runs the shuffled-label control (a second full pipeline), the
    random-direction control, the generalisation matrix, the swapped-family scores and the final
    refits; the sklearn loop does only the held-out AUROCs, so the ratio is conservative. The
    bootstrap is left out of both. run_sweep is single-threaded; the loop's BLAS gets
    `baseline_threads` threads (1 = like for like; None = library default, which on a busy machine
    can be many times slower).
    Returns {"sweep_s", "sklearn_loop_s", "sweep_speedup", "max_auroc_diff"}; max_auroc_diff is the
    largest |AUROC difference| over every key x method on the main families.
    """
    from threadpoolctl import threadpool_limits

    from afprobe.probes.sweep import run_sweep

    t0 = time.perf_counter()
    res = run_sweep(features, labels, groups, families, folds=folds, n_boot=0, seed=seed)
    t1 = time.perf_counter()
    with threadpool_limits(limits=baseline_threads):
        ref = sklearn_loop(features, labels, groups, families, folds, seed)
    t2 = time.perf_counter()
    mine = {((r["layer"], r["site"], r["position"]), r["method"]): r["auroc"] for r in res.rows
            if r["train_family"] == "all" and r["test_family"] == "all"}
    diff = max(abs(mine[k] - v) for k, v in ref.items())
    return {"sweep_s": t1 - t0, "sklearn_loop_s": t2 - t1, "sweep_speedup": (t2 - t1) / (t1 - t0),
            "max_auroc_diff": float(diff)}
