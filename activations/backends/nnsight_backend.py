"""nnsight backend: `TransformersModel` traces around the HF model; edits run at every generation step."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Optional

import nnsight
import torch

from afprobe.activations.attention import split_prefix
from afprobe.activations.backends.base import (
    Backend, ModelInputs, ResidualEdit, SiteKey, generation_config, pool, project_out, truncate_at_eos,
)


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, value: Any) -> Any:
    return (value,) + tuple(output[1:]) if isinstance(output, tuple) else value


def _apply_edit(lm: Any, blocks: Any, adapter: Any, edit: ResidualEdit) -> None:
    """Apply `edit` to the traced forward (inside a trace or a generation step), in module order."""
    add_layers = set(edit.layers) if edit.add is not None else set()
    top = max(add_layers) if edit.ablate is None else len(blocks) - 1
    for i in range(top + 1):
        block = blocks[i]
        adding = i in add_layers
        if edit.ablate is not None:
            block.input = project_out(block.input, edit.ablate)
        if adding and edit.site == "resid_pre":
            block.input = edit.steer(block.input)
        if edit.ablate is not None:
            attn = getattr(block, adapter.attn)
            attn.output = _with_first(attn.output, project_out(_first(attn.output), edit.ablate))
        if adding and edit.site == "resid_mid":
            out = getattr(block, adapter.attn_out_module)
            out.output = _with_first(out.output, edit.steer(_first(out.output)))
        if edit.ablate is not None:
            mlp = getattr(block, adapter.mlp)
            mlp.output = project_out(mlp.output, edit.ablate)
        if adding and edit.site == "resid_post":
            block.output = edit.steer(block.output)


@dataclass
class NnsightBackend(Backend):
    lm: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        from nnsight import TransformersModel

        side = self.tokenizer.padding_side
        self.lm = TransformersModel(self.model, tokenizer=self.tokenizer)
        self.tokenizer.padding_side = side  # nnsight sets it in place; we pad ourselves
        self.name = "nnsight"
        self._blocks = reduce(getattr, self.adapter.layers.split("."), self.lm)

    def read(self, inputs: ModelInputs, sites: list[SiteKey], weights: torch.Tensor) -> dict[SiteKey, torch.Tensor]:
        order = {"resid_pre": 0, "resid_mid": 1, "resid_post": 2}
        wanted = sorted(sites, key=lambda s: (s[0], order[s[1]]))
        with torch.inference_mode(), split_prefix(self.model):
            with self.lm.trace(**inputs.forward_kwargs()) as tracer:
                out = nnsight.save({})
                for layer, site in wanted:
                    block = self._blocks[layer]
                    if site == "resid_pre":
                        hidden = block.input
                    elif site == "resid_mid":
                        hidden = getattr(block, self.adapter.mid_module).input
                    else:
                        hidden = block.output
                    out[(layer, site)] = pool(weights, hidden)
                tracer.stop()
        return dict(out)

    def logits(self, inputs: ModelInputs, edit: Optional[ResidualEdit] = None) -> tuple[torch.Tensor, Any]:
        with torch.inference_mode(), split_prefix(self.model):
            with self.lm.trace(**inputs.forward_kwargs()):
                if edit is not None:
                    _apply_edit(self.lm, self._blocks, self.adapter, edit)
                result = self.lm.output.save()
        return result.logits, getattr(result, "past_key_values", None)

    def generate(self, inputs: ModelInputs, edit: Optional[ResidualEdit], **generate_kwargs: Any) -> torch.Tensor:
        steps = int(generate_kwargs["max_new_tokens"])
        # A fixed step count lets the intervention loop end; EOS is applied afterwards.
        config = generation_config(self.model, self.tokenizer, stop_at_eos=False, **generate_kwargs)
        kwargs = dict(input_ids=inputs.full_ids, attention_mask=inputs.attention_mask, generation_config=config)
        if inputs.past is not None:
            kwargs["past_key_values"] = inputs.past
        with torch.inference_mode(), split_prefix(self.model):
            with self.lm.generate(**kwargs) as tracer:
                if edit is not None:
                    for _ in tracer.iter[:steps]:
                        _apply_edit(self.lm, self._blocks, self.adapter, edit)
                ids = tracer.result.save()
        return truncate_at_eos(ids[:, inputs.full_ids.shape[1]:], self.model, self.tokenizer)
