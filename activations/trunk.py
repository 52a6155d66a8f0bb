"""Shared trunk: the unsteered prompt pass run once up to the first steered block, then branched per condition.

Every condition that steers at layer L (every alpha, both modes, every random control) computes exactly the same
thing for blocks 0..k-1 of the prompt pass, where k is the first block whose computation the edit changes
(k = L for resid_pre / resid_mid, L + 1 for resid_post, since an addition at block L's output is an addition at
block L+1's input). So for a batch of prompts:

1. trunk (`run_trunk`): one plain forward over the batch's own tokens (continuing the shared-prefix cache when
   prefix reuse is on) that stops at block k's input, keeping the residual there ([b, t, d]) and the KV of
   blocks 0..k-1 for those tokens;
2. branch (`run_branch`): the conditions are stacked as rows ([c * b, ...], condition-major); blocks 0..k-1 are
   skipped (their KV comes from the trunk, repeated per condition), block k's input is replaced by the trunk's
   residual (plus the resid_post addition at L when k = L + 1), and blocks k..N-1 run with the conditions' edits.

What is shared is the *prompt pass* only: once decoding starts the generated tokens differ by condition, so the
tag continuations and every decoding step run all blocks per condition (from the branched cache: the trunk's KV of
blocks < k for the prompt tokens, the condition's own KV from block k on). The edit at decoding steps is the same
as on the unshared path (`steering._continuation_edit`), through the backend.

The trunk and branch prompt passes are plain HF forwards with torch hooks doing the same additions as the backends
(`ResidualEdit.steer` at the same module boundaries), so the result equals the unshared path within float error
(tests: log-odds within 1e-5, identical greedy tokens). Ablation edits every block from 0 on and has no trunk.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from transformers import DynamicCache

from afprobe.activations.attention import split_prefix
from afprobe.activations.backends import ModelInputs, ResidualEdit
from afprobe.activations.kv import KV, PrefixLayer, cache_from_layers


class _StopForward(Exception):
    pass


def trunk_boundary(layers: tuple[int, ...], site: str, n_layers: int) -> int:
    """k: the first block whose prompt-pass computation an addition at `site` of `layers` changes (blocks 0..k-1
    are the shared trunk). resid_post at L is block L+1's input; capped at the last block."""
    first = min(layers)
    return min(first + 1, n_layers - 1) if site == "resid_post" else first


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_first(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _out_first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _out_with_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def edit_hooks(blocks: Any, adapter: Any, edit: Optional[ResidualEdit], skip: set[int] = frozenset()) -> list[Any]:
    """Torch hooks adding `edit` (no ablation) at its site of each of its layers except `skip`, at the module
    boundaries the backends use: resid_pre = block input, resid_mid = the attention-output module's output,
    resid_post = block output. Returns the handles."""
    handles: list[Any] = []
    if edit is None or edit.add is None:
        return handles
    for layer in edit.layers:
        if layer in skip:
            continue
        block = blocks[layer]
        if edit.site == "resid_pre":
            handles.append(block.register_forward_pre_hook(
                lambda m, args, kwargs: _with_first(args, kwargs, edit.steer(_first(args, kwargs))), with_kwargs=True))
        elif edit.site == "resid_mid":
            module = getattr(block, adapter.attn_out_module)
            handles.append(module.register_forward_hook(
                lambda m, args, output: _out_with_first(output, edit.steer(_out_first(output)))))
        else:
            handles.append(block.register_forward_hook(
                lambda m, args, output: _out_with_first(output, edit.steer(_out_first(output)))))
    return handles


@dataclass
class Trunk:
    """The shared prompt pass of one batch, up to block k's input.

    residual: [b, t, d] input of block k for the batch's tokens run now (unsteered)
    kv:       per block i < k, the keys/values of those tokens ([b, kvh, t, hd] each)
    prefix:   per block, the shared prefix's keys/values ([1, kvh, P, hd]) or None (no prefix reuse)
    """

    k: int
    residual: torch.Tensor
    kv: list[KV]
    prefix: list[Optional[KV]]


def _empty_own(model: Any, block: Any, rows: int) -> KV:
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(block.parameters())
    t = torch.empty((rows, heads, 0, head_dim), dtype=p.dtype, device=p.device)
    return t, t


def run_trunk(model: Any, adapter: Any, inputs: ModelInputs, k: int) -> Trunk:
    """Run blocks 0..k-1 over `inputs` (unsteered) and stop at block k's input."""
    blocks = adapter.blocks(model)
    past = inputs.past if inputs.past is not None else DynamicCache()
    captured: dict[str, torch.Tensor] = {}

    def stop(module: Any, args: tuple, kwargs: dict) -> None:
        captured["h"] = _first(args, kwargs)
        raise _StopForward

    kwargs = inputs.forward_kwargs()
    kwargs.update(past_key_values=past, use_cache=True)
    kwargs.pop("logits_to_keep", None)
    handle = blocks[k].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.inference_mode(), split_prefix(model):
            model(**kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    layers = list(getattr(past, "layers", []))
    kv: list[KV] = []
    prefix: list[Optional[KV]] = []
    for i in range(len(blocks)):
        layer = layers[i] if i < len(layers) else None
        pre = layer.prefix if isinstance(layer, PrefixLayer) else None
        prefix.append(pre)
        if i < k:
            kv.append(layer.own if isinstance(layer, PrefixLayer) else (layer.keys, layer.values))
    return Trunk(k, captured["h"], kv, prefix)


class _WithheldLayer(PrefixLayer):
    """A `PrefixLayer` for a skipped trunk block: it already holds the prompt tokens' KV, but reports (for the
    attention mask) and exposes only the prefix until `commit()` (called when the block is skipped)."""

    def __init__(self, config: Any, prefix: Optional[KV], own: KV, room: int) -> None:
        super().__init__(config, prefix, own, room)
        self._held = own[0].shape[2]
        self._n -= self._held

    def commit(self) -> None:
        self._n += self._held
        self._held = 0


@contextmanager
def _skipping(blocks: Any, k: int, layers: list[PrefixLayer], residual: torch.Tensor) -> Iterator[None]:
    """Blocks 0..k-1 return their input untouched (committing their trunk KV); block k's input is `residual`."""
    saved = []

    def skip(i: int):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            layers[i].commit()
            return hidden_states
        return forward

    # plain object attributes: a wrapper module (e.g. TransformerLens's bridge) may redirect setattr
    for i in range(k):
        saved.append(blocks[i].__dict__.get("forward"))
        object.__setattr__(blocks[i], "forward", skip(i))
    handle = blocks[k].register_forward_pre_hook(
        lambda m, args, kwargs: _with_first(args, kwargs, residual.to(_first(args, kwargs).device, _first(args, kwargs).dtype)), with_kwargs=True,
        prepend=True)  # before any edit hook on block k
    try:
        yield
    finally:
        handle.remove()
        for i, fwd in enumerate(saved):
            if fwd is None:
                object.__delattr__(blocks[i], "forward")
            else:
                object.__setattr__(blocks[i], "forward", fwd)


def tile(x: torch.Tensor, c: int) -> torch.Tensor:
    """[b, ...] -> [c * b, ...], condition-major (rows of condition j at j*b .. j*b + b - 1)."""
    return x.repeat(c, *([1] * (x.dim() - 1)))


def tile_inputs(inputs: ModelInputs, c: int, **fields: Any) -> ModelInputs:
    """`inputs` ([b, ...]) repeated for c stacked conditions ([c * b, ...], condition-major), with `fields` set."""
    return ModelInputs(input_ids=tile(inputs.input_ids, c), attention_mask=tile(inputs.attention_mask, c),
                       position_ids=tile(inputs.position_ids, c),
                       full_ids=None if inputs.full_ids is None else tile(inputs.full_ids, c), **fields)


def run_branch(model: Any, adapter: Any, trunk: Trunk, inputs: ModelInputs, c: int, edit: Optional[ResidualEdit],
               site_first_layer: Optional[int] = None, room: int = 0, residual: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, list[PrefixLayer]]:
    """Blocks k..N-1 of the prompt pass for `c` stacked conditions, from the trunk.

    inputs: the trunk's batch (b rows, not stacked); edit: rows [c * b] (condition-major) or None;
    site_first_layer: when set (resid_post at L with k = L + 1), the addition at L is applied to the trunk's
    residual directly; residual: block k's input per stacked row ([c * b, t, d]) in place of the trunk's residual
    repeated (activation patching writes other prompts' values into it). Returns (last-position logits
    [c * b, 1, vocab], the cache layers of every block, continuing with `room` spare positions)."""
    blocks = adapter.blocks(model)
    k, b = trunk.k, inputs.input_ids.shape[0]
    residual = tile(trunk.residual, c) if residual is None else residual
    skip: set[int] = set()
    if edit is not None and edit.add is not None and site_first_layer is not None:
        residual = edit.steer(residual)
        skip = {site_first_layer}
    layers: list[PrefixLayer] = []
    for i, block in enumerate(blocks):
        if i < k:
            kk, vv = trunk.kv[i]
            layers.append(_WithheldLayer(model.config, trunk.prefix[i], (tile(kk, c), tile(vv, c)), room))
        else:
            layers.append(PrefixLayer(model.config, trunk.prefix[i], _empty_own(model, block, c * b),
                                      room + inputs.input_ids.shape[1]))
    past = cache_from_layers(layers)
    stacked = tile_inputs(inputs, c, past=past, last_logits_only=True)
    handles = edit_hooks(blocks, adapter, edit, skip)
    try:
        with torch.inference_mode(), split_prefix(model), _skipping(blocks, k, layers, residual):
            out = model(**stacked.forward_kwargs())
    finally:
        for h in handles:
            h.remove()
    return out.logits, layers
