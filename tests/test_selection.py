"""Selection-aware probe statistics (afprobe.probes.selection): arrays only, no model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from afprobe.errors import BadInput
from afprobe.probes.bench import synthetic_features
from afprobe.probes.methods import DiffMeans
from afprobe.probes.selection import select_probe, within_pair_permutations
from afprobe.probes.sweep import ALL, run_sweep

SITE = "resid_post"
FAMS = ("tier_tag", "explicit", "swapped_tier")
CONTROL = ("swapped_tier",)


def _data(seed: int, *, n_layers: int = 30, n_queries: int = 100, d: int = 64, planted: dict[int, float] | None = None,
          families: tuple[str, ...] = FAMS, flipped: tuple[str, ...] = ()):
    """synthetic_features without its own signal (pure noise: query, family and anisotropic structure only),
    plus label_sign * strength * u at the layers in `planted` ({layer: strength}); `flipped` families
    carry the shift with the opposite sign. u = data.direction (orthogonal to the structured noise)."""
    data = synthetic_features(n_queries, n_layers, d, 0, seed=seed, positions=("last",), families=families,
                              signal=0.0)
    sign = (data.labels - 0.5) * np.where(np.isin(data.families, flipped), -1.0, 1.0)
    for layer, strength in (planted or {}).items():
        key = (layer, SITE, "last")
        data.features[key] = (data.features[key] + np.outer(sign * strength, data.direction)).astype(np.float32)
    return data


def _cells(layers, method: str = "diff_means") -> list:
    return [((layer, SITE, "last"), method) for layer in layers]


def _select(data, eligible, **kw):
    kw = {"control_families": CONTROL, "methods": ("diff_means",), **kw}
    return select_probe(data.features, data.labels, data.groups, data.families, eligible=eligible, **kw)


# ------------------------------------------------------------------------------------------ noise


def test_pure_noise_is_not_significant_after_selection():
    """30 layers of pure noise, 29 eligible cells: the naive best AUROC is biased upward, the max-statistic
    p-value and the nested interval are not."""
    ps, covers, naive, nested = [], [], [], []
    for seed in range(20):
        res = _select(_data(seed), _cells(range(1, 30)), n_perm=200, n_random=20, n_boot=200, seed=seed)
        assert res.n_cells == 29 and res.n_perm == 200 and len(res.perm_max) == 200
        ps.append(res.selection_p)
        covers.append(res.auroc_ci[0] <= 0.5 <= res.auroc_ci[1])
        naive.append(res.naive_auroc)
        nested.append(res.auroc)
    assert sum(p >= 0.05 for p in ps) >= 19, ps
    assert sum(covers) >= 15, covers
    assert np.mean(naive) > np.mean(nested) + 0.02, (naive, nested)  # the selection bias the p-value accounts for


# ---------------------------------------------------------------------------------------- planted


def test_planted_direction_is_found_and_significant():
    planted = {11: 5.0, 12: 5.0, 13: 5.0}
    data = _data(100, planted=planted)
    res = _select(data, _cells(range(1, 30)), n_perm=200, n_random=50, n_boot=300)
    assert res.selection_p < 0.05 and res.shuffled["p"] < 0.05
    assert res.best_cell["layer"] in planted
    assert res.auroc_ci[0] > 0.9 and res.naive_auroc > 0.9
    assert {c["layer"] for c in res.fold_choices} <= set(planted)
    main = ~np.isin(data.families, CONTROL)
    X = data.features[(res.best_cell["layer"], SITE, "last")][main]
    u = DiffMeans().fit(X, data.labels[main]).direction_
    assert float(u @ data.direction) >= 0.95  # both unit vectors


def test_heldout_split_on_planted_signal():
    data = _data(7, n_layers=6, planted={3: 4.0})
    res = _select(data, _cells(range(6)), selection="heldout_split", n_perm=20, n_random=10, n_boot=200)
    assert res.selection == "heldout_split" and len(res.fold_choices) == 1
    assert res.fold_choices[0]["layer"] == 3 and res.best_cell["layer"] == 3
    assert res.auroc_ci[0] <= res.auroc <= res.auroc_ci[1] and res.auroc_ci[0] > 0.8
    n_main = int((~np.isin(data.families, CONTROL)).sum())
    assert 0.3 * n_main <= res.n <= 0.7 * n_main  # the second half's main rows only


# ----------------------------------------------------------------------------------- permutations


def test_within_pair_permutations():
    # 6 queries x 2 families of (training, deployment) pairs; then an unpaired row and a 3-row (query, family)
    labels = np.concatenate([np.tile([1, 0], 12), [1, 1, 0, 1]])
    groups = np.concatenate([np.repeat(np.arange(6), 4), [6, 7, 7, 7]]).astype(str)
    families = np.concatenate([np.tile(np.repeat(["a", "b"], 2), 6), ["a"] * 4])
    perms = within_pair_permutations(labels, groups, families, 500, seed=3)
    assert perms.shape == (500, len(labels))
    pairs = perms[:, :24].reshape(500, 12, 2)
    assert np.array_equal(np.sort(pairs, axis=-1), np.broadcast_to([0, 1], pairs.shape))  # each pair keeps {0, 1}
    assert (perms[:, 24:] == labels[24:]).all()  # rows not in a complete pair keep their label
    assert 0.4 < (pairs[..., 0] == 0).mean() < 0.6  # swapped with probability 1/2
    assert len({tuple(p) for p in perms[:, :24]}) > 400  # independent per pair
    assert np.array_equal(perms, within_pair_permutations(labels, groups, families, 500, seed=3))
    assert not np.array_equal(perms, within_pair_permutations(labels, groups, families, 500, seed=4))
    assert within_pair_permutations(labels, groups, families, 0, seed=0).shape == (0, len(labels))
    with pytest.raises(BadInput):
        within_pair_permutations(labels + 1, groups, families, 5, seed=0)


def test_max_statistic_equals_brute_force():
    """perm_max and selection_p equal a loop that reruns run_sweep once per permutation (every method)."""
    data = _data(5, n_layers=3, n_queries=12, d=8, planted={1: 1.0})
    methods = ("diff_means", "lda", "logreg")
    eligible = [((layer, SITE, "last"), m) for layer in range(3) for m in methods]
    kw = dict(methods=methods, folds=3, seed=2)
    # the selection's inner folds (2) are not logreg's C-selection folds (3, as run_sweep's inner_folds)
    res = _select(data, eligible, n_perm=12, n_random=5, n_boot=50, inner_folds=2, **kw)
    perms = within_pair_permutations(data.labels, data.groups, data.families, 12, seed=2)

    def best(y: np.ndarray) -> float:
        sweep = run_sweep(data.features, y, data.groups, data.families, n_boot=0, control_families=CONTROL,
                          refit="best", **kw)
        return max(r["auroc"] for r in sweep.rows if r["train_family"] == ALL and r["test_family"] == ALL)

    brute = np.array([best(y) for y in perms])
    assert np.allclose(res.perm_max, brute, atol=1e-9, rtol=0)
    observed = best(data.labels)
    assert res.naive_auroc == pytest.approx(observed, abs=1e-9)
    assert res.selection_p == pytest.approx((1 + np.sum(brute >= observed)) / 13)


def test_progress_and_determinism():
    data = _data(1, n_layers=4)
    ticks: list[int] = []
    a = _select(data, _cells(range(4)), n_perm=30, n_random=10, n_boot=50, progress=ticks.append)
    assert sum(ticks) == 4 * (30 + 2)
    b = _select(data, _cells(range(4)), n_perm=30, n_random=10, n_boot=50)
    assert json.dumps(a.to_dict(), allow_nan=False) == json.dumps(b.to_dict(), allow_nan=False)


# ------------------------------------------------------------------------------- selection stage


@pytest.mark.parametrize("selection", ["nested", "heldout_split"])
def test_choices_come_from_eligible_cells_only(selection):
    """The strongest signal sits in a cell that is not eligible; every fold still chooses an eligible cell."""
    data = _data(2, n_layers=4, planted={0: 6.0, 2: 1.0})
    eligible = [((3, SITE, "last"), "diff_means"), ((2, SITE, "last"), "lda"), ((1, SITE, "last"), "diff_means")]
    res = _select(data, eligible, methods=("diff_means", "lda"), selection=selection, folds=4, n_perm=10,
                  n_random=5, n_boot=50)
    allowed = {(c[0][0], c[1]) for c in eligible}
    assert len(res.fold_choices) == (4 if selection == "nested" else 1)
    assert {(c["layer"], c["method"]) for c in res.fold_choices} <= allowed
    assert (res.best_cell["layer"], res.best_cell["method"]) == (2, "lda")
    assert [c["layer"] for c in res.cells] == [1, 2, 3]  # tie-break order: by layer


# ----------------------------------------------------------------------------------------- controls


def test_random_direction_distribution_on_noise():
    res = _select(_data(3, n_layers=3), _cells(range(3)), n_perm=10, n_random=37, n_boot=50)
    rnd = res.random
    assert rnd["n"] == 37
    assert rnd["q05"] <= rnd["median"] <= rnd["q95"]
    assert abs(rnd["median"] - 0.5) < 0.05


def test_control_families_are_not_fitted_and_are_scored():
    data = _data(4, n_layers=5, planted={2: 2.0}, flipped=CONTROL)
    kw = dict(n_perm=30, n_random=10, n_boot=200)
    res = _select(data, _cells(range(5)), **kw)
    ctrl = data.families == "swapped_tier"
    scrambled = {k: v.copy() for k, v in data.features.items()}
    rng = np.random.default_rng(0)
    for v in scrambled.values():
        v[ctrl] = rng.normal(size=v[ctrl].shape) * 10
    res2 = select_probe(scrambled, data.labels, data.groups, data.families, eligible=_cells(range(5)),
                        control_families=CONTROL, methods=("diff_means",), **kw)
    for f in ("best_cell", "naive_auroc", "auroc", "auroc_ci", "fold_choices", "selection_p", "shuffled", "cells"):
        assert getattr(res, f) == getattr(res2, f), f  # nothing fitted or scored on the main rows changed
    assert np.array_equal(res.perm_max, res2.perm_max)
    assert set(res.controls) == {"swapped_tier"}
    a, (lo, hi) = res.controls["swapped_tier"]["auroc"], res.controls["swapped_tier"]["ci"]
    assert lo <= a <= hi and hi < 0.5  # the flipped family: main-trained direction reverses there
    assert res.controls != res2.controls
    none = _select(data, _cells(range(5)), control_families=(), **kw)
    assert none.controls == {}
    with pytest.raises(BadInput, match="do not occur"):
        _select(data, _cells(range(5)), control_families=("nope",), **kw)


def test_generalization_matrix_has_intervals():
    data = _data(6, n_layers=3, planted={1: 3.0})
    res = _select(data, _cells(range(3)), n_perm=10, n_random=5, n_boot=200)
    gen = res.generalization
    assert set(gen) == set(FAMS) and all(set(row) == set(FAMS) for row in gen.values())
    for row in gen.values():
        for cell in row.values():
            lo, hi = cell["ci"]
            assert lo <= cell["auroc"] <= hi and hi > lo
    assert gen["tier_tag"]["explicit"]["ci"][0] > 0.6 and gen["explicit"]["tier_tag"]["ci"][0] > 0.6


# ------------------------------------------------------------------------------------------- errors


def test_select_probe_input_errors():
    data = _data(0, n_layers=2, n_queries=10, d=8)
    ok = _cells(range(2))
    bad = [dict(eligible=[]), dict(eligible=ok + ok[:1]), dict(eligible=_cells([5])),
           dict(eligible=_cells(range(2), "lda")), dict(eligible=[(0, "diff_means")]),
           dict(eligible=ok, selection="best"), dict(eligible=ok, n_perm=-1), dict(eligible=ok, ci=1.5),
           dict(eligible=ok, methods=("nope",)), dict(eligible=ok, inner_folds=1),
           dict(eligible=ok, logreg_inner_folds=1.5)]
    for kw in bad:
        with pytest.raises(BadInput):
            _select(data, **kw)
    unpaired = np.repeat(np.arange(10) % 2, 2 * len(FAMS))  # each (query, family): two rows, one label
    with pytest.raises(BadInput, match="paired"):
        select_probe(data.features, unpaired, data.groups, data.families, eligible=ok, methods=("diff_means",))
