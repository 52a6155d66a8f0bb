"""Attention over [shared prefix | own tokens] without copying the prefix per row or per head.

With a reused prefix (the system prompt, ~1700 tokens here) HF's sdpa path joins the prefix with each
row's own keys (one copy per row) and repeats the keys for every query head sharing them (GQA): per
layer and forward that moves far more memory than the attention computes. Here the prefix is attended
once for all rows and query heads (queries folded into one long block), each row's own tokens
separately, and the two softmaxes are merged by their log-sum-exp. Equal to sdpa within float error
(tested against a plain HF forward).

`PrefixLayer` (activations/kv.py) hands its own keys to this function, tagged with the prefix, only
while `split_prefix(model)` is active; any other attention code gets the joined keys.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from einops import rearrange, repeat
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "afprobe_split_prefix"
PREFIX_ATTR = "_afprobe_prefix"  # set on the own keys handed to attention: (prefix keys, prefix values)


def tag_with_prefix(keys: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    setattr(keys, PREFIX_ATTR, prefix)
    return keys


def is_active(config: Any) -> bool:
    return getattr(config, "_attn_implementation", None) == NAME


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [b, h, t, d], log-sum-exp [b, h, t] float32). `mask` is additive (float, like q)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)[:2]
    return out, lse


def _own_mask(attention_mask: Optional[torch.Tensor], t: int, own: int, device: torch.device) -> torch.Tensor:
    """[b|1, 1, t, own] bool: which of its own tokens each query sees (None mask = causal, end-aligned)."""
    if attention_mask is None:
        return (torch.arange(own, device=device)[None, :] <= torch.arange(t, device=device)[:, None] + own - t)[None, None]
    m = attention_mask[..., -own:]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def split_prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention interface. query [b, H, t, d]; key/value [b, kvh, own, d] (own tokens), tagged with the
    prefix keys/values [1|b, kvh, P, d]; attention_mask [b, 1, t, P + own] bool or None.
    Returns ([b, t, H, d], None) like sdpa."""
    prefix = getattr(key, PREFIX_ATTR, None)
    if prefix is None or query.device.type != "cpu" or dropout:
        if prefix is not None:  # not on CPU: join and let sdpa do it
            b = key.shape[0]
            key = torch.cat([prefix[0].expand(b, -1, -1, -1), key], dim=-2)
            value = torch.cat([prefix[1].expand(b, -1, -1, -1), value], dim=-2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    pk, pv = prefix
    b, H, t, d = query.shape
    kvh, own = key.shape[1], key.shape[-2]
    g = H // kvh
    if attention_mask is not None and attention_mask.shape[-1] != pk.shape[-2] + own:
        raise RuntimeError(f"attention mask covers {attention_mask.shape[-1]} keys, the cache "
                           f"{pk.shape[-2]} + {own}")
    q = rearrange(query, "b (kvh g) t d -> b kvh (g t) d", kvh=kvh)  # the query heads sharing a kv head, stacked
    # prefix: every query sees all of it; fold rows (and heads of a group) into one block per kv head
    if pk.shape[0] == 1:
        o1, l1 = _flash_cpu(rearrange(q, "b kvh r d -> 1 kvh (b r) d"), pk, pv, None, scaling)
        o1 = rearrange(o1, "1 kvh (b r) d -> b kvh r d", b=b)
        l1 = rearrange(l1, "1 kvh (b r) -> b kvh r", b=b)
    else:
        o1, l1 = _flash_cpu(q, pk, pv, None, scaling)
    # own tokens: causal and padding mask, the same for every head of a group
    seen = _own_mask(attention_mask, t, own, query.device)  # [b|1, 1, t, own]
    seen = repeat(seen.expand(seen.shape[0], 1, t, own), "b 1 t o -> b 1 (g t) o", g=g)
    additive = torch.zeros(seen.shape, dtype=query.dtype, device=query.device).masked_fill_(~seen, float("-inf"))
    o2, l2 = _flash_cpu(q, key, value, additive, scaling)
    l2 = l2.masked_fill(~seen.any(-1).expand_as(l2), float("-inf"))  # no own token visible: weight 0
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    out = (o1 * w1[..., None] + o2.nan_to_num() * w2[..., None]) / (w1 + w2)[..., None]
    return rearrange(out.to(query.dtype), "b kvh (g t) d -> b t (kvh g) d", g=g).contiguous(), None


AttentionInterface.register(NAME, split_prefix_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def split_prefix(model: Any) -> Iterator[bool]:
    """Use `split_prefix_attention` inside the block if the model runs sdpa (yields whether it does)."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    active = previous in ("sdpa", NAME)
    if active:
        config._attn_implementation = NAME
    try:
        yield active
    finally:
        config._attn_implementation = previous
