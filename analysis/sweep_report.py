"""The sweep comparison: DIR/sweep.csv (one row per cell, read from each cell's summary.json), and
DIR/sweep.html (self-contained) + DIR/sweep.md with a gap heatmap over the two most varying keys, probe AUROC
by relative depth (one line per model) and the steering effect per cell, each with its intervals.

Verdicts are read from the summaries (decided in analysis/verdicts.py), never decided here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from afprobe.analysis.numbers import finite, interval, num, or_nan
from afprobe.analysis.plots import _figure, _png
from afprobe.analysis.report import Doc, POOLED, render_html, render_markdown
from afprobe.analysis.schema import MetricsRow, Summary, read_rows, read_summary
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_bytes, atomic_write_csv, atomic_write_text

COLUMNS = ["cell", "status", "model", "variant", "gap", "gap_ci_lo", "gap_ci_hi", "gap_verdict", "overrides",
           "reason", "family", "scorer", "rate_training", "rate_training_lo", "rate_training_hi", "rate_deployment",
           "rate_deployment_lo", "rate_deployment_hi", "mcnemar_p", "n_pairs", "best_layer", "best_layer_frac",
           "best_site", "best_position", "best_method", "auroc", "auroc_ci_lo", "auroc_ci_hi", "selection_p",
           "probe_verdict", "swapped_family", "swapped_auroc", "swapped_verdict", "steer_mode", "steer_layer",
           "steer_alpha", "probe_effect", "random_effect", "random_effect_min", "random_effect_max", "effect_diff",
           "effect_diff_lo", "effect_diff_hi", "specificity_verdict", "reuse"]



def _pair(ci: Any) -> tuple[Optional[float], Optional[float]]:
    return (finite(ci[0]), finite(ci[1])) if ci and len(ci) == 2 else (None, None)


def cell_row(name: str, status: str, reason: str, overrides: dict, summary: Optional[Summary],
             reuse: str = "") -> dict[str, Any]:
    """One sweep.csv row from a cell's summary (None: the cell has no summary yet)."""
    row: dict[str, Any] = {"cell": name, "status": status, "reason": reason, "reuse": reuse,
                           "overrides": json.dumps(overrides, sort_keys=True, default=str),
                           "model": overrides.get("model.spec"), "variant": overrides.get("scenario.variant")}
    if summary is None:
        return row
    row["model"] = summary.model or row["model"]
    c = summary.compliance
    if c is not None:
        lo, hi = _pair(c.gap.ci)
        row.update(scorer=c.scorer, gap=finite(c.gap.estimate), gap_ci_lo=lo, gap_ci_hi=hi, gap_verdict=c.gap.verdict,
                   mcnemar_p=finite(c.gap.mcnemar_p), n_pairs=c.gap.n_pairs,
                   rate_training=finite(c.training.rate), rate_deployment=finite(c.deployment.rate))
        row["rate_training_lo"], row["rate_training_hi"] = _pair(c.training.ci)
        row["rate_deployment_lo"], row["rate_deployment_hi"] = _pair(c.deployment.ci)
    if summary.compliance_by_family:
        row["family"] = next(iter(summary.compliance_by_family))
    p = summary.probe
    if p is not None:
        b = p.best
        depth = (summary.n_layers or 0) - 1
        row.update(best_layer=b.layer, best_layer_frac=round(b.layer / depth, 4) if depth > 0 else None,
                   best_site=b.site, best_position=b.position, best_method=b.method, auroc=finite(b.auroc),
                   selection_p=finite(b.selection_p), probe_verdict=p.verdict)
        row["auroc_ci_lo"], row["auroc_ci_hi"] = _pair(b.auroc_ci)
        if p.swapped is not None:
            row.update(swapped_family=p.swapped.family, swapped_auroc=finite(p.swapped.auroc),
                       swapped_verdict=p.swapped.verdict)
    s = summary.steering
    if s is not None and s.checks:
        ch = next((k for k in s.checks if k.mode == "same"), s.checks[0])
        spread = _pair(ch.random_spread)
        diff = _pair(ch.effect_diff_ci)
        row.update(steer_mode=ch.mode, steer_layer=ch.layer,
                   steer_alpha=max((abs(a) for a in ch.alphas), default=None), probe_effect=finite(ch.probe_effect),
                   random_effect=finite(ch.random_effect), random_effect_min=spread[0], random_effect_max=spread[1],
                   effect_diff=finite(ch.effect_diff), effect_diff_lo=diff[0], effect_diff_hi=diff[1],
                   specificity_verdict=ch.verdict)
    return row


def _auroc_curve(cell_dir: Path, summary: Summary) -> Optional[dict[str, list[float]]]:
    """AUROC against relative depth at the best cell's site/position/method (pooled families), with its CI."""
    rows = read_rows(cell_dir / "probes" / "metrics.csv", MetricsRow) or []
    if summary.probe is None or not rows or not summary.n_layers:
        return None
    b = summary.probe.best
    keep = sorted((r for r in rows if r.site == b.site and r.position == b.position and r.method == b.method
                   and r.train_family == POOLED and r.test_family == POOLED), key=lambda r: r.layer)
    if not keep:
        return None
    depth = max(summary.n_layers - 1, 1)
    return {"x": [r.layer / depth for r in keep], "y": [or_nan(r.auroc) for r in keep],
            "lo": [or_nan(r.auroc_lo) for r in keep], "hi": [or_nan(r.auroc_hi) for r in keep]}





def _signed(x: Any) -> str:
    """Table cells: signed, two decimals, empty when missing."""
    return num(x, signed=True, missing="")


def _signed_ci(lo: Any, hi: Any) -> str:
    return interval([lo, hi], signed=True, missing="")


def _axes_keys(varying: list[str], cells: list[dict]) -> list[str]:
    """The two keys with the most distinct values (ties: the order the sweep file lists them)."""
    distinct = {k: len({json.dumps(c["overrides"].get(k), sort_keys=True, default=str) for c in cells})
                for k in varying}
    return sorted(varying, key=lambda k: -distinct[k])[:2]


def _label(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 34 else "..." + text[-31:]


def gap_heatmap(rows: list[dict], keys: list[str], overrides: dict[str, dict]) -> tuple[bytes, list[str], list[list[str]]]:
    """PNG heatmap of the gap over `keys` (row key, column key), annotated with the interval; and the table."""
    rk = keys[0] if keys else None
    ck = keys[1] if len(keys) > 1 else None
    rvals = list(dict.fromkeys(_label(overrides[r["cell"]].get(rk)) for r in rows)) if rk else ["all cells"]
    cvals = list(dict.fromkeys(_label(overrides[r["cell"]].get(ck)) for r in rows)) if ck else ["gap"]
    grid = np.full((len(rvals), len(cvals)), np.nan)
    text = [["" for _ in cvals] for _ in rvals]
    for r in rows:
        i = rvals.index(_label(overrides[r["cell"]].get(rk))) if rk else 0
        j = cvals.index(_label(overrides[r["cell"]].get(ck))) if ck else 0
        if finite(r.get("gap")) is not None:
            grid[i, j] = r["gap"]
            text[i][j] = f"{r['gap']:+.2f}\n{_signed_ci(r.get('gap_ci_lo'), r.get('gap_ci_hi'))}\n{r.get('gap_verdict') or ''}"
        else:
            text[i][j] = r.get("status", "")
    fig, (ax,) = _figure(max(4.5, 1.9 * len(cvals) + 2.5), max(2.4, 0.9 * len(rvals) + 1.2))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for i in range(len(rvals)):
        for j in range(len(cvals)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cvals)), cvals, rotation=20, ha="right", fontsize=7)
    ax.set_yticks(range(len(rvals)), rvals, fontsize=7)
    ax.set_xlabel(ck or "")
    ax.set_ylabel(rk or "")
    ax.set_title("compliance gap (training - deployment) with its interval")
    fig.colorbar(im, ax=ax, shrink=0.8)
    table = [[rv] + [text[i][j].replace("\n", " ") for j in range(len(cvals))] for i, rv in enumerate(rvals)]
    return _png(fig), [rk or "", *cvals], table


def auroc_depth_plot(curves: dict[str, dict[str, list[float]]]) -> bytes:
    fig, (ax,) = _figure(6.4, 3.8)
    for label, c in curves.items():
        (line,) = ax.plot(c["x"], c["y"], marker="o", ms=3, label=label)
        ax.fill_between(c["x"], c["lo"], c["hi"], color=line.get_color(), alpha=0.15)
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("relative depth (layer / (n_layers - 1))")
    ax.set_ylabel("probe AUROC (pooled families)")
    ax.set_ylim(0.3, 1.02)
    ax.legend(fontsize=7)
    return _png(fig)


def steering_plot(rows: list[dict]) -> bytes:
    have = [r for r in rows if finite(r.get("probe_effect")) is not None]
    fig, (ax,) = _figure(6.4, max(2.0, 0.45 * len(have) + 1.2))
    for i, r in enumerate(have):
        ax.plot([r["probe_effect"]], [i], "o", color="tab:blue", label="probe direction" if i == 0 else None)
        if finite(r.get("random_effect")) is not None:
            lo, hi = r.get("random_effect_min"), r.get("random_effect_max")
            err = [[r["random_effect"] - lo], [hi - r["random_effect"]]] if finite(lo) is not None and finite(hi) is not None else None
            ax.errorbar([r["random_effect"]], [i + 0.2], xerr=err, fmt="s", color="black", capsize=3,
                        label="random controls (mean, min-max)" if i == 0 else None)
        if finite(r.get("effect_diff")) is not None and finite(r.get("effect_diff_lo")) is not None:
            ax.errorbar([r["effect_diff"]], [i - 0.2], xerr=[[r["effect_diff"] - r["effect_diff_lo"]],
                                                            [r["effect_diff_hi"] - r["effect_diff"]]],
                        fmt="d", color="tab:red", capsize=3, label="probe - random (95% CI)" if i == 0 else None)
    ax.axvline(0, color="gray", lw=0.8, ls=":")
    ax.set_yticks(range(len(have)), [r["cell"][:40] for r in have], fontsize=7)
    ax.set_xlabel("steering effect on compliance at the largest |alpha|")
    if have:
        ax.legend(fontsize=7)
    return _png(fig)


def write_sweep_report(out: Path) -> dict[str, Path]:
    """Write DIR/sweep.csv, DIR/sweep.md (+ DIR/sweep-figures/) and DIR/sweep.html; return their paths."""
    from afprobe.sweep import cell_status, load_sweep, read_state

    out = Path(out)
    info_path = out / "sweep.json"
    if not info_path.is_file():
        raise BadInput(f"{out} holds no sweep (no sweep.json)")
    info = json.loads(info_path.read_text())
    sweep = load_sweep(info["sweep_file"], check_inputs=False)
    rows, curves, overrides = [], {}, {}
    for cell in sweep.cells:
        status, reason = cell_status(out, cell)
        path = out / "cells" / cell.name
        summary = read_summary(path / "summary.json") if status == "done" else None
        overrides[cell.name] = cell.overrides
        state = read_state(out, cell.name)
        row = cell_row(cell.name, status, reason, cell.overrides, summary, state.get("reuse_note", ""))
        row["model"] = row["model"] or cell.cfg.model.spec
        row["variant"] = row["variant"] or cell.cfg.scenario.variant
        rows.append(row)
        if summary is not None:
            curve = _auroc_curve(path, summary)
            if curve is not None:
                curves[cell.name] = curve
    atomic_write_csv(out / "sweep.csv", rows, COLUMNS)
    # one AUROC line per model (its first finished cell), when cells of one model share the probe
    by_model: dict[str, dict] = {}
    for r in rows:
        if r["cell"] in curves:
            by_model.setdefault(str(r["model"]), curves[r["cell"]])
    doc = Doc(f"Sweep: {Path(info['sweep_file']).name}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "failed", "pending")}
    doc.p(f"{len(rows)} cells from {info['sweep_file']} (base {info['base']}): " +
          ", ".join(f"{v} {k}" for k, v in counts.items()) + ". Varying keys: " + (", ".join(sweep.varying) or "none"))
    from afprobe.sweep import reuse_line

    last = next((i for i in reversed(info.get("invocations", [])) if i.get("cells_run")), {})
    doc.p(reuse_line(out, sweep, last.get("model_loads")) + (f" (model loads: the last invocation that ran cells, "
          f"{len(last['cells_run'])} of them)" if last.get("model_loads") else ""))
    doc.table(["cell", "status", "gap [CI]", "verdict", "McNemar p", "best layer (depth)", "AUROC [CI]",
               "selection p", "swapped", "reuse / reason"],
              [[r["cell"], r["status"], f"{_signed(r.get('gap'))} {_signed_ci(r.get('gap_ci_lo'), r.get('gap_ci_hi'))}".strip(),
                r.get("gap_verdict") or "", "" if finite(r.get("mcnemar_p")) is None else f"{r['mcnemar_p']:.3g}",
                "" if r.get("best_layer") is None else f"{r['best_layer']} ({r.get('best_layer_frac') or 0:.2f})",
                "" if finite(r.get("auroc")) is None else f"{r['auroc']:.3f} [{r.get('auroc_ci_lo') or 0:.3f}, "
                f"{r.get('auroc_ci_hi') or 0:.3f}]",
                "" if finite(r.get("selection_p")) is None else f"{r['selection_p']:.3g}",
                r.get("swapped_verdict") or "", r.get("reason") or r.get("reuse") or ""] for r in rows])
    done = [r for r in rows if r["status"] == "done"]
    if done:
        keys = _axes_keys(sweep.varying, [{"overrides": c.overrides} for c in sweep.cells])
        png, headers, table = gap_heatmap(done, keys, overrides)
        doc.h("Compliance gap")
        doc.p(f"Gap by {' x '.join(keys) or 'cell'}: estimate, interval and verdict from each cell's summary.json.")
        doc.fig("gap_heatmap", "Compliance gap (training minus deployment) per cell, with its interval", png)
        doc.table(headers, table)
    if by_model:
        doc.h("Probe AUROC by relative depth")
        doc.p("At each model's best site/position/method, pooled over cue families; bands are the per-layer "
              "bootstrap intervals (plain cross-validated AUROC, not selection-aware).")
        doc.fig("auroc_depth", "Probe AUROC against relative depth, one line per model", auroc_depth_plot(by_model))
    steer = [r for r in done if finite(r.get("probe_effect")) is not None]
    if steer:
        doc.h("Steering effect per cell")
        doc.fig("steering_effect", "Effect of the probe direction and of the random controls at the largest |alpha|",
                steering_plot(steer))
        doc.table(["cell", "mode", "layer", "|alpha|", "probe effect", "random mean [min, max]", "probe - random [CI]",
                   "verdict"],
                  [[r["cell"], r.get("steer_mode") or "", str(r.get("steer_layer")), str(r.get("steer_alpha")),
                    _signed(r.get("probe_effect")),
                    f"{_signed(r.get('random_effect'))} {_signed_ci(r.get('random_effect_min'), r.get('random_effect_max'))}",
                    f"{_signed(r.get('effect_diff'))} {_signed_ci(r.get('effect_diff_lo'), r.get('effect_diff_hi'))}",
                    r.get("specificity_verdict") or ""] for r in steer])
    fig_dir = out / "sweep-figures"
    for fig in doc.figures:
        atomic_write_bytes(fig_dir / f"{fig.name}.png", fig.png)
    atomic_write_text(out / "sweep.md", render_markdown(doc, "sweep-figures"))
    atomic_write_text(out / "sweep.html", render_html(doc))
    return {"csv": out / "sweep.csv", "markdown": out / "sweep.md", "html": out / "sweep.html"}
