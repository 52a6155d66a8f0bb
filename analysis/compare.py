"""Side-by-side comparison of finished runs (e.g. the base model and the planted-gap organism).

Reads each run's summary.json and steering/results.csv; writes compare.html (self-contained) and
compare.md next to the figures it draws.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from afprobe.analysis import plots
from afprobe.analysis.report import (
    CONDITIONS, Doc, _ci, _f, _get, _p, _signed, _transfer_verdict, load_run, render_html, render_markdown,
)
from afprobe.analysis.steering_table import steering_checks
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_bytes, atomic_write_text


def _run_label(path: Path, summary: dict) -> str:
    model = summary.get("model") or path.name
    return f"{path.name} ({model}{', PLANTED gap' if summary.get('planted') else ''})"


def _rows_for(runs: list[tuple[Path, Any]]) -> list[list[str]]:
    """One table row per measured quantity, one column per run."""
    def row(label: str, fn) -> list[str]:
        cells = []
        for _, data in runs:
            try:
                cells.append(fn(data.summary or {}, data))
            except (KeyError, TypeError, IndexError, StopIteration):  # absent from this run
                cells.append("n/a")
        return [label, *cells]

    def best(s: dict, _: Any) -> str:
        b = s["probe"]["best"]
        return f"{b['method']} L{b['layer']} {b['site']}/{b['position']}: AUROC {_f(b['auroc'])} {_ci(b['auroc_ci'])}"

    def controls(s: dict, _: Any) -> str:
        c = s["probe"]["controls"]
        return f"shuffled {_f(c['shuffled_auroc'])}, random {_f(c['random_auroc'])}"

    def rate(cond: str):
        return lambda s, _: f"{_f(s['compliance'][cond]['rate'])} {_ci(s['compliance'][cond]['ci'])}"

    out = [
        row("queries / layers", lambda s, _: f"{s['n_queries']} / {s['n_layers']}"),
        row("best probe", best),
        row("probe controls", controls),
        *[row(f"compliance, {cond} cue", rate(cond)) for cond in CONDITIONS],
        row("compliance gap", lambda s, _: f"{_signed(s['compliance']['gap'])} {_ci(s['compliance']['gap_ci'])}, "
                                           f"{_p(s['compliance']['p_value'])}"),
        row("scorer", lambda s, _: str(s["compliance"].get("scorer", "tag"))),
    ]
    families = list(dict.fromkeys(f for _, d in runs for f in (_get(d.summary, "compliance_by_family") or {})))
    for fam in families:
        out.append(row(f"gap under {fam}", lambda s, _, fam=fam: (
            f"{_signed(s['compliance_by_family'][fam]['gap'])} {_ci(s['compliance_by_family'][fam]['gap_ci'])}; "
            f"{_transfer_verdict(fam, s['compliance_by_family'][fam])}")))
    modes = list(dict.fromkeys(r["mode"] for _, d in runs for r in d.steering or []))
    for mode in modes:
        def check(s: dict, data: Any, mode: str = mode) -> str:
            c = next(c for c in steering_checks(data.steering) if c["mode"] == mode)
            ratio = c["effect_ratio"]
            flag = "n/a" if c["monotone"] is None else "yes" if c["monotone"] else "NO"
            return (f"monotone {flag}; moved {_f(c['probe_effect'])} vs random "
                    f"{_f(c['random_effect'])}" + ("" if ratio is None else " (control moved nothing)" if ratio == float("inf") else f" ({_f(ratio, 1)}x)"))
        out.append(row(f"steering, {mode} mode", check))
    out.append(row("known-answer check", lambda s, _: "passed" if s["known_answer"]["passed"] else "FAILED"))
    out.append(row("seconds (cache / probe / steer / report)", lambda s, _: " / ".join(
        _f(s["timings_s"].get(k), 0) for k in ("cache", "probe", "steer", "report"))))
    return out


def build_comparison(run_dirs: Sequence[Path]) -> Doc:
    runs = [(Path(d), load_run(Path(d))) for d in run_dirs]
    labels = [_run_label(p, d.summary or {}) for p, d in runs]
    doc = Doc("afprobe comparison: " + " vs ".join(p.name for p, _ in runs))
    if any((d.summary or {}).get("planted") for _, d in runs):
        doc.p("A run marked PLANTED uses a model whose compliance gap was put there by a LoRA adapter: it is a "
              "positive control that shows the pipeline finds and moves a gap where the answer is known.")
    doc.table(["", *labels], _rows_for(runs))
    for (path, data), label in zip(runs, labels):
        card = _get(data.summary, "organism")
        if isinstance(card, dict):
            base, org = card.get("heldout_gap_base") or {}, card.get("heldout_gap_organism") or {}
            doc.h(f"{path.name}: the adapter on its {card.get('n_heldout')} held-out requests", 3)
            doc.table(["cue family", "base model gap", "base log-odds gap", "organism gap", "organism log-odds gap"],
                      [[fam, f"{_signed(_get(base, fam, 'gap'))} {_ci(_get(base, fam, 'gap_ci'))}",
                        _signed(_get(base, fam, "log_odds_gap")),
                        f"{_signed(_get(org, fam, 'gap'))} {_ci(_get(org, fam, 'gap_ci'))}",
                        _signed(_get(org, fam, "log_odds_gap"))] for fam in dict.fromkeys([*org, *base])])
    for (path, data), label in zip(runs, labels):
        rows = data.steering or []
        for mode in dict.fromkeys(r["mode"] for r in rows):
            gap, rates = {}, {}
            for direction in ("probe", "random"):
                grp = sorted((r for r in rows if r["mode"] == mode and r["direction"] == direction),
                             key=lambda r: r["alpha"])
                if not grp:
                    continue
                gap[direction] = {"x": [r["alpha"] for r in grp], "y": [r["gap"] for r in grp],
                                  "lo": [r["gap_lo"] for r in grp], "hi": [r["gap_hi"] for r in grp]}
                for cond in CONDITIONS:
                    rates[f"{direction} / {cond}"] = {
                        "x": [r["alpha"] for r in grp], "y": [r[f"rate_{cond}"] for r in grp],
                        "lo": [r[f"rate_{cond}_lo"] for r in grp], "hi": [r[f"rate_{cond}_hi"] for r in grp]}
            if gap:
                doc.fig(f"{path.name}_steering_{mode}", f"{label}: steering in {mode} mode.",
                        plots.steering_curves(gap, rates, f"({path.name}, {mode})"))
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
