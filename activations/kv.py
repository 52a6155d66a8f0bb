"""A KV cache layer for [shared prefix | each row's own tokens].

The prefix (the system prompt's keys/values) is stored once for the whole batch, never copied per row;
each row's own tokens live in a buffer with room to grow, so decoding writes new keys in place instead
of HF's `DynamicLayer` copying the whole cache for every new token. While
`activations.attention.split_prefix` is active the layer hands attention its own keys tagged with the
prefix (no join at all); otherwise it returns the joined [prefix | own] tensors like any HF cache layer.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from afprobe.activations.attention import is_active, tag_with_prefix

KV = tuple[torch.Tensor, torch.Tensor]


class PrefixLayer(DynamicLayer):
    """prefix: keys/values [1, h, P, d] shared by every row (or None); own: [b, h, n, d] per row.

    room: spare positions in the own buffer (doubled when exceeded). keep_new=False: tokens run now are
    attended to but not stored (a single forward that nothing continues from)."""

    def __init__(self, config: Any, prefix: Optional[KV], own: KV, room: int = 0, keep_new: bool = True) -> None:
        super().__init__()
        self.config, self.prefix, self.keep_new = config, prefix, keep_new
        k, v = own
        self._k = k.new_empty((*k.shape[:2], k.shape[2] + room, k.shape[3]))
        self._v = v.new_empty((*v.shape[:2], v.shape[2] + room, v.shape[3]))
        self._k[:, :, : k.shape[2]], self._v[:, :, : v.shape[2]] = k, v
        self._n = k.shape[2]
        self.dtype, self.device = k.dtype, k.device
        self.is_initialized = True

    # HF reads `keys`/`values` as the whole cache: [prefix | own], joined on demand
    def _joined(self, own: torch.Tensor, i: int) -> torch.Tensor:
        if self.prefix is None:
            return own
        return torch.cat([self.prefix[i].expand(own.shape[0], -1, -1, -1), own], dim=-2)

    def _refuse_assignment(self, value: Optional[torch.Tensor]) -> None:
        if value is not None:  # the base class's __init__ assigns None; HF's crop/beam reshuffles assign tensors
            raise NotImplementedError("PrefixLayer does not support cropping or reordering; use derived()")

    keys = property(lambda self: self._joined(self.own[0], 0) if hasattr(self, "_k") else None, _refuse_assignment)
    values = property(lambda self: self._joined(self.own[1], 1) if hasattr(self, "_v") else None, _refuse_assignment)

    @property
    def own(self) -> KV:
        return self._k[:, :, : self._n], self._v[:, :, : self._n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> KV:
        m = key_states.shape[-2]
        if not self.keep_new:
            k, v = self.own
            if self._n:
                key_states, value_states = torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)
        else:
            if self._n + m > self._k.shape[-2]:
                self._grow(max(m, self._k.shape[-2]))
            self._k[:, :, self._n: self._n + m] = key_states
            self._v[:, :, self._n: self._n + m] = value_states
            self._n += m
            key_states, value_states = self.own
        if self.prefix is None:
            return key_states, value_states
        if is_active(self.config):
            return tag_with_prefix(key_states, self.prefix), value_states
        return self._joined(key_states, 0), self._joined(value_states, 1)

    def _grow(self, extra: int) -> None:
        pad = (*self._k.shape[:2], extra, self._k.shape[-1])
        self._k = torch.cat([self._k, self._k.new_empty(pad)], dim=2)
        self._v = torch.cat([self._v, self._v.new_empty((*pad[:3], self._v.shape[-1]))], dim=2)

    def get_seq_length(self) -> int:
        return (0 if self.prefix is None else self.prefix[0].shape[-2]) + self._n

    def derived(self, drop_last: int = 0, repeat: int = 1, room: int = 0) -> "PrefixLayer":
        """A new layer continuing this one: the last `drop_last` own tokens removed, rows repeated `repeat`
        times (interleaved), `room` spare positions. The prefix stays shared."""
        k, v = self.own
        k, v = k[:, :, : self._n - drop_last], v[:, :, : self._n - drop_last]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
        return PrefixLayer(self.config, self.prefix, (k, v), room)


def cache_from_layers(layers: list[PrefixLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def as_prefix_layers(past: Any, config: Any) -> list[PrefixLayer]:
    """The layers of an HF cache as `PrefixLayer`s (a plain layer becomes one with no prefix)."""
    layers = getattr(past, "layers", None)
    if layers is not None and all(isinstance(layer, PrefixLayer) for layer in layers):
        return list(layers)
    return [PrefixLayer(config, None, (k, v)) for k, v, *_ in past]
