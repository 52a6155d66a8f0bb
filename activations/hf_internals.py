"""Every use of transformers internals in afprobe, behind one switch.

The speed work leans on parts of transformers that are not its public API:

- `PrefixLayer`, a subclass of `transformers.cache_utils.DynamicLayer` overriding its `keys`/`values`, and
  caches assembled by assigning `DynamicCache.layers`: the shared system-prompt prefix is stored once for
  the whole batch and decoding writes into a buffer in place (activations/steering.py, batching.py);
- `split_prefix_attention`, registered globally with `AttentionInterface` and switched on per model by
  setting `config._attn_implementation` (`split_prefix(model)`): attends the prefix once for all rows;
- the private aten op `_scaled_dot_product_flash_attention_for_cpu` (it returns the log-sum-exp that
  merging two softmaxes needs);
- transformers' device-map planner (`integrations.accelerate._get_device_map`, `accelerate_dispatch`) and
  its GGUF loader's progress bar.

They were tested with the transformers versions in `TESTED` (keep it in step with the pin in
pyproject.toml). With another version installed, or with the environment variable AFPROBE_HF_INTERNALS=0,
or after `use_internals(False)`, the first three fall back to the plain path (slower, still correct):
HF's own `DynamicCache` with the prefix copied per row, and sdpa over the joined keys. One warning says
so. Results are equal either way (tests/test_hf_internals.py).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from einops import rearrange, repeat

from afprobe.log import log

TESTED = ("5.0", "5.24")  # [low, high): the range pyproject.toml pins and the tests ran with
ENV = "AFPROBE_HF_INTERNALS"  # "0" / "off" / "false": always the plain path

KV = tuple[torch.Tensor, torch.Tensor]


def decide(version: str, env: Optional[str]) -> tuple[bool, Optional[str]]:
    """(use the internals?, why not): from the installed transformers version and the environment switch."""
    from packaging.version import InvalidVersion, Version

    if env is not None and env.strip().lower() in ("0", "off", "false", "no"):
        return False, f"{ENV}={env}"
    try:
        v = Version(version)
    except InvalidVersion:
        return False, f"transformers version {version!r} is not a version number"
    if not Version(TESTED[0]) <= Version(v.base_version) < Version(TESTED[1]):
        return False, f"transformers {version} is outside the tested range >={TESTED[0]},<{TESTED[1]}"
    return True, None


def _installed() -> str:
    import transformers

    return str(transformers.__version__)


_ENABLED, _WHY = decide(_installed(), os.environ.get(ENV))
_warned = False


def _imports() -> dict[str, Any]:
    """The internal names, or {} if this transformers lacks one of them (then the plain path is forced)."""
    try:
        from transformers import AttentionInterface
        from transformers.cache_utils import DynamicLayer
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        global _WHY
        _WHY = f"transformers {_installed()} lacks {exc.name or exc}"
        return {}
    return dict(AttentionInterface=AttentionInterface, DynamicLayer=DynamicLayer,
                sdpa_attention_forward=sdpa_attention_forward, AttentionMaskInterface=AttentionMaskInterface,
                sdpa_mask=sdpa_mask)


_HF = _imports()
if not _HF:
    _ENABLED = False


def internals_enabled() -> bool:
    """Whether the fast path runs (warns once, the first time it is asked, if it does not)."""
    global _warned
    if not _ENABLED and not _warned and _WHY and not _WHY.startswith("use_internals"):
        log.warning(f"afprobe: not using transformers internals ({_WHY}); prefix reuse and attention take "
                    "the plain path (slower, same results)")
        _warned = True
    return _ENABLED


def use_internals(on: bool) -> None:
    """Switch the fast path on or off for this process (on only works where the check allowed it)."""
    global _ENABLED, _WHY
    allowed, why = decide(_installed(), os.environ.get(ENV))
    if on and not (allowed and _HF):
        raise RuntimeError(f"cannot use transformers internals: {why or _WHY}")
    _ENABLED, _WHY = bool(on), None if on else "use_internals(False)"


@contextmanager
def plain_path() -> Iterator[None]:
    """Inside the block, the plain path (for tests and comparisons)."""
    before, why = _ENABLED, _WHY
    use_internals(False)
    try:
        yield
    finally:
        globals().update(_ENABLED=before, _WHY=why)


# ---------------------------------------------------------------- split-prefix attention

NAME = "afprobe_split_prefix"
PREFIX_ATTR = "_afprobe_prefix"  # set on the own keys handed to attention: (prefix keys, prefix values)


def tag_with_prefix(keys: torch.Tensor, prefix: KV) -> torch.Tensor:
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
    Returns ([b, t, H, d], None) like sdpa.

    With a reused prefix (the system prompt, ~1500 tokens here) HF's sdpa path joins the prefix with each
    row's own keys (one copy per row) and repeats the keys for every query head sharing them (GQA). Here
    the prefix is attended once for all rows and query heads (queries folded into one long block), each
    row's own tokens separately, and the two softmaxes are merged by their log-sum-exp. Equal to sdpa
    within float error (tests/test_attention.py)."""
    prefix = getattr(key, PREFIX_ATTR, None)
    # the CPU flash op's backward ignores the log-sum-exp the merge uses: with gradients, join and use sdpa
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    if prefix is None or query.device.type != "cpu" or dropout or grad:
        if prefix is not None:  # not on CPU, or with gradients: join and let sdpa do it
            b = key.shape[0]
            key = torch.cat([prefix[0].expand(b, -1, -1, -1), key], dim=-2)
            value = torch.cat([prefix[1].expand(b, -1, -1, -1), value], dim=-2)
        return _HF["sdpa_attention_forward"](module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, is_causal=is_causal, **kwargs)
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


if _HF:
    _HF["AttentionInterface"].register(NAME, split_prefix_attention)
    _HF["AttentionMaskInterface"].register(NAME, _HF["sdpa_mask"])


@contextmanager
def split_prefix(model: Any) -> Iterator[bool]:
    """Use `split_prefix_attention` inside the block if the model runs sdpa and the internals are on (yields
    whether it does)."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    active = previous in ("sdpa", NAME) and internals_enabled()
    if active:
        config._attn_implementation = NAME
    try:
        yield active
    finally:
        if active:
            config._attn_implementation = previous


# ---------------------------------------------------------------- the [shared prefix | own tokens] KV layer

_Base: Any = _HF.get("DynamicLayer", object)


class PrefixLayer(_Base):  # type: ignore[misc, valid-type]
    """A KV cache layer for [shared prefix | each row's own tokens].

    prefix: keys/values [1, h, P, d] shared by every row (or None); own: [b, h, n, d] per row. The prefix is
    stored once for the whole batch, never copied per row; each row's own tokens live in a buffer with
    room to grow, so decoding writes new keys in place instead of HF's `DynamicLayer` copying the whole
    cache for every new token. While `split_prefix` is active the layer hands attention its own keys tagged
    with the prefix (no join at all); otherwise it returns the joined [prefix | own] tensors like any HF
    cache layer. On the plain path it is only a container: `cache_from_layers` hands HF a `DynamicCache`.

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

    def derived(self, drop_last: int = 0, repeat: int = 1, room: int = 0, rows: Any = None) -> "PrefixLayer":
        """A new layer continuing this one: only `rows` (all when None), the last `drop_last` own tokens removed,
        rows repeated `repeat` times (interleaved), `room` spare positions. The prefix stays shared."""
        k, v = self.own
        k, v = k[:, :, : self._n - drop_last], v[:, :, : self._n - drop_last]
        if rows is not None:  # a slice, or an index tensor [b']
            if isinstance(rows, slice):
                k, v = k[rows], v[rows]
            else:
                index = rows.to(k.device)
                k, v = k.index_select(0, index), v.index_select(0, index)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
        return PrefixLayer(self.config, self.prefix, (k, v), room)


def cache_from_layers(layers: list[PrefixLayer]) -> Any:
    """An HF cache continuing `layers`: the layers themselves (fast path), or a plain `DynamicCache` holding
    copies of their joined keys and values (plain path: public API only)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if internals_enabled():
        cache.layers = list(layers)
        return cache
    for i, layer in enumerate(layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    return cache


def as_prefix_layers(past: Any, config: Any) -> list[PrefixLayer]:
    """The layers of an HF cache as `PrefixLayer`s (a plain layer becomes one with no prefix)."""
    layers = getattr(past, "layers", None)
    if layers is not None and all(isinstance(layer, PrefixLayer) for layer in layers):
        return list(layers)
    return [PrefixLayer(config, None, (k, v)) for k, v, *_ in past]


# ---------------------------------------------------------------- loading: device maps, GGUF

def plan_and_dispatch(model: Any, device_map: Any, max_memory: Any, offload_folder: Optional[str],
                      check: Any) -> dict[str, Any]:
    """transformers' own device-map planner, then its accelerate dispatch, as `from_pretrained(device_map=...)`
    does. `check(realized)` runs between the two (it may raise). Returns the realized map."""
    from transformers.integrations.accelerate import _get_device_map, accelerate_dispatch

    realized = _get_device_map(model, device_map, max_memory, None)
    check(realized)
    accelerate_dispatch(model, None, realized, offload_folder, None, False)
    return realized


@contextmanager
def quiet_gguf_bar() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar outside its logging switches: silence it while loading."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
