"""Token-budget batching with shared-prefix reuse.

A batch's sequences are laid out as [shared prefix | left padding | own suffix]. The prefix is run
once (plain HF forward, no hooks) and its KV cache is reused by every batch that shares it; only
the suffixes cost compute. Padding sits between prefix and suffix and is masked out; positions are
explicit, so every real token keeps the position it has in the unpadded prompt.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import DynamicCache

from afprobe.activations.backends import ModelInputs
from afprobe.activations.devices import input_device
from afprobe.activations.kv import PrefixLayer, cache_from_layers


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs):
            return i
    return n


def budget_batches(lengths: Sequence[int], keys: Sequence[Any], budget: int, max_batch: int = 64) -> list[list[int]]:
    """Indices grouped by key, sorted by length, packed so that rows x longest <= budget tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (keys[i], lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        grown = current + [i]
        longest = max(lengths[j] for j in grown)
        if current and (keys[i] != keys[current[0]] or len(grown) * longest > budget or len(grown) > max_batch):
            batches.append(current)
            grown = [i]
        current = grown
    if current:
        batches.append(current)
    return batches


class PrefixCache:
    """Computes a prefix's KV cache once and hands out caches continuing it (`PrefixLayer`: the prefix is
    shared by every row, never copied).

    keep_new: whether the handed-out caches store the tokens run after the prefix (needed to generate;
    a single forward that only reads activations does not need them)."""

    def __init__(self, model: Any, keep_new: bool = True) -> None:
        self.model = model
        self.keep_new = keep_new
        self._key: Optional[tuple[int, ...]] = None
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.computed_tokens = 0

    def get(self, prefix: Sequence[int], batch_size: int) -> DynamicCache:
        key = tuple(prefix)
        if key != self._key:
            ids = torch.tensor([key], device=input_device(self.model))
            kwargs: dict[str, Any] = {}
            if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
                kwargs["logits_to_keep"] = 1  # only the KV cache is wanted: skip the prefix's logits
            with torch.inference_mode():
                out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
            self._layers = [(k, v) for k, v, *_ in out.past_key_values]  # each on its layer's device
            self._key = key
            self.computed_tokens += len(key)
        def empty(t: torch.Tensor) -> torch.Tensor:
            return t.new_empty((batch_size, t.shape[1], 0, t.shape[3]))

        return cache_from_layers([PrefixLayer(self.model.config, (k, v), (empty(k), empty(v)), keep_new=self.keep_new)
                                  for k, v in self._layers])


@dataclass
class Batch:
    """A batch ready to run, plus where each prompt's tokens landed.

    offsets: [b] index in `inputs.input_ids` of each prompt's first suffix token, minus prefix_len:
             a token at position i of prompt r (i >= prefix_len) sits at column i + offsets[r].
    """

    rows: list[int]
    inputs: ModelInputs
    prefix_len: int
    offsets: list[int]

    def column(self, row: int, position: int) -> int:
        return position + self.offsets[row]


def make_batch(
    rows: list[int],
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    prefix_len: int,
    prefix_cache: Optional[PrefixCache],
    device: torch.device,
) -> Batch:
    """Lay out `seqs` (full token lists) as [prefix | pad | suffix] with a reused prefix cache."""
    p = prefix_len if prefix_cache is not None else 0
    suffixes = [list(s[p:]) for s in seqs]
    t = max(len(s) for s in suffixes)
    b = len(seqs)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((b, t), dtype=torch.long)
    offsets = []
    for r, suf in enumerate(suffixes):
        input_ids[r, t - len(suf):] = torch.tensor(suf, dtype=torch.long)
        suffix_mask[r, t - len(suf):] = 1
        offsets.append(t - len(suf) - p)
    positions = (p + suffix_mask.cumsum(-1) - 1).clamp(min=p)
    attention_mask = torch.cat([torch.ones((b, p), dtype=torch.long), suffix_mask], dim=1)
    full_ids = torch.cat([torch.tensor([list(seqs[0][:p])] * b, dtype=torch.long).reshape(b, p), input_ids], dim=1)
    past = prefix_cache.get(seqs[0][:p], b) if p > 0 else None
    inputs = ModelInputs(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=positions.to(device),
        past=past, full_ids=full_ids.to(device),
    )
    return Batch(rows=rows, inputs=inputs, prefix_len=p, offsets=offsets)


def plan_prefix(seqs: Sequence[Sequence[int]], earliest_needed: Sequence[int]) -> int:
    """Longest prefix shared by `seqs` that ends before every position that must be computed fresh."""
    return max(0, min(common_prefix_len(seqs), min(earliest_needed), min(len(s) for s in seqs) - 1))


def group_prefixes(seqs: Sequence[Sequence[int]], keys: Sequence[Any],
                   earliest_needed: Sequence[int]) -> dict[Any, int]:
    """Per group key, the prefix length `run_batches` reuses for that group's sequences (`plan_prefix`)."""
    out: dict[Any, int] = {}
    for key in dict.fromkeys(keys):
        members = [i for i, k in enumerate(keys) if k == key]
        out[key] = plan_prefix([seqs[i] for i in members], [earliest_needed[i] for i in members])
    return out


def run_batches(
    seqs: Sequence[Sequence[int]],
    group_keys: Sequence[Any],
    earliest_needed: Sequence[int],
    budget: int,
    pad_id: int,
    model: Any,
    prefix_cache: Optional[PrefixCache],
    fn: Callable[[Batch], None],
    progress: Optional[Callable[[int], None]] = None,
    max_batch: int = 64,
) -> dict[str, int]:
    """Run `fn` on every batch; returns token counts (computed vs total) for the speed report.

    `prefix_cache` None computes every token (no reuse); share one across calls to keep its prefix.
    """
    reuse = prefix_cache is not None
    device = input_device(model)
    prefix_before = prefix_cache.computed_tokens if reuse else 0
    total = sum(len(s) for s in seqs)
    computed = 0
    # With reuse the batch budget counts suffix tokens only: plan prefixes per group first.
    group_prefix = group_prefixes(seqs, group_keys, earliest_needed) if reuse else {}
    lengths = [len(s) - group_prefix.get(k, 0) for s, k in zip(seqs, group_keys)]
    for rows in budget_batches(lengths, group_keys, budget, max_batch):
        p = group_prefix.get(group_keys[rows[0]], 0)
        batch = make_batch(rows, [seqs[i] for i in rows], pad_id, p, prefix_cache, device)
        computed += sum(len(seqs[i]) - batch.prefix_len for i in rows)
        fn(batch)
        if progress is not None:
            progress(len(rows))
    if reuse:
        computed += prefix_cache.computed_tokens - prefix_before
    return {"total_tokens": total, "computed_tokens": computed}
