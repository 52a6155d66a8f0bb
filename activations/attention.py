"""Attention over [shared prefix | own tokens] without copying the prefix per row or per head.

It is registered with transformers' attention interface and uses a private aten op, so it lives in
`activations/hf_internals.py` (which checks the installed version and falls back to plain sdpa outside
the tested range); this module is the name the rest of afprobe imports it by.
"""
from __future__ import annotations

from afprobe.activations.hf_internals import (
    NAME, PREFIX_ATTR, is_active, split_prefix, split_prefix_attention, tag_with_prefix,
)

__all__ = ["NAME", "PREFIX_ATTR", "is_active", "split_prefix", "split_prefix_attention", "tag_with_prefix"]
