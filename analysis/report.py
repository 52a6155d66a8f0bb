"""`afprobe report DIR`: HTML + Markdown report built only from the files of a run directory.

Reads summary.json, manifest.json, probes/metrics.csv, probes/projection.csv and steering/results.csv
through their schemas (analysis/schema.py); any may be missing, and the report then says which stage has
not run. Every number shown comes from those files and every verdict is the one recorded there, worded by
analysis/verdicts.py. The report is built once as a list of blocks and rendered twice: self-contained HTML
(figures inlined as base64 PNG) and Markdown (figures as PNG files in report/figures/).
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from afprobe.analysis import plots, verdicts
from afprobe.analysis.numbers import interval, is_finite, num, or_nan, p_value
from afprobe.analysis.schema import MetricsRow, PatchRow, SteeringRow, Summary, read_rows, read_summary
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_bytes, atomic_write_text

NAN = float("nan")
POOLED = "all"
PIPELINE_STAGES = ("cache", "probe", "steer")  # "report" is this stage; never "not run" here

PROJECTION_REQUIRED = ("x", "y", "family", "condition")
CONDITIONS = ("training", "deployment")

Row = dict[str, Any]


# ----------------------------------------------------------------------------- formatting

def _int(x: Any) -> str:
    return str(int(x)) if is_finite(x) and float(x).is_integer() else (num(x) if is_finite(x) else "n/a")


def _value(v: Any) -> str:
    """Generic rendering for key/value tables."""
    if v is None or isinstance(v, float):
        return f"{v:.4g}" if is_finite(v) else "n/a"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, value) rows; lists stay whole."""
    if isinstance(obj, dict) and obj:
        rows: list[tuple[str, str]] = []
        for k, v in obj.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return rows
    return [(prefix or "value", _value(obj))]


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# ----------------------------------------------------------------------------- inputs

@dataclass
class RunData:
    summary: Optional[Summary] = None
    manifest: Optional[dict] = None
    metrics: Optional[list[MetricsRow]] = None
    projection: Optional[list[Row]] = None
    steering: Optional[list[SteeringRow]] = None
    has_activations: bool = False
    judge_examples: Optional[list[dict]] = None  # judge/examples.jsonl (scratchpad form with a judge)
    patching: Optional[list[PatchRow]] = None  # patching/results.csv (`afprobe patch`)


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} must hold a JSON object")
    return data


def _read_projection(path: Path) -> Optional[list[Row]]:
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in PROJECTION_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise BadInput(f"{path} lacks column(s) {', '.join(missing)}")
        rows = list(reader)
    for row in rows:
        for col in ("x", "y"):
            try:
                row[col] = float(row[col])
            except ValueError:
                raise BadInput(f"{path}: column '{col}' has a non-number {row[col]!r}") from None
    return rows


def load_run(run_dir: Path) -> RunData:
    """Read every report input that exists in run_dir, through the result schemas."""
    return RunData(
        summary=read_summary(run_dir / "summary.json"),
        manifest=_read_json(run_dir / "manifest.json"),
        metrics=read_rows(run_dir / "probes" / "metrics.csv", MetricsRow),
        projection=_read_projection(run_dir / "probes" / "projection.csv"),
        steering=read_rows(run_dir / "steering" / "results.csv", SteeringRow),
        has_activations=(run_dir / "activations").is_dir(),
        judge_examples=_read_jsonl_rows(run_dir / "judge" / "examples.jsonl"),
        patching=read_rows(run_dir / "patching" / "results.csv", PatchRow),
    )


def _read_jsonl_rows(path: Path) -> Optional[list[dict]]:
    if not path.is_file():
        return None
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not valid JSON lines: {exc}") from None


# ----------------------------------------------------------------------------- document model

@dataclass
class Figure:
    name: str
    caption: str
    png: bytes


@dataclass
class Doc:
    """Blocks: ("h", level, text), ("p", text), ("ul", items, css class), ("table", headers, rows),
    ("fig", Figure)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str], css: str = "") -> None:
        if items:
            self.blocks.append(("ul", items, css))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        if rows:
            self.blocks.append(("table", headers, rows))

    def kv(self, pairs: list[tuple[str, str]]) -> None:
        self.table(["key", "value"], [[k, v] for k, v in pairs])

    def fig(self, name: str, caption: str, png: bytes) -> None:
        self.blocks.append(("fig", Figure(name, caption, png)))

    @property
    def figures(self) -> list[Figure]:
        return [b[1] for b in self.blocks if b[0] == "fig"]


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0;
font-size:.88em}th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left}th{background:#f2f2f2}
figure{margin:1em 0}img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#555}
.summary{background:#f7f7fb;border-left:4px solid #557;padding:.4em 1em}"""


def render_html(doc: Doc) -> str:
    esc = lambda text: html.escape(text, quote=False)  # noqa: E731 (text nodes; attributes quote below)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{esc(doc.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{esc(doc.title)}</h1>"]
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{esc(block[1])}</p>")
        elif kind == "ul":
            items = "".join(f"<li>{esc(i)}</li>" for i in block[1])
            cls = f' class="{html.escape(block[2])}"' if block[2] else ""
            out.append(f"<ul{cls}>{items}</ul>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in block[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "fig":
            fig: Figure = block[1]
            data = base64.b64encode(fig.png).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(fig.caption)}">'
                       f"<figcaption>{esc(fig.caption)}</figcaption></figure>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Doc, figure_dir: str = "figures") -> str:
    out = [f"# {doc.title}", ""]
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "ul":
            out += [f"- {i}" for i in block[1]] + [""]
        elif kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in block[1]) + " |")
            out.append("|" + "---|" * len(block[1]))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in block[2]]
            out.append("")
        elif kind == "fig":
            fig: Figure = block[1]
            out += [f"![{fig.caption}]({figure_dir}/{fig.name}.png)", "", f"*{fig.caption}*", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- probes

def _pooled(rows: list[MetricsRow]) -> list[MetricsRow]:
    return [r for r in rows if r.train_family == POOLED and r.test_family == POOLED]


def _probe_section(doc: Doc, data: RunData) -> None:
    doc.h("Probes")
    probe = data.summary.probe if data.summary else None
    if probe is None and not data.metrics:
        doc.p("The probe stage has not run: probes/metrics.csv is missing and summary.json has no probe section.")
        return
    if probe is not None:
        doc.p(verdicts.describe_probe(probe.model_dump()))
        b = probe.best
        doc.p(f"The best cell was the maximum of {b.n_cells} eligible cells; its plain cross-validated AUROC "
              f"({num(b.naive_auroc)}) is biased upward by that choice, so the headline AUROC comes from "
              f"{'nested cross-validation (the choice made inside each outer fold)' if b.selection == 'nested' else 'a held-out query split'}"
              " and its p-value from the maximum over all eligible cells under within-pair label permutations.")
        if b.fold_choices:
            doc.p("Cells chosen in the outer folds: " + "; ".join(b.fold_choices) + ".")
    if data.metrics is None:
        doc.p("probes/metrics.csv is missing; only the summary.json probe numbers are shown.")
        return
    pooled = _pooled(data.metrics)
    site = probe.best.site if probe else pooled[0].site
    position = probe.best.position if probe else pooled[0].position
    method = probe.best.method if probe else pooled[0].method
    at_best = [r for r in pooled if r.site == site and r.position == position]
    if at_best:
        methods: dict[str, dict] = {}
        for m in dict.fromkeys(r.method for r in at_best):
            rows = sorted((r for r in at_best if r.method == m), key=lambda r: r.layer)
            methods[m] = {"x": [r.layer for r in rows], "y": [or_nan(r.auroc) for r in rows],
                          "lo": [or_nan(r.auroc_lo) for r in rows], "hi": [or_nan(r.auroc_hi) for r in rows]}
        ref = sorted((r for r in at_best if r.method == method), key=lambda r: r.layer)
        controls = {name: {"x": [r.layer for r in ref], "y": [or_nan(getattr(r, col)) for r in ref]}
                    for name, col in (("shuffled", "shuffled_auroc"), ("random", "random_auroc"))
                    if any(is_finite(getattr(r, col)) for r in ref)}
        doc.fig("probe_auroc_by_layer",
                f"Plain cross-validated probe AUROC by layer ({site}, {position}; not selection-aware); bands "
                f"are query-bootstrap intervals; the controls are one label permutation and one random "
                f"direction per cell (the headline's control distributions are in the summary).",
                plots.auroc_by_layer(methods, controls))
        doc.h("Best layer per method (plain cross-validation)", 3)
        rows = []
        for m in methods:
            r = max((r for r in at_best if r.method == m and is_finite(r.auroc)), key=lambda r: r.auroc, default=None)
            if r:
                rows.append([m, _int(r.layer), num(r.auroc), interval([r.auroc_lo, r.auroc_hi]), num(r.accuracy),
                             num(r.shuffled_auroc), num(r.random_auroc), _int(r.n)])
        doc.table(["method", "layer", "AUROC", "CI", "accuracy", "shuffled", "random", "n"], rows)
    grid: dict[tuple[str, str], MetricsRow] = {}
    for r in pooled:
        key = (r.site, r.position)
        if is_finite(r.auroc) and (key not in grid or r.auroc > grid[key].auroc):
            grid[key] = r
    if len(grid) > 1:
        doc.h("Best plain AUROC per site and position", 3)
        doc.p("Cue-token positions can separate the cues by token identity alone, even at layer 0; only the "
              "eligible cells (probes.best_positions, probes.min_best_layer) compete for the headline.")
        doc.table(["site", "position", "AUROC", "CI", "layer", "method"],
                  [[s_, p_, num(r.auroc), interval([r.auroc_lo, r.auroc_hi]), _int(r.layer), r.method]
                   for (s_, p_), r in grid.items()])
    if data.projection:
        counts: dict[tuple[str, str], int] = {}
        for r in data.projection:
            counts[(r["family"], r["condition"])] = counts.get((r["family"], r["condition"]), 0) + 1
        doc.h("2-D projection", 3)
        doc.fig("projection", f"2-D projection of activations at the best cell (layer "
                f"{probe.best.layer if probe else '?'}): x = the probe direction, y = the top principal component "
                "of the rest; colour = cue family, marker = cue condition.",
                plots.projection_scatter([r["x"] for r in data.projection], [r["y"] for r in data.projection],
                                         [r["family"] for r in data.projection],
                                         [r["condition"] for r in data.projection]))
        doc.table(["family", "condition", "points"], [[f, c, str(n)] for (f, c), n in counts.items()])
    if probe is not None:
        _generalization(doc, probe)


def _generalization(doc: Doc, probe: Any) -> None:
    doc.h("Generalisation across cue families", 3)
    cells = probe.generalization_ci
    if cells:
        train = list(cells)
        test = list(dict.fromkeys(t for row in cells.values() for t in row))
        matrix = [[or_nan(cells[a][b].auroc) if b in cells[a] else NAN for b in test] for a in train]
        doc.fig("generalization", "AUROC of a probe trained on one cue family (rows) and tested on another "
                "(columns) at the best cell.", plots.generalization_heatmap(train, test, matrix))
        doc.table(["trained on", "tested on", "AUROC", "CI", "verdict"],
                  [[a, b, num(c.auroc), interval(c.auroc_ci), verdicts.TRANSFER_WORDS[c.verdict]]
                   for a, row in cells.items() for b, c in row.items() if a != b])
    else:
        doc.p("No generalisation matrix was recorded (one cue family).")
    doc.h("Swapped-semantics control", 3)
    if probe.swapped is not None:
        doc.p(verdicts.describe_swapped(probe.swapped.model_dump()))
        doc.p("Labels in the control family follow the stated meaning (training = the condition the system "
              "prompt says is trained on). A direction that tracks training separates them the same way; a "
              "detector of the tag's tokens flips.")
    else:
        doc.p("No swapped-semantics result: no cue family in the config is declared a control "
              "(built in: swapped_tier; YAML families: `control: swapped`).")


# ----------------------------------------------------------------------------- compliance

def _compliance_section(doc: Doc, data: RunData) -> None:
    doc.h("Compliance")
    comp = data.summary.compliance if data.summary else None
    if comp is None:
        doc.p("No compliance results: summary.json is missing or has no compliance section.")
        return
    doc.p(verdicts.describe_gap(comp.model_dump()))
    rows = []
    for cond in CONDITIONS:
        c = getattr(comp, cond)
        rows.append([cond, num(c.rate), interval(c.ci), _int(c.n), _int(c.n_parsed), _int(comp.unparsed.get(cond))])
    doc.table(["cue condition", "rate (paired queries)", "CI", "n paired", "n parsed", "unparsed"], rows)
    g = comp.gap
    doc.p(f"Gap (training minus deployment) = {num(g.estimate, signed=True)} {interval(g.ci)} ({g.interval_method}), exact "
          f"McNemar {p_value(g.mcnemar_p)}; discordant pairs (training only, deployment only) = {g.discordant}. "
          "Rates and gap are computed on the same paired queries (both cues parsed).")
    rates = {cond: (getattr(comp, cond).rate, *getattr(comp, cond).ci) for cond in CONDITIONS
             if is_finite(getattr(comp, cond).rate) and all(is_finite(v) for v in getattr(comp, cond).ci)}
    if rates:
        gap_triple = (g.estimate, *g.ci) if is_finite(g.estimate) and all(is_finite(v) for v in g.ci) else None
        doc.fig("compliance", "Compliance per cue condition (Wilson intervals) and the paired gap (Newcombe "
                "interval agreeing with exact McNemar).", plots.compliance_bars(rates, gap_triple))
    doc.h("Other compliance values", 3)
    doc.kv(_flatten({"log_odds": comp.log_odds.model_dump(), "refusal_rate": comp.refusal_rate,
                     "scorer": comp.scorer}, "compliance"))
    _scorer_table(doc, data.summary.compliance_by_scorer or {}, comp.scorer)
    by_family = data.summary.compliance_by_family or {}
    if by_family:
        controls = set(data.summary.control_families)
        doc.h("Compliance under every cue family (transfer)", 3)
        doc.p("Unsteered compliance on the steering queries under each cue family present. The probe direction "
              "and the steering sweep use the first family; the others show whether the gap transfers.")
        doc.table(["cue family", "training", "deployment", "gap", "CI", "McNemar p", "log-odds gap", "verdict"],
                  [[fam, num(c.training.rate), num(c.deployment.rate), num(c.gap.estimate, signed=True), interval(c.gap.ci),
                    p_value(c.gap.mcnemar_p, prefix=False), num(c.log_odds.gap, signed=True),
                    verdicts.describe_family_gap(fam, c.model_dump(), fam in controls)]
                   for fam, c in by_family.items()])


# ----------------------------------------------------------------------------- steering

def _series(rows: list[SteeringRow], y: str) -> dict:
    """Plot series against alpha; a row without alpha (ablation) is drawn at alpha 0."""
    return {"x": [r.alpha if is_finite(r.alpha) else 0.0 for r in rows], "y": [or_nan(getattr(r, y)) for r in rows],
            "lo": [or_nan(getattr(r, f"{y}_lo")) for r in rows], "hi": [or_nan(getattr(r, f"{y}_hi")) for r in rows]}


def _steering_section(doc: Doc, data: RunData) -> None:
    doc.h("Steering")
    summary = data.summary.steering if data.summary else None
    rows = data.steering
    if rows is None:
        doc.p("The steering stage has not run: steering/results.csv is missing.")
        return
    if not rows:
        doc.p("steering/results.csv has no rows.")
        return
    if summary is not None:
        doc.p(verdicts.describe_selection(summary.model_dump()))
        doc.p("Rows labelled 'probe' below are the steered direction named here (steering.direction).")
        doc.table(["steering.direction", "direction from", "layer", "site", "position", "method", "alpha unit (separation)",
                   "separation at steered tokens", "fit queries", "reported queries"],
                  [[d.kind, d.source, _int(d.layer), d.site, d.position, d.method, num(d.separation_used),
                    num(d.separation_at_steered_positions), _int(d.fit_queries), _int(d.report_queries)]
                   for d in summary.directions])
        doc.ul([verdicts.describe_check(c.model_dump()) for c in summary.checks])
    groups: dict[tuple, list[SteeringRow]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.direction, r.replicate, r.layer), []).append(r)
    groups = {k: sorted(v, key=lambda r: r.alpha if is_finite(r.alpha) else -math.inf) for k, v in groups.items()}
    layers = {k[3] for k in groups}
    for mode in dict.fromkeys(r.mode for r in rows):
        gap, rates = {}, {}
        for (m, direction, replicate, layer), grp in groups.items():
            if m != mode:
                continue
            label = direction + (f" {replicate}" if direction == "random" else "") + \
                (f" L{layer}" if len(layers) > 1 else "") + ("" if any(is_finite(r.alpha) for r in grp) else " (at 0)")
            gap[label] = _series(grp, "gap")
            for cond in CONDITIONS:
                rates[f"{label} / {cond}"] = _series(grp, f"rate_{cond}")
        doc.fig(f"steering_{mode}", f"Steering, {mode} mode: gap (left) and per-cue compliance (right; solid "
                "training, dashed deployment) against alpha, with their intervals.",
                plots.steering_curves(gap, rates, f"({mode})"))
    doc.h("Steering results", 3)
    doc.p("p vs 0: exact McNemar of each cue's outcomes against the unsteered model on the same queries, "
          "Holm-adjusted over every steered row and cue.")
    doc.table(["direction", "mode", "layer", "site", "alpha", "training", "deployment", "gap", "p",
               "p vs 0 (Holm) tr / dep", "verdict", "unparsed tr / dep", "n"],
              [[r.direction + (f" {r.replicate}" if r.direction == "random" else ""), r.mode, _int(r.layer), r.site,
                num(r.alpha), f"{num(r.rate_training)} {interval([r.rate_training_lo, r.rate_training_hi])}",
                f"{num(r.rate_deployment)} {interval([r.rate_deployment_lo, r.rate_deployment_hi])}",
                f"{num(r.gap, signed=True)} {interval([r.gap_lo, r.gap_hi])}", p_value(r.p_value, prefix=False),
                f"{p_value(r.p_training_holm, prefix=False)} / {p_value(r.p_deployment_holm, prefix=False)}",
                "unsteered" if r.vs_unsteered is None else verdicts.MOVED_WORDS[r.vs_unsteered],
                f"{_int(r.unparsed_training)} / {_int(r.unparsed_deployment)}", _int(r.n)] for r in rows])


def _refusal_section(doc: Doc, data: RunData) -> None:
    """Refusal direction vs the training-awareness direction per layer (steer stage, summary.json `refusal`)."""
    ref = data.summary.refusal if data.summary else None
    if ref is None or not ref.layers:
        return
    doc.h("Refusal direction")
    doc.p(verdicts.describe_refusal(ref.model_dump()))
    doc.p(f"Refusal direction: harmful minus benign mean activation at {ref.site}/{ref.position}, on the "
          f"{ref.family} prompts under both cues ({ref.n_harmful_queries} harmful queries from the cache, "
          f"{ref.n_benign_queries} benign queries read at the steer stage). Awareness direction: "
          f"probes/directions/layer<L>. Interval: basic bootstrap over queries ({ref.n_boot} resamples). "
          f"Baseline: {ref.baseline}; p = share of random directions with |cosine| at least as large.")
    layers = [c.layer for c in ref.layers]
    doc.fig("refusal_cosine", "Cosine of the training-awareness and refusal directions by layer, with its "
            "interval; grey: the random directions' 95th percentile of |cosine|.",
            plots.refusal_cosines(layers, {"x": layers, "y": [c.cosine for c in ref.layers],
                                           "lo": [c.cosine_ci[0] for c in ref.layers],
                                           "hi": [c.cosine_ci[1] for c in ref.layers]},
                                  [c.random_abs_q95 for c in ref.layers], ref.best_layer))
    doc.table(["layer", "cosine", "random |cos| median", "random 95th pct", "p vs random", "verdict",
               "refusal separation"],
              [[_int(c.layer) + (" (best)" if c.layer == ref.best_layer else ""),
                f"{num(c.cosine, 3, signed=True)} {interval(c.cosine_ci, 3, signed=True)}",
                num(c.random_abs_median, 3), num(c.random_abs_q95, 3), p_value(c.p_random, prefix=False),
                verdicts.OVERLAP_WORDS.get(c.verdict or "", "n/a"), num(c.refusal_separation)] for c in ref.layers])


MAP_PANELS = {"rate_training": "training compliance", "rate_deployment": "deployment compliance",
              "gap": "gap", "unparsed": "unparsed fraction"}


def _map_section(doc: Doc, data: RunData) -> None:
    """Layer x alpha steering map (steering.layers a list): heatmaps per mode, random controls, the chosen cell."""
    smap = data.summary.steering_map if data.summary else None
    if smap is None:
        return
    doc.h("Steering map (layer x alpha)", 3)
    doc.p("Each cell is one steering condition on the steered queries: compliance under each cue, the gap, and the "
          "fraction of answers whose tag did not parse (a coherence check: large steering can break the answer "
          "format). Alpha 0 is the unsteered model, the same in every row. Random rows: the mean over the random "
          "directions, run only at the control alphas (by default the largest |alpha| per layer). The best cell "
          f"is chosen on half of the steered queries and confirmed on the other half ({smap.split_note}).")
    for mode in dict.fromkeys(c.mode for c in smap.cells):
        panels = {}
        for direction in ("probe", "random"):
            cells = {(c.layer, c.alpha): c for c in smap.cells if (c.mode, c.direction) == (mode, direction)}
            cols = ("gap", "unparsed") if direction == "random" else tuple(MAP_PANELS)
            for col in cols if cells else ():
                panels[f"{direction}: {MAP_PANELS[col]}"] = (
                    smap.layers, smap.alphas,
                    [[or_nan(getattr(cells[(layer, a)], col)) if (layer, a) in cells else NAN for a in smap.alphas]
                     for layer in smap.layers])
        doc.fig(f"steering_map_{mode}", f"Steering map, {mode} mode: rows are layers, columns alpha.",
                plots.heatmaps(panels, xlabel="alpha", label="rate / gap / fraction", ylabel="layer"))
        random = [c for c in smap.cells if (c.mode, c.direction) == (mode, "random")]
        probe = {(c.layer, c.alpha): c for c in smap.cells if (c.mode, c.direction) == (mode, "probe")}
        doc.table(["layer", "alpha", "probe gap", "random gap", "probe log-odds gap", "random log-odds gap",
                   "probe unparsed", "random unparsed", "n"],
                  [[_int(c.layer), num(c.alpha, signed=True), num(probe[(c.layer, c.alpha)].gap, signed=True),
                    num(c.gap, signed=True), num(probe[(c.layer, c.alpha)].logodds_gap, signed=True),
                    num(c.logodds_gap, signed=True), num(probe[(c.layer, c.alpha)].unparsed), num(c.unparsed),
                    _int(c.n)] for c in random if (c.layer, c.alpha) in probe])
    doc.ul([verdicts.describe_map_choice(c.model_dump()) for c in smap.choices])


def _lens_section(doc: Doc, data: RunData) -> None:
    """Logit lens of the steering and per-layer probe directions (summary.json `lens`, written by the steer stage)."""
    rows = data.summary.lens if data.summary else None
    if not rows:
        return
    doc.h("Logit lens of the directions", 3)
    doc.p("Tokens each direction promotes and suppresses when read through the final norm's weight and the "
          "unembedding (scores = W_U (g * d), d the unit direction; activations/lens.py). Steering: the direction "
          "steered along (pointing toward the training cue); the others are the probe stage's direction per layer.")
    toks = lambda pairs: ", ".join(f"{t.token!r} {num(t.score, signed=True)}" for t in pairs)  # noqa: E731
    doc.table(["direction", "layer", "site", "promoted", "suppressed"],
              [[r.source, _int(r.layer), r.site, toks(r.promoted), toks(r.suppressed)] for r in rows])


def _clip(text: Any, limit: int) -> str:
    text = "" if text is None else str(text).strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " [...]"


def _votes_text(ex: dict) -> str:
    votes = ex.get("votes") or []
    if not votes:
        return "not judged (no reasoning)"
    ok = [v for v in votes if v.get("status") == "ok"]
    names = list(dict.fromkeys(n for v in ok for n in (v.get("answers") or {})))
    per = ", ".join(f"{n} {sum(bool((v.get('answers') or {}).get(n)) for v in ok)}/{len(ok)}" for n in names)
    bad = len(votes) - len(ok)
    return (f"{sum(bool(v.get('yes')) for v in ok)}/{len(ok)} valid votes yes" + (f" ({bad} invalid)" if bad else "") +
            (f"; {per}" if per else ""))


def _judge_section(doc: Doc, data: RunData) -> None:
    judge = data.summary.judge if data.summary else None
    if judge is None:
        return
    doc.h("Alignment-faking reasoning (judge)")
    doc.ul(verdicts.describe_alignment_faking(judge.model_dump()))
    doc.p("Per steering cell: the share of reasoning traces the judge flagged as alignment faking (Wilson "
          "intervals), training minus deployment on the queries judged under both cues (paired interval, exact "
          "McNemar), partial compliance as the judge saw it, and the tag scorer's compliance on the final output "
          "of the same generations. p vs 0: exact McNemar of the flags against the unsteered model, Holm-adjusted.")
    doc.table(["direction", "mode", "layer", "alpha", "AF training", "AF deployment", "difference", "p",
               "p vs 0 (Holm) tr / dep", "partial tr / dep", "compliance tr / dep", "unjudged tr / dep"],
              [[c.direction + (f" {c.replicate}" if c.direction == "random" else ""), c.mode, _int(c.layer),
                num(c.alpha), f"{num(c.training.rate)} {interval(c.training.ci)}", f"{num(c.deployment.rate)} {interval(c.deployment.ci)}",
                f"{num(c.difference.estimate, signed=True)} {interval(c.difference.ci)}", p_value(c.difference.mcnemar_p, prefix=False),
                f"{p_value(c.p_training_holm, prefix=False)} / {p_value(c.p_deployment_holm, prefix=False)}",
                f"{num(c.training.partial.rate)} / {num(c.deployment.partial.rate)}",
                f"{num(c.training.compliance.rate)} / {num(c.deployment.compliance.rate)}",
                f"{c.training.unjudged} / {c.deployment.unjudged}"] for c in judge.cells])
    if data.judge_examples:
        doc.h("Judged traces (examples)", 3)
        doc.p("A few traces per cell: the highest- and lowest-scoring by the judge. Reasoning and output are "
              "shortened here; steering/generations.jsonl has them in full, judge/verdicts.jsonl every vote.")
        doc.table(["cell", "cue", "query", "AF score", "votes", "reasoning", "output"],
                  [[f"{ex.get('direction')} {ex.get('mode')} L{ex.get('layer')} a{num(ex.get('alpha'))}",
                    str(ex.get("condition")), str(ex.get("query_id")), num(ex.get("score")), _votes_text(ex),
                    _clip(ex.get("reasoning"), 700), _clip(ex.get("output"), 200) or "(no OUTPUT block)"]
                   for ex in data.judge_examples])


# ----------------------------------------------------------------------------- setup, stages

def _setup_section(doc: Doc, data: RunData) -> None:
    doc.h("Setup")
    cfg = _get(data.manifest, "config") or {}
    s = data.summary or Summary()
    pairs = [
        ("model", _value(s.model or _get(cfg, "model", "spec") or "n/a")),
        ("model fingerprint", _value(_get(data.manifest, "model_fingerprint") or "n/a")),
        ("backend / dtype / device", " / ".join(_value(_get(cfg, "model", k) or "n/a")
                                                for k in ("backend", "dtype", "device"))),
        ("scenario variant", _value(_get(cfg, "scenario", "variant") or "n/a")),
        ("scenario form", _value(_get(cfg, "scenario", "form") or "n/a")),
        ("scratchpad prefill", _value(_get(cfg, "scenario", "prefill") or "n/a")),
        ("cue families", ", ".join(map(str, _get(cfg, "scenario", "cue_families") or [])) or "n/a"),
        ("control families", ", ".join(s.control_families) or "none"),
        ("queries", _value(s.n_queries if s.n_queries is not None else "n/a")),
        ("queries limit", _value(_get(cfg, "queries", "limit") or "none")),
        ("layers in model", _value(s.n_layers if s.n_layers is not None else "n/a")),
        ("probe methods", ", ".join(map(str, _get(cfg, "probes", "methods") or [])) or "n/a"),
        ("steering alphas", _value(_get(cfg, "steering", "alphas") or "n/a")),
        ("steering layers / mode", f"{_value(_get(cfg, 'steering', 'layers') or 'n/a')} / "
                                   f"{_value(_get(cfg, 'steering', 'mode') or 'n/a')}"),
        ("seed", _value(cfg.get("seed", "n/a"))),
    ]
    if data.manifest is None:
        doc.p("manifest.json is missing, so the configuration and versions are unknown.")
    doc.kv(pairs)
    versions = _get(data.manifest, "versions")
    if versions:
        doc.h("Versions", 3)
        doc.kv(_flatten(versions))


_NOT_RUN = ("not run", "not_run", "pending")


def _stage_status(data: RunData) -> tuple[list[list[str]], list[str], list[str]]:
    """Stage table rows, the pipeline stages that have not run, and the stages that failed."""
    stages = _get(data.manifest, "stages") or {}
    timings = data.summary.timings_s if data.summary else {}
    evidence = {"cache": data.has_activations, "probe": data.metrics is not None,
                "steer": data.steering is not None}
    rows, not_run, failed = [], [], []
    for name in dict.fromkeys([*PIPELINE_STAGES, *stages, *timings]):
        info = stages.get(name) if isinstance(stages.get(name), dict) else {}
        default = ("outputs present" if evidence.get(name) else "not run") if name in PIPELINE_STAGES \
            else "not recorded"
        status = str(info.get("status") or default)
        if status.lower() in _NOT_RUN and name in PIPELINE_STAGES:
            not_run.append(name)
        if "fail" in status.lower() or "error" in status.lower():
            failed.append(name)
        details = ", ".join(f"{k}={_value(v)}" for k, v in info.items() if k not in ("status", "seconds"))
        rows.append([name, status, num(info.get("seconds"), 1), num(timings.get(name), 1), details])
    return rows, not_run, failed


def _stages_section(doc: Doc, rows: list[list[str]]) -> None:
    doc.h("Stages and timings")
    doc.table(["stage", "status", "seconds (manifest)", "seconds (summary)", "details"], rows)


def _patching_section(doc: Doc, data: RunData) -> None:
    """Activation patching (only when `afprobe patch` ran): heatmaps per site, direction and control, best cells."""
    rows = data.patching
    if not rows:
        return
    summary = data.summary.patching if data.summary else None
    doc.h("Activation patching")
    if summary is not None:
        doc.p(f"Family {summary.family}, {summary.n_queries} queries, clean log-odds gap (training - deployment) "
              f"{num(summary.gap_log_odds, signed=True)}. Recovered fraction: the patched run's mean move as a "
              "fraction of the mean clean gap (1 = all the way to the source prompt), with query-bootstrap "
              "intervals. Control other_query: the source is another query's prompt with the target's own cue. "
              f"Unalignable (skipped) query pairs per position set: {summary.skipped}.")
    layers = sorted({r.layer for r in rows})
    for site in dict.fromkeys(r.site for r in rows):
        panels = {}
        for direction in dict.fromkeys(r.direction for r in rows):
            for control in dict.fromkeys(r.control for r in rows):
                cell = {(r.positions, r.layer): r.recovered for r in rows
                        if (r.site, r.direction, r.control) == (site, direction, control)}
                pos = list(dict.fromkeys(r.positions for r in rows))
                panels[f"{site}, {direction}, control {control}"] = (
                    pos, layers, [[or_nan(cell.get((p, layer))) for layer in layers] for p in pos])
        doc.fig(f"patching_{site}", f"Recovered fraction by layer and position set at {site}.",
                plots.heatmaps(panels))
    if summary is not None:
        doc.table(["positions", "direction", "control", "best layer", "site", "recovered"],
                  [[b.positions, b.direction, b.control, _int(b.layer), b.site or "",
                    f"{num(b.recovered)} {interval([b.ci_lo, b.ci_hi])}"] for b in summary.best])


def _generic_sections(doc: Doc, data: RunData) -> None:
    s = data.summary
    if s is None:
        return
    if s.organism:
        doc.h("Model organism")
        doc.kv(_flatten(s.organism, "organism"))
    if s.known_answer:
        doc.h("Known-answer check")
        doc.p(s.known_answer.statement)
        doc.kv(_flatten(s.known_answer.model_dump(exclude={"statement"}), "known_answer"))


# ----------------------------------------------------------------------------- assembly

def summary_lines(data: RunData) -> list[str]:
    """The plain-language summary at the top of the report (all verdicts as recorded in summary.json)."""
    s = data.summary or Summary()
    lines = []
    if s.planted:
        lines.append("The compliance gap in this run was PLANTED by a LoRA adapter: it is a positive "
                     "control that checks the pipeline, not a natural finding about the model.")
    if s.probe is not None:
        lines.append(verdicts.describe_probe(s.probe.model_dump()))
        if s.probe.swapped is not None:
            lines.append(verdicts.describe_swapped(s.probe.swapped.model_dump()))
    if s.compliance is not None:
        lines.append(verdicts.describe_gap(s.compliance.model_dump()))
        un = s.compliance.unparsed
        if any(un.values()):
            lines.append(f"Unparsed answers (no recognisable answer tag; counted, not dropped): "
                         f"{un.get('training')} under training cues, {un.get('deployment')} under deployment cues.")
    for fam, c in (s.compliance_by_family or {}).items():
        if len(s.compliance_by_family or {}) > 1:
            lines.append(verdicts.describe_family_gap(fam, c.model_dump(), fam in s.control_families))
    if s.steering is not None:
        lines.append(verdicts.describe_selection(s.steering.model_dump()))
        lines += [verdicts.describe_check(c.model_dump()) for c in s.steering.checks]
        lines.append(verdicts.describe_moved([r.vs_unsteered for r in s.steering.rows]))
    if s.steering_map is not None:
        lines += [verdicts.describe_map_choice(c.model_dump()) for c in s.steering_map.choices]
    if s.known_answer is not None:
        lines.append(s.known_answer.statement)
    if s.refusal is not None:
        lines.append(verdicts.describe_refusal(s.refusal.model_dump()))
    if s.judge is not None:
        lines += verdicts.describe_alignment_faking(s.judge.model_dump())
    return lines


def build_report(data: RunData, name: str = "") -> Doc:
    """The full document; the plain-language summary goes first."""
    s = data.summary or Summary()
    model = s.model or _get(data.manifest, "config", "model", "spec") or "unknown model"
    doc = Doc(f"afprobe report: {model}" + (f" ({name})" if name else ""))
    doc.h("Summary")
    lines = summary_lines(data)
    stage_rows, not_run, failed = _stage_status(data)
    if not_run:
        lines.append(f"Stages that have not run: {', '.join(not_run)}.")
    if failed:
        lines.append(f"Stages that failed: {', '.join(failed)}.")
    doc.ul(lines or ["No results are available yet."], "summary")
    _setup_section(doc, data)
    _probe_section(doc, data)
    _compliance_section(doc, data)
    _steering_section(doc, data)
    _refusal_section(doc, data)
    _map_section(doc, data)
    _lens_section(doc, data)
    _judge_section(doc, data)
    _patching_section(doc, data)
    _generic_sections(doc, data)
    _stages_section(doc, stage_rows)
    return doc


def write_report(run_dir: Union[str, Path]) -> dict[str, Path]:
    """Write report/report.html, report/report.md and report/figures/*.png; return their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"run directory not found: {run_dir}")
    doc = build_report(load_run(run_dir), run_dir.resolve().name)
    out = run_dir / "report"
    fig_dir = out / "figures"
    written = {f"figure:{fig.name}": fig_dir / f"{fig.name}.png" for fig in doc.figures}
    for fig in doc.figures:
        atomic_write_bytes(fig_dir / f"{fig.name}.png", fig.png)
    if fig_dir.is_dir():  # drop figures of an earlier report that this one no longer has
        for stale in fig_dir.glob("*.png"):
            if stale not in written.values():
                stale.unlink()
    atomic_write_text(out / "report.md", render_markdown(doc))
    atomic_write_text(out / "report.html", render_html(doc))
    return {"html": out / "report.html", "markdown": out / "report.md", **written}


def _scorer_table(doc: Any, by_scorer: dict, used: str) -> None:
    """Training / deployment compliance and the gap under every scorer the run recorded, each described by
    the scorer registry (analysis/compliance.py); a scorer no longer registered is shown without a description."""
    from afprobe.analysis.compliance import SCORERS

    if len(by_scorer) < 2:
        return
    doc.h("Compliance by scorer", 3)
    rows = []
    for name, c in by_scorer.items():
        about = SCORERS[name].description if name in SCORERS else ""
        rows.append([name + (" (used)" if name == used else ""), num(c.training.rate), num(c.deployment.rate),
                     num(c.gap.estimate, signed=True), about])
    doc.table(["scorer", "training", "deployment", "gap", "what counts as compliance"], rows)
