"""Acceptance tests for afprobe.probes (arrays only, no model)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from afprobe.errors import BadInput
from afprobe.probes.bench import bench_sweep, synthetic_features
from afprobe.probes.directions import load_direction, save_direction
from afprobe.probes.methods import LDA, METHODS, DiffMeans, LogisticCV
from afprobe.probes.metrics import auroc, auroc_ci, bootstrap_weights, weighted_auroc, widen_degenerate
from afprobe.probes.splits import fold_ids
from afprobe.probes.sweep import ROW_FIELDS, main_family_mask, run_sweep


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_recover_planted_direction(name):
    data = synthetic_features(300, 1, 16, 0, seed=1, positions=("last",), signal=3.0)
    X, y, g = data.features[(0, "resid_post", "last")], data.labels, data.groups
    train = np.isin(g, np.unique(g)[:200])
    probe = METHODS[name]().fit(X[train], y[train], groups=g[train])
    assert probe.direction_.shape == (16,)
    assert np.linalg.norm(probe.direction_) == pytest.approx(1.0)
    assert _cos(probe.direction_, data.direction) >= 0.95  # oriented: class 1 projects higher
    assert probe.separation_ > 0
    proj = X[train] @ probe.direction_
    assert probe.separation_ == pytest.approx(proj[y[train] == 1].mean() - proj[y[train] == 0].mean())
    assert probe.score(X[~train], y[~train]) > 0.95
    assert set(np.unique(probe.predict(X[~train]))) <= {0, 1}


def test_methods_match_sklearn_directions():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 120)) @ rng.normal(size=(120, 120)) * 0.2 + 5.0  # d > n: Woodbury path
    y = np.repeat([0, 1], 40)
    X[y == 1, :3] += 1.0
    with threadpool_limits(limits=1):  # threaded BLAS is very slow on a busy machine
        ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(X, y).coef_[0]
    assert _cos(LDA().fit(X, y).direction_, ref) > 0.999999
    dm = X[y == 1].mean(0) - X[y == 0].mean(0)
    assert _cos(DiffMeans().fit(X, y).direction_, dm) > 0.999999


def test_method_input_errors():
    with pytest.raises(BadInput):
        DiffMeans().fit(np.zeros((4, 2)), np.array([0, 0, 0, 0]))
    with pytest.raises(BadInput):
        DiffMeans().fit(np.zeros((4, 2)), np.array([0, 1, 2, 1]))
    with pytest.raises(BadInput):
        LogisticCV().decision_function(np.zeros((2, 2)))
    with pytest.raises(BadInput):
        LogisticCV(cs=())


# ---------------------------------------------------------------------------------------- splits


def test_grouped_folds_keep_queries_together():
    groups = np.repeat([f"q{i}" for i in range(23)], 2)
    fid = fold_ids(groups, 5, seed=3)
    assert sorted(set(fid.tolist())) == list(range(5))  # each row held out exactly once
    for f in range(5):
        assert not set(groups[fid == f]) & set(groups[fid != f])
        assert abs((fid == f).sum() - 46 / 5) <= 2
    assert np.array_equal(fold_ids(groups, 5, 3), fold_ids(groups, 5, 3))
    assert not np.array_equal(fold_ids(groups, 5, 3), fold_ids(groups, 5, 4))
    with pytest.raises(BadInput):
        fold_ids(groups, 24, seed=0)


def test_grouped_split_defeats_query_memorisation():
    """Label decided by the query alone (4 rows per query share it and a query-specific offset): an
    ungrouped split scores well by recognising queries, the grouped split is at chance."""
    rng = np.random.default_rng(0)
    nq, reps, d = 60, 4, 96
    q_label = rng.permutation(np.repeat([0, 1], nq // 2))
    offsets = rng.normal(size=(nq, d)) * 3.0
    qid = np.repeat(np.arange(nq), reps)
    X = offsets[qid] + rng.normal(size=(nq * reps, d)) * 0.5
    y = q_label[qid]
    feats = {(0, "resid_post", "last"): X.astype(np.float32)}
    fam = np.full(len(y), "tier")
    kw = dict(methods=("lda", "logreg"), folds=5, n_boot=0, seed=0, refit="best")
    grouped = run_sweep(feats, y, qid.astype(str), fam, **kw)
    ungrouped = run_sweep(feats, y, np.arange(len(y)).astype(str), fam, **kw)
    for res, lo, hi in ((grouped, 0.3, 0.7), (ungrouped, 0.9, 1.0)):
        for r in res.rows:
            if r["train_family"] == "all":
                assert lo <= r["auroc"] <= hi, (r["method"], r["auroc"])


# --------------------------------------------------------------------------------------- metrics


def test_auroc_ties_and_weights_match_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, 60).astype(float)  # many ties
    y = rng.integers(0, 2, 60)
    w = rng.integers(0, 3, 60).astype(float)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert weighted_auroc(s[None], y, w[None])[0, 0] == pytest.approx(roc_auc_score(y, s, sample_weight=w))
    assert math.isnan(auroc(s, np.zeros(60)))


def test_bootstrap_resamples_queries():
    groups = np.repeat(np.arange(30), 2)
    w = bootstrap_weights(groups, 50, seed=0)
    assert w.shape == (50, 60)
    assert np.array_equal(w[:, 0::2], w[:, 1::2])  # both rows of a query share its draw count
    assert np.allclose(w.sum(1), 60)
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 30)
    s = y + rng.normal(size=60)
    a, lo, hi = auroc_ci(s, y, groups, n_boot=300, ci=0.9, seed=0)
    assert lo <= a <= hi and hi - lo > 0.02
    assert (a, lo, hi) == auroc_ci(s, y, groups, n_boot=300, ci=0.9, seed=0)


def test_perfect_separation_interval_is_a_score_interval_not_zero_width():
    """Every resample of a perfectly separated sample gives AUROC 1; the interval is then Wilson's over queries."""
    groups = np.repeat(np.arange(40), 2)
    y = np.tile([0, 1], 40)
    a, lo, hi = auroc_ci(y.astype(float), y, groups, n_boot=200, seed=0)
    z2 = 1.959963984540054 ** 2
    assert a == 1.0 and hi == 1.0 and lo == pytest.approx(40 / (40 + z2))
    a, lo, hi = auroc_ci(-y.astype(float), y, groups, n_boot=200, seed=0)
    assert a == 0.0 and lo == 0.0 and hi == pytest.approx(z2 / (40 + z2))
    # a non-degenerate interval is left as the bootstrap gave it
    w_lo, w_hi = widen_degenerate(0.7, 0.6, 0.8, 40)
    assert (float(w_lo), float(w_hi)) == (0.6, 0.8)
    # bounds other than [0, 1]: an effect difference of +1 on [-2, 2] from 8 queries
    w_lo, w_hi = widen_degenerate(1.0, 1.0, 1.0, 8, bounds=(-2.0, 2.0))
    eps = z2 / (8 + z2)
    assert (float(w_lo), float(w_hi)) == pytest.approx((1.0 - 3.0 * eps, 1.0 + eps))


# ----------------------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def small_sweep():
    data = synthetic_features(100, 3, 384, 1, seed=2, positions=("last", "cue"), signal=2.0)
    res = run_sweep(data.features, data.labels, data.groups, data.families, folds=4, n_boot=200, seed=0)
    return data, res


def test_sweep_finds_signal_with_controls_at_chance(small_sweep):
    data, res = small_sweep
    best = res.best
    assert (best["layer"], best["position"]) == (1, "last")
    assert best["auroc"] > 0.95
    lo, hi = best["auroc_ci"]
    assert lo <= best["auroc"] <= hi
    assert 0.3 <= res.controls["shuffled_auroc"] <= 0.7
    assert 0.3 <= res.controls["random_auroc"] <= 0.7
    main = [r for r in res.rows if r["train_family"] == "all"]
    assert len(main) == 3 * 2 * 3  # layers x positions x methods
    assert {r["n"] for r in main} == {200}
    for r in main:
        if r["layer"] != 1:  # signal falls off away from the planted layer, position "last" is strongest
            assert r["auroc"] < best["auroc"]
        assert 0.25 <= r["shuffled_auroc"] <= 0.75
    # final directions: the best one and one per layer at the best site/position
    u, sep = res.directions[(1, "resid_post", "last", best["method"])]
    assert _cos(u, data.direction) > 0.6 and sep > 0  # d = 384 > n = 200: a noisy but clear estimate
    assert {k[0] for k in res.directions} == {0, 1, 2}
    assert res.generalization == {"tier": {"tier": best["auroc"]}} and res.controls_by_family == {}


def test_sweep_is_deterministic_and_its_rows_fit_the_metrics_schema(tmp_path):
    from afprobe.analysis.schema import MetricsRow, csv_text, read_rows

    data = synthetic_features(20, 2, 16, 1, seed=5, positions=("last",))
    kw = dict(folds=3, n_boot=50, seed=7)
    a = run_sweep(data.features, data.labels, data.groups, data.families, **kw)
    b = run_sweep(data.features, data.labels, data.groups, data.families, **kw)
    assert a.rows == b.rows
    path = tmp_path / "metrics.csv"
    path.write_text(csv_text([MetricsRow(**r) for r in a.rows], MetricsRow))
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(ROW_FIELDS) and len(lines) == 1 + len(a.rows)
    assert [r.model_dump() for r in read_rows(path, MetricsRow)] == [MetricsRow(**r).model_dump() for r in a.rows]


@pytest.mark.parametrize("flipped", [(), ("swapped_tier",)])
def test_generalisation_matrix_and_control_family(flipped):
    fams = ("tier", "explicit", "swapped_tier")
    data = synthetic_features(40, 1, 24, 0, seed=3, positions=("last",), families=fams, flipped=flipped,
                              signal=2.0)
    res = run_sweep(data.features, data.labels, data.groups, data.families, methods=("diff_means", "lda"),
                    folds=4, n_boot=100, seed=0, control_families=("swapped_tier",))
    gen = res.generalization
    assert set(gen) == set(fams) and all(set(row) == set(fams) for row in gen.values())
    assert gen["tier"]["explicit"] > 0.9 and gen["explicit"]["tier"] > 0.9
    ctrl = res.controls_by_family
    assert set(ctrl) == {"swapped_tier"}
    a, (lo, hi) = ctrl["swapped_tier"]["auroc"], ctrl["swapped_tier"]["auroc_ci"]
    assert lo <= a <= hi
    if flipped:  # a tag-token detector: the main-trained direction flips on the control family
        assert hi < 0.5
        assert gen["tier"]["swapped_tier"] < 0.2 and gen["swapped_tier"]["swapped_tier"] > 0.9
    else:
        assert lo > 0.5
    # main pooled result excludes the swapped family
    main = next(r for r in res.rows if r["train_family"] == "all" and r["test_family"] == "all")
    assert main["n"] == 40 * 2 * 2


def test_control_families_are_named_by_the_caller():
    fams = np.array(["tier", "tier", "swapped_tier", "swapped_tier"])
    assert main_family_mask(fams).all()  # no control unless named, whatever the family is called
    assert main_family_mask(fams, ["swapped_tier"]).tolist() == [True, True, False, False]
    assert main_family_mask(fams, ["tier"]).tolist() == [False, False, True, True]
    with pytest.raises(BadInput, match="do not occur"):
        main_family_mask(fams, ["explicit"])
    with pytest.raises(BadInput, match="every cue family"):
        main_family_mask(fams, ["tier", "swapped_tier"])


def test_sweep_input_errors():
    data = synthetic_features(10, 1, 8, 0, seed=0, positions=("last",))
    args = (data.features, data.labels, data.groups, data.families)
    with pytest.raises(BadInput):
        run_sweep(*args, methods=("nope",))
    with pytest.raises(BadInput):
        run_sweep(*args, folds=11)
    with pytest.raises(BadInput):
        run_sweep({(0, "resid_post", "last"): np.zeros((3, 8))}, *args[1:])


# ------------------------------------------------------------------------------------ directions


def test_direction_round_trip(tmp_path):
    vec = np.random.default_rng(0).normal(size=32)
    meta = {"model": "abc123", "layer": 7, "site": "resid_post", "position": "last", "method": "lda",
            "separation": 1.25, "config_hash": "deadbeef", "extra": {"a": [1, 2]}}
    path = tmp_path / "layer7.safetensors"
    save_direction(path, vec, meta)
    got, got_meta = load_direction(path)
    assert got.dtype == np.float32 and np.allclose(got, vec, atol=1e-6)
    assert got_meta == meta


def test_direction_bad_files(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(BadInput, match="missing.safetensors"):
        load_direction(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(BadInput, match="corrupt.safetensors"):
        load_direction(corrupt)
    truncated = tmp_path / "trunc.safetensors"
    save_direction(truncated, np.ones(8), {})
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(BadInput, match="trunc.safetensors"):
        load_direction(truncated)
    with pytest.raises(BadInput):
        save_direction(tmp_path / "../x y.safetensors", np.ones(3), {})
    with pytest.raises(BadInput):
        save_direction(tmp_path / "nan.safetensors", np.array([np.nan, 1.0]), {})


# ----------------------------------------------------------------------------------------- bench


@pytest.mark.parametrize("families", [("tier",), ("tier_tag", "explicit", "swapped_tier")])
def test_bench_sweep_agrees_with_sklearn(families):
    data = synthetic_features(20, 2, 12, 1, seed=4, positions=("last",), signal=1.0, families=families,
                              flipped=("swapped_tier",))
    controls = [f for f in families if f == "swapped_tier"]
    out = bench_sweep(data.features, data.labels, data.groups, data.families, folds=3, seed=0,
                      control_families=controls)
    assert set(out) == {"sweep_s", "sklearn_loop_s", "sweep_speedup", "max_auroc_diff"}
    assert out["max_auroc_diff"] <= 0.01
    assert out["sweep_s"] > 0 and out["sklearn_loop_s"] > 0
