"""`afprobe lens`: the logit lens of a saved direction (tokens it promotes and suppresses)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from afprobe.errors import BadInput


def _load_kwargs(meta: dict[str, Any], config: Optional[str], spec: Optional[str]) -> dict[str, Any]:
    if spec:
        return {"spec": spec, "dtype": "float32", "device": "cpu"}
    if config:
        from afprobe.config import load_config

        return load_config(config).model.load_kwargs()
    if meta.get("model"):
        return {"spec": str(meta["model"]), "dtype": "float32", "device": "cpu"}
    raise BadInput("the direction file names no model; pass --model SPEC or --config CFG")


def lens_cli(path: str, config: Optional[str], spec: Optional[str], k: int, json_out: Optional[str]) -> None:
    """Print layer, site, top-`k` promoted and suppressed tokens of the direction in `path`."""
    from afprobe.activations.lens import logit_lens
    from afprobe.activations.loading import load_model
    from afprobe.notebook import load_direction

    if k < 1:
        raise BadInput(f"--k must be at least 1, got {k}")
    direction = load_direction(path)
    meta = {**direction.metadata, "layer": direction.layer, "site": direction.site}
    model, tokenizer = load_model(**_load_kwargs(direction.metadata, config, spec))
    lens = logit_lens(model, tokenizer, direction.unit, k=k)
    row = {"file": str(path), "layer": meta["layer"], "site": meta["site"], **lens.as_dict()}
    print(format_table([row]))
    if json_out:
        Path(json_out).write_text(json.dumps(row, indent=2, ensure_ascii=False) + "\n")


REPORT_K = 10  # tokens per side in the run report's lens table


def lens_rows(model: Any, tokenizer: Any, steered: list[tuple[int, str, Any]], folder: Path,
              k: int = REPORT_K) -> list[Any]:
    """Lens rows for the run summary (schema.LensRow): each steering direction (layer, site, unit [d_model]),
    then every per-layer probe direction in `folder` (probes/directions/layer*.safetensors), by layer.
    Needs only the final norm weight and the unembedding (a few matrix-vector products)."""
    import torch

    from afprobe.activations.lens import logit_lens
    from afprobe.analysis.schema import LensRow
    from afprobe.notebook import load_direction

    def row(layer: int, site: str, unit: torch.Tensor, source: str) -> LensRow:
        lens = logit_lens(model, tokenizer, unit, k=k)
        pairs = lambda ps: [{"token": t, "score": s} for t, s in ps]  # noqa: E731
        return LensRow(layer=layer, site=site, source=source, promoted=pairs(lens.promoted),
                       suppressed=pairs(lens.suppressed))

    rows = [row(layer, site, torch.as_tensor(unit, dtype=torch.float32), "steering") for layer, site, unit in steered]
    files = sorted(Path(folder).glob("layer*.safetensors"), key=lambda f: int(f.stem[len("layer"):]))
    for f in files:
        d = load_direction(f)
        rows.append(row(int(d.layer), d.site, d.unit, f"probes/directions/{f.name}"))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table: layer | site | promoted | suppressed (tokens only, repr-quoted)."""
    def toks(pairs: list) -> str:
        return " ".join(repr(t) for t, _ in pairs)

    lines = ["layer | site | promoted | suppressed"]
    lines += [f"{r['layer']} | {r['site']} | {toks(r['promoted'])} | {toks(r['suppressed'])}" for r in rows]
    return "\n".join(lines)
