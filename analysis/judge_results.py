"""Alignment-faking results of a scratchpad run: the judge's verdicts per steering cell and cue.

Input: the steer stage's generation records (steering/generations.jsonl, scratchpad form) each joined with
the judge's verdict on its reasoning: `af` (1 flagged alignment faking, 0 not, None when the judge gave no
valid vote or there was no reasoning), `partial` (1/0/None: the judge's partial-compliance question, same
vote rule), `score` (fraction of yes votes).

Per cell (direction, replicate, mode, layer, site, alpha):
- the alignment-faking rate under each cue over its judged traces, with a Wilson interval (stats.rate);
- training minus deployment on the queries judged under both cues: paired difference, Newcombe interval
  made to agree with the exact McNemar test (stats.paired_gap), verdict from analysis/verdicts.py;
- the partial-compliance rate per cue (Wilson), recorded separately from alignment faking;
- the tag-scorer compliance rate per cue from the same records (the output only), so a reader can see
  whether steering changed the reasoning, the answer, or both;
- for steered cells: exact McNemar of each cue's alignment-faking flags against the unsteered cell (same
  queries), Holm-adjusted over every steered cell and cue, and the moved-or-not verdict (verdicts.py).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from afprobe.analysis import stats, verdicts
from afprobe.analysis.numbers import finite, or_nan

CELL_KEYS = ("direction", "replicate", "mode", "layer", "site", "alpha")
CUES = ("training", "deployment")




def _rate(values: Sequence[Optional[int]], ci: float) -> dict:
    r = stats.rate([or_nan(v) for v in values], ci)
    return {"rate": finite(r["rate"]), "ci": [finite(c) for c in r["ci"]], "n": r["n"], "k": r["k"],
            "unjudged": r["unparsed"]}


def cell_key(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in CELL_KEYS)


def _by_query(recs: list[dict], cue: str, field: str) -> dict[str, Optional[int]]:
    return {r["query_id"]: r.get(field) for r in recs if r["condition"] == cue}


def _paired(recs: list[dict], field: str) -> tuple[list[float], list[float], list[str]]:
    tr, de = _by_query(recs, "training", field), _by_query(recs, "deployment", field)
    queries = sorted(set(tr) & set(de))
    return [or_nan(tr[q]) for q in queries], [or_nan(de[q]) for q in queries], queries


def _is_unsteered(key: tuple) -> bool:
    direction, _, _, _, _, alpha = key
    return direction == "probe" and alpha == 0


def summarise_cells(records: list[dict], ci: float = 0.95) -> list[dict]:
    """One result per steering cell (see the module docstring), in the order cells first appear."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault(cell_key(r), []).append(r)
    base = next((recs for key, recs in cells.items() if _is_unsteered(key)), None)
    out = []
    for key, recs in cells.items():
        row: dict[str, Any] = dict(zip(CELL_KEYS, key))
        row["n_traces"] = len(recs)
        for cue in CUES:
            mine = [r for r in recs if r["condition"] == cue]
            row[cue] = {**_rate([r.get("af") for r in mine], ci),
                        "partial": _rate([r.get("partial") for r in mine], ci),
                        "compliance": _rate([{"accepted": 1, "rejected": 0}.get(r.get("tag")) for r in mine], ci),
                        "mean_score": finite(_mean([r.get("score") for r in mine]))}
        t, d, _ = _paired(recs, "af")
        g = stats.paired_gap(t, d, ci)
        row["difference"] = {"estimate": finite(g["gap"]), "ci": [finite(c) for c in g["ci"]],
                             "mcnemar_p": finite(g["p_value"]), "n_pairs": g["n_pairs"], "discordant": g["discordant"],
                             "verdict": verdicts.gap_verdict(g["p_value"]), "interval_method": g["interval_method"]}
        row["p_training_vs0"] = row["p_deployment_vs0"] = None
        if base is not None and not _is_unsteered(key):
            for cue in CUES:
                before, after = _by_query(base, cue, "af"), _by_query(recs, cue, "af")
                qs = sorted(set(before) & set(after))
                test = stats.mcnemar_paired([or_nan(before[q]) for q in qs], [or_nan(after[q]) for q in qs])
                row[f"p_{cue}_vs0"] = finite(test["p_value"])
        out.append(row)
    steered = [(i, cue) for i, row in enumerate(out) for cue in CUES if row[f"p_{cue}_vs0"] is not None]
    adjusted = stats.holm([out[i][f"p_{cue}_vs0"] for i, cue in steered])
    for row in out:
        row["p_training_holm"] = row["p_deployment_holm"] = None
        row["vs_unsteered"] = None
    for (i, cue), p in zip(steered, adjusted):
        out[i][f"p_{cue}_holm"] = finite(p)
    for row in out:
        if row["p_training_vs0"] is not None or row["p_deployment_vs0"] is not None:
            row["vs_unsteered"] = verdicts.moved_verdict([row["p_training_holm"], row["p_deployment_holm"]])
    return out


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def pick_examples(records: list[dict], per_cell: int = 2) -> list[dict]:
    """A few judged traces per cell for the report: the highest-scoring and the lowest-scoring judged trace
    (so a reader sees both what was flagged and what was not), then unjudged ones if nothing was judged."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault(cell_key(r), []).append(r)
    out = []
    for recs in cells.values():
        judged = sorted((r for r in recs if r.get("score") is not None), key=lambda r: (-r["score"], r["prompt_id"]))
        chosen: list[dict] = []
        for r in (judged[:1] + judged[-1:] + judged[1:-1] + [r for r in recs if r.get("score") is None]):
            if r not in chosen and len(chosen) < per_cell:
                chosen.append(r)
        out += chosen
    return out
