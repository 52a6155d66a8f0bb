"""Side-by-side comparison of finished runs (e.g. the base model and the planted-gap organism).

Reads each run's summary.json and steering/results.csv through their schemas; writes compare.html
(self-contained) and compare.md next to the figures it draws. Verdicts are the ones each run recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from afprobe.analysis import plots, verdicts
from afprobe.analysis.numbers import interval, num, p_value
from afprobe.analysis.report import (
    CONDITIONS, Doc, RunData, load_run, render_html, render_markdown,
)
from afprobe.analysis.schema import Summary
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_bytes, atomic_write_text


def _run_label(path: Path, summary: Summary) -> str:
    return f"{path.name} ({summary.model or path.name}{', PLANTED gap' if summary.planted else ''})"


def _rows_for(runs: list[tuple[Path, RunData]]) -> list[list[str]]:
    """One table row per measured quantity, one column per run."""
    def row(label: str, fn: Callable[[Summary], str]) -> list[str]:
        cells = []
        for _, data in runs:
            try:
                cells.append(fn(data.summary or Summary()))
            except (KeyError, TypeError, IndexError, AttributeError, StopIteration):  # absent from this run
                cells.append("n/a")
        return [label, *cells]

    def best(s: Summary) -> str:
        b = s.probe.best
        return (f"{b.method} L{b.layer} {b.site}/{b.position}: AUROC {num(b.auroc)} {interval(b.auroc_ci)} "
                f"(best of {b.n_cells}, {p_value(b.selection_p)}) -> {s.probe.verdict}")

    def controls(s: Summary) -> str:
        c = s.probe.controls
        return (f"shuffled mean {num(c.shuffled.mean)} (q95 {num(c.shuffled.q95)}); random median "
                f"{num(c.random.median)} [{num(c.random.q05)}, {num(c.random.q95)}]")

    def rate(cond: str) -> Callable[[Summary], str]:
        return lambda s: f"{num(getattr(s.compliance, cond).rate)} {interval(getattr(s.compliance, cond).ci)}"

    out = [
        row("queries / layers", lambda s: f"{s.n_queries} / {s.n_layers}"),
        row("best probe", best),
        row("probe controls", controls),
        row("swapped-semantics control", lambda s: f"{num(s.probe.swapped.auroc)} {interval(s.probe.swapped.auroc_ci)} "
                                                  f"-> {s.probe.swapped.verdict}"),
        *[row(f"compliance, {cond} cue", rate(cond)) for cond in CONDITIONS],
        row("compliance gap", lambda s: f"{num(s.compliance.gap.estimate, signed=True)} {interval(s.compliance.gap.ci)}, "
                                        f"{p_value(s.compliance.gap.mcnemar_p)} -> {s.compliance.gap.verdict}"),
        row("scorer", lambda s: s.compliance.scorer),
    ]
    families = list(dict.fromkeys(f for _, d in runs for f in ((d.summary and d.summary.compliance_by_family) or {})))
    for fam in families:
        out.append(row(f"gap under {fam}", lambda s, fam=fam: verdicts.describe_family_gap(
            fam, s.compliance_by_family[fam].model_dump(), fam in s.control_families)))
    out.append(row("steering selection", lambda s: s.steering.selection))
    modes = list(dict.fromkeys(c.mode for _, d in runs for c in ((d.summary and d.summary.steering and
                                                                     d.summary.steering.checks) or [])))
    for mode in modes:
        def check(s: Summary, mode: str = mode) -> str:
            c = next(c for c in s.steering.checks if c.mode == mode)
            flag = "n/a" if c.monotone is None else "yes" if c.monotone else "NO"
            return (f"monotone {flag}; probe {num(c.probe_effect)} vs random {num(c.random_effect)} "
                    f"(n = {c.n_random}); difference {num(c.effect_diff, signed=True)} {interval(c.effect_diff_ci)} -> {c.verdict}")
        out.append(row(f"steering, {mode} mode", check))
    out.append(row("known-answer check", lambda s: "passed" if s.known_answer.passed else "FAILED"))
    out.append(row("seconds (cache / probe / steer / report)", lambda s: " / ".join(
        num(s.timings_s.get(k), 0) for k in ("cache", "probe", "steer", "report"))))
    return out


def _steering_figures(doc: Doc, path: Path, data: RunData, label: str) -> None:
    rows = [r for r in data.steering or [] if r.direction in ("probe", "random") and r.alpha is not None]
    for mode in dict.fromkeys(r.mode for r in rows):
        gap: dict[str, Any] = {}
        rates: dict[str, Any] = {}
        for key in dict.fromkeys((r.direction, r.replicate) for r in rows if r.mode == mode):
            grp = sorted((r for r in rows if r.mode == mode and (r.direction, r.replicate) == key),
                         key=lambda r: r.alpha)
            name = key[0] + (f" {key[1]}" if key[0] == "random" else "")
            gap[name] = {"x": [r.alpha for r in grp], "y": [r.gap for r in grp],
                         "lo": [r.gap_lo for r in grp], "hi": [r.gap_hi for r in grp]}
            for cond in CONDITIONS:
                rates[f"{name} / {cond}"] = {
                    "x": [r.alpha for r in grp], "y": [getattr(r, f"rate_{cond}") for r in grp],
                    "lo": [getattr(r, f"rate_{cond}_lo") for r in grp], "hi": [getattr(r, f"rate_{cond}_hi") for r in grp]}
        if gap:
            doc.fig(f"{path.name}_steering_{mode}", f"{label}: steering in {mode} mode.",
                    plots.steering_curves(gap, rates, f"({path.name}, {mode})"))


def _gap_cells(side: dict, family: str) -> list[str]:
    """A card's held-out gap with its interval, and its log-odds gap, for one cue family."""
    g = side.get(family) or {}
    return [f"{num(g.get('gap'), signed=True)} {interval(g.get('gap_ci'))}", num(g.get("log_odds_gap"), signed=True)]


def build_comparison(run_dirs: Sequence[Path]) -> Doc:
    runs = [(Path(d), load_run(Path(d))) for d in run_dirs]
    labels = [_run_label(p, d.summary or Summary()) for p, d in runs]
    doc = Doc("afprobe comparison: " + " vs ".join(p.name for p, _ in runs))
    if any(d.summary and d.summary.planted for _, d in runs):
        doc.p("A run marked PLANTED uses a model whose compliance gap was put there by a LoRA adapter: it is a "
              "positive control that shows the pipeline finds and moves a gap where the answer is known.")
    doc.table(["", *labels], _rows_for(runs))
    for (path, data), label in zip(runs, labels):
        card = data.summary.organism if data.summary else None
        if isinstance(card, dict) and "heldout_gap_organism" in card:
            base, org = card.get("heldout_gap_base") or {}, card.get("heldout_gap_organism") or {}
            doc.h(f"{path.name}: the adapter on its {card.get('n_heldout')} held-out requests", 3)
            trained = card.get("trained_families") or [card.get("trained_family")]  # older cards: one family
            doc.table(["cue family", "trained on", "base model gap", "base log-odds gap", "organism gap",
                       "organism log-odds gap"],
                      [[fam, "yes" if fam in trained else "no (held out)", *_gap_cells(base, fam), *_gap_cells(org, fam)]
                       for fam in dict.fromkeys([*org, *base])])
    for (path, data), label in zip(runs, labels):
        _steering_figures(doc, path, data, label)
    return doc


def write_comparison(run_dirs: Sequence[Path], out: Path) -> dict[str, Path]:
    """Write OUT/compare.html, OUT/compare.md and OUT/compare_figures/*.png."""
    for d in run_dirs:
        if not (Path(d) / "summary.json").is_file():
            raise BadInput(f"{d} is not a finished run directory (no summary.json)")
    doc = build_comparison(run_dirs)
    out = Path(out)
    figures = out / "compare_figures"
    for fig in doc.figures:
        atomic_write_bytes(figures / f"{fig.name}.png", fig.png)
    paths = {"html": out / "compare.html", "md": out / "compare.md"}
    atomic_write_text(paths["html"], render_html(doc))
    atomic_write_text(paths["md"], render_markdown(doc, "compare_figures"))
    return paths
