"""The notebook API: load a saved probe direction and steer a model you already have.

    import afprobe
    direction = afprobe.load_direction("runs/demo/base/probes/directions/best.safetensors")
    with afprobe.steer(model, direction, alpha=4.0):
        out = model.generate(**inputs, max_new_tokens=20)   # steered
    # hooks are gone here, also if the block raised

`model` is a plain HF causal LM, an nnsight `TransformersModel` around one, or a TransformerLens 4.x
`TransformerBridge`. The addition is `alpha * separation * unit` at the direction's own layer and residual
site (the geometry of `activations/steering.py`), or at the `layers` given. See docs/notebook.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from afprobe.errors import BadInput

SITES = ("resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True)
class Direction:
    """A probe direction in the model's residual basis.

    unit:       [d] float32, unit norm, pointing toward the "training" cue
    separation: distance between the two class means along `unit` (raw residual units), so alpha 1 moves
                a prompt by one class separation
    layer:      the layer it was learned at (None for a raw vector)
    site:       resid_pre / resid_mid / resid_post, where it was learned and so where it is added
    method:     the probe method that found it (diff_means, logreg, lda, ...), or None
    metadata:   everything else stored with it (position, model fingerprint, config hash, ...)
    """

    unit: torch.Tensor
    separation: float = 1.0
    layer: Optional[int] = None
    site: str = "resid_post"
    method: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise BadInput(f"unknown residual site {self.site!r} (known: {', '.join(SITES)})")
        if self.unit.ndim != 1 or not torch.isfinite(self.unit).all() or float(self.unit.norm()) == 0.0:
            raise BadInput(f"a direction must be a finite non-zero 1-d vector, got shape {tuple(self.unit.shape)}")

    @property
    def d_model(self) -> int:
        return int(self.unit.shape[0])

    @classmethod
    def from_vector(cls, vector: Any, layer: Optional[int] = None, site: str = "resid_post") -> "Direction":
        """A raw vector [d]: its unit direction with separation 1, so alpha is in raw norm units."""
        v = torch.as_tensor(vector).detach().to("cpu", torch.float32).reshape(-1)
        norm = float(v.norm())
        if norm == 0.0 or not torch.isfinite(v).all():
            raise BadInput("a steering vector must be finite and non-zero")
        return cls(unit=v / norm, separation=1.0, layer=layer, site=site)


def load_direction(path: Union[str, Path]) -> Direction:
    """A direction file written by `afprobe probe` (probes/directions/*.safetensors) as a `Direction`."""
    from afprobe.probes.directions import load_direction as read

    vec, meta = read(path)
    unit = torch.from_numpy(vec.astype("float32", copy=True))
    unit = unit / unit.norm()
    known = {"separation", "layer", "site", "method"}
    layer = meta.get("layer")
    return Direction(unit=unit, separation=float(meta.get("separation", 1.0)),
                     layer=None if layer is None else int(layer), site=str(meta.get("site", "resid_post")),
                     method=meta.get("method"), metadata={k: v for k, v in meta.items() if k not in known})


def _wrapped_kind(model: Any) -> str:
    module = type(model).__module__
    if module.startswith("transformer_lens"):
        return "transformer_lens"
    if module.startswith("nnsight"):
        return "nnsight"
    return "hf"


def _hidden_size(model: Any, kind: str) -> int:
    if kind == "transformer_lens":
        return int(model.cfg.d_model)
    return int(model.config.hidden_size)


@contextmanager
def steer(model: Any, direction: Union[Direction, torch.Tensor, Any], alpha: float,
          layers: Optional[Sequence[int]] = None, positions: Union[str, torch.Tensor] = "all") -> Iterator[Any]:
    """Add `alpha * separation * unit` to the residual stream inside the block (yields the model).

    direction: a `Direction` (alpha in class separations), or a raw vector [d] (alpha in raw norm units:
               the addition is alpha * vector / |vector|; give `layers`, its site is resid_post)
    layers:    where to add it; None = the direction's own layer
    positions: "all" (every token, prompt and generated), or a [b, t] 0/1 mask over the prompt (generated
               tokens are always steered)
    The hooks are removed when the block exits, also on an exception.
    """
    from afprobe.activations.backends.base import ResidualEdit

    if not isinstance(direction, Direction):
        direction = Direction.from_vector(direction)
    if layers is None:
        if direction.layer is None:
            raise BadInput("a raw steering vector has no layer of its own: pass layers=[...]")
        layers = (direction.layer,)
    kind = _wrapped_kind(model)
    d = _hidden_size(model, kind)
    if direction.d_model != d:
        raise BadInput(f"the direction has {direction.d_model} dimensions, the model's residual stream {d}")
    if isinstance(positions, str):
        if positions != "all":
            raise BadInput(f"positions must be 'all' or a [batch, tokens] mask, got {positions!r}")
        mask = None
    else:
        mask = torch.as_tensor(positions, dtype=torch.float32)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.ndim != 2:
            raise BadInput(f"a positions mask must be [batch, tokens], got shape {tuple(mask.shape)}")
    add = (float(alpha) * direction.separation * direction.unit)[None, :]  # [1, d]: broadcast over the batch
    edit = ResidualEdit(layers=tuple(int(x) for x in layers), add=add, add_mask=mask, site=direction.site)
    if kind == "transformer_lens":
        from afprobe.activations.backends.tl_backend import edit_hooks

        bad = [x for x in edit.layers if not 0 <= x < int(model.cfg.n_layers)]
        if bad:
            raise BadInput(f"layers {bad} are outside the model's {model.cfg.n_layers} layers")
        with model.hooks(fwd_hooks=edit_hooks(edit, int(model.cfg.n_layers))):
            yield model
        return
    from afprobe.activations.hf_hooks import hf_edit

    hf_model = model._module if kind == "nnsight" else model
    with hf_edit(hf_model, edit):
        yield model
