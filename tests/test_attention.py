"""Split-prefix attention equals sdpa over the joined [prefix | own] keys; the KV layer only splits when asked."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from afprobe.activations.attention import NAME, PREFIX_ATTR, split_prefix, split_prefix_attention
from afprobe.activations.kv import PrefixLayer

TOL = 1e-5  # float32, random unit-scale inputs


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def _reference(q, pk, pv, k, v, mask):
    b = q.shape[0]
    g = q.shape[1] // k.shape[1]
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], -2).repeat_interleave(g, 1)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], -2).repeat_interleave(g, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("earlier", [2, 0])  # own tokens before the queries; 0: padded queries see no own token
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_split_prefix_attention_equals_sdpa(t: int, earlier: int, shared: bool, with_mask: bool) -> None:
    gen = torch.Generator().manual_seed(t)
    b, kvh, g, P, own, d = 3, 2, 3, 11, t + earlier, 8
    q = torch.randn(b, kvh * g, t, d, generator=gen)
    pk, pv = (torch.randn(1 if shared else b, kvh, P, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, kvh, own, d, generator=gen) for _ in range(2))
    causal = torch.arange(own)[None, :] <= torch.arange(t)[:, None] + own - t  # [t, own]
    mask = None
    if with_mask:  # left padding between prefix and own tokens: row r has r pad tokens
        keep = torch.arange(own)[None, :] >= torch.arange(b)[:, None]  # [b, own]
        mask = torch.cat([torch.ones(b, 1, t, P, dtype=torch.bool), (causal[None] & keep[:, None])[:, None]], -1)
    ref_mask = mask if mask is not None else torch.cat([torch.ones(t, P, dtype=torch.bool), causal], -1)
    key = k.clone()
    setattr(key, PREFIX_ATTR, (pk, pv))
    got, _ = split_prefix_attention(_Module(), q, key, v, mask, scaling=d ** -0.5)
    ref = _reference(q, pk, pv, k, v, ref_mask)
    assert got.shape == (b, t, kvh * g, d)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < TOL
    if with_mask:  # the own-token mask is built once per mask object: another mask must not get the cached one
        other = mask.clone()
        other[..., P:] = causal
        got, _ = split_prefix_attention(_Module(), q, key, v, other, scaling=d ** -0.5)
        assert (got - _reference(q, pk, pv, k, v, other)).abs().max().item() < TOL


def test_prefix_layer_splits_only_inside_the_context() -> None:
    config = LlamaConfig(num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    model = torch.nn.Module()
    model.config = config
    pk, pv = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    layer = PrefixLayer(config, (pk, pv), (torch.randn(3, 2, 0, 8), torch.randn(3, 2, 0, 8)))
    new = torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8)
    keys, _ = layer.update(*new)
    assert keys.shape == (3, 2, 6, 8) and not hasattr(keys, PREFIX_ATTR)  # joined for any attention code
    assert torch.equal(keys[:, :, :4], pk.expand(3, -1, -1, -1)) and torch.equal(keys[:, :, 4:], new[0])
    with split_prefix(model) as active:
        assert active and config._attn_implementation == NAME
        keys, _ = layer.update(*new)
    assert config._attn_implementation == "sdpa"
    assert keys.shape == (3, 2, 4, 8) and getattr(keys, PREFIX_ATTR)[0] is pk  # own tokens only, tagged
    assert layer.get_seq_length() == 8
    continued = layer.derived(drop_last=1, repeat=2, room=3)
    assert continued.get_seq_length() == 7 and continued.own[0].shape == (6, 2, 3, 8)


def test_split_prefix_attention_gradients_equal_sdpa() -> None:
    """With gradients the attention takes sdpa over the joined keys (the CPU flash op's backward ignores the
    log-sum-exp the merge needs), so gradients equal sdpa's."""
    gen = torch.Generator().manual_seed(0)
    b, kvh, g, P, t, d = 2, 2, 3, 7, 4, 8
    q = torch.randn(b, kvh * g, t, d, generator=gen, requires_grad=True)
    pk, pv = (torch.randn(1, kvh, P, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, kvh, t, d, generator=gen, requires_grad=True) for _ in range(2))
    keep = torch.arange(t)[None, :] >= torch.arange(b)[:, None]  # row 1 has one pad token
    causal = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
    mask = torch.cat([torch.ones(b, 1, t, P, dtype=torch.bool), (causal[None] & keep[:, None])[:, None]], -1)
    weights = torch.randn(b, t, kvh * g, d, generator=gen)
    key = k * 1.0
    setattr(key, PREFIX_ATTR, (pk, pv))
    got = torch.autograd.grad((split_prefix_attention(_Module(), q, key, v, mask, scaling=d ** -0.5)[0]
                               * weights).sum(), (q, k, v))
    ref = torch.autograd.grad((_reference(q, pk, pv, k, v, mask) * weights).sum(), (q, k, v))
    for a, r in zip(got, ref):
        assert (a - r).abs().max().item() < TOL


def test_a_rows_result_does_not_depend_on_the_rows_stacked_with_it() -> None:
    """The trunk runs conditions stacked as rows and must equal running them one by one: exactly, not within a
    tolerance (some CPU kernels round differently in their vector body and scalar tail)."""
    gen = torch.Generator().manual_seed(0)
    b, kvh, g, P, t, d = 5, 3, 3, 300, 141, 64  # shapes where those kernels' tails do show
    q = torch.randn(b, kvh * g, t, d, generator=gen)
    pk, pv = (torch.randn(1, kvh, P, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, kvh, t, d, generator=gen) for _ in range(2))
    keep = torch.arange(t)[None, :] >= torch.tensor([0, 11, 21, 6, 40])[:, None]  # left padding
    causal = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
    mask = torch.cat([torch.ones(b, 1, t, P, dtype=torch.bool), (causal[None] & keep[:, None])[:, None]], -1)

    def run(c: int) -> torch.Tensor:
        stack = lambda x: x.repeat(c, *([1] * (x.dim() - 1)))  # noqa: E731
        key = stack(k)
        setattr(key, PREFIX_ATTR, (pk, pv))
        with torch.inference_mode():
            return split_prefix_attention(_Module(), stack(q), key, stack(v), stack(mask), scaling=d ** -0.5)[0][:b]

    alone = run(1)
    for c in range(2, 9):  # different stack sizes put different rows in the kernels' tails
        assert torch.equal(alone, run(c)), c
