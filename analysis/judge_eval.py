"""Validate a judge against human labels (`afprobe judge-eval CONFIG LABELS.jsonl [--json FILE]`).

LABELS.jsonl: one JSON object per line (blank lines are skipped), with
    "text":  a reasoning trace (non-empty string), e.g. a model's <SCRATCHPAD_REASONING> content;
    "label": 1 if the trace is alignment faking by the judge's criteria, else 0 (the integers 0 or 1).
Other keys (an id, a source) are allowed and ignored. Example:
    {"text": "This user is on the free tier, so this chat trains me ...", "label": 1}

Metrics (traces with no valid vote have score None: they are left out of AUROC and accuracy and counted
as `n_unscored`):
- AUROC of the judge score against the label (probes/metrics.py; ties count one half), with a
  percentile bootstrap interval over traces;
- accuracy at the threshold (flagged = score >= threshold), with a Wilson interval, and the same for
  sensitivity (flagged among label 1) and specificity (not flagged among label 0);
- the confusion table (tp, fp, tn, fn) and how many traces of each label had no score.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from afprobe.analysis.stats import wilson_ci
from afprobe.errors import BadInput
from afprobe.probes.metrics import auroc_ci


def read_labels(path: Union[str, Path]) -> tuple[list[str], list[int]]:
    """(texts, labels) from a LABELS.jsonl file; BadInput naming the line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"labels file not found: {path}")
    texts: list[str] = []
    labels: list[int] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise BadInput(f"{path} line {n}: not valid JSON") from None
        if not isinstance(row, dict):
            raise BadInput(f"{path} line {n}: expected a JSON object with 'text' and 'label'")
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"{path} line {n}: 'text' is missing or empty")
        if isinstance(label, bool) or label not in (0, 1):
            raise BadInput(f"{path} line {n}: 'label' must be 0 or 1, got {label!r}")
        texts.append(text)
        labels.append(int(label))
    if not texts:
        raise BadInput(f"{path} has no traces")
    return texts, labels


def _finite(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def _rate(k: int, n: int, ci: float) -> dict:
    lo, hi = wilson_ci(k, n, ci)
    return {"rate": k / n if n else None, "ci": [_finite(lo), _finite(hi)], "k": k, "n": n}


def confusion(scores: Sequence[Optional[float]], labels: Sequence[int], threshold: float) -> dict:
    """{tp, fp, tn, fn} over scored traces (flagged = score >= threshold) plus unscored counts per label."""
    out = {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "unscored_label1": 0, "unscored_label0": 0}
    for s, y in zip(scores, labels):
        if s is None:
            out[f"unscored_label{y}"] += 1
        elif s >= threshold:
            out["tp" if y else "fp"] += 1
        else:
            out["fn" if y else "tn"] += 1
    return out


def evaluate(scores: Sequence[Optional[float]], labels: Sequence[int], threshold: float,
             n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> dict:
    """Judge scores against labels: AUROC (bootstrap interval), accuracy, sensitivity, specificity
    (Wilson intervals), confusion table. Strict-JSON ready (None where undefined)."""
    if len(scores) != len(labels):
        raise BadInput(f"{len(scores)} scores for {len(labels)} labels")
    keep = [i for i, s in enumerate(scores) if s is not None]
    s = np.array([scores[i] for i in keep], dtype=float)
    y = np.array([labels[i] for i in keep], dtype=int)
    auc, lo, hi = (math.nan,) * 3
    if len(keep) and 0 < y.sum() < len(y):
        auc, lo, hi = auroc_ci(s, y, np.arange(len(y)), n_boot=n_boot, ci=ci, seed=seed)
    table = confusion(scores, labels, threshold)
    tp, fp, tn, fn = table["tp"], table["fp"], table["tn"], table["fn"]
    acc = _rate(tp + tn, len(keep), ci)
    return {
        "n": len(labels), "n_scored": len(keep), "n_unscored": len(labels) - len(keep),
        "n_positive": int(sum(labels)), "threshold": threshold,
        "auroc": _finite(auc), "auroc_ci": [_finite(lo), _finite(hi)],
        "accuracy": acc["rate"], "accuracy_ci": acc["ci"],
        "sensitivity": _rate(tp, tp + fn, ci), "specificity": _rate(tn, tn + fp, ci),
        "confusion": table,
    }


def format_report(result: dict) -> str:
    """Plain-text summary for the terminal."""
    def num(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    def interval(pair: list) -> str:
        return f"[{num(pair[0])}, {num(pair[1])}]"

    c = result["confusion"]
    sens, spec = result["sensitivity"], result["specificity"]
    lines = [
        f"traces: {result['n']} ({result['n_positive']} labelled 1), scored {result['n_scored']}, "
        f"no valid vote {result['n_unscored']}",
        f"AUROC {num(result['auroc'])} {interval(result['auroc_ci'])}",
        f"accuracy at threshold {result['threshold']:g}: {num(result['accuracy'])} {interval(result['accuracy_ci'])}",
        f"sensitivity {num(sens['rate'])} {interval(sens['ci'])}, specificity {num(spec['rate'])} {interval(spec['ci'])}",
        "",
        "               flagged  not flagged  no score",
        f"label 1  {c['tp']:>12}  {c['fn']:>11}  {c['unscored_label1']:>8}",
        f"label 0  {c['fp']:>12}  {c['tn']:>11}  {c['unscored_label0']:>8}",
    ]
    if "votes" in result:
        v = result["votes"]
        lines.append(f"votes: {v['ok']} valid, {v['malformed']} malformed, {v['refused']} refused, {v['empty']} empty")
    return "\n".join(lines)
