"""Synthetic activations with a planted direction, and a benchmark of `run_sweep` against a
straightforward per-layer scikit-learn loop on the same data and folds."""
from __future__ import annotations

import time
from typing import NamedTuple, Optional, Sequence

import numpy as np

from afprobe.errors import BadInput
from afprobe.probes.methods import DEFAULT_CS, REFERENCES
from afprobe.probes.splits import derive_seed, fold_ids, inner_fold_seed
from afprobe.probes.sweep import ALL, main_family_mask, run_sweep

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


Cell = tuple[Key, str, str, str, str]  # (key, method, train_family, test_family, field) of a metrics.csv row
LABEL_SETS = ("main", "shuffled", "families", "random")  # timed parts of the loop, see sklearn_loop


class LoopResult(NamedTuple):
    aurocs: dict[Cell, float]  # every AUROC cell run_sweep reports for the keys given
    seconds: dict[str, float]  # wall time of each part (LABEL_SETS): fitting and scoring held-out rows


def _fit_direction(method: str, Xtr: np.ndarray, ytr: np.ndarray, gtr: np.ndarray, cs: tuple[float, ...],
                   inner_folds: int, inner_seed: int) -> np.ndarray:
    """One method's (unnormalised) direction fitted by its registered numpy / scikit-learn reference."""
    if method not in REFERENCES:
        raise BadInput(f"sklearn_loop: probe method {method!r} has no registered reference")
    return REFERENCES[method](Xtr, ytr, gtr, cs, inner_folds, inner_seed)


def with_reference(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods a reference loop can check (registered with a reference); the others are skipped."""
    return tuple(m for m in methods if m in REFERENCES)


def _held_out_scores(w: np.ndarray, Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray) -> np.ndarray:
    """run_sweep's scoring rule: unit direction oriented so class 1 projects higher on the training rows,
    minus the midpoint of the training class means."""
    u = w / np.linalg.norm(w)
    p = Xtr @ u
    m1, m0 = p[ytr == 1].mean(), p[ytr == 0].mean()
    sign = 1.0 if m1 >= m0 else -1.0
    return sign * (Xte @ u - 0.5 * (m1 + m0))


def sklearn_loop(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray,
                 families: np.ndarray, folds: int, seed: int, *,
                 methods: Optional[Sequence[str]] = None,
                 cs: tuple[float, ...] = DEFAULT_CS, inner_folds: int = 3,
                 control_families: Sequence[str] = ()) -> LoopResult:
    """The straightforward reference for `run_sweep(..., n_boot=0)`'s AUROCs, one fit at a time with numpy /
    scikit-learn. For each key, each label set, each outer fold and each method, fit on the label set's
    training rows of the fold and score every held-out row. Label sets, as in run_sweep:
    - main: the main families (all but `control_families`) with the true labels;
    - shuffled: the main families with labels permuted across the main rows (run_sweep's permutation);
    - families: each cue family alone (none with a single family; a family whose rows are the main rows
      reuses the main fit);
    - random: a fixed seeded random unit direction per width, oriented per fold on the main training rows.
    Same outer folds, inner CV folds and relative C grid as run_sweep. AUROCs are pooled over the held-out
    scores: main on the main rows, shuffled on the main rows against the shuffled labels, random on the
    main rows, main -> each control family, and train family -> test family for every pair of families.
    """
    from sklearn.metrics import roc_auc_score

    methods = with_reference(methods if methods is not None else list(REFERENCES))  # no reference: skipped

    labels, groups, families = np.asarray(labels), np.asarray(groups).astype(str), np.asarray(families).astype(str)
    main = main_family_mask(families, control_families)
    fams = list(dict.fromkeys(families.tolist()))
    controls = [a for a in fams if not main[families == a].any()]
    fid = fold_ids(groups, folds, seed)
    y_shuf = labels.copy()
    y_shuf[main] = np.random.default_rng(derive_seed(seed, 2)).permutation(labels[main])
    # label set -> (training rows, labels, timed part); families alone only if they differ from the main set
    sets = {"main": (main, labels, "main"), "shuffled": (main, y_shuf, "shuffled")}
    if len(fams) > 1:
        sets.update({f"family {a}": (families == a, labels, "families") for a in fams
                     if not np.array_equal(families == a, main)})

    def auc(scores: np.ndarray, rows: np.ndarray, y: np.ndarray = labels) -> float:
        return float(roc_auc_score(y[rows], scores[rows]))

    seconds = dict.fromkeys(LABEL_SETS, 0.0)
    out: dict[Cell, float] = {}
    for key, feats in features.items():
        X = np.asarray(feats, dtype=np.float64)
        oof = {}  # (label set, method) -> [n] held-out scores
        for name, (rows, y, part) in sets.items():
            t0 = time.perf_counter()
            for m in methods:
                oof[name, m] = np.zeros(len(labels))
            for f in range(folds):
                tr, te = np.flatnonzero(rows & (fid != f)), np.flatnonzero(fid == f)
                for m in methods:
                    w = _fit_direction(m, X[tr], y[tr], groups[tr], cs, inner_folds, inner_fold_seed(seed, f))
                    oof[name, m][te] = _held_out_scores(w, X[tr], y[tr], X[te])
            seconds[part] += time.perf_counter() - t0
        t0 = time.perf_counter()
        g = np.random.default_rng(derive_seed(seed, 3, X.shape[1])).normal(size=X.shape[1])
        rnd = np.zeros(len(labels))
        for f in range(folds):
            tr, te = np.flatnonzero(main & (fid != f)), np.flatnonzero(fid == f)
            rnd[te] = _held_out_scores(g / np.linalg.norm(g), X[tr], labels[tr], X[te])
        seconds["random"] += time.perf_counter() - t0
        for m in methods:
            out[key, m, ALL, ALL, "auroc"] = auc(oof["main", m], main)
            out[key, m, ALL, ALL, "shuffled_auroc"] = auc(oof["shuffled", m], main, y_shuf)
            out[key, m, ALL, ALL, "random_auroc"] = auc(rnd, main)
            for c in controls:
                out[key, m, ALL, c, "auroc"] = auc(oof["main", m], families == c)
            for a in fams:
                src = f"family {a}" if f"family {a}" in sets else "main"
                for b in fams:
                    out[key, m, a, b, "auroc"] = auc(oof[src, m], families == b)
    return LoopResult(out, seconds)


def sweep_cells(rows: list[dict]) -> dict[Cell, float]:
    """The AUROC cells of run_sweep's rows, keyed like `sklearn_loop`'s (shuffled and random: main rows only)."""
    out: dict[Cell, float] = {}
    for r in rows:
        base = ((r["layer"], r["site"], r["position"]), r["method"], r["train_family"], r["test_family"])
        out[(*base, "auroc")] = r["auroc"]
        if r["train_family"] == ALL and r["test_family"] == ALL:
            out[(*base, "shuffled_auroc")] = r["shuffled_auroc"]
            out[(*base, "random_auroc")] = r["random_auroc"]
    return out


def cell_kind(cell: Cell) -> str:
    """main | shuffled | random (main rows), control (main -> a control family), family (family -> family)."""
    _, _, train, test, fld = cell
    if fld != "auroc":
        return fld.removesuffix("_auroc")
    return "family" if train != ALL else ("main" if test == ALL else "control")


def auroc_diffs(ref: dict[Cell, float], rows: list[dict]) -> dict[Cell, float]:
    """|sweep - loop| for every cell; the sweep's cells on the loop's keys and methods must be exactly the loop's
    (methods without a reference are not in the loop)."""
    keys, methods = {c[0] for c in ref}, {c[1] for c in ref}
    mine = {c: v for c, v in sweep_cells(rows).items() if c[0] in keys and c[1] in methods}
    if set(mine) != set(ref):
        raise ValueError(f"sweep and loop cells differ: {sorted(set(mine) ^ set(ref))[:5]}")
    return {c: abs(mine[c] - v) for c, v in ref.items()}


def diff_summary(diffs: dict[Cell, float]) -> dict[str, dict]:
    """Counts and largest AUROC differences by kind of cell (see cell_kind):
    {"per_kind": {kind: {"n", "max"}}, "per_method": {method: {kind: {"n", "max"}}}}."""
    out: dict[str, dict] = {"per_kind": {}, "per_method": {}}
    for c, d in diffs.items():
        kind = cell_kind(c)
        for s in (out["per_kind"].setdefault(kind, {"n": 0, "max": 0.0}),
                  out["per_method"].setdefault(c[1], {}).setdefault(kind, {"n": 0, "max": 0.0})):
            s["n"] += 1
            s["max"] = max(s["max"], d)
    return out


def bench_sweep(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray,
                families: np.ndarray, folds: int = 5, seed: int = 0, *,
                control_families: Sequence[str] = (), baseline_threads: int | None = 1) -> dict:
    """Time `run_sweep(..., n_boot=0)` against `sklearn_loop` on the same data and folds.

    Both compute the same AUROCs (main, shuffled-label and random controls, control families, generalisation
    matrix); the sweep also refits the final directions, so the ratio is conservative. run_sweep is
    single-threaded; the loop's BLAS gets `baseline_threads` threads (1 = like for like; None = library
    default, which on a busy machine can be many times slower).
    Returns {"sweep_s", "sklearn_loop_s", "sweep_speedup", "max_auroc_diff"}; max_auroc_diff is the largest
    |AUROC difference| over every cell (key x method x row x field).
    """
    import sklearn.discriminant_analysis  # noqa: F401  (imported before the thread limit: scikit-learn loads
    import sklearn.linear_model  # noqa: F401  SciPy's own BLAS, which must be limited too)
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    res = run_sweep(features, labels, groups, families, folds=folds, n_boot=0, seed=seed,
                    control_families=control_families)
    t1 = time.perf_counter()
    with threadpool_limits(limits=baseline_threads):
        ref = sklearn_loop(features, labels, groups, families, folds, seed, control_families=control_families)
    t2 = time.perf_counter()
    diff = max(auroc_diffs(ref.aurocs, res.rows).values())
    return {"sweep_s": t1 - t0, "sklearn_loop_s": t2 - t1, "sweep_speedup": (t2 - t1) / (t1 - t0),
            "max_auroc_diff": float(diff)}
