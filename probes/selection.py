"""Selection-aware statistics for the headline probe.

The headline probe is the best of many cells (layer x site x position x method). Its plain out-of-fold
AUROC is biased upward by that choice, and an interval from the same folds ignores it: on pure noise
(29 eligible layers, 100 queries) the best cell's AUROC was 0.53-0.59 over 20 seeds, where the nested
AUROC averaged below 0.5 (tests/test_selection.py). For the cells the caller declares eligible,
`select_probe` reports:

- the best cell (argmax of the plain out-of-fold AUROC; the cell the caller steers along) and that
  naive, selection-biased AUROC;
- a selection-aware AUROC: nested cross-validation (the cell is chosen inside each outer fold) or a
  held-out split (chosen on one half of the queries, scored on the other), with a query-bootstrap interval;
- a max-statistic permutation test: the naive best AUROC against the best AUROC over the same cells under
  within-pair label permutations, so the p-value accounts for the choice among cells;
- the shuffled-label AUROC at the best cell and a random-direction baseline, each as a distribution;
- each control family scored by the main-trained best cell, and the generalisation matrix at the best
  cell, with query-bootstrap intervals.

Numbers only: no verdicts and no thresholds here (verdicts are computed in analysis/). The fold machinery
is run_sweep's (probes/sweep.py): for the same seed and folds a cell's plain AUROC equals run_sweep's.
Permutations are batched as label sets that share each fold's training rows (one gather of the rows and
one Gram matrix per key and fold); everything runs single-threaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from afprobe.errors import BadInput
from afprobe.probes.methods import DEFAULT_CS, DTYPE, DiffMeans, Probe, make_probe, single_thread
from afprobe.probes.metrics import auroc_ci_batch, bootstrap_weights, weighted_auroc
from afprobe.probes.splits import derive_seed, fold_ids, inner_fold_seed
from afprobe.probes.sweep import (_MEM_BUDGET, Key, _check_inputs, _chunk_size, _fit, _jsonable, _plan, _Plan,
                                  main_family_mask)

Tensor = torch.Tensor
Cell = tuple[Key, str]  # ((layer, site, position), method)
SELECTIONS = ("nested", "heldout_split")
# permutation AUROCs within _TIE of the observed one count as ties (float noise of batched fits; distinct
# AUROCs differ by at least 1 / (2 n1 n0), far more for any realistic number of rows)
_TIE = 1e-9
# seed streams (run_sweep uses 1-4)
_TAG_PERM, _TAG_RANDOM, _TAG_BOOT, _TAG_INNER, _TAG_SPLIT = 10, 11, 12, 13, 14


@dataclass
class ProbeSelection:
    """Selection-aware probe statistics; plain numbers (NaN where undefined). A cell is reported as
    {"layer", "site", "position", "method"}."""

    best_cell: dict  # argmax of the plain out-of-fold AUROC over the eligible cells (the cell to steer along)
    naive_auroc: float  # that plain AUROC: biased upward by the choice among n_cells cells
    auroc: float  # selection-aware AUROC (nested CV or held-out split), pooled over the scored main rows
    auroc_ci: list[float]  # [lo, hi] query-bootstrap percentile interval of `auroc`
    selection: str  # "nested" | "heldout_split"
    fold_choices: list[dict]  # per outer fold (one for heldout_split): the chosen cell + "selection_auroc"
    n_cells: int  # number of eligible cells
    selection_p: float  # max-statistic permutation p of naive_auroc: (1 + #{perm_max >= naive}) / (1 + n_perm)
    n_perm: int
    perm_max: np.ndarray  # [n_perm] best plain AUROC over the eligible cells under each permutation
    shuffled: dict  # best cell's plain AUROC under the same permutations: {"mean", "q95", "n", "p"}
    random: dict  # random unit directions at the best cell: {"median", "q05", "q95", "n"}; how diffuse the
    # cue's mean shift is (a shift spread over many dimensions moves random projections too), not a chance null
    controls: dict  # control family -> {"auroc", "ci"}: best cell trained on the main rows
    generalization: dict  # train family -> test family -> {"auroc", "ci"} at the best cell
    cells: list[dict] = field(default_factory=list)  # every eligible cell + its plain "auroc", tie-break order
    n: int = 0  # main rows scored for `auroc`

    def to_dict(self) -> dict:
        """Strict-JSON-ready dict (NaN -> None, arrays -> lists)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["perm_max"] = np.asarray(self.perm_max, dtype=np.float64).tolist()
        return _jsonable(out)


# ---------------------------------------------------------------------------------------------------
# permutations


def within_pair_permutations(labels: np.ndarray, groups: np.ndarray, families: np.ndarray, n_perm: int,
                             seed: int) -> np.ndarray:
    """[n_perm, n] label vectors that swap, independently for every complete pair and every permutation,
    the two labels of the pair with probability 1/2.

    labels: [n] in {0, 1}; groups: [n] query ids; families: [n] family names. A complete pair is the two
    rows of one (query id, family) with labels 1 and 0; rows of any other (query, family) keep their label.
    Under the null that the cue changes nothing, a query's two rows are exchangeable, so each of these
    label vectors is as likely as the observed one. Deterministic given `seed`.
    """
    labels, groups, families = _check_rows(labels, groups, families)
    if int(n_perm) != n_perm or n_perm < 0:
        raise BadInput(f"n_perm must be a non-negative integer, got {n_perm}")
    pos, neg = _pairs(labels, groups, families)
    swap = np.random.default_rng(derive_seed(seed, _TAG_PERM)).integers(0, 2, (int(n_perm), len(pos))).astype(bool)
    out = np.repeat(labels[None].astype(np.int64), int(n_perm), axis=0)
    out[:, pos] = np.where(swap, 0, 1)
    out[:, neg] = np.where(swap, 1, 0)
    return out


def _pairs(labels: np.ndarray, groups: np.ndarray, families: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices [P] of the label-1 and the label-0 row of each complete pair, in order of first row."""
    rows: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(groups.astype(str).tolist(), families.astype(str).tolist())):
        rows.setdefault(key, []).append(i)
    pos, neg = [], []
    for r in rows.values():
        if len(r) == 2 and labels[r[0]] != labels[r[1]]:
            i, j = r if labels[r[0]] == 1 else r[::-1]
            pos.append(i)
            neg.append(j)
    return np.asarray(pos, dtype=np.int64), np.asarray(neg, dtype=np.int64)


def _check_rows(labels: Any, groups: Any, families: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels, groups, families = np.asarray(labels), np.asarray(groups), np.asarray(families)
    n = len(labels)
    if labels.ndim != 1 or groups.shape != (n,) or families.shape != (n,):
        raise BadInput("labels, groups and families must be 1-d arrays with one entry per prompt")
    if not np.isin(labels, (0, 1)).all():
        raise BadInput("labels must be 0 (deployment) or 1 (training)")
    return labels.astype(np.int64), groups.astype(str), families.astype(str)


# ---------------------------------------------------------------------------------------------------
# the selection


def select_probe(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray, families: np.ndarray,
                 *, eligible: Sequence[Cell], control_families: Sequence[str] = (), methods: Sequence[str],
                 folds: int = 5, inner_folds: int = 3, selection: str = "nested", n_perm: int = 200,
                 n_random: int = 100, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                 cs: Sequence[float] = DEFAULT_CS, logreg_inner_folds: int = 3,
                 progress: Callable[[int], None] | None = None) -> ProbeSelection:
    """Choose the best eligible probe cell and report statistics that account for the choice.

    features: {(layer, site, position): [n, d] float}; labels: [n] 1 = training (by meaning); groups: [n]
    query ids; families: [n] cue family names. eligible: the cells ((layer, site, position), method) that
    may become best (the caller decides); every method must be in `methods` (probe methods built once:
    logreg with the relative C grid `cs` chosen by a `logreg_inner_folds`-fold inner CV, as run_sweep's
    `cs` and `inner_folds`).
    control_families: families that are controls because the caller says so; fitting uses the other
    ("main") rows only.

    Plain AUROC of a cell: `folds`-fold CV grouped by query on the main rows (run_sweep's folds for this
    seed); each held-out row is scored by its fold's direction minus the fold's midpoint threshold, and
    the scores are pooled into one AUROC. The best cell is the argmax over eligible cells (ties: earlier
    layer, then the order given); `naive_auroc` is its plain AUROC.

    selection="nested": in each outer fold, the cell with the best plain AUROC under an `inner_folds`-fold
    grouped CV over the outer-training queries is fitted on the outer-training main rows and scores the
    fold's held-out main rows. Folds may pick different cells with different residual scales, so each
    fold's scores are put on a common scale before pooling: (projection - midpoint threshold) / (half the
    training class separation), i.e. -1 at the training deployment mean and +1 at the training "training"
    mean. selection="heldout_split": the queries are split in half (seeded, grouped); the cell is chosen
    by a `folds`-fold CV on the first half's main rows, fitted on them and scored on the second half's.
    Either way one AUROC over the scored main rows with a query-bootstrap percentile interval.

    Max-statistic permutation test: the observed statistic is naive_auroc; for each of `n_perm`
    `within_pair_permutations(labels, groups, families, n_perm, seed)` the plain AUROC of every eligible
    cell is recomputed and the max taken (perm_max); selection_p = (1 + #{perm_max >= naive_auroc}) /
    (1 + n_perm). The shuffled-label control is the best cell's column of the same permutations.

    Random-direction baseline: `n_random` seeded random unit directions at the best cell, each oriented
    per fold on the fold's main training rows and scored out of fold like a probe. It measures how
    diffuse the cue's mean shift is (a random direction picks up a shift spread over many dimensions);
    it is not a chance null (the permutations are).

    progress(k), if given, is called with increments summing to n_cells * (n_perm + 2): one per cell and
    label set of the plain CV, one per cell for the selection CV. Cost: about n_perm + 5 plain CVs of every
    eligible cell (the permutations, the selection CV, the best cell's extras). Measured on 30 cells, 600
    rows, d 576 (CPU seconds, one thread): difference of means 2.7 in all with 200 permutations; per
    permutation LDA 2.1, logistic regression 5.5.
    Deterministic given `seed`; runs single-threaded (torch).
    """
    with single_thread():
        return _select(features, labels, groups, families, eligible=eligible, control_families=control_families,
                       methods=methods, folds=folds, inner_folds=inner_folds, selection=selection, n_perm=n_perm,
                       n_random=n_random, n_boot=n_boot, ci=ci, seed=seed, cs=cs,
                       logreg_inner_folds=logreg_inner_folds, progress=progress)


def _select(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray, families: np.ndarray, *,
            eligible: Sequence[Cell], control_families: Sequence[str], methods: Sequence[str], folds: int,
            inner_folds: int, selection: str, n_perm: int, n_random: int, n_boot: int, ci: float, seed: int,
            cs: Sequence[float], logreg_inner_folds: int,
            progress: Callable[[int], None] | None) -> ProbeSelection:
    labels, groups, families = _check_rows(labels, groups, families)
    cells = _check_args(features, labels, groups, families, eligible, methods, selection, folds, inner_folds,
                        logreg_inner_folds, n_perm, n_random, n_boot, ci)
    main = main_family_mask(families, control_families)
    if len(np.unique(labels[main])) < 2:
        raise BadInput("labels of the main cue families must contain both 0 and 1")
    if n_perm and not len(_pairs(labels[main], groups[main], families[main])[0]):
        raise BadInput("the permutation test needs main rows paired by query and family (one training and one "
                       "deployment row each); none are")
    ctx = _Ctx(features, cells, labels, groups, main, logreg_inner_folds, seed, progress,
               {m: make_probe(m, cs=tuple(cs), inner_folds=logreg_inner_folds, seed=seed) for m in methods})
    fid = fold_ids(groups, folds, seed)
    tr_fold = (fid[None, :] != np.arange(folds)[:, None]) & main  # [F, n]
    boot_seed = derive_seed(seed, _TAG_BOOT)

    # 1. plain out-of-fold AUROC of every cell under the true labels and each permutation
    ys = np.concatenate([labels[None], within_pair_permutations(labels, groups, families, n_perm, seed)])
    aucs, oof_true = ctx.plain_cv(tr_fold, fid, ys)  # [C, 1 + P], [C, n]
    observed = np.nan_to_num(aucs[:, 0], nan=-np.inf)
    best = int(np.argmax(observed))  # first maximum: cells are in tie-break order
    naive = float(aucs[best, 0])
    perm = aucs[:, 1:]
    perm_max = np.nanmax(perm, axis=0) if n_perm else np.zeros(0)
    shuf = perm[best]

    # 2. selection-aware AUROC
    if selection == "nested":  # outer sets: run_sweep's folds
        outer_test, k = fid[None, :] == np.arange(folds)[:, None], inner_folds
    else:  # one outer set: the first half of the queries trains, the second is scored
        outer_test, k = fold_ids(groups, 2, derive_seed(seed, _TAG_SPLIT))[None] == 1, folds
    outer_train = ~outer_test
    choices, sel_aucs = ctx.choose(outer_train & main, k)
    z = ctx.outer_scores(choices, outer_train & main, outer_test & main)
    scored = (outer_test & main).any(0)
    a, lo, hi = _with_ci(z[None], scored, labels, groups, n_boot, ci, boot_seed)

    # 3. controls and the generalisation matrix at the best cell
    X_best = np.asarray(features[cells[best][0]], dtype=np.float64)
    rnd = _random_baseline(X_best, labels, main, fid, folds, n_random, derive_seed(seed, _TAG_RANDOM, X_best.shape[1]))
    controls = {}
    for c in dict.fromkeys(families[~main].tolist()):
        ca, clo, chi = _with_ci(oof_true[best][None], families == c, labels, groups, n_boot, ci, boot_seed)
        controls[c] = {"auroc": float(ca[0]), "ci": [float(clo[0]), float(chi[0])]}
    gen = ctx.generalization(best, fid, folds, families, n_boot, ci, boot_seed)

    def q(v: np.ndarray, p: float) -> float:
        return float(np.quantile(v, p)) if len(v) else math.nan

    def cell_dict(i: int) -> dict:
        (layer, site, position), method = cells[i]
        return {"layer": int(layer), "site": site, "position": position, "method": method}

    return ProbeSelection(
        best_cell=cell_dict(best), naive_auroc=naive, auroc=float(a[0]), auroc_ci=[float(lo[0]), float(hi[0])],
        selection=selection,
        fold_choices=[{**cell_dict(c), "selection_auroc": float(sel_aucs[o, c])} for o, c in enumerate(choices)],
        n_cells=len(cells), selection_p=_perm_p(perm_max, naive), n_perm=int(n_perm), perm_max=perm_max,
        shuffled={"mean": float(shuf.mean()) if n_perm else math.nan, "q95": q(shuf, 0.95), "n": int(n_perm),
                  "p": _perm_p(shuf, naive)},
        random={"median": q(rnd, 0.5), "q05": q(rnd, 0.05), "q95": q(rnd, 0.95), "n": int(n_random)},
        controls=controls, generalization=gen,
        cells=[{**cell_dict(i), "auroc": float(aucs[i, 0])} for i in range(len(cells))], n=int(scored.sum()))


def _perm_p(null: np.ndarray, observed: float) -> float:
    """(1 + #{null >= observed}) / (1 + len(null)); NaN without draws."""
    if not len(null):
        return math.nan
    return float((1 + np.sum(null >= observed - _TIE)) / (1 + len(null)))


def _with_ci(scores: np.ndarray, rows: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_boot: int, ci: float,
             seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROC and query-bootstrap interval of scores [R, n] on the rows mask [n]; resamples the queries of
    those rows only. Returns (auroc [R], lo [R], hi [R])."""
    s = scores[:, rows]
    boot = bootstrap_weights(groups[rows], n_boot, seed) if n_boot > 0 else None
    return auroc_ci_batch(s, np.broadcast_to(labels[rows], s.shape), np.ones(s.shape), boot, ci,
                          n_units=len(np.unique(groups[rows])))


def _random_baseline(X: np.ndarray, labels: np.ndarray, main: np.ndarray, fid: np.ndarray, folds: int,
                     n_random: int, seed: int) -> np.ndarray:
    """Out-of-fold AUROCs [n_random] of seeded random unit directions on X [n, d] (main rows), each oriented
    per fold on the fold's main training rows and scored minus the fold's midpoint threshold."""
    g = np.random.default_rng(seed).normal(size=(int(n_random), X.shape[1]))
    P = X @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T  # [n, R]
    out = np.zeros_like(P)
    for f in range(folds):
        tr, te = main & (fid != f), fid == f
        m1, m0 = P[tr & (labels == 1)].mean(0), P[tr & (labels == 0)].mean(0)
        sign = np.where(m1 >= m0, 1.0, -1.0)
        out[te] = (P[te] - 0.5 * (m1 + m0)) * sign
    return weighted_auroc(out[main].T, labels[main])[:, 0] if n_random else np.zeros(0)


class _Ctx:
    """The data and probe objects shared by the stages; cells are fitted in batches of one method and width."""

    def __init__(self, features: dict[Key, np.ndarray], cells: list[Cell], labels: np.ndarray, groups: np.ndarray,
                 main: np.ndarray, logreg_inner_folds: int, seed: int, progress: Callable[[int], None] | None,
                 probes: dict[str, Probe]) -> None:
        self.features, self.cells, self.labels, self.groups, self.main = features, cells, labels, groups, main
        self.logreg_inner_folds, self.seed, self.progress, self.probes = logreg_inner_folds, seed, progress, probes
        self.batches: dict[tuple[str, int], list[int]] = {}  # (method, width) -> cell indices
        for i, (key, m) in enumerate(cells):
            self.batches.setdefault((m, int(np.shape(features[key])[1])), []).append(i)

    def _tick(self, k: int) -> None:
        if self.progress is not None:
            self.progress(int(k))

    def _chunks(self, plan: _Plan, ids: list[int], d: int):
        """Yield (cell indices, X [K, n, d] float64) in chunks sized by sweep's memory budget."""
        step = _chunk_size(len(ids), [tuple(plan.inner.shape)], d)
        for a in range(0, len(ids), step):
            part = ids[a: a + step]
            yield part, torch.as_tensor(np.stack([np.asarray(self.features[self.cells[i][0]], dtype=np.float64)
                                                  for i in part]))

    def _base_plan(self, train: np.ndarray, seeds: Sequence[int]) -> _Plan:
        """Plan of the training rows [F', n] (one per fold model) with the true labels; `seeds` (one per
        fold model) seed logreg's inner C-selection folds."""
        inner_k = self.logreg_inner_folds if "logreg" in self.probes else 0
        return _plan(train[:, None], self.labels[None], self.groups, inner_k, seeds)

    def plain_cv(self, tr_fold: np.ndarray, fid: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Plain out-of-fold AUROCs [C, S] on the main rows for label sets ys [S, n] (row 0: true labels),
        and the true-label out-of-fold scores [C, n] (every row, minus its fold's threshold)."""
        F, n = tr_fold.shape
        S, main = len(ys), self.main
        base = self._base_plan(tr_fold, [inner_fold_seed(self.seed, f) for f in range(F)])
        m = base.idx.shape[-1]
        aucs, oof_true = np.zeros((len(self.cells), S)), np.zeros((len(self.cells), n))
        for (method, d), ids in self.batches.items():
            probe = self.probes[method]
            for part, X in self._chunks(base, ids, d):
                K = len(part)
                per_set = 8 * K * F * (n + 3 * d + 2 * m)  # scores, directions, projections of the fold models
                if not isinstance(probe, DiffMeans):  # LDA's centred rows / logreg's Newton systems per set
                    per_set += 8 * (8 * m * d + 4 * m * m)
                step = max(1, _MEM_BUDGET // per_set)
                for s0 in range(0, S, step):
                    y = ys[s0: s0 + step]
                    oof = _gather(_scores(probe, X, _with_labels(base, y)), fid)  # [K, s, n]
                    r = oof[:, :, main].reshape(-1, int(main.sum()))
                    aucs[part, s0: s0 + len(y)] = weighted_auroc(
                        r, np.broadcast_to(y[:, main], (K, *y[:, main].shape)).reshape(r.shape)).reshape(K, -1)
                    if s0 == 0:
                        oof_true[part] = oof[:, 0]
                    self._tick(K * len(y))
        return aucs, oof_true

    def choose(self, rows: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
        """For each outer training set rows [O, n] (main rows), the cell with the best plain AUROC under a
        k-fold CV grouped by query over those rows. Returns (chosen cell per outer set, AUROCs [O, C])."""
        O, n = rows.shape
        ifold = np.full((O, n), -1)
        for o in range(O):
            ifold[o, rows[o]] = fold_ids(self.groups[rows[o]], k, derive_seed(self.seed, _TAG_INNER, o))
        train = np.stack([rows[o] & (ifold[o] != j) for o in range(O) for j in range(k)])
        base = self._base_plan(train, [derive_seed(self.seed, _TAG_INNER, o, j) for o in range(O) for j in range(k)])
        src = torch.as_tensor(np.where(rows, np.arange(O)[:, None] * k + ifold, 0))  # [O, n] fold model of a row
        aucs = np.zeros((O, len(self.cells)))
        for (method, d), ids in self.batches.items():
            for part, X in self._chunks(base, ids, d):
                s = _scores(self.probes[method], X, base)[:, :, 0]  # [K, O*k, n]
                held = s.gather(1, src[None].expand(len(part), O, n)).reshape(-1, n)  # [K*O, n]
                w = np.broadcast_to(rows, (len(part), O, n)).reshape(-1, 1, n)
                aucs[:, part] = weighted_auroc(held.numpy(), self.labels, w)[:, 0].reshape(len(part), O).T
                self._tick(len(part))
        return [int(np.argmax(np.nan_to_num(a, nan=-np.inf))) for a in aucs], aucs

    def outer_scores(self, choices: list[int], train: np.ndarray, test: np.ndarray) -> np.ndarray:
        """[n] scores of the test rows test [O, n], each by its outer set's chosen cell fitted on train [O, n],
        on the common scale (projection - threshold) / (separation / 2); 0 elsewhere."""
        z = np.zeros(train.shape[1])
        for c in dict.fromkeys(choices):
            os_ = [o for o, ch in enumerate(choices) if ch == c]
            base = self._base_plan(train[os_], [inner_fold_seed(self.seed, o) for o in os_])
            key, method = self.cells[c]
            X = torch.as_tensor(np.asarray(self.features[key], dtype=np.float64))[None]
            u, sep, thr = _fit(self.probes[method], X, base)  # [1, O', 1, d], [1, O', 1]
            for j, o in enumerate(os_):
                proj = X[0, torch.as_tensor(test[o])] @ u[0, j, 0]
                z[test[o]] = ((proj - thr[0, j, 0]) / (sep[0, j, 0] / 2).clamp_min(1e-300)).numpy()
        return z

    def generalization(self, best: int, fid: np.ndarray, folds: int, families: np.ndarray, n_boot: int, ci: float,
                       boot_seed: int) -> dict:
        """Best cell trained on each family alone (grouped CV), tested on each family: {a: {b: {auroc, ci}}}."""
        fams = list(dict.fromkeys(families.tolist()))
        train = np.stack([(fid != f) & (families == a) for a in fams for f in range(folds)])  # [A*F, n]
        base = self._base_plan(train, [inner_fold_seed(self.seed, f) for _ in fams for f in range(folds)])
        key, method = self.cells[best]
        X = torch.as_tensor(np.asarray(self.features[key], dtype=np.float64))[None]
        s = _scores(self.probes[method], X, base)[0, :, 0]  # [A*F, n]
        src = torch.as_tensor(np.arange(len(fams))[:, None] * folds + fid[None, :])  # [A, n]
        oof = s.gather(0, src).numpy()  # [A, n] out-of-fold scores of each train family
        gen: dict[str, dict] = {a: {} for a in fams}
        for b in fams:
            a_, lo, hi = _with_ci(oof, families == b, self.labels, self.groups, n_boot, ci, boot_seed)
            for i, a in enumerate(fams):
                gen[a][b] = {"auroc": float(a_[i]), "ci": [float(lo[i]), float(hi[i])]}
        return gen


def _with_labels(plan: _Plan, ys: np.ndarray) -> _Plan:
    """The plan's training rows with label sets ys [S, n]: y [F', S, m]; rows are gathered once for all sets."""
    idx = plan.idx[:, 0].numpy()  # [F', m]
    return plan._replace(y=torch.as_tensor(np.ascontiguousarray(ys[:, idx].transpose(1, 0, 2)), dtype=DTYPE))


def _scores(probe: Probe, X: Tensor, plan: _Plan) -> Tensor:
    """Every row [K, n] scored by every fold model and label set: projection minus the fold's midpoint
    threshold, [K, F', S, n]."""
    u, _, thr = _fit(probe, X, plan)
    return torch.einsum("knd,kfsd->kfsn", X, u) - thr.unsqueeze(-1)


def _gather(scores: Tensor, fid: np.ndarray) -> np.ndarray:
    """Out-of-fold scores [K, S, n] from scores [K, F, S, n]: row i from fold model fid[i]."""
    K, _, S, n = scores.shape
    return scores.gather(1, torch.as_tensor(fid)[None, None, None].expand(K, 1, S, n)).squeeze(1).numpy()


def _check_args(features: dict[Key, np.ndarray], labels: np.ndarray, groups: np.ndarray, families: np.ndarray,
                eligible: Sequence[Cell], methods: Sequence[str], selection: str, folds: int, inner_folds: int,
                logreg_inner_folds: int, n_perm: int, n_random: int, n_boot: int, ci: float) -> list[Cell]:
    """Validate; return the eligible cells in tie-break order (by layer, then as given)."""
    if selection not in SELECTIONS:
        raise BadInput(f"selection must be one of {SELECTIONS}, got {selection!r}")
    for name, v in (("n_perm", n_perm), ("n_random", n_random), ("n_boot", n_boot)):
        if int(v) != v or v < 0:
            raise BadInput(f"{name} must be a non-negative integer, got {v}")
    if not 0 < ci < 1:
        raise BadInput(f"ci must be in (0, 1), got {ci}")
    for name, v in (("folds", folds), ("inner_folds", inner_folds), ("logreg_inner_folds", logreg_inner_folds)):
        if int(v) != v or v < 2:
            raise BadInput(f"{name} must be an integer >= 2, got {v}")
    cells: list[Cell] = []
    for c in eligible:
        if not (isinstance(c, (tuple, list)) and len(c) == 2 and isinstance(c[0], tuple)):
            raise BadInput(f"eligible cell {c!r} is not ((layer, site, position), method)")
        if c[0] not in features:
            raise BadInput(f"eligible cell {c!r}: no features for key {c[0]!r}")
        if c[1] not in methods:
            raise BadInput(f"eligible cell {c!r}: method {c[1]!r} is not in methods {list(methods)}")
        cells.append((c[0], c[1]))
    if not cells:
        raise BadInput("no eligible cells to select from")
    if len(set(cells)) < len(cells):
        raise BadInput("eligible cells must not repeat")
    _check_inputs({k: features[k] for k, _ in cells}, labels, groups, families, methods, "best")
    order = sorted(range(len(cells)), key=lambda i: int(cells[i][0][0]))  # stable: ties keep the given order
    return [cells[i] for i in order]
