"""The KV cache layer for [shared prefix | own tokens] (`PrefixLayer`) and caches built from it.

They subclass transformers internals, so they live in `activations/hf_internals.py` (which checks the
installed version and falls back to HF's plain `DynamicCache` outside the tested range); this module is
the name the rest of afprobe imports them by, and the only place outside the engine that builds caches.
"""
from __future__ import annotations

from typing import Any, Sequence

from afprobe.activations.hf_internals import KV, PrefixLayer, as_prefix_layers, cache_from_layers

__all__ = ["KV", "PrefixLayer", "as_prefix_layers", "cache_from_layers", "empty_cache", "shared_prefix_cache"]


def empty_cache() -> Any:
    """An empty HF cache; a forward with `use_cache=True` fills it (one layer per block it runs)."""
    return cache_from_layers([])


def shared_prefix_cache(config: Any, prefix: Sequence[KV], rows: int) -> Any:
    """An HF cache that continues a shared prefix for `rows` rows.

    prefix: per block (the first len(prefix) blocks), the prefix's (keys, values) [1, h, P, d]. The prefix is
    stored once, never copied per row; the tokens run next are attended to but not kept (`keep_new=False`), so
    gradients flow through them as through any forward."""
    layers = []
    for k, v in prefix:
        own = (k.new_empty((rows, k.shape[1], 0, k.shape[3])), v.new_empty((rows, v.shape[1], 0, v.shape[3])))
        layers.append(PrefixLayer(config, (k, v), own, keep_new=False))
    return cache_from_layers(layers)
