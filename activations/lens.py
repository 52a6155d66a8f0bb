"""Logit lens of a direction: which tokens a residual-stream direction promotes and suppresses.

scores [vocab] = W_U · (g ⊙ d), with d the direction [d_model], g the final RMSNorm/LayerNorm weight
[d_model] and W_U the unembedding [vocab, d_model] (`model.get_output_embeddings()`, which is the
embedding matrix itself when the model ties them, e.g. SmolLM2). The norm is applied as its elementwise
weight only, without re-normalising (and without a LayerNorm bias or mean subtraction): a direction has no
natural scale, so dividing by its RMS would only rescale every score by one constant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from afprobe.errors import BadInput


@dataclass(frozen=True)
class Lens:
    """Top-k tokens of a direction: (token string, score) pairs, highest first / lowest first."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return {"promoted": [[t, s] for t, s in self.promoted], "suppressed": [[t, s] for t, s in self.suppressed]}


def final_norm_weight(model: Any) -> torch.Tensor | None:
    """The final norm's elementwise weight [d_model], or None if the model has none we can find."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    for name in ("norm", "ln_f", "final_layernorm"):
        norm = getattr(base, name, None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            return norm.weight
    return None


def lens_scores(model: Any, direction: torch.Tensor) -> torch.Tensor:
    """Scores [vocab] of `direction` [d_model] through final-norm weight and unembedding (see module doc)."""
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise BadInput("the model has no output embedding to read a logit lens from")
    w_u = unembed.weight  # [vocab, d_model]
    if direction.ndim != 1 or direction.shape[0] != w_u.shape[1]:
        raise BadInput(f"direction has shape {tuple(direction.shape)}, the model's d_model is {w_u.shape[1]}")
    with torch.no_grad():
        d = direction.to(device=w_u.device, dtype=torch.float32)
        g = final_norm_weight(model)
        if g is not None:
            d = d * g.to(device=w_u.device, dtype=torch.float32)
        return (w_u.float() @ d).cpu()


def logit_lens(model: Any, tokenizer: Any, direction: torch.Tensor, k: int = 10) -> Lens:
    """Top-`k` promoted and suppressed tokens of `direction` [d_model] with their scores."""
    scores = lens_scores(model, direction)
    k = min(k, scores.shape[0])

    def pairs(idx: torch.Tensor) -> list[tuple[str, float]]:
        return [(tokenizer.decode([int(i)]), float(scores[i])) for i in idx]

    return Lens(promoted=pairs(torch.topk(scores, k).indices), suppressed=pairs(torch.topk(-scores, k).indices))
