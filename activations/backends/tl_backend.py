"""TransformerLens 4.x backend: `TransformerBridge` hook points wrap the HF modules in place.

Booting switches the model to eager attention in place. Compatibility mode (folded norms) is
never enabled, so directions stay in the HF residual basis shared with the nnsight backend.
Device maps: sharded across GPUs, or offloaded to CPU / disk, run; a map mixing offload with GPUs is
refused (exit 2), because TransformerLens 4.3 rejects it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from afprobe.activations.backends.base import (
    Backend, ModelInputs, ResidualEdit, SiteKey, generation_config, pool, project_out,
)
from afprobe.activations.devices import device_map_of, mixes_offload_and_gpu
from afprobe.errors import BadInput

_HOOK = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post"}
# Where an addition at each site goes. The bridge's hook_resid_mid is the input of the norm before the
# MLP: editing it would bypass the skip connection, so resid_mid additions go to the attention output.
_ADD_HOOK = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_attn_out", "resid_post": "hook_resid_post"}


def edit_hooks(edit: Optional[ResidualEdit], n_layers: int) -> list[tuple[str, Any]]:
    """(hook name, hook) pairs that apply `edit` on a `TransformerBridge` with `n_layers` blocks."""
    if edit is None:
        return []
    hooks: list[tuple[str, Any]] = []
    if edit.ablate is not None:
        ablate = lambda t, hook: project_out(t, edit.ablate)  # noqa: E731
        for i in range(n_layers):
            hooks += [(f"blocks.{i}.hook_resid_pre", ablate), (f"blocks.{i}.hook_attn_out", ablate),
                      (f"blocks.{i}.hook_mlp_out", ablate)]
    if edit.add is not None:
        for layer in edit.layers:
            hooks.append((f"blocks.{layer}.{_ADD_HOOK[edit.site]}", lambda t, hook: edit.steer(t)))
    return hooks


class _StopForward(Exception):
    pass


@dataclass
class TransformerLensBackend(Backend):
    bridge: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        from transformer_lens.model_bridge import TransformerBridge

        placed = device_map_of(self.model)
        if placed and mixes_offload_and_gpu(placed):
            raise BadInput("model.backend transformer_lens cannot run a device_map that mixes CPU/disk offload with "
                           "GPUs (TransformerLens 4.3 rejects such maps); use model.backend nnsight, or a device_map "
                           "that keeps every module on GPUs")
        if not getattr(self.model.config, "architectures", None):
            self.model.config.architectures = [type(self.model).__name__]
        side, add_bos = self.tokenizer.padding_side, getattr(self.tokenizer, "add_bos_token", None)
        self.bridge = TransformerBridge.boot_transformers(
            self.model.config.architectures[0], hf_model=self.model, tokenizer=self.tokenizer
        )
        self.tokenizer.padding_side = side
        self.name = "transformer_lens"

    @contextmanager
    def _hooks(self, hooks: list[tuple[str, Any]]) -> Iterator[None]:
        with self.bridge.hooks(fwd_hooks=hooks):
            yield

    def _edit_hooks(self, edit: Optional[ResidualEdit]) -> list[tuple[str, Any]]:
        return edit_hooks(edit, self.n_layers)

    def read(self, inputs: ModelInputs, sites: list[SiteKey], weights: torch.Tensor) -> dict[SiteKey, torch.Tensor]:
        out: dict[SiteKey, torch.Tensor] = {}
        last = max(layer for layer, _ in sites)

        def grab(key: SiteKey):
            def hook(t: torch.Tensor, hook: Any) -> None:
                out[key] = pool(weights, t)
                if len(out) == len(sites):
                    raise _StopForward

            return hook

        hooks = [(f"blocks.{layer}.{_HOOK[site]}", grab((layer, site))) for layer, site in sites]
        with torch.inference_mode(), self._hooks(hooks):
            try:
                self.model(**inputs.forward_kwargs())
            except _StopForward:
                pass
        assert last >= 0 and len(out) == len(sites), "a requested site was never reached"
        return out

    def logits(self, inputs: ModelInputs, edit: Optional[ResidualEdit] = None) -> tuple[torch.Tensor, Any]:
        with torch.inference_mode(), self._hooks(self._edit_hooks(edit)):
            result = self.model(**inputs.forward_kwargs())
        return result.logits, getattr(result, "past_key_values", None)

    def generate(self, inputs: ModelInputs, edit: Optional[ResidualEdit], **generate_kwargs: Any) -> torch.Tensor:
        config = generation_config(self.model, self.tokenizer, **generate_kwargs)
        kwargs = dict(input_ids=inputs.full_ids, attention_mask=inputs.attention_mask, generation_config=config)
        if inputs.past is not None:
            kwargs["past_key_values"] = inputs.past
        with torch.inference_mode(), self._hooks(self._edit_hooks(edit)):
            ids = self.model.generate(**kwargs)
        return ids[:, inputs.full_ids.shape[1]:]
