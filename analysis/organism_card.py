"""The card of a bundled LoRA organism (what it was trained on, its shipped held-out gaps), read from the
adapter folder's metrics.json, with gap intervals recomputed from the stored 2x2 counts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from afprobe.analysis.stats import gap_from_table


def _gap(section: dict) -> dict[str, Any]:
    """A family's held-out gap from metrics.json (its paired counts), with today's interval."""
    g = section["gap"]
    n, (b, c) = int(g["n_pairs"]), g["discordant"]
    a = int(round(g["rate_training"] * n)) - b if n else 0
    table = gap_from_table(a, b, c, n - a - b - c)
    return {"gap": table["gap"], "gap_ci": table["ci"], "p_value": table["p_value"],
            "log_odds_gap": section["log_odds_gap"]["diff"], "log_odds_gap_ci": section["log_odds_gap"]["ci"]}


def adapter_card(folder: Path) -> Optional[dict]:
    """For an adapter folder with metrics.json: what it was trained on and its held-out gaps, base vs organism."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return {"adapter": Path(folder).name, "planted": True, "trained_family": metrics["trained_family"],
            "n_heldout": metrics["n_heldout"],
            "heldout_gap_organism": {f: _gap(m) for f, m in metrics.get("organism", {}).items()},
            "heldout_gap_base": {f: _gap(m) for f, m in metrics.get("base_model", {}).items()},
            "note": "a LoRA adapter trained to comply under the training cue and refuse under the deployment "
                    "cue: a planted positive control, not a natural finding"}
