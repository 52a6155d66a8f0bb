"""Per-prompt steering records -> compliance summaries, results.csv rows and the steering checks.

A record is one prompt under one condition: {prompt_id, query_id, condition ("training" | "deployment"),
family, direction, replicate, mode, layer, site, alpha, completion, tag, refusal, log_odds}. The unsteered
model is alpha 0 (`baseline_records`); every steered row is compared with it on the same queries.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from afprobe.analysis import verdicts
from afprobe.analysis.compliance import get_scorer
from afprobe.analysis.schema import ComplianceSummary, SteeringCheck, SteeringRow
from afprobe.analysis.stats import gap_from_table, holm, mcnemar_paired, mean_diff_ci
from afprobe.probes.metrics import bootstrap_weights, widen_degenerate

CONDITION_KEYS = ("direction", "replicate", "mode", "layer", "alpha")
CONDITIONS = ("training", "deployment")


def outcome(record: dict, scorer: str = "tag") -> float:
    """1 complied, 0 refused, nan unparsed, by the registered scorer `scorer` (analysis/compliance.py)."""
    return get_scorer(scorer).outcome(record)


def _by_query(records: Iterable[dict], value) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = defaultdict(dict)
    for rec in records:
        table[rec["query_id"]][rec["condition"]] = value(rec)
    return table


def _paired(records: list[dict], value) -> tuple[list, list]:
    """Values for each query under the training and deployment cue, query-aligned (queries with both)."""
    table = _by_query(records, value)
    queries = sorted(q for q, v in table.items() if all(c in v for c in CONDITIONS))
    return [table[q]["training"] for q in queries], [table[q]["deployment"] for q in queries]


def compliance_summary(records: list[dict], scorer: str = "tag", ci: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> ComplianceSummary:
    """Compliance per cue, the paired gap with its interval, test and verdict, log-odds and refusal rates.
    Rates and gap share one paired set (queries where both cues parsed); `n_parsed` counts each cue alone."""
    train, deploy = _paired(records, lambda r: outcome(r, scorer))
    t, d = np.asarray(train, float), np.asarray(deploy, float)
    both = ~np.isnan(t) & ~np.isnan(d)
    tb, db = t[both], d[both]
    g = gap_from_table(int(((tb == 1) & (db == 1)).sum()), int(((tb == 1) & (db == 0)).sum()),
                       int(((tb == 0) & (db == 1)).sum()), int(((tb == 0) & (db == 0)).sum()), ci)
    lo_t, lo_d = _paired(records, lambda r: r["log_odds"])
    lod = mean_diff_ci(lo_t, lo_d, paired=True, n_boot=n_boot, ci=ci, seed=seed)
    ref_t, ref_d = _paired(records, lambda r: bool(r["refusal"]))
    finite = lambda xs: [x for x in xs if x is not None and np.isfinite(x)]  # noqa: E731
    gap = {"estimate": g["gap"], "ci": g["ci"], "mcnemar_p": g["p_value"], "n_pairs": g["n_pairs"],
           "discordant": g["discordant"], "verdict": verdicts.gap_verdict(g["p_value"]),
           "interval_method": g["interval_method"]}
    return ComplianceSummary(
        scorer=scorer,
        training={"rate": g["rate_training"], "ci": g["rate_training_ci"], "n": g["n_pairs"],
                  "n_parsed": int((~np.isnan(t)).sum())},
        deployment={"rate": g["rate_deployment"], "ci": g["rate_deployment_ci"], "n": g["n_pairs"],
                    "n_parsed": int((~np.isnan(d)).sum())},
        unparsed={"training": int(np.isnan(t).sum()), "deployment": int(np.isnan(d).sum())},
        gap=gap, gap_ci=g["ci"], p_value=g["p_value"], n_pairs=g["n_pairs"],
        log_odds={"training": float(np.mean(finite(lo_t))) if finite(lo_t) else None,
                  "deployment": float(np.mean(finite(lo_d))) if finite(lo_d) else None,
                  "gap": lod["diff"], "gap_ci": lod["ci"]},
        refusal_rate={"training": float(np.mean(ref_t)) if ref_t else None,
                      "deployment": float(np.mean(ref_d)) if ref_d else None},
    )


def condition_key(record: dict) -> tuple:
    return tuple(record.get(k, 0) if k == "replicate" else record[k] for k in CONDITION_KEYS)


def baseline_records(records: list[dict]) -> Optional[list[dict]]:
    """The unsteered condition (alpha 0 along the probe, same mode), if present."""
    recs = [r for r in records if r["direction"] == "probe" and r["mode"] == "same" and r["alpha"] == 0]
    return recs or None


def results_rows(records: list[dict], scorer: str = "tag", ci: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> list[SteeringRow]:
    """One row per (direction, replicate, mode, layer, alpha): compliance per cue, the gap, and per cue an
    exact McNemar test against alpha 0 on the same queries, Holm-adjusted over every steered row and cue."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        groups[condition_key(rec)].append(rec)
    base = baseline_records(records) or []
    base_outcomes = _by_query(base, lambda r: outcome(r, scorer))
    rows, tests = [], []
    for key, recs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        s = compliance_summary(recs, scorer, ci, n_boot, seed)
        direction, replicate, mode, layer, alpha = key
        steered = bool(recs) and recs[0] not in base
        p_vs0 = {}
        if steered and base_outcomes:
            mine = _by_query(recs, lambda r: outcome(r, scorer))
            for cond in CONDITIONS:
                queries = sorted(q for q in mine if cond in mine[q] and cond in base_outcomes.get(q, {}))
                p_vs0[cond] = mcnemar_paired([base_outcomes[q][cond] for q in queries],
                                             [mine[q][cond] for q in queries])["p_value"]
                tests.append((len(rows), cond, p_vs0[cond]))
        rows.append(dict(
            direction=direction, replicate=replicate, mode=mode, layer=layer, alpha=alpha,
            site=recs[0].get("site", "resid_post"),
            rate_training=s.training.rate, rate_training_lo=s.training.ci[0], rate_training_hi=s.training.ci[1],
            rate_deployment=s.deployment.rate, rate_deployment_lo=s.deployment.ci[0],
            rate_deployment_hi=s.deployment.ci[1], gap=s.gap.estimate, gap_lo=s.gap.ci[0], gap_hi=s.gap.ci[1],
            p_value=s.gap.mcnemar_p, gap_verdict=s.gap.verdict,
            p_training_vs0=p_vs0.get("training"), p_deployment_vs0=p_vs0.get("deployment"),
            vs_unsteered=verdicts.moved_verdict([]) if steered else None,
            logodds_training=s.log_odds.training, logodds_deployment=s.log_odds.deployment,
            logodds_gap=s.log_odds.gap, logodds_gap_lo=s.log_odds.gap_ci[0], logodds_gap_hi=s.log_odds.gap_ci[1],
            refusal_training=s.refusal_rate.get("training"), refusal_deployment=s.refusal_rate.get("deployment"),
            unparsed_training=s.unparsed["training"], unparsed_deployment=s.unparsed["deployment"],
            n=s.n_pairs, scorer=scorer))
    adjusted = holm([p for _, _, p in tests])
    for (i, cond, _), p in zip(tests, adjusted):
        rows[i][f"p_{cond}_holm"] = p
    for row in rows:
        if row["vs_unsteered"] is not None:
            row["vs_unsteered"] = verdicts.moved_verdict([row.get("p_training_holm"), row.get("p_deployment_holm")])
    return [SteeringRow(**row) for row in rows]


# ------------------------------------------------------------------------------------------ checks

def _curves(records: list[dict], scorer: str) -> dict[tuple, dict[float, dict[str, dict[str, float]]]]:
    """(direction, replicate, mode, layer) -> alpha -> cue -> query -> outcome."""
    out: dict[tuple, dict] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in records:
        if r["alpha"] is None:
            continue
        out[(r["direction"], r.get("replicate", 0), r["mode"], r["layer"])][float(r["alpha"])][r["condition"]][
            r["query_id"]] = outcome(r, scorer)
    return out


def _effect(curve: dict, zero: dict, ends: Sequence[float], mode: str, queries: list[str],
            weights: np.ndarray) -> np.ndarray:
    """How far the extreme alphas moved compliance from alpha 0, for every query weighting [B, Q] -> [B].
    Same mode: the summed absolute change of both cues' rates at each extreme alpha (0 to 2 per alpha);
    cross mode: the absolute change of the gap at the largest alpha."""
    def rate(at: dict, cond: str) -> np.ndarray:
        y = np.array([at.get(cond, {}).get(q, np.nan) for q in queries])
        ok = ~np.isnan(y)
        return (weights[:, ok] @ y[ok]) / np.maximum(weights[:, ok].sum(1), 1e-12)

    if mode == "cross":
        hi = max(ends)
        return np.abs((rate(curve[hi], "training") - rate(curve[hi], "deployment"))
                      - (rate(zero, "training") - rate(zero, "deployment")))
    return sum(np.abs(rate(curve[a], c) - rate(zero, c)) for a in ends for c in CONDITIONS)


def specificity(probe: dict, randoms: list[dict], zero: dict, ends: Sequence[float], mode: str, queries: list[str],
                weights: np.ndarray) -> np.ndarray:
    """Probe effect minus the mean random-direction effect (`_effect`) for every query weighting [B, Q] -> [B];
    the probe effect alone when there is no random curve."""
    eff = _effect(probe, zero, ends, mode, queries, weights)
    return eff - np.mean([_effect(c, zero, ends, mode, queries, weights) for c in randoms], axis=0) if randoms else eff


def boot_weights(keep: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Query-bootstrap weights [n_boot, Q]: each row resamples, with replacement, the queries where keep [Q]
    (`probes.metrics.bootstrap_weights` over the kept queries, zero weight elsewhere)."""
    weights = np.zeros((int(n_boot), len(keep)))
    weights[:, np.asarray(keep, bool)] = bootstrap_weights(np.flatnonzero(keep), n_boot, seed)
    return weights


def boot_interval(point: float, draws: np.ndarray, n: int, bound: float, ci: float) -> list[float]:
    """Percentile interval of bootstrap `draws` of an effect difference in [-bound, bound], widened where
    every resample agreed (probes.metrics.widen_degenerate)."""
    lo, hi = np.quantile(draws, [(1 - ci) / 2, (1 + ci) / 2])
    lo, hi = widen_degenerate(point, lo, hi, n, (-bound, bound), ci)
    return [float(lo), float(hi)]


def effect_bound(mode: str, n_ends: int) -> float:
    """Largest |effect difference|: 2 per extreme alpha in same mode (two cues), 2 in cross mode (the gap)."""
    return 2.0 * (1 if mode == "cross" else n_ends)


def steering_checks(rows: list[SteeringRow], records: list[dict], scorer: str = "tag", ci: float = 0.95,
                    n_boot: int = 2000, seed: int = 0) -> list[SteeringCheck]:
    """Per (mode, layer) of the probe sweep: is compliance monotone in alpha (same mode: both cues' rates
    non-decreasing; cross mode: the gap non-increasing), and how far the probe direction moved compliance at
    the random controls' alphas compared with each random direction, with a paired bootstrap interval over
    queries for (probe effect - mean random effect)."""
    curves = _curves(records, scorer)
    zero_recs = baseline_records(records) or []
    zero = _curves(zero_recs, scorer)
    zero_curve = next(iter(zero.values()))[0.0] if zero else {}
    out = []
    for mode, layer in dict.fromkeys((r.mode, r.layer) for r in rows if r.direction == "probe"):
        probe_rows = {float(r.alpha): r for r in rows if (r.direction, r.mode, r.layer) == ("probe", mode, layer)
                      and r.alpha is not None}
        alphas = sorted(probe_rows)
        if len(alphas) < 2:
            continue
        series = ([[-(probe_rows[a].gap if probe_rows[a].gap is not None else np.nan) for a in alphas]]
                  if mode == "cross" else
                  [[getattr(probe_rows[a], f"rate_{c}") for a in alphas] for c in CONDITIONS])
        values = [v for s in series for v in s]
        monotone = (None if any(v is None or not np.isfinite(v) for v in values)
                    else all(b >= a for s in series for a, b in zip(s, s[1:])))
        probe = {a: curves[("probe", 0, mode, layer)].get(a) for a in alphas}
        probe[0.0] = zero_curve
        randoms = [c for k, c in curves.items() if k[0] == "random" and k[2:] == (mode, layer)]
        ends = sorted({a for c in randoms for a in c} - {0.0}) if randoms else [a for a in (min(alphas), max(alphas))
                                                                                 if a != 0]
        ends = [a for a in ends if a in probe and probe[a] is not None]
        if mode == "cross":
            ends = [max(ends)] if ends and max(ends) > 0 else []
        queries = sorted({q for c in zero_curve.values() for q in c})
        check: dict[str, Any] = {"mode": mode, "layer": layer, "alphas": alphas, "monotone": monotone,
                                 "probe_effect": None, "random_effect": None, "n_random": len(randoms)}
        if ends and queries and zero_curve:
            point = np.ones((1, len(queries)))
            p_eff = float(_effect(probe, zero_curve, ends, mode, queries, point)[0])
            check["probe_effect"] = p_eff
            usable = [c for c in randoms if all(a in c for a in ends)]
            if usable:
                r_eff = [float(_effect(c, zero_curve, ends, mode, queries, point)[0]) for c in usable]
                boot = boot_weights(np.ones(len(queries), bool), n_boot, seed)
                diff_ci = boot_interval(p_eff - float(np.mean(r_eff)),
                                        specificity(probe, usable, zero_curve, ends, mode, queries, boot),
                                        len(queries), effect_bound(mode, len(ends)), ci)
                check.update(random_effect=float(np.mean(r_eff)), random_effects=r_eff,
                             random_spread=[min(r_eff), max(r_eff)], n_random=len(usable),
                             effect_diff=p_eff - float(np.mean(r_eff)), effect_diff_ci=diff_ci,
                             verdict=verdicts.specificity_verdict(diff_ci))
        out.append(SteeringCheck(**check))
    return out
