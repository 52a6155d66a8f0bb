"""The interface every backend implements, and the plain-data types that cross it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from afprobe.activations.adapters import FamilyAdapter, adapter_for

SITES = ("resid_pre", "resid_mid", "resid_post")
SiteKey = tuple[int, str]  # (layer, site)


@dataclass
class ModelInputs:
    """One batch, possibly continuing a shared-prefix KV cache.

    input_ids:      [b, t]      tokens to run now (the suffix when `past` is set)
    attention_mask: [b, p + t]  1 for real tokens, prefix included
    position_ids:   [b, t]      positions of the tokens run now
    past:           HF cache holding the first p tokens, or None
    full_ids:       [b, p + t]  the whole sequences (generation needs them)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    past: Any = None
    full_ids: Optional[torch.Tensor] = None
    keep_cache: bool = False  # return the KV cache (to continue from it)
    last_logits_only: bool = False  # logits for the last position only ([b, 1, vocab]): skips most of the LM head

    def forward_kwargs(self) -> dict[str, Any]:
        kwargs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids)
        if self.last_logits_only:
            kwargs["logits_to_keep"] = 1
        if self.past is not None:
            kwargs.update(past_key_values=self.past, use_cache=True)
        else:
            kwargs.update(use_cache=self.keep_cache)
        return kwargs


@dataclass
class ResidualEdit:
    """Steering or ablation applied during a forward or a whole generation.

    add:       [b, d] vector added to the residual stream at `site` of each block in `layers`
               (resid_pre: the block's input; resid_mid: after attention, i.e. added to the
               attention output, so the MLP and the skip connection both see it; resid_post: the
               block's output)
    add_mask:  [b, t] 1 where the prompt pass adds (e.g. from the user turn on); tokens
               generated afterwards are always steered
    ablate:    [d] unit direction projected out of every block input and every attention
               and MLP output, or None
    """

    layers: tuple[int, ...] = ()
    add: Optional[torch.Tensor] = None
    add_mask: Optional[torch.Tensor] = None
    ablate: Optional[torch.Tensor] = None
    site: str = "resid_post"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"unknown residual site {self.site!r} (known: {', '.join(SITES)})")

    def prompt_delta(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, t, d] float32 addition for a forward over `hidden` ([b, t, d]), on `hidden`'s device (the
        layer's, under a device map): masked on the prompt pass."""
        add = self.add.to(hidden.device, torch.float32)[:, None, :]
        if self.add_mask is not None and self.add_mask.shape[1] == hidden.shape[1]:
            return add * self.add_mask.to(hidden.device, torch.float32)[:, :, None]
        return add.expand(hidden.shape)

    def steer(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` ([b, t, d]) plus the addition, in `hidden`'s dtype: summed in float32 and rounded once, so a
        bf16/fp16 residual gets the float32 direction without rounding the direction first."""
        return (hidden.float() + self.prompt_delta(hidden)).to(hidden.dtype)


def project_out(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """hidden - (hidden . u) u, for hidden [..., d] (any device and dtype) and unit u [d] (float32):
    computed in float32, returned in hidden's dtype."""
    u = unit.to(hidden.device, torch.float32)
    h = hidden.float()
    return (h - (h @ u)[..., None] * u).to(hidden.dtype)


def pool(weights: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Weighted token pools in float32: weights [b, k, t], hidden [b, t, d] (any device, dtype) -> [b, k, d]
    float32 on hidden's device (a mean over many bf16 tokens is not rounded to bf16)."""
    return torch.einsum("bkt,btd->bkd", weights.to(hidden.device, torch.float32), hidden.float())


@dataclass
class Backend(ABC):
    """Reads residual activations and runs (steered) forwards and generations for one HF model."""

    model: Any
    tokenizer: Any
    adapter: FamilyAdapter = field(init=False)
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.adapter = adapter_for(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.adapter.blocks(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @abstractmethod
    def read(self, inputs: ModelInputs, sites: list[SiteKey], weights: torch.Tensor) -> dict[SiteKey, torch.Tensor]:
        """Weighted token pools of residual sites: `weights` [b, k, t] -> {site: [b, k, d]}.

        Each of the k rows of `weights` selects or averages tokens of the tokens run now (one
        row per requested position). The forward stops after the last layer needed.
        """

    @abstractmethod
    def logits(self, inputs: ModelInputs, edit: Optional[ResidualEdit] = None) -> tuple[torch.Tensor, Any]:
        """Full forward: (logits [b, t, vocab], the updated KV cache or None)."""

    @abstractmethod
    def generate(self, inputs: ModelInputs, edit: Optional[ResidualEdit], **generate_kwargs: Any) -> torch.Tensor:
        """HF `generate` with the edit active at every step and the KV cache on: new tokens [b, n]."""


def generation_config(model: Any, tokenizer: Any, stop_at_eos: bool = True, **settings: Any) -> Any:
    """A copy of the model's generation config with `settings`; `stop_at_eos=False` never stops early."""
    import copy

    config = copy.deepcopy(model.generation_config)
    for key, value in settings.items():
        setattr(config, key, value)
    if not settings.get("do_sample"):
        config.temperature, config.top_p, config.top_k = None, None, None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if not stop_at_eos:
        config.eos_token_id = None
    return config


def truncate_at_eos(new_ids: torch.Tensor, model: Any, tokenizer: Any) -> torch.Tensor:
    """Replace everything after each row's first EOS by padding, as HF `generate` does. [b, n] -> [b, n]."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos:
        return new_ids
    is_eos = torch.isin(new_ids, torch.tensor(eos, device=new_ids.device))
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return new_ids.masked_fill(after, pad)
