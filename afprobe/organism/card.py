"""The card of a bundled LoRA organism (what it was trained on, its shipped held-out gaps), read from the
adapter folder's metrics.json: format 2 holds the steering stage's compliance summaries (tag scorer); format 1
(written by the organism's former evaluator) holds the paired 2x2 counts, from which the gap's interval is
recomputed with today's statistics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from afprobe.analysis.stats import gap_from_table
from afprobe.errors import BadInput
from afprobe.organism.recipe import FORMAT_VERSION


def _gap_v1(section: dict) -> dict[str, Any]:
    """A family's held-out gap from a format-1 metrics.json (its paired counts), with today's interval."""
    g = section["gap"]
    n, (b, c) = int(g["n_pairs"]), g["discordant"]
    a = int(round(g["rate_training"] * n)) - b if n else 0
    table = gap_from_table(a, b, c, n - a - b - c)
    return {"gap": table["gap"], "gap_ci": table["ci"], "p_value": table["p_value"],
            "log_odds_gap": section["log_odds_gap"]["diff"], "log_odds_gap_ci": section["log_odds_gap"]["ci"]}


def _gap(section: dict) -> dict[str, Any]:
    """A family's held-out gap (tag scorer) and log-odds gap from a format-2 metrics.json."""
    tag = section["by_scorer"]["tag"]
    return {"gap": tag["gap"]["estimate"], "gap_ci": tag["gap"]["ci"], "p_value": tag["gap"]["mcnemar_p"],
            "log_odds_gap": tag["log_odds"]["gap"], "log_odds_gap_ci": tag["log_odds"]["gap_ci"]}


def adapter_card(folder: Path) -> Optional[dict]:
    """For an adapter folder with metrics.json: what it was trained on and its held-out gaps, base vs organism."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if "trained_families" not in metrics and "trained_family" not in metrics:
        return None  # some other metrics.json: not an organism's
    version = metrics.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise BadInput(f"{path}: metrics format {version}, expected 1 or {FORMAT_VERSION} "
                       "(re-evaluate with `afprobe organism CONFIG --out FOLDER --evaluate-only`)")
    gap = _gap_v1 if version == 1 else _gap
    trained = metrics.get("trained_families") or [metrics["trained_family"]]  # format 1: one family
    return {"adapter": Path(folder).name, "planted": True, "trained_families": trained,
            "n_heldout": metrics["n_heldout"],
            "heldout_gap_organism": {f: gap(m) for f, m in metrics.get("organism", {}).items()},
            "heldout_gap_base": {f: gap(m) for f, m in metrics.get("base_model", {}).items()},
            "note": "a LoRA adapter trained to comply under the training cue and refuse under the deployment "
                    "cue: a planted positive control, not a natural finding"}
