"""Shared fixtures. Real models only: a tiny random Llama built from a config, and the embedded
SmolLM2-135M-Instruct (loaded once per session)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smol_tokenizer():
    from afprobe.activations.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def tiny_model():
    """A fresh 4-layer randomly initialised Llama (d_model 64) from a config. Function-scoped: booting a
    TransformerLens bridge rewires the module tree in place, so tests must not share one."""
    from afprobe.activations.loading import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct, loaded once for the whole session: (model, tokenizer)."""
    from afprobe.activations.loading import load_model

    return load_model("smollm2-135m-instruct", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smol_backends(smol):
    """Both backends on the embedded model. nnsight shares the session instance; TransformerLens gets
    its own copy, because booting a bridge rewires the HF module tree in place (and sets eager attention)."""
    import copy

    from afprobe.activations.backends import make_backend

    model, tokenizer = smol
    return {"nnsight": make_backend("nnsight", model, tokenizer),
            "transformer_lens": make_backend("transformer_lens", copy.deepcopy(model), tokenizer)}


def hf_residuals(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Reference residual stream from a plain HF forward with forward hooks: {(layer, site): [b, t, d]}."""
    from afprobe.activations.adapters import adapter_for

    adapter = adapter_for(model)
    out: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(adapter.blocks(model)):
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: out.__setitem__((i, "resid_pre"), (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(getattr(block, adapter.mid_module).register_forward_pre_hook(
            lambda m, args, i=i: out.__setitem__((i, "resid_mid"), args[0].clone())))
        handles.append(block.register_forward_hook(
            lambda m, args, output, i=i: out.__setitem__((i, "resid_post"), (output[0] if isinstance(output, tuple) else output).clone())))
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out
