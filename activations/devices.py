"""Where tensors go when a model is split across devices by an accelerate device map.

Rules (both backends):
- inputs (token ids, masks, positions, pooling weights) go to the input embedding's execution device;
- an edit vector or ablation direction moves to the device and dtype of the hidden state it touches;
- each layer's KV cache (shared prefix included) stays on the device its attention ran on;
- gathered activations go to the CPU store as float32.
With a device map, `model.device` is only the first parameter's device (`meta` when that one is on disk),
so nothing here reads it.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

Place = Union[int, str, torch.device]


def _as_device(place: Place) -> torch.device:
    return torch.device("cuda", place) if isinstance(place, int) else torch.device(place)


def execution_device(module: Any) -> Optional[torch.device]:
    """The device an accelerate hook runs `module` on, or None when it has no such hook."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one hook
        place = getattr(h, "execution_device", None)
        if place is not None:
            return _as_device(place)
    return None


def input_device(model: Any) -> torch.device:
    """Where input ids must be: the execution device of the input embedding."""
    embed = model.get_input_embeddings()  # a TransformerLens bridge passes `_hf_hook` through to the wrapped module
    found = execution_device(embed)
    return found if found is not None else embed.weight.device


def device_map_of(model: Any) -> Optional[dict[str, Place]]:
    """The realized device map ({module: device}) of a model dispatched by accelerate, else None."""
    found = getattr(model, "hf_device_map", None)
    return dict(found) if found else None


def is_split(model: Any) -> bool:
    """Whether the model's modules sit on more than one device (disk offload counts)."""
    found = device_map_of(model)
    return bool(found) and (len({str(v) for v in found.values()}) > 1 or "disk" in found.values())


def mixes_offload_and_gpu(device_map: dict[str, Place]) -> bool:
    """A map with both CPU/disk-offloaded modules and modules on an accelerator."""
    places = {"gpu" if isinstance(v, int) or str(v) not in ("cpu", "disk") else "offload" for v in device_map.values()}
    return places == {"gpu", "offload"}
