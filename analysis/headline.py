"""The one-screen terminal summary printed at the end of `afprobe run` (verdicts as recorded in summary.json)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from afprobe.analysis import verdicts
from afprobe.analysis.schema import Summary


def headline(summary: Summary, paths: Mapping[str, Path]) -> str:
    lines = [f"== afprobe: {summary.model} ({summary.n_queries} queries, {summary.n_layers} layers) =="]
    if summary.planted:
        lines.append("NOTE: this model carries a PLANTED compliance gap (LoRA positive control), not a natural one.")
    if summary.probe is not None:
        lines.append("probe   " + verdicts.describe_probe(summary.probe.model_dump()))
        if summary.probe.swapped is not None:
            lines.append("control " + verdicts.describe_swapped(summary.probe.swapped.model_dump()))
    if summary.compliance is not None:
        lines.append("gap     " + verdicts.describe_gap(summary.compliance.model_dump()))
    if summary.steering is not None:
        lines.append("steer   " + verdicts.describe_selection(summary.steering.model_dump()))
        lines += ["check   " + verdicts.describe_check(c.model_dump()) for c in summary.steering.checks]
    for family, comp in (summary.compliance_by_family or {}).items():
        lines.append("family  " + verdicts.describe_family_gap(family, comp.model_dump(),
                                                               family in summary.control_families))
    if summary.known_answer is not None:
        lines.append(summary.known_answer.statement)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in summary.timings_s.items() if v is not None)
    lines.append(f"time    {times or 'n/a'}")
    if paths.get("html"):
        lines.append(f"report  {paths['html']}")
    return "\n".join(lines)
