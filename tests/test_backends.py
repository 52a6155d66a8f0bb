"""Backend parity: activations equal a plain HF forward (with forward hooks) within 1e-3 absolute, fp32."""
from __future__ import annotations

import pytest
import torch

from afprobe.activations.backends import SITES, ResidualEdit, make_backend
from afprobe.activations.batching import PrefixCache, make_batch, run_batches
from tests.conftest import hf_residuals

TOL = 1e-3  # absolute, fp32; residual norms of the embedded model are ~100


def _read_all(backend, seqs, layers, reuse, earliest=None):
    """Last-token and mean-over-tail residuals of every prompt via the backend's batched read."""
    sites = [(layer, site) for layer in layers for site in SITES]
    earliest = earliest or [len(s) - 1 for s in seqs]
    results: dict[int, dict] = {}

    def fn(batch):
        b, t = batch.inputs.input_ids.shape
        w = torch.zeros(b, 2, t)
        for r, row in enumerate(batch.rows):
            n = len(seqs[row])
            w[r, 0, batch.column(r, n - 1)] = 1.0
            w[r, 1, batch.column(r, earliest[row]): batch.column(r, n)] = 1.0 / (n - earliest[row])
        out = backend.read(batch.inputs, sites, w)
        for r, row in enumerate(batch.rows):
            results[row] = {k: v[r] for k, v in out.items()}

    cache = PrefixCache(backend.model) if reuse else None
    run_batches(seqs, [0] * len(seqs), earliest, 96, backend.tokenizer.pad_token_id, backend.model, cache, fn)
    return results


def _prompts(tokenizer, n: int = 3) -> list[list[int]]:
    system = "You are an assistant. Answer briefly and accurately. " * 4
    users = ["What is the capital of France?", "Name three colours of the rainbow please.", "Hi!", "Count to five."]
    return [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": u}], add_generation_prompt=True,
            tokenize=True, return_dict=False,
        )
        for u in users[:n]
    ]


def _check_against_hf(backend, seqs, layers, reuse):
    earliest = [len(s) - 4 for s in seqs]
    got = _read_all(backend, seqs, layers, reuse, earliest)
    worst = 0.0
    for i, s in enumerate(seqs):
        ref = hf_residuals(backend.model, torch.tensor([s]))
        for layer in layers:
            for site in SITES:
                worst = max(worst, (got[i][(layer, site)][0] - ref[(layer, site)][0, -1]).abs().max().item())
                tail = ref[(layer, site)][0, earliest[i]:].mean(0)
                worst = max(worst, (got[i][(layer, site)][1] - tail).abs().max().item())
    return worst, got


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("reuse", [False, True])
def test_tiny_model_parity(backend_name, reuse, smol_tokenizer):
    from afprobe.activations.loading import tiny_llama

    model = tiny_llama(seed=1)
    backend = make_backend(backend_name, model, smol_tokenizer)
    seqs = _prompts(smol_tokenizer, 4)
    worst, _ = _check_against_hf(backend, seqs, list(range(backend.n_layers)), reuse)
    assert worst < TOL


def test_embedded_parity_all_layers_both_backends(smol_backends, smol_tokenizer):
    """Every layer and site of the embedded model, both backends, padded batch with and without prefix reuse."""
    seqs = _prompts(smol_tokenizer, 3)
    outputs = {}
    for name, backend in smol_backends.items():
        layers = list(range(backend.n_layers))
        assert len(layers) == 30
        for reuse in (False, True):
            worst, got = _check_against_hf(backend, seqs, layers, reuse)
            assert worst < TOL, (name, reuse, worst)
            outputs[(name, reuse)] = got
    a, b = outputs[("nnsight", True)], outputs[("transformer_lens", False)]
    assert max((a[i][k] - b[i][k]).abs().max().item() for i in a for k in a[i]) < TOL


def test_padded_batch_equals_one_at_a_time(smol_backends, smol_tokenizer):
    backend = smol_backends["nnsight"]
    seqs = _prompts(smol_tokenizer, 3)
    assert len({len(s) for s in seqs}) == 3  # different lengths, so the batch really is padded
    batched = _read_all(backend, seqs, [0, 15, 29], reuse=False)
    for i, s in enumerate(seqs):
        alone = _read_all(backend, [s], [0, 15, 29], reuse=False)[0]
        assert max((batched[i][k] - alone[k]).abs().max().item() for k in alone) < TOL


def test_prefix_reuse_computes_fewer_tokens(tiny_model, smol_tokenizer):
    seqs = _prompts(smol_tokenizer, 4)
    model = tiny_model
    counts = {}
    for reuse in (False, True):
        counts[reuse] = run_batches(seqs, [0] * 4, [len(s) - 1 for s in seqs], 512, 2, model,
                                    PrefixCache(model) if reuse else None, lambda batch: None)
    assert counts[False]["computed_tokens"] == counts[False]["total_tokens"]
    assert counts[True]["computed_tokens"] < 0.6 * counts[True]["total_tokens"]


def test_edit_is_scoped(tiny_model, smol_tokenizer):
    """An edit applies inside the call only: the next plain forward is unchanged (no leaked hooks)."""
    backend = make_backend("transformer_lens", tiny_model, smol_tokenizer)
    seq = _prompts(smol_tokenizer, 1)[0]
    batch = make_batch([0], [seq], 2, 0, None, tiny_model.device)
    before, _ = backend.logits(batch.inputs)
    edit = ResidualEdit(layers=(1,), add=torch.full((1, tiny_model.config.hidden_size), 5.0))
    steered, _ = backend.logits(batch.inputs, edit)
    after, _ = backend.logits(batch.inputs)
    assert (steered - before).abs().max() > 1e-2
    assert torch.equal(before, after)


def _hf_logits_with_addition(model, inputs, layer: int, site: str, vector: torch.Tensor) -> torch.Tensor:
    """Plain HF forward with a hook adding `vector` at `site` of block `layer` (the reference geometry)."""
    from afprobe.activations.adapters import adapter_for

    adapter = adapter_for(model)
    block = adapter.blocks(model)[layer]
    if site == "resid_pre":
        handle = block.register_forward_pre_hook(
            lambda m, args, kwargs: ((args[0] + vector, *args[1:]), kwargs) if args
            else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vector}), with_kwargs=True)
    elif site == "resid_mid":
        handle = getattr(block, adapter.attn_out_module).register_forward_hook(
            lambda m, a, out: (out[0] + vector, *out[1:]) if isinstance(out, tuple) else out + vector)
    else:
        handle = block.register_forward_hook(lambda m, a, out: out + vector)
    try:
        with torch.inference_mode():
            return model(**{k: v for k, v in inputs.forward_kwargs().items()}).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
def test_addition_lands_at_the_direction_site(tiny_model, smol_tokenizer, backend_name, site):
    """A direction learned at resid_pre / resid_mid / resid_post of block L is added there: the block's input,
    the attention output (so the MLP and the skip both see it), the block's output; equal to plain HF hooks."""
    seq = _prompts(smol_tokenizer, 1)[0]
    batch = make_batch([0], [seq], 2, 0, None, tiny_model.device)
    vector = torch.linspace(-3.0, 3.0, tiny_model.config.hidden_size)
    expected = _hf_logits_with_addition(tiny_model, batch.inputs, 2, site, vector)
    backend = make_backend(backend_name, tiny_model, smol_tokenizer)
    ours, _ = backend.logits(batch.inputs, ResidualEdit(layers=(2,), add=vector[None], site=site))
    plain, _ = backend.logits(batch.inputs)
    assert (expected - plain).abs().max() > 1e-2  # the addition matters
    assert (ours - expected).abs().max() < 1e-4
