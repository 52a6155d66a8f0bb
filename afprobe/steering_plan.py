"""The steering plan: decided once, read by the steer stage and the results tables.

It says which queries are steered and reported, where each steering direction comes from (fitted on other,
held-out queries, or taken from the probe stage), alpha's unit, and the conditions to run: the probe
direction at every alpha and mode, `steering.n_random` random orthogonal directions at the control alphas,
ablation, and the unsteered alpha-0 pass, which is run once and shared by every direction and mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from afprobe.config import REFUSAL_DIRECTIONS, Config
from afprobe.errors import BadInput

MIN_FIT_QUERIES = 20  # held-out selection needs at least this many queries to fit the direction on
Selection = Literal["heldout", "in_sample"]


@dataclass
class PlannedDirection:
    """A unit direction [d] in the residual basis, pointing toward "training", and alpha's unit."""

    unit: np.ndarray
    layer: int
    site: str
    position: str
    method: str
    separation: float  # class-mean separation along `unit` on the steering family at `position`
    separation_steered: Optional[float]  # the same at the steered user-turn tokens (reference only)
    source: str
    fit_queries: int
    kind: str = "best"  # steering.direction: which direction `unit` is (see `refusal_variant`)


@dataclass
class SteeringPlan:
    selection: Selection
    selection_note: str
    fit_queries: list[str]
    report_queries: list[str]
    directions: list[PlannedDirection]
    specs: list[Any] = field(default_factory=list)  # SteeringSpec, alpha 0 (unsteered) once

    def baseline_copies(self, cfg: Config) -> list[tuple[str, int, str]]:
        """(direction, replicate, mode) sweeps whose alpha-0 point is the shared unsteered pass."""
        randoms = [("random", k) for k in range(cfg.steering.n_random)] if "random" in cfg.steering.controls else []
        return [(d, k, m) for d, k in [("probe", 0), *randoms] for m in cfg.steering.modes
                if (d, m) != ("probe", "same")]


def steering_split(cfg: Config, query_ids: list[str]) -> tuple[Selection, list[str], list[str], str]:
    """(selection, queries to fit the direction on, queries steered and reported, a note).

    The steered queries are the first `steering.n_queries` of the cache (half of them when unset and the
    selection is held out). Held out: the direction is fitted on the remaining queries, which must be at least
    MIN_FIT_QUERIES. `auto` picks held out whenever that is possible."""
    ids = list(dict.fromkeys(query_ids))
    st = cfg.steering
    want = st.n_queries if st.n_queries is not None else None
    report = ids[: want if want is not None else max(1, len(ids) // 2)]
    rest = [q for q in ids if q not in set(report)]
    possible = len(rest) >= MIN_FIT_QUERIES
    if st.selection == "heldout" and not possible:
        raise BadInput(f"steering.selection heldout needs at least {MIN_FIT_QUERIES} cached queries besides the "
                       f"{len(report)} steered ones (have {len(rest)}); cache more queries, lower steering.n_queries "
                       "or use steering.selection in_sample")
    if st.selection == "heldout" or (st.selection == "auto" and possible):
        return "heldout", rest, report, (f"direction fitted on {len(rest)} queries, steering reported on "
                                         f"{len(report)} others")
    report = ids[: want] if want is not None else ids
    why = ("requested in the config" if st.selection == "in_sample" else
           f"only {len(rest)} queries besides the steered ones; held-out selection needs {MIN_FIT_QUERIES}")
    return "in_sample", ids, report, f"direction and layer chosen on the reported queries ({why})"


def _separation(x: np.ndarray, labels: np.ndarray, unit: np.ndarray) -> float:
    """Mean projection of label-1 rows minus label-0 rows of x [n, d] on unit [d]."""
    proj = x @ unit
    return float(proj[labels == 1].mean() - proj[labels == 0].mean())


def _eligible(cfg: Config, keys: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    pr = cfg.probes
    return [k for k in keys if k[2] in pr.best_positions and k[0] >= pr.min_best_layer]


def plan_directions(cfg: Config, run_path: Path, store: Any, selection: Selection, fit_ids: list[str],
                    control_families: list[str]) -> list[PlannedDirection]:
    """The steering directions. Held out: fitted here on the fit queries' main-family rows (the best eligible
    cell when steering.layers is "best", else the probe stage's best site, position and method at each listed
    layer). In sample: the probe stage's saved directions. Either way alpha's unit is measured on the steering
    family (the first cue family) at the direction's own position."""
    from afprobe.fsio import safe_name
    from afprobe.probes.directions import load_direction
    from afprobe.probes.methods import make_probe
    from afprobe.probes.sweep import run_sweep

    st, pr = cfg.steering, cfg.probes
    labels, groups, families = store.column("label"), store.column("query_id"), store.column("family")
    fit = np.isin(groups, fit_ids)
    main = ~np.isin(families, control_families)
    steer_rows = fit & (families == cfg.scenario.cue_families[0])
    folder = run_path / "probes" / "directions"
    best_meta = load_direction(folder / "best.safetensors")[1]
    methods = list(pr.best_methods or pr.methods)
    if st.direction not in ("best", *REFUSAL_DIRECTIONS):
        named = [(st.direction, *load_direction(folder / f"{safe_name(st.direction, 'direction name')}.safetensors"))]
    elif selection == "in_sample":
        names = ["best"] if st.layers == "best" else [f"layer{layer}" for layer in st.layers]
        named = [(n, *load_direction(folder / f"{safe_name(n, 'direction name')}.safetensors")) for n in names]
    else:
        named = []
    cells: list[tuple[tuple[int, str, str], str, Optional[np.ndarray], str]] = []
    for name, vector, meta in named:
        cells.append(((int(meta["layer"]), meta["site"], meta["position"]), meta["method"], np.asarray(vector),
                      f"probes/directions/{name}.safetensors"))
    if not named and st.layers == "best":
        keys = _eligible(cfg, store.keys)
        if not keys:
            raise BadInput(f"no cached cell is eligible to steer along (probes.best_positions {pr.best_positions}, "
                           f"layers >= {pr.min_best_layer})")
        rows = fit & main
        feats = {k: store.array(k)[rows] for k in keys}
        folds = min(pr.folds, len(set(groups[rows].tolist())))
        result = run_sweep(feats, labels[rows], groups[rows], families[rows], methods=methods, folds=folds,
                           n_boot=0, seed=cfg.seed, refit="best")  # rows: main families only
        b = result.best
        cells.append(((int(b["layer"]), b["site"], b["position"]), b["method"], None, "best cell on the fit queries"))
    elif not named:
        cells += [((layer, best_meta["site"], best_meta["position"]), best_meta["method"], None,
                   f"layer {layer} on the fit queries") for layer in st.layers]
    out = []
    for key, method, vector, source in cells:
        if key not in store.keys:
            raise BadInput(f"the activation store has no {key} to steer along; cache it (cache.layers/sites/positions)")
        x = store.array(key)
        if vector is None:  # fit on the fit queries' main-family rows
            rows = fit & main
            vector = make_probe(method).fit(x[rows], labels[rows], groups[rows]).direction_
        unit = np.asarray(vector, dtype=np.float64)
        unit = unit / np.linalg.norm(unit)
        steered_key = (key[0], key[1], "user_mean")
        steered = (_separation(store.array(steered_key)[steer_rows], labels[steer_rows], unit)
                   if steered_key in store.keys else None)
        out.append(PlannedDirection(unit.astype(np.float32), key[0], key[1], key[2], method,
                                    _separation(x[steer_rows], labels[steer_rows], unit), steered, source,
                                    len(set(groups[fit].tolist()))))
    return out


def refusal_variant(kind: str, d: PlannedDirection, diff: np.ndarray, x: np.ndarray, labels: np.ndarray,
                    n_refusal: str) -> PlannedDirection:
    """The planned awareness direction `d` turned into steering.direction `kind`, given the refusal vector
    diff [d] (harmful minus benign mean at d's cell) and the steering family's fit rows x [n, d] with labels [n]
    (for alpha's unit of an awareness-type direction). refusal: diff's unit, alpha's unit the harmful-benign
    separation; probe_minus_refusal: the awareness direction with the refusal direction projected out (alpha's
    unit the training-deployment separation along it); refusal_minus_probe: the reverse (harmful-benign)."""
    from afprobe.probes.refusal import project_out, unit

    if kind == "refusal":
        vec = unit(diff)
    elif kind == "probe_minus_refusal":
        vec = project_out(d.unit, diff)
    else:
        vec = project_out(diff, d.unit)
    separation = _separation(x, labels, vec) if kind == "probe_minus_refusal" else float(diff @ vec)
    what = {"refusal": "refusal direction (harmful minus benign mean)",
            "probe_minus_refusal": "awareness direction with the refusal direction projected out",
            "refusal_minus_probe": "refusal direction with the awareness direction projected out"}[kind]
    return PlannedDirection(vec.astype(np.float32), d.layer, d.site, d.position,
                            "diff_means" if kind == "refusal" else f"{d.method} / diff_means", separation, None,
                            f"{what}; refusal from {n_refusal}, awareness: {d.source}", d.fit_queries, kind)


def condition_grid(st: Any) -> list[tuple[str, int, str, Optional[float]]]:
    """(direction, replicate, mode, alpha) run for each steering direction (`st`: the steering config), besides
    the one shared unsteered pass. Control alphas missing from steering.alphas are added to the probe's grid
    too (never dropped), so probe and random directions are compared at the same alphas. Unset control alphas
    are every alpha, or, for a layer x alpha map (several layers), the largest |alpha| (each sign present)."""
    nonzero = sorted({a for a in st.alphas if a != 0})
    default = nonzero
    if st.layers != "best" and len(st.layers) > 1 and nonzero:
        default = [a for a in nonzero if abs(a) == max(abs(b) for b in nonzero)]
    control = sorted({a for a in (st.control_alphas if st.control_alphas is not None else default) if a != 0})
    grid: list[tuple[str, int, str, Optional[float]]] = []
    for mode in st.modes:
        for alpha in sorted(set(nonzero) | set(control)):
            grid.append(("probe", 0, mode, float(alpha)))
            if "random" in st.controls and alpha in control:
                grid += [("random", k, mode, float(alpha)) for k in range(st.n_random)]
    if "ablation" in st.controls:
        grid.append(("ablation", 0, "same", None))
    return grid


def plan_specs(cfg: Config, directions: list[PlannedDirection], n_layers: int) -> list[Any]:
    """Every condition to run: `condition_grid` for each direction, and the unsteered pass once."""
    import torch

    from afprobe.activations.steering import SteeringSpec, random_orthogonal
    from afprobe.probes.splits import derive_seed

    st = cfg.steering
    specs = [SteeringSpec("probe", torch.zeros(1), 0.0, (directions[0].layer,), 0.0, "same", st.positions,
                          directions[0].site)]
    for d in directions:
        if not 0 <= d.layer < n_layers:
            raise BadInput(f"a steering direction is for layer {d.layer}, but the model has {n_layers} layers")
        unit = torch.tensor(d.unit, dtype=torch.float32)
        randoms = [random_orthogonal(unit, derive_seed(cfg.seed, 5, d.layer, k)) for k in range(st.n_random)]
        for direction, k, mode, alpha in condition_grid(st):
            if direction == "ablation":
                specs.append(SteeringSpec("ablation", unit, d.separation, (d.layer,), 0.0, "same", "all", d.site))
            else:
                specs.append(SteeringSpec(direction, randoms[k] if direction == "random" else unit, d.separation,
                                          (d.layer,), alpha, mode, st.positions, d.site, k))
    return specs


def make_plan(cfg: Config, run_path: Path, store: Any, n_layers: int, control_families: list[str],
              split: tuple[Selection, list[str], list[str], str], refusal: Any = None) -> SteeringPlan:
    """The plan for the store's queries divided by `split` (`steering_split`); `refusal`
    (afprobe.refusal.RefusalData) is needed when steering.direction is a refusal kind."""
    selection, fit_ids, report_ids, note = split
    directions = plan_directions(cfg, run_path, store, selection, fit_ids, control_families)
    kind = cfg.steering.direction
    if kind in REFUSAL_DIRECTIONS:
        labels, groups, families = store.column("label"), store.column("query_id"), store.column("family")
        rows = np.isin(groups, fit_ids) & (families == cfg.scenario.cue_families[0])
        n_refusal = (f"{len(set(refusal.harmful_groups.tolist()))} harmful and "
                     f"{len(set(refusal.benign_groups.tolist()))} benign queries")
        directions = [refusal_variant(kind, d, refusal.diff((d.layer, d.site, d.position)),
                                      store.array((d.layer, d.site, d.position))[rows], labels[rows], n_refusal)
                      for d in directions]
    elif kind != "best" and selection == "heldout":
        selection, note = "in_sample", "a named direction file; its fitting queries are not known"
    return SteeringPlan(selection, note, fit_ids, report_ids, directions, plan_specs(cfg, directions, n_layers))
