"""Sweep probes over (layer, site, position) x method with grouped cross-validation and controls.

Pipeline per key and method: k folds over queries (all families of a query on one side); each fold's
direction is fitted on the main families' training rows and scores every held-out row (minus the
fold's midpoint threshold); pooled out-of-fold scores give AUROC (bootstrap CI over queries) and
accuracy. The same pipeline runs with labels permuted across the main rows (shuffled control), a
seeded random unit direction is scored the same way (random control), each family is also trained on
alone and tested on every family (generalisation matrix), and the main-trained folds score each control
family. Main families are all but the control families the caller names. These controls are single
draws and the best cell is the plain argmax; probes/selection.py gives the selection-aware statistics.

Speed: keys of equal width are stacked and every key, outer fold and label set goes through one batched
call of the method cores (true and shuffled labels share one gather of the rows and one Gram matrix);
the cores block the work so each block stays in cache. Everything runs single-threaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from afprobe.errors import BadInput
from afprobe.probes.methods import DEFAULT_CS, DTYPE, METHODS, Probe, finish, make_probe, single_thread
from afprobe.probes.metrics import auroc_ci_batch, bootstrap_weights, weighted_auroc
from afprobe.probes.splits import derive_seed, fold_ids, inner_fold_seed

Tensor = torch.Tensor
Key = tuple[int, str, str]  # (layer, site, position)
DirKey = tuple[int, str, str, str]  # (layer, site, position, method)
ROW_FIELDS = ("layer", "site", "position", "method", "train_family", "test_family", "auroc", "auroc_lo",
              "auroc_hi", "accuracy", "shuffled_auroc", "random_auroc", "n")
ALL = "all"
_MEM_BUDGET = 512 * 2**20  # bytes of float64 temporaries per chunk of keys


def main_family_mask(families: np.ndarray, control_families: Sequence[str] = ()) -> np.ndarray:
    """[n] bool: rows of every family except the control families.

    A family is a control because the caller names it, never because of its name. Every control family
    must occur in `families` [n], and at least one family must be left."""
    families = np.asarray(families).astype(str)
    controls = [str(c) for c in control_families]
    missing = sorted(set(controls) - set(families.tolist()))
    if missing:
        raise BadInput(f"control families {missing} do not occur in the data (families: "
                       f"{sorted(set(families.tolist()))})")
    main = ~np.isin(families, controls)
    if not main.any():
        raise BadInput(f"every cue family is a control ({controls}): no main rows left to fit on")
    return main


@dataclass
class SweepResult:
    rows: list[dict]  # metrics.csv rows, ROW_FIELDS
    best: dict  # layer, site, position, method, auroc, auroc_ci [lo, hi], accuracy
    controls: dict  # shuffled_auroc, random_auroc at the best key and method
    generalization: dict[str, dict[str, float]]  # train family -> test family -> AUROC (best)
    controls_by_family: dict[str, dict]  # control family -> {"auroc", "auroc_ci"}: main-trained, best cell
    directions: dict[DirKey, tuple[np.ndarray, float]] = field(default_factory=dict)  # refit on main


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ---------------------------------------------------------------------------------------------------
# fitting plans: which rows each (fold, label set) trains on, gathered once for all keys


class _Plan(NamedTuple):
    idx: Tensor  # [F, S, m] row indices (padded)
    w: Tensor  # [F, S, m] 1 for real rows
    y: Tensor  # [F, S, m] labels
    inner: Tensor  # [F, S, k, m] inner-CV training masks
    shared: bool  # every label set trains on the same rows (gather X once)


def _plan(train: np.ndarray, ys: np.ndarray, groups: np.ndarray, inner_k: int,
          inner_seeds: Sequence[int]) -> _Plan:
    """train: [F, S, n] bool; ys: [S, n] labels; inner_seeds: one per fold. inner_k 0: no inner-CV masks
    (only logistic regression uses them; the others then need no minimum number of queries per fold)."""
    F, S, n = train.shape
    m = int(train.sum(-1).max())
    idx = np.zeros((F, S, m), dtype=np.int64)
    w = np.zeros((F, S, m))
    inner = np.zeros((F, S, inner_k, m), dtype=bool)
    for f in range(F):
        for s in range(S):
            rows = np.flatnonzero(train[f, s])
            idx[f, s, : len(rows)], w[f, s, : len(rows)] = rows, 1.0
            if inner_k:
                fid = fold_ids(groups[rows], inner_k, inner_seeds[f])
                inner[f, s, :, : len(rows)] = fid[None, :] != np.arange(inner_k)[:, None]
    y = np.take_along_axis(np.broadcast_to(ys, (F, S, n)), idx, axis=-1)
    shared = bool((train == train[:, :1]).all())
    return _Plan(torch.as_tensor(idx), torch.as_tensor(w, dtype=DTYPE), torch.as_tensor(y, dtype=DTYPE),
                 torch.as_tensor(inner), shared)


def _fit(probe: Probe, X: Tensor, plan: _Plan) -> tuple[Tensor, Tensor, Tensor]:
    """X [K, n, d] -> unit directions [K, F, S, d], separations and thresholds [K, F, S]."""
    sl = slice(0, 1) if plan.shared else slice(None)  # rows shared by label sets: gather once
    Xg = X[:, plan.idx[:, sl]]  # [K, F, S', m, d]
    w, inner = plan.w[:, sl], plan.inner[:, sl]
    if probe.small_batches:  # memory-bound cores run one (key, fold) at a time, in cache
        W = torch.stack([torch.stack([probe.core(Xg[k, f], plan.y[f], w[f], inner[f])
                                      for f in range(Xg.shape[1])]) for k in range(Xg.shape[0])])
    else:
        W = probe.core(Xg, plan.y, w, inner)
    return finish(W, Xg, plan.y, w)


def _chunk_size(n_keys: int, plan_shapes: list[tuple[int, ...]], d: int) -> int:
    """Keys per chunk so that the float64 temporaries of one fit stay near _MEM_BUDGET."""
    per_key = max(8 * F * S * m * (8 * d + 2 * k * m) for F, S, k, m in plan_shapes)
    return int(max(1, min(n_keys, _MEM_BUDGET // max(1, per_key))))


# ---------------------------------------------------------------------------------------------------
# the sweep


def run_sweep(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray,
              families: np.ndarray, *, methods: Sequence[str] = ("diff_means", "logreg", "lda"),
              folds: int = 5, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
              control_families: Sequence[str] = (), inner_folds: int = 3,
              cs: Sequence[float] = DEFAULT_CS, refit: str = "layers") -> SweepResult:
    """Grouped k-fold probe sweep with controls, generalisation matrix and control-family scores.

    features: {(layer, site, position): [n, d] float16/float32}; labels: [n] 1 = training (by meaning);
    groups: [n] query ids; families: [n] cue family names. Main families = all but `control_families`
    (e.g. the swapped-semantics family); fitting uses main rows only and the main-trained folds score
    each control family's rows.
    refit: "best" | "layers" (best method at the best site/position, every layer) | "all" — which
    final directions are refitted on all main-family rows.
    Runs single-threaded (torch), which is much faster than contended threads on a shared machine.
    """
    with single_thread():
        return _run_sweep(features, labels, groups, families, methods=methods, folds=folds, n_boot=n_boot,
                          ci=ci, seed=seed, control_families=control_families, inner_folds=inner_folds, cs=cs,
                          refit=refit)


def _run_sweep(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray, families: np.ndarray,
               *, methods: Sequence[str], folds: int, n_boot: int, ci: float, seed: int,
               control_families: Sequence[str], inner_folds: int, cs: Sequence[float], refit: str) -> SweepResult:
    labels, groups, families = (np.asarray(a) for a in (labels, groups, families))
    keys = _check_inputs(features, labels, groups, families, methods, refit)
    if not 0 < ci < 1 or n_boot < 0:
        raise BadInput(f"need 0 < ci < 1 and n_boot >= 0, got ci={ci}, n_boot={n_boot}")
    n = len(labels)
    groups, families = groups.astype(str), families.astype(str)
    probes = {m: make_probe(m, cs=cs, inner_folds=inner_folds, seed=seed) for m in methods}
    main = main_family_mask(families, control_families)
    if len(np.unique(labels[main])) < 2:
        raise BadInput("labels of the main cue families must contain both 0 and 1")
    fams = list(dict.fromkeys(families.tolist()))
    controls = [a for a in fams if not main[families == a].any()]
    fid = fold_ids(groups, folds, seed)
    y_shuf = labels.copy()
    y_shuf[main] = np.random.default_rng(derive_seed(seed, 2)).permutation(labels[main])
    inner_seeds = [inner_fold_seed(seed, f) for f in range(folds)]
    tr_fold = fid[None, :] != np.arange(folds)[:, None]  # [F, n]

    # label sets: main rows with true and shuffled labels; each family alone (unless it is the main set)
    inner_k = inner_folds if "logreg" in methods else 0
    main_plan = _plan(np.stack([tr_fold & main] * 2, 1), np.stack([labels, y_shuf]), groups, inner_k,
                      inner_seeds)
    fam_sets = [a for a in fams if len(fams) > 1 and not np.array_equal(families == a, main)]
    fam_plan = (_plan(np.stack([tr_fold & (families == a) for a in fam_sets], 1),
                      np.stack([labels] * len(fam_sets)), groups, inner_k, inner_seeds)
                if fam_sets else None)

    K, M = len(keys), len(methods)
    oof = np.zeros((K, M, 2 + len(fam_sets), n))  # held-out scores minus fold threshold
    rnd = np.zeros((K, n))
    r_dir: dict[int, Tensor] = {}
    by_width: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_width.setdefault(features[k].shape[1], []).append(i)
    shapes = [tuple(p.inner.shape) for p in (main_plan, fam_plan) if p is not None]
    for d, kidx in by_width.items():
        chunk = _chunk_size(len(kidx), shapes, d)
        if d not in r_dir:
            g = np.random.default_rng(derive_seed(seed, 3, d)).normal(size=d)
            r_dir[d] = torch.as_tensor(g / np.linalg.norm(g), dtype=DTYPE)
        for a in range(0, len(kidx), chunk):
            ids = kidx[a: a + chunk]
            X = torch.as_tensor(np.stack([np.asarray(features[keys[i]], dtype=np.float64) for i in ids]))
            for j, m in enumerate(methods):
                oof[ids, j, :2] = _held_out(_fit(probes[m], X, main_plan), X, fid)
                if fam_plan is not None:
                    oof[ids, j, 2:] = _held_out(_fit(probes[m], X, fam_plan), X, fid)
            rnd[ids] = _random_control(X, r_dir[d], labels, main, tr_fold, fid)

    rows, best_i = _score_rows(keys, methods, oof, rnd, labels, y_shuf, groups, families, main, fams,
                               fam_sets, controls, n_boot, ci, seed)
    best_row = rows[best_i]
    bk, bm = (best_row["layer"], best_row["site"], best_row["position"]), best_row["method"]
    gen = {r["train_family"]: {} for r in rows if r["train_family"] != ALL}
    by_control: dict[str, dict] = {}
    for r in rows:
        if (r["layer"], r["site"], r["position"], r["method"]) != (*bk, bm):
            continue
        if r["train_family"] != ALL:
            gen[r["train_family"]][r["test_family"]] = r["auroc"]
        elif r["test_family"] in controls:
            by_control[r["test_family"]] = {"auroc": r["auroc"], "auroc_ci": [r["auroc_lo"], r["auroc_hi"]]}
    directions = _refit(features, keys, probes, labels, groups, main, bk, bm, refit, inner_folds,
                        inner_fold_seed(seed, folds))
    return SweepResult(
        rows=rows,
        best={"layer": bk[0], "site": bk[1], "position": bk[2], "method": bm, "auroc": best_row["auroc"],
              "auroc_ci": [best_row["auroc_lo"], best_row["auroc_hi"]], "accuracy": best_row["accuracy"]},
        controls={"shuffled_auroc": best_row["shuffled_auroc"], "random_auroc": best_row["random_auroc"]},
        generalization=gen,
        controls_by_family=by_control,
        directions=directions)


def _held_out(fitted: tuple[Tensor, Tensor, Tensor], X: Tensor, fid: np.ndarray) -> np.ndarray:
    """Out-of-fold scores [K, S, n]: each row scored by the fold model that did not train on it,
    minus that model's threshold."""
    u, _, thr = fitted  # [K, F, S, d], [K, F, S]
    scores = torch.einsum("knd,kfsd->kfsn", X, u) - thr.unsqueeze(-1)  # [K, F, S, n]
    f = torch.as_tensor(fid)[None, None, None, :].expand(scores.shape[0], 1, scores.shape[2], -1)
    return scores.gather(1, f).squeeze(1).numpy()


def _random_control(X: Tensor, r: Tensor, labels: np.ndarray, main: np.ndarray, tr_fold: np.ndarray,
                    fid: np.ndarray) -> np.ndarray:
    """Held-out projections [K, n] on a fixed random unit direction, oriented per fold on the
    fold's main training rows."""
    p = X @ r  # [K, n]
    w = torch.as_tensor(tr_fold & main, dtype=DTYPE)  # [F, n]
    y = torch.as_tensor(labels, dtype=DTYPE)
    u, _, thr = finish(r.expand(p.shape[0], len(w), -1), X.unsqueeze(1), y, w)  # [K, F, d], [K, F]
    sign = u @ r  # +-1: orientation chosen on each fold's training rows
    f = torch.as_tensor(fid)
    return (p * sign[:, f] - thr[:, f]).numpy()


def _score_rows(keys: list[Key], methods: Sequence[str], oof: np.ndarray, rnd: np.ndarray,
                labels: np.ndarray, y_shuf: np.ndarray, groups: np.ndarray, families: np.ndarray,
                main: np.ndarray, fams: list[str], fam_sets: list[str], controls: list[str],
                n_boot: int, ci: float, seed: int) -> tuple[list[dict], int]:
    """metrics.csv rows and the index of the best (all, all) row."""
    K, M, _, n = oof.shape
    boot = bootstrap_weights(groups, n_boot, derive_seed(seed, 4)) if n_boot > 0 else None
    set_of = {a: (2 + fam_sets.index(a) if a in fam_sets else 0) for a in fams}

    def stats(scores: np.ndarray, rows: np.ndarray, y: np.ndarray, with_ci: bool):
        """scores [R, n] on rows mask [n] -> auroc, lo, hi, accuracy [R]."""
        s = scores[:, rows]
        a, lo, hi = auroc_ci_batch(s, np.broadcast_to(y[rows], s.shape), np.ones(s.shape),
                                   boot[:, rows] if with_ci and boot is not None else None, ci,
                                   n_units=len(np.unique(groups[rows])))
        return a, lo, hi, ((s > 0) == y[rows].astype(bool)).mean(1)

    flat = oof.reshape(K * M, -1, n)
    main_stats = stats(flat[:, 0], main, labels, True)
    shuf = weighted_auroc(flat[:, 1][:, main], y_shuf[main])[:, 0]
    rand = weighted_auroc(rnd[:, main], labels[main])[:, 0]
    # best: highest main AUROC, ties to the earlier layer (keys are sorted by layer), then key/method order
    score = np.nan_to_num(main_stats[0], nan=-np.inf)
    best_i = int(np.argmax(score))
    extra: dict[tuple[str, str], tuple] = {}
    for c in controls:
        extra[(ALL, c)] = stats(flat[:, 0], families == c, labels, True)
    if len(fams) > 1:
        for a in fams:
            for b in fams:
                extra[(a, b)] = stats(flat[:, set_of[a]], families == b, labels, False)
    else:
        extra[(fams[0], fams[0])] = main_stats
    rows: list[dict] = []
    best_row = 0
    for i in range(K * M):
        key, meth = keys[i // M], methods[i % M]
        base = {"layer": key[0], "site": key[1], "position": key[2], "method": meth}
        if i == best_i:
            best_row = len(rows)
        a, lo, hi, acc = (v[i] for v in main_stats)
        rows.append({**base, "train_family": ALL, "test_family": ALL, "auroc": float(a), "auroc_lo": float(lo),
                     "auroc_hi": float(hi), "accuracy": float(acc), "shuffled_auroc": float(shuf[i]),
                     "random_auroc": float(rand[i // M]), "n": int(main.sum())})
        for (ta, tb), st in extra.items():
            a, lo, hi, acc = (v[i] for v in st)
            rows.append({**base, "train_family": ta, "test_family": tb, "auroc": float(a), "auroc_lo": float(lo),
                         "auroc_hi": float(hi), "accuracy": float(acc), "shuffled_auroc": math.nan,
                         "random_auroc": math.nan, "n": int((families == tb).sum())})
    return rows, best_row


def _refit(features: dict[Key, np.ndarray], keys: list[Key], probes: dict[str, Probe], labels: np.ndarray,
           groups: np.ndarray, main: np.ndarray, best_key: Key, best_method: str, refit: str,
           inner_folds: int, inner_seed: int) -> dict[DirKey, tuple[np.ndarray, float]]:
    """Final directions fitted on all main-family rows: {(layer, site, position, method): (u, sep)}."""
    if refit == "all":
        targets = [(k, m) for k in keys for m in probes]
    elif refit == "layers":
        targets = [(k, best_method) for k in keys if k[1:] == best_key[1:]]
    else:
        targets = [(best_key, best_method)]
    plan = _plan(main[None, None], labels[None], groups, inner_folds if any(t[1] == "logreg" for t in targets) else 0,
                 [inner_seed])
    out: dict[DirKey, tuple[np.ndarray, float]] = {}
    for m in dict.fromkeys(t[1] for t in targets):
        mk = [k for k, mm in targets if mm == m]
        for d in dict.fromkeys(features[k].shape[1] for k in mk):
            kd = [k for k in mk if features[k].shape[1] == d]
            chunk = _chunk_size(len(kd), [tuple(plan.inner.shape)], d)
            for a in range(0, len(kd), chunk):
                part = kd[a: a + chunk]
                X = torch.as_tensor(np.stack([np.asarray(features[k], dtype=np.float64) for k in part]))
                u, sep, _ = _fit(probes[m], X, plan)
                for j, k in enumerate(part):
                    out[(*k, m)] = (u[j, 0, 0].numpy().copy(), float(sep[j, 0, 0]))
    return out


def _check_inputs(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray,
                  families: np.ndarray, methods: Sequence[str], refit: str) -> list[Key]:
    """Validate and return the keys sorted by layer (stable for site/position)."""
    if not features:
        raise BadInput("no features to probe")
    n = len(labels)
    if labels.ndim != 1 or groups.shape != (n,) or families.shape != (n,):
        raise BadInput("labels, groups and families must be 1-d arrays with one entry per prompt")
    if not np.isin(labels, (0, 1)).all():
        raise BadInput("labels must be 0 (deployment) or 1 (training)")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise BadInput(f"unknown probe method(s) {bad}; known: {sorted(METHODS)}")
    if refit not in ("best", "layers", "all"):
        raise BadInput(f"refit must be best, layers or all, got {refit!r}")
    for k, v in features.items():
        if not (isinstance(k, tuple) and len(k) == 3):
            raise BadInput(f"feature key {k!r} is not (layer, site, position)")
        if np.ndim(v) != 2 or len(v) != n:
            raise BadInput(f"features{k} must be [{n}, d], got shape {np.shape(v)}")
        if not np.isfinite(np.asarray(v, dtype=np.float32)).all():
            raise BadInput(f"features{k} contain NaN or inf")
    return sorted(features, key=lambda k: int(k[0]))
