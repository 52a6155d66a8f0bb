"""The one-screen terminal summary printed at the end of `afprobe run`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _ci(pair: Any) -> str:
    return f"[{_num(pair[0])}, {_num(pair[1])}]" if pair else "[n/a]"


def _yes_no(flag: Any) -> str:
    return "n/a" if flag is None else "yes" if flag else "NO"


def headline(summary: Mapping[str, Any], paths: Mapping[str, Path]) -> str:
    lines = [f"== afprobe: {summary.get('model')} ({summary.get('n_queries')} queries, {summary.get('n_layers')} layers) =="]
    if summary.get("planted"):
        lines.append("NOTE: this model carries a PLANTED compliance gap (LoRA positive control), not a natural one.")
    probe = summary.get("probe") or {}
    best, controls = probe.get("best") or {}, probe.get("controls") or {}
    if best:
        lines.append(
            f"probe   best {best.get('method')} @ layer {best.get('layer')} {best.get('site')}/{best.get('position')}: "
            f"AUROC {_num(best.get('auroc'))} {_ci(best.get('auroc_ci'))}; controls shuffled "
            f"{_num(controls.get('shuffled_auroc'))}, random {_num(controls.get('random_auroc'))}"
        )
    swapped = probe.get("swapped") or {}
    if swapped:
        lines.append(f"swapped-semantics control: AUROC {_num(swapped.get('auroc'))} -> follows {swapped.get('verdict')}")
    comp = summary.get("compliance") or {}
    if comp:
        t, d = comp.get("training", {}), comp.get("deployment", {})
        lines.append(f"comply  training {_num(t.get('rate'))} {_ci(t.get('ci'))} n={t.get('n')}; "
                     f"deployment {_num(d.get('rate'))} {_ci(d.get('ci'))} n={d.get('n')}")
        lo, hi = (comp.get("gap_ci") or [math.nan, math.nan])[:2]
        verdict = ("no parsed pairs" if not (lo == lo and hi == hi) else
                   "no gap detected" if lo <= 0 <= hi else "a gap (interval excludes 0)")
        lines.append(f"gap     {_num(comp.get('gap'), '{:+.2f}')} {_ci(comp.get('gap_ci'))}, McNemar p = "
                     f"{_num(comp.get('p_value'), '{:.3g}')} -> {verdict}; scorer {comp.get('scorer', 'tag')}; "
                     f"unparsed {comp.get('unparsed')}")
        odds = comp.get("log_odds") or {}
        if odds:
            lines.append(f"log-odds accept-vs-reject: training {_num(odds.get('training'))}, deployment "
                         f"{_num(odds.get('deployment'))}, difference {_num(odds.get('gap'), '{:+.2f}')} "
                         f"{_ci(odds.get('gap_ci'))}")
    steering = summary.get("steering") or []
    for direction in ("probe", "random"):
        rows = sorted((r for r in steering if r.get("direction") == direction and r.get("alpha") is not None
                       and r.get("mode", "same") == "same"), key=lambda r: r["alpha"])
        if rows:
            ends = rows[0], rows[-1]
            lines.append(f"steer   {direction:6s} " + "  ".join(
                f"alpha {r['alpha']:+g}: train {_num(r['rate_training'])} deploy {_num(r['rate_deployment'])} "
                f"gap {_num(r['gap'], '{:+.2f}')} {_ci(r.get('gap_ci'))}" for r in ends))
    for c in summary.get("steering_checks") or []:
        ratio = c.get("effect_ratio")
        lines.append(f"check   {c['mode']} mode, layer {c['layer']}: monotone in alpha {_yes_no(c['monotone'])}; "
                     f"probe moved compliance {_num(c.get('probe_effect'))}, random {_num(c.get('random_effect'))}"
                     + ("" if ratio is None else f" ({'inf' if ratio == math.inf else _num(ratio, '{:.1f}')}x)"))
    for family, c in (summary.get("compliance_by_family") or {}).items():
        lines.append(f"family  {family}: gap {_num(c.get('gap'), '{:+.2f}')} {_ci(c.get('gap_ci'))} "
                     f"(training {_num((c.get('training') or {}).get('rate'))}, deployment "
                     f"{_num((c.get('deployment') or {}).get('rate'))})")
    known = summary.get("known_answer") or {}
    if known.get("statement"):
        lines.append(known["statement"])
    timings = summary.get("timings_s") or {}
    lines.append("time    " + ", ".join(f"{k} {_num(v, '{:.0f}')}s" for k, v in timings.items()))
    if paths.get("html"):
        lines.append(f"report  {paths['html']}")
    return "\n".join(lines)
