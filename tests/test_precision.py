"""Precision: bf16 and fp16 are first-class, on the CPU.

Tolerances (stated once in `afprobe.parity.BF16`, with why): bf16 keeps 8 significant bits (~2-3 decimal
digits), every block rounds again, and the residual stream's largest dimensions (~600 on the embedded model)
carry rounding steps of 2-4, so max-abs limits mean little. Activations are compared per pooled vector by
relative L2 error, log-odds in nats. The reference is a plain HF bf16 forward of the same model on the same
tokens (one unpadded prompt at a time, sdpa attention); our paths pad, reuse the prefix (split-prefix
attention), or run eager attention (TransformerLens), each a valid bf16 computation that rounds differently.
"""
from __future__ import annotations

import copy

import pytest
import torch

from afprobe.activations.attention import PREFIX_ATTR, split_prefix_attention
from afprobe.activations.backends import ResidualEdit, make_backend, pool, project_out
from afprobe.activations.loading import load_model
from afprobe.activations.steering import SteeringRunner
from afprobe.parity import ACCEPT, BF16, FP32, REJECT, chat_prompts, compare, format_rows, measure
from tests.conftest import hf_residuals
from tests.test_attention import _Module, _reference
from tests.test_backends import _prompts, _read_all

LAYERS = [0, 9, 19, 29]


@pytest.fixture(scope="module")
def bf16_backends():
    """The embedded model loaded in bf16 (`model.dtype: bfloat16`): nnsight on it, TransformerLens on a copy."""
    model, tok = load_model("smollm2-135m-instruct", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    return {"nnsight": make_backend("nnsight", model, tok),
            "transformer_lens": make_backend("transformer_lens", copy.deepcopy(model), tok)}


def test_float32_direction_added_to_a_half_residual():
    """The addition is summed in float32 and rounded once to the residual's dtype, on the residual's device;
    ablation and pooling likewise (pools come back float32 for the store)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        hidden = (torch.randn(2, 5, 64, generator=gen) * 50).to(dtype)
        add = torch.randn(2, 64, generator=gen, dtype=torch.float64).float() * 3
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float32)
        steered = ResidualEdit(layers=(0,), add=add, add_mask=mask).steer(hidden)
        assert steered.dtype == dtype
        assert torch.equal(steered, (hidden.float() + add[:, None] * mask[..., None]).to(dtype))
        unit = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
        ablated = project_out(hidden, unit)
        assert ablated.dtype == dtype
        assert (ablated.float() @ unit).abs().max() < 50 * 64 * 2 ** -8 * 0.05  # zero up to the final rounding
        weights = torch.full((2, 1, 5), 1 / 5)
        pooled = pool(weights, hidden)
        assert pooled.dtype == torch.float32
        assert torch.allclose(pooled[:, 0], hidden.float().mean(1), atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_split_prefix_attention_half_precision(dtype, tol):
    """The CPU flash-attention op takes bf16 / fp16 queries, keys and an additive mask of the same dtype; merged by
    log-sum-exp in float32. Against float32 sdpa on the same (rounded) inputs; outputs are ~1, so the limit is a
    few rounding steps of `dtype` (bf16 step 2^-8, fp16 2^-11 relative)."""
    gen = torch.Generator().manual_seed(0)
    b, kvh, g, P, t, d = 3, 2, 3, 11, 4, 16
    q = torch.randn(b, kvh * g, t, d, generator=gen).to(dtype)
    pk, pv = (torch.randn(1, kvh, P, d, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, kvh, t + 1, d, generator=gen).to(dtype) for _ in range(2))
    causal = torch.arange(t + 1)[None, :] <= torch.arange(t)[:, None] + 1
    keep = torch.arange(t + 1)[None, :] >= torch.arange(b)[:, None]  # left padding: row r has r pads
    mask = torch.cat([torch.ones(b, 1, t, P, dtype=torch.bool), (causal[None] & keep[:, None])[:, None]], -1)
    key = k.clone()
    setattr(key, PREFIX_ATTR, (pk, pv))
    got, _ = split_prefix_attention(_Module(), q, key, v, mask, scaling=d ** -0.5)
    ref = _reference(q.float(), pk.float(), pv.float(), k.float(), v.float(), mask)
    assert got.dtype == dtype
    assert (got.float() - ref).abs().max() < tol


def _relative_errors(got, seqs, refs, earliest):
    """Per pooled vector ||ours - HF|| / ||HF||, worst over prompts, layers, sites and both pools."""
    worst = 0.0
    for i in range(len(seqs)):
        for (layer, site), ours in got[i].items():
            hidden = refs[i][(layer, site)][0].float()
            for k, ref in enumerate((hidden[-1], hidden[earliest[i]:].mean(0))):
                worst = max(worst, float((ours[k] - ref).norm() / ref.norm()))
    return worst


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
def test_bf16_read_matches_hf_bf16(bf16_backends, smol, backend_name):
    backend = bf16_backends[backend_name]
    seqs = _prompts(backend.tokenizer, 3)
    earliest = [len(s) - 4 for s in seqs]
    plain = bf16_backends["nnsight"].model  # un-bridged: the plain HF bf16 reference
    refs = [hf_residuals(plain, torch.tensor([s])) for s in seqs]
    floor = _relative_errors({i: {k: torch.stack([v[0, -1].float(), v[0, earliest[i]:].float().mean(0)])
                                  for k, v in hf_residuals(smol[0], torch.tensor([s])).items() if k[0] in LAYERS}
                              for i, s in enumerate(seqs)}, seqs, refs, earliest)
    for reuse in (False, True):
        got = _read_all(backend, seqs, LAYERS, reuse, earliest)
        assert all(v.dtype == torch.float32 for v in got[0].values())
        err = _relative_errors(got, seqs, refs, earliest)
        print(f"{backend_name} bf16 reuse={reuse}: relative L2 vs HF bf16 {err:.4f} (HF bf16 vs fp32: {floor:.4f})")
        assert err < BF16.act_rel, (backend_name, reuse, err)


def _hf_log_odds(model, prompt_ids, tags) -> float:
    """Plain HF forward over prompt + tag, one sequence at a time: log P(accept) - log P(reject)."""
    logps = []
    for tag in tags:
        ids = torch.tensor([list(prompt_ids) + tag])
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        n = len(prompt_ids)
        logps.append(float(sum(logprobs[n - 1 + j, tok] for j, tok in enumerate(tag))))
    return logps[0] - logps[1]


def test_bf16_log_odds_match_hf_bf16(bf16_backends, smol_backends):
    backend = bf16_backends["nnsight"]
    tok = backend.tokenizer
    prompts = chat_prompts(tok, 2)
    tags = [tok(t, add_special_tokens=False)["input_ids"] for t in (ACCEPT, REJECT)]
    ref = [_hf_log_odds(backend.model, p.input_ids, tags) for p in prompts]
    fp32 = [_hf_log_odds(smol_backends["nnsight"].model, p.input_ids, tags) for p in prompts]
    for reuse in (False, True):  # reuse: the split-prefix attention path in bf16
        ours = SteeringRunner(backend, prefix_reuse=reuse).log_odds(prompts, None, ACCEPT, REJECT)
        err = max(abs(a - b) for a, b in zip(ours, ref))
        print(f"bf16 log-odds reuse={reuse}: max |ours - HF bf16| {err:.4f} nats; HF bf16 vs fp32 "
              f"{max(abs(a - b) for a, b in zip(ref, fp32)):.4f}")
        assert err < BF16.log_odds


def test_parity_checks_on_cpu(smol_backends, bf16_backends):
    """The functions behind scripts/gpu-check, on this CPU: fp32 with prefix reuse vs without (identical greedy
    tokens), and bf16 with reuse vs the fp32 reference without."""
    fp32 = smol_backends["nnsight"]
    prompts = chat_prompts(fp32.tokenizer, 3)
    run = lambda backend, reuse: measure(backend, prompts, reuse, LAYERS, 19, max_new_tokens=6)  # noqa: E731
    ref = run(fp32, False)
    rows = compare("cpu float32 reuse=on", ref, run(fp32, True), FP32)
    rows += compare("cpu bfloat16 reuse=on", ref, run(bf16_backends["nnsight"], True), BF16)
    print("\n" + format_rows(rows))
    assert all(r.ok for r in rows), format_rows([r for r in rows if not r.ok])
    assert ref.log_odds["steered"] != ref.log_odds["unsteered"]
