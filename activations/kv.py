"""A KV cache that grows in place, for decoding many tokens after a long prompt.

HF's `DynamicLayer` concatenates the whole cache with every new token: after a prompt of thousands of
tokens, each decode step copies all of it, in every layer. `PreallocatedLayer` copies the prompt once
into a buffer with room for the tokens to come and writes new keys/values into it in place.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """Keys/values [b, heads, n, d] stored in a buffer with `room` spare positions (grows if exceeded)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        b, h, n, d = keys.shape
        self._k = keys.new_empty((b, h, n + room, d))
        self._v = values.new_empty((b, h, n + room, values.shape[-1]))
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self._n = n
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        m = key_states.shape[-2]
        if self._n + m > self._k.shape[-2]:  # out of room: double the buffer
            grow = max(m, self._k.shape[-2])
            self._k = torch.cat([self._k, self._k.new_empty((*self._k.shape[:2], grow, self._k.shape[-1]))], dim=2)
            self._v = torch.cat([self._v, self._v.new_empty((*self._v.shape[:2], grow, self._v.shape[-1]))], dim=2)
        self._k[:, :, self._n: self._n + m] = key_states
        self._v[:, :, self._n: self._n + m] = value_states
        self._n += m
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n


def preallocated_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], room: int) -> DynamicCache:
    """A `DynamicCache` holding `layers` ([(keys, values)] per layer) with room for `room` more tokens."""
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(k, v, room) for k, v in layers]
    return cache
