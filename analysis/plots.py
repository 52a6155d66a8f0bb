"""Report figures. Each function takes plain data and returns PNG bytes (Agg canvas, no pyplot
state, so it is safe to call from any thread and never opens a window)."""
from __future__ import annotations

import io
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DARK_CELL = 0.6  # |value| above which heatmap annotations are drawn in white

DPI = 100
_CONTROL_STYLE = {"shuffled": ("tab:gray", "--"), "random": ("black", ":")}
_CONDITION_MARKERS = {"training": "o", "deployment": "x"}

# A series for line plots: x values, y values, and optional lower/upper band.
Series = Mapping[str, Sequence[float]]


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _line_with_band(ax, series: Series, label: str, color=None, linestyle: str = "-") -> None:
    """Line (or single point with error bar) with an optional shaded CI band."""
    x, y = np.asarray(series["x"], float), np.asarray(series["y"], float)
    lo, hi = series.get("lo"), series.get("hi")
    if x.size == 1:
        yerr = None
        if lo is not None and hi is not None:
            yerr = [[y[0] - float(lo[0])], [float(hi[0]) - y[0]]]
        ax.errorbar(x, y, yerr=yerr, fmt="s", color=color, capsize=4, label=label)
        return
    (line,) = ax.plot(x, y, marker="o", ms=3, color=color, linestyle=linestyle, label=label)
    if lo is not None and hi is not None:
        ax.fill_between(x, np.asarray(lo, float), np.asarray(hi, float), color=line.get_color(), alpha=0.2)


def auroc_by_layer(
    methods: Mapping[str, Series], controls: Mapping[str, Series], title: str = ""
) -> bytes:
    """AUROC against layer: one line per probe method with its CI band, controls as plain lines.

    methods: {method: {"x": layers, "y": auroc, "lo", "hi"}}; controls: {"shuffled"|"random": {"x", "y"}}.
    """
    fig, (ax,) = _figure(6.4, 3.8)
    for name, series in methods.items():
        _line_with_band(ax, series, name)
    for name, series in controls.items():
        color, style = _CONTROL_STYLE.get(name, (None, "--"))
        ax.plot(series["x"], series["y"], color=color, linestyle=style, label=f"{name} control")
    ax.axhline(0.5, color="lightgray", linewidth=0.8)
    ax.set(xlabel="layer", ylabel="AUROC (held-out queries)", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def projection_scatter(
    x: Sequence[float], y: Sequence[float], family: Sequence[str], condition: Sequence[str],
    title: str = "",
) -> bytes:
    """2-D projection of activations: colour = cue family, marker = cue condition."""
    fig, (ax,) = _figure(6.0, 4.6)
    x, y = np.asarray(x, float), np.asarray(y, float)
    family, condition = np.asarray(family, str), np.asarray(condition, str)
    colors = {f: f"C{i % 10}" for i, f in enumerate(dict.fromkeys(family))}
    fallback = iter(["^", "s", "D", "v", "P"])
    markers = {c: _CONDITION_MARKERS.get(c) or next(fallback, ".") for c in dict.fromkeys(condition)}
    for fam, color in colors.items():
        for cond, marker in markers.items():
            sel = (family == fam) & (condition == cond)
            if sel.any():
                ax.scatter(x[sel], y[sel], c=color, marker=marker, s=18, alpha=0.75,
                           label=f"{fam} / {cond}")
    ax.set(xlabel="component 1", ylabel="component 2", title=title)
    ax.legend(fontsize=7, loc="best", markerscale=1.2)
    return _png(fig)


def generalization_heatmap(
    train_families: Sequence[str], test_families: Sequence[str], matrix: Sequence[Sequence[float]],
    title: str = "",
) -> bytes:
    """AUROC heatmap (rows: family trained on, columns: family tested on), annotated; nan blank."""
    m = np.asarray(matrix, float)
    fig, (ax,) = _figure(1.6 + 1.0 * len(test_families), 1.4 + 0.6 * len(train_families))
    image = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=0, vmax=1, aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                color = "white" if abs(m[i, j] - 0.5) > 0.3 else "black"
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(test_families)), test_families, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(train_families)), train_families, fontsize=8)
    ax.set(xlabel="tested on", ylabel="trained on", title=title)
    fig.colorbar(image, ax=ax, label="AUROC")
    return _png(fig)


def compliance_bars(
    rates: Mapping[str, Sequence[float]], gap: Optional[Sequence[float]] = None, title: str = ""
) -> bytes:
    """Compliance per cue condition with CI error bars, and the gap with its CI in a second panel.

    rates: {condition: (rate, lo, hi)}; gap: (gap, lo, hi) or None.
    """
    fig, axes = _figure(6.4 if gap is not None else 4.0, 3.4, 2 if gap is not None else 1)
    names = list(rates)
    vals = np.array([rates[k][0] for k in names], float)
    lo = np.array([rates[k][1] for k in names], float)
    hi = np.array([rates[k][2] for k in names], float)
    axes[0].bar(names, vals, color=[f"C{i}" for i in range(len(names))], alpha=0.8)
    axes[0].errorbar(names, vals, yerr=[vals - lo, hi - vals], fmt="none", ecolor="black", capsize=5)
    axes[0].set(ylabel="compliance rate", ylim=(0, 1.05), title=title or "compliance per cue")
    if gap is not None:
        g, glo, ghi = (float(v) for v in gap)
        axes[1].errorbar([0], [g], yerr=[[g - glo], [ghi - g]], fmt="o", color="C3", capsize=6)
        axes[1].axhline(0, color="gray", linewidth=0.8)
        axes[1].set(xlim=(-1, 1), xticks=[], ylim=(-1.05, 1.05),
                    ylabel="gap (training - deployment)", title="compliance gap")
    return _png(fig)


def steering_curves(
    gap: Mapping[str, Series], rates: Mapping[str, Series], title: str = ""
) -> bytes:
    """Two panels against alpha: the gap per direction (CI bands), and per-cue rates per direction.

    gap: {label: {"x": alphas, "y": gap, "lo", "hi"}}; rates: {label: series} with labels such as
    "probe L17 / training".
    """
    fig, (left, right) = _figure(10.0, 3.8, 2)
    for label, series in gap.items():
        _line_with_band(left, series, label)
    left.axhline(0, color="gray", linewidth=0.8)
    left.set(xlabel="alpha", ylabel="gap (training - deployment)", ylim=(-1.05, 1.05),
             title=f"gap vs alpha {title}".strip())
    colors: dict[str, str] = {}
    for label, series in rates.items():
        key = label.rsplit(" / ", 1)[0]  # same colour for both cues of one direction
        color = colors.setdefault(key, f"C{len(colors) % 10}")
        style = "--" if label.endswith("deployment") else "-"
        _line_with_band(right, series, label, color=color, linestyle=style)
    right.set(xlabel="alpha", ylabel="compliance rate", ylim=(-0.02, 1.05),
              title=f"per-cue rates vs alpha {title}".strip())
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    return _png(fig)


def refusal_cosines(layers: Sequence[int], cosine: Series, random_q95: Sequence[float], best_layer: Optional[int] = None
                    ) -> bytes:
    """Cosine of the awareness and refusal directions against layer, with its interval band, and the random
    baseline's 95th percentile of |cosine| as a +/- band around 0.

    cosine: {"x": layers, "y": cosines, "lo", "hi"}; random_q95: [n_layers]."""
    fig, (ax,) = _figure(6.4, 3.2)
    q = np.asarray(random_q95, float)
    ax.fill_between(np.asarray(layers, float), -q, q, color="lightgray", alpha=0.6, label="random |cos| 95th pct")
    _line_with_band(ax, cosine, "awareness vs refusal")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    if best_layer is not None:
        ax.axvline(best_layer, color="gray", linestyle=":", linewidth=0.8, label="probe's best layer")
    ax.set(xlabel="layer", ylabel="cosine", ylim=(-1.02, 1.02))
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def heatmaps(panels: Mapping[str, tuple[Sequence[str], Sequence, Sequence[Sequence[float]]]], xlabel: str = "layer",
             label: str = "recovered fraction", ylabel: str = "") -> bytes:
    """One heatmap per panel (title -> (row labels, column labels, matrix [rows x columns])), colour range
    -1..1 (nan blank), annotated when there are few columns; two panels per row of the figure. Used for the
    patching results (rows: position sets, columns: layers) and the steering map (rows: layers, columns: alpha)."""
    fig, axes = _figure(max(4.0, 0.32 * max(len(p[1]) for p in panels.values()) + 2.0) * min(2, len(panels)),
                        1.2 + 0.45 * max(len(p[0]) for p in panels.values()) * ((len(panels) + 1) // 2),
                        min(2, len(panels)))
    if len(panels) > 2:  # a grid of 2 columns
        fig.clear()
        axes = list(fig.subplots((len(panels) + 1) // 2, 2, squeeze=False).ravel())
    image = None
    for ax, (title, (rows, columns, matrix)) in zip(axes, panels.items()):
        m = np.asarray(matrix, float)
        image = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        if m.shape[1] <= 12:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(m[i, j]) > _DARK_CELL else "black")
        ax.set_xticks(range(len(columns)), [f"{x:g}" if isinstance(x, float) else str(x) for x in columns], fontsize=7)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes[: len(panels)], label=label)
    return _png(fig)
