"""Logit lens of a direction (activations/lens.py) and the `afprobe lens` CLI."""
from __future__ import annotations

import subprocess
import sys

import torch

from afprobe.activations.lens import lens_scores, logit_lens


def _plant_norm(model) -> torch.Tensor:
    """A non-uniform final-norm weight, so a lens that ignored the norm would rank differently."""
    g = torch.exp(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)))
    model.model.norm.weight.data.copy_(g)
    return g


def _row_direction(model, g: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The largest-norm unembedding row t, as a direction d with g ⊙ d = W_U[t]."""
    w_u = model.get_output_embeddings().weight
    t = int(w_u.norm(dim=1).argmax())
    return t, w_u[t] / g


def test_lens_of_unembedding_row_ranks_that_token_first_tied(tiny_model, smol_tokenizer):
    g = _plant_norm(tiny_model)
    t, d = _row_direction(tiny_model, g)
    assert int(lens_scores(tiny_model, d).argmax()) == t
    # a real check of the norm: without the norm weight the same direction ranks another token first
    assert int((tiny_model.get_output_embeddings().weight @ d).argmax()) != t
    lens = logit_lens(tiny_model, smol_tokenizer, d, k=3)
    assert lens.promoted[0][0] == smol_tokenizer.decode([t])
    assert lens.promoted[0][1] > lens.promoted[1][1] and lens.suppressed[0][1] < lens.promoted[-1][1]


def test_lens_untied_reads_lm_head_not_embedding(tiny_model):
    g = _plant_norm(tiny_model)
    emb = tiny_model.get_input_embeddings().weight
    tiny_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(emb), requires_grad=False)
    assert tiny_model.get_output_embeddings().weight is not emb
    t, d = _row_direction(tiny_model, g)
    assert int(lens_scores(tiny_model, d).argmax()) == t
    # the input embedding row of t through the lens is not what ranks t first
    assert int(lens_scores(tiny_model, emb[t] / g).argmax()) != t or t == int(emb.norm(dim=1).argmax())
