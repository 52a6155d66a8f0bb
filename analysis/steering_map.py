"""Layer x alpha steering map: compliance per cue, the gap and coherence for every steered (mode, layer, alpha),
the random controls where they ran, and which cell steers best, chosen on one half of the steered queries and
confirmed on the other half.

Inputs are the steer stage's records (steering/generations.jsonl, fields as in analysis/steering_table.py) and
its rows (steering/results.csv). Cell rates and gaps are the rows' numbers; coherence is the fraction of answers
whose tag did not parse (the tag scorer, whatever `steering.scorer` is: an answer the model no longer writes in
the asked format is incoherent even when the log-odds scorer can still rank the two tags).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from afprobe.analysis import verdicts
from afprobe.analysis.schema import MapCell, MapChoice, SteeringMap, SteeringRow
from afprobe.analysis.steering_table import (
    _curves, baseline_records, boot_interval, boot_weights, effect_bound, outcome, specificity,
)
from afprobe.probes.splits import derive_seed

SPLIT_STREAM = 17  # derive_seed tag of the selection / confirmation split of the steered queries
MAX_UNPARSED = 0.5  # a cell whose probe answers fail to parse more often than this (on the half choosing) cannot win


def map_split(queries: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(selection, confirmation): the steered queries shuffled with the run seed and halved (selection gets the
    extra one). Both halves are disjoint from the queries the directions were fitted on when the run's steering
    selection is held out (afprobe/steering_plan.py)."""
    order = np.random.default_rng(derive_seed(seed, SPLIT_STREAM)).permutation(sorted(queries))
    half = (len(order) + 1) // 2
    return sorted(order[:half].tolist()), sorted(order[half:].tolist())


def _unparsed(records: list[dict]) -> Optional[float]:
    """Fraction of records (both cues) whose answer tag did not parse."""
    flags = [np.isnan(outcome(r, "tag")) for r in records]
    return float(np.mean(flags)) if flags else None


def _half_unparsed(records: list[dict], mode: str, cand: list[tuple[int, float]], queries: list[str]
                   ) -> np.ndarray:
    """[len(cand)] unparsed fraction of each candidate probe cell's records on `queries` (NaN: none there)."""
    keep = set(queries)
    by_cell: dict[tuple, list[dict]] = {}
    for r in records:
        if r["direction"] == "probe" and r["mode"] == mode and r["query_id"] in keep:
            by_cell.setdefault((r["layer"], r["alpha"]), []).append(r)
    return np.array([_unparsed(by_cell.get(c, [])) if by_cell.get(c) else np.nan for c in cand], dtype=float)


def _competing(unparsed: np.ndarray, max_unparsed: float) -> tuple[np.ndarray, int]:
    """(mask of the cells that may be chosen: unparsed fraction at most `max_unparsed`, or every cell when none
    is; how many cells were over it)."""
    ok = ~(unparsed > max_unparsed)
    return (ok if ok.any() else np.ones_like(ok)), int(np.sum(~ok))


def _best(score: np.ndarray, competing: np.ndarray) -> int:
    return int(np.nanargmax(np.where(competing, score, -np.inf)))


def _mean(values: list[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _cells(rows: list[SteeringRow], records: list[dict], base: list[dict]) -> list[MapCell]:
    """Probe cells at every (mode, layer, alpha), alpha 0 being the shared unsteered pass; random cells (mean
    over the random directions) where they ran."""
    zero = next(r for r in rows if r.direction == "probe" and r.vs_unsteered is None and r.alpha == 0)
    steered = [r for r in rows if r.direction in ("probe", "random") and r.vs_unsteered is not None]
    layers = sorted({r.layer for r in steered if r.direction == "probe"})
    cells = []
    for mode in dict.fromkeys(r.mode for r in steered):
        for layer in layers:
            cells.append(MapCell(mode=mode, layer=layer, alpha=0.0, rate_training=zero.rate_training,
                                 rate_deployment=zero.rate_deployment, gap=zero.gap, logodds_gap=zero.logodds_gap,
                                 unparsed=_unparsed(base), n=zero.n))
            for direction in ("probe", "random"):
                group = [r for r in steered if (r.direction, r.mode, r.layer) == (direction, mode, layer)]
                for alpha in sorted({float(r.alpha) for r in group}):
                    at = [r for r in group if r.alpha == alpha]
                    recs = [x for x in records if (x["direction"], x["mode"], x["layer"]) == (direction, mode, layer)
                            and x["alpha"] == alpha]
                    mean = lambda col: _mean([getattr(r, col) for r in at])  # noqa: E731
                    cells.append(MapCell(mode=mode, layer=layer, alpha=alpha, direction=direction,
                                         rate_training=mean("rate_training"), rate_deployment=mean("rate_deployment"),
                                         gap=mean("gap"), logodds_gap=mean("logodds_gap"), unparsed=_unparsed(recs),
                                         n=min(r.n for r in at)))
    return cells


def _choose(curves: dict, zero: dict, mode: str, layers: list[int], queries: list[str],
            weights: np.ndarray) -> tuple[list[tuple[int, float]], np.ndarray]:
    """Candidate cells (layer, alpha) and their scores [len(cells), B] for query weightings [B, Q]: cells with a
    random control, or every steered alpha when no random direction ran."""
    cand, scores = [], []
    any_random = any(k[0] == "random" and k[2] == mode for k in curves)
    for layer in layers:
        probe = curves.get(("probe", 0, mode, layer), {})
        randoms = [c for k, c in curves.items() if k[0] == "random" and k[2:] == (mode, layer)]
        alphas = sorted({a for c in randoms for a in c} if any_random else set(probe))
        for alpha in [a for a in alphas if a != 0 and a in probe]:
            usable = [c for c in randoms if alpha in c]
            cand.append((layer, alpha))
            scores.append(specificity(probe, usable, zero, [alpha], mode, queries, weights))
    return cand, np.asarray(scores).reshape(len(cand), len(weights))


def steering_map(rows: list[SteeringRow], records: list[dict], scorer: str = "tag", ci: float = 0.95,
                 n_boot: int = 2000, seed: int = 0, split_note: str = "",
                 max_unparsed: float = MAX_UNPARSED) -> Optional[SteeringMap]:
    """The layer x alpha map and, per mode, the best cell: highest (probe effect - mean random effect) on the
    selection half of the steered queries (`map_split`) among the cells that stay coherent there (at most
    `max_unparsed` of the probe's answers unparsed; every cell competes when none does), re-scored on the
    confirmation half with a query bootstrap interval and specificity verdict, and the confirmation half's own
    argmax (by the same rule on its own answers) for comparison. None when fewer than two layers were steered or
    there is no unsteered pass."""
    base = baseline_records(records)
    probe_layers = sorted({r["layer"] for r in records if r["direction"] == "probe" and r["alpha"] not in (None, 0)})
    if base is None or len(probe_layers) < 2:
        return None
    curves = _curves(records, scorer)
    zero = next(iter(_curves(base, scorer).values()))[0.0]
    queries = sorted({q for by_q in zero.values() for q in by_q})
    select, confirm = map_split(queries, seed)
    in_select = np.isin(queries, select)
    cells = _cells(rows, records, base)
    unparsed = {(c.mode, c.layer, c.alpha): c.unparsed for c in cells if c.direction == "probe"}
    choices = []
    for mode in dict.fromkeys(k[2] for k in curves if k[0] == "probe"):
        halves = np.stack([in_select, ~in_select]).astype(float)  # [2, Q]
        cand, score = _choose(curves, zero, mode, probe_layers, queries, halves)
        if not cand:
            continue
        competing, excluded = _competing(_half_unparsed(records, mode, cand, select), max_unparsed)
        best = _best(score[:, 0], competing)
        other = _best(score[:, 1], _competing(_half_unparsed(records, mode, cand, confirm), max_unparsed)[0]) \
            if confirm else best
        layer, alpha = cand[best]
        ties = int(np.sum(np.isclose(score[competing, 0], score[best, 0]))) - 1  # argmax takes the first of these
        choice = MapChoice(mode=mode, layer=layer, alpha=alpha, selection_score=float(score[best, 0]), ties=ties,
                           unparsed=unparsed.get((mode, layer, alpha)), incoherent_excluded=excluded,
                           all_incoherent=excluded == len(cand), max_unparsed=max_unparsed,
                           selection_queries=len(select), confirm_queries=len(confirm),
                           confirm_best_layer=cand[other][0], confirm_best_alpha=cand[other][1])
        if not any(k[0] == "random" and k[2] == mode for k in curves):  # probe effect alone: no specificity
            choice = choice.model_copy(update={"against_random": False})
        if confirm:
            _, draws = _choose(curves, zero, mode, probe_layers, queries, boot_weights(~in_select, n_boot, seed))
            interval = boot_interval(float(score[best, 1]), draws[best], len(confirm), effect_bound(mode, 1), ci)
            choice = choice.model_copy(update={"confirm_score": float(score[best, 1]), "confirm_ci": interval,
                                               "verdict": verdicts.specificity_verdict(interval)
                                               if choice.against_random else None})
        choices.append(choice)
    alphas = sorted({0.0, *(float(r["alpha"]) for r in records if r["alpha"] is not None)})
    return SteeringMap(layers=probe_layers, alphas=alphas, cells=cells, choices=choices,
                       split_note=split_note or f"cell chosen on {len(select)} steered queries, confirmed on "
                                                f"{len(confirm)} others")
