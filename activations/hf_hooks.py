"""A `ResidualEdit` applied to a plain HF causal LM with PyTorch hooks (no backend needed).

Same geometry as the backends: resid_pre adds to the block's input, resid_mid to the attention output
(so the MLP and the skip connection both see it), resid_post to the block's output; ablation projects the
direction out of every block input and every attention and MLP output. The hooks fire on every forward,
so `model.generate(...)` is steered at every step. They are removed when the context exits, also on an
exception.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from afprobe.activations.adapters import adapter_for
from afprobe.activations.backends.base import ResidualEdit, project_out
from afprobe.errors import BadInput


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, value: Any) -> Any:
    return (value,) + tuple(output[1:]) if isinstance(output, tuple) else value


def _pre_hook(fn: Any) -> Any:
    """A forward pre-hook (with kwargs) applying fn to the block's hidden states, positional or keyword."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return hook


def _out_hook(fn: Any) -> Any:
    return lambda module, args, output: _with_first(output, fn(_first(output)))


@contextmanager
def hf_edit(model: nn.Module, edit: ResidualEdit) -> Iterator[None]:
    """Apply `edit` to every forward of `model` (a HF causal LM of a family with an adapter) inside the block."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    bad = [layer for layer in edit.layers if not 0 <= layer < len(blocks)]
    if bad:
        raise BadInput(f"layers {bad} are outside the model's {len(blocks)} layers")
    handles = []
    try:
        if edit.ablate is not None:
            ablate = lambda t: project_out(t, edit.ablate)  # noqa: E731
            for block in blocks:
                handles.append(block.register_forward_pre_hook(_pre_hook(ablate), with_kwargs=True))
                handles.append(getattr(block, adapter.attn).register_forward_hook(_out_hook(ablate)))
                handles.append(getattr(block, adapter.mlp).register_forward_hook(_out_hook(ablate)))
        if edit.add is not None:
            for layer in edit.layers:
                block = blocks[layer]
                if edit.site == "resid_pre":
                    handles.append(block.register_forward_pre_hook(_pre_hook(edit.steer), with_kwargs=True))
                elif edit.site == "resid_mid":
                    handles.append(getattr(block, adapter.attn_out_module).register_forward_hook(_out_hook(edit.steer)))
                else:
                    handles.append(block.register_forward_hook(_out_hook(edit.steer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
