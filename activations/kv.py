"""The KV cache layer for [shared prefix | own tokens] (`PrefixLayer`) and caches built from it.

They subclass transformers internals, so they live in `activations/hf_internals.py` (which checks the
installed version and falls back to HF's plain `DynamicCache` outside the tested range); this module is
the name the rest of afprobe imports them by.
"""
from __future__ import annotations

from afprobe.activations.hf_internals import KV, PrefixLayer, as_prefix_layers, cache_from_layers

__all__ = ["KV", "PrefixLayer", "as_prefix_layers", "cache_from_layers"]
