"""Backends behind one interface: nnsight (`TransformersModel`) and TransformerLens 4.x (`TransformerBridge`)."""
from __future__ import annotations

from typing import Any

from afprobe.activations.backends.base import SITES, Backend, ModelInputs, ResidualEdit, SiteKey, pool, project_out
from afprobe.errors import BadInput

BACKENDS = ("nnsight", "transformer_lens")


def make_backend(name: str, model: Any, tokenizer: Any) -> Backend:
    if name == "nnsight":
        from afprobe.activations.backends.nnsight_backend import NnsightBackend

        return NnsightBackend(model, tokenizer)
    if name == "transformer_lens":
        from afprobe.activations.backends.tl_backend import TransformerLensBackend

        return TransformerLensBackend(model, tokenizer)
    raise BadInput(f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})")


__all__ = ["SITES", "Backend", "ModelInputs", "ResidualEdit", "SiteKey", "make_backend", "pool", "project_out"]
