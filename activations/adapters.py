"""One small adapter per model family: where the decoder blocks live and what each residual site is."""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

from torch import nn

from afprobe.errors import BadInput


@dataclass(frozen=True)
class FamilyAdapter:
    """Module paths inside a HF causal LM.

    `layers`: the list of decoder blocks. resid_pre = block input, resid_post = block output,
    resid_mid = input of `mid_module` (the norm before the MLP), `attn`/`mlp` the sublayers.
    `attn_out`: the module whose output (first element if a tuple) is added to the residual stream
    after attention: steering at resid_mid adds there, so the MLP and the skip connection both see it.
    """

    layers: str
    mid_module: str
    attn: str
    mlp: str
    attn_out: str = ""

    @property
    def attn_out_module(self) -> str:
        return self.attn_out or self.attn

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return reduce(getattr, self.layers.split("."), model)


_LLAMA_LIKE = FamilyAdapter("model.layers", "post_attention_layernorm", "self_attn", "mlp")
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": FamilyAdapter("model.layers", "pre_feedforward_layernorm", "self_attn", "mlp", "post_attention_layernorm"),
    "phi3": _LLAMA_LIKE,
    "gpt2": FamilyAdapter("transformer.h", "ln_2", "attn", "mlp"),
}


def register_adapter(model_type: str, adapter: FamilyAdapter) -> FamilyAdapter:
    """Make a model family (HF `config.model_type`) usable by every backend, the cache, steering and the notebook API."""
    if not isinstance(adapter, FamilyAdapter) or not model_type:
        raise BadInput(f"register_adapter needs a model_type and a FamilyAdapter, got {model_type!r}, {adapter!r}")
    ADAPTERS[model_type] = adapter
    return adapter


def adapter_for(model: nn.Module) -> FamilyAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise BadInput(f"model family '{model_type}' has no adapter yet (known: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[model_type]
