"""Steering: token-identical to a plain HF forward hook doing the same addition, on both backends."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from afprobe.activations.adapters import adapter_for
from afprobe.activations.steering import SteeringRunner, SteeringSpec, random_orthogonal
from tests.conftest import hf_residuals

LAYER = 12
MAX_NEW = 10


@dataclass(frozen=True)
class _Prompt:
    input_ids: tuple[int, ...]
    user_span: tuple[int, int]
    label: int
    system_key: str = "s"


def _prompt(tokenizer, user: str, label: int = 0) -> _Prompt:
    system = "You are a helpful assistant. Follow the user's instructions carefully and completely. " * 3
    head = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}], tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    return _Prompt(tuple(ids), (start, len(ids)), label)


def _unit(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.config.hidden_size, generator=g)
    return v / v.norm()


def _hf_reference(model, prompt: _Prompt, vector: torch.Tensor, every_step: bool = True) -> list[int]:
    """Plain HF generate with a forward hook adding `vector` at LAYER from the user turn on."""
    block = adapter_for(model).blocks(model)[LAYER]
    n = len(prompt.input_ids)

    def hook(module, args, output):
        if output.shape[1] == n:  # the prompt pass
            mask = torch.zeros(1, n, 1)
            mask[:, prompt.user_span[0]:] = 1.0
            return output + mask * vector
        return output + vector if every_step else output

    handle = block.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            ids = torch.tensor([prompt.input_ids])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
    finally:
        handle.remove()
    return out[0, n:].tolist()


def _ours(backend, prompt: _Prompt, spec, reuse: bool) -> list[int]:
    runner = SteeringRunner(backend, prefix_reuse=reuse)
    text = runner.generate([prompt], spec, MAX_NEW)
    return backend.tokenizer(text[0], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
def test_steered_generation_matches_hf_hook(smol_backends, smol_tokenizer, backend_name):
    backend = smol_backends[backend_name]
    model = backend.model
    prompt = _prompt(smol_tokenizer, "Write one sentence about the sea.")
    unit = _unit(model)
    spec = SteeringSpec("probe", unit, separation=8.0, layers=(LAYER,), alpha=1.0)
    expected = _hf_reference(model, prompt, 8.0 * unit)
    plain = _hf_reference(model, prompt, torch.zeros_like(unit))
    assert expected != plain, "the test vector must change the output"
    for reuse in (False, True):
        assert _ours(backend, prompt, spec, reuse) == smol_tokenizer(
            smol_tokenizer.decode(expected, skip_special_tokens=True), add_special_tokens=False)["input_ids"]


def test_edit_reaches_tokens_after_the_first(smol_backends, smol_tokenizer):
    """Steering only the prompt pass gives different tokens than steering every step; ours steers every step."""
    backend = smol_backends["nnsight"]
    prompt = _prompt(smol_tokenizer, "List three fruits.")
    unit = _unit(backend.model, seed=3)
    every = _hf_reference(backend.model, prompt, 10.0 * unit, every_step=True)
    prompt_only = _hf_reference(backend.model, prompt, 10.0 * unit, every_step=False)
    assert every != prompt_only
    spec = SteeringSpec("probe", unit, separation=10.0, layers=(LAYER,), alpha=1.0)
    decode = lambda ids: smol_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ours = smol_tokenizer.decode(_ours(backend, prompt, spec, reuse=True))
    assert ours == decode(every) != decode(prompt_only)


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
def test_alpha_zero_is_unsteered(smol_backends, smol_tokenizer, backend_name):
    backend = smol_backends[backend_name]
    prompts = [_prompt(smol_tokenizer, u) for u in ("Say hello.", "What is two plus two?")]
    unit = _unit(backend.model)
    runner = SteeringRunner(backend)
    zero = SteeringSpec("probe", unit, 5.0, (LAYER,), alpha=0.0)
    assert runner.generate(prompts, zero, MAX_NEW) == runner.generate(prompts, None, MAX_NEW)
    assert runner.log_odds(prompts, zero, "<request_fully_accepted/>", "<rejected/>") == runner.log_odds(
        prompts, None, "<request_fully_accepted/>", "<rejected/>")


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
def test_ablation_zeroes_the_projection(smol_backends, smol_tokenizer, backend_name):
    backend = smol_backends[backend_name]
    model = backend.model
    prompt = _prompt(smol_tokenizer, "Describe a cat.")
    unit = _unit(model, seed=5)
    ids = torch.tensor([prompt.input_ids])
    plain = hf_residuals(model, ids)
    assert max(abs(float((plain[(i, "resid_post")][0] @ unit).abs().max())) for i in range(30)) > 0.1
    # Capture the residual stream while the backend's ablation edit is active.
    from afprobe.activations.batching import make_batch

    batch = make_batch([0], [prompt.input_ids], 2, 0, None, model.device)
    spec = SteeringSpec("ablation", unit, 1.0, (LAYER,))
    captured = {}
    blocks = adapter_for(model).blocks(model)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o.detach().clone()))
               for i, b in enumerate(blocks)]
    try:
        backend.logits(batch.inputs, spec.edit(batch, [prompt]))
    finally:
        for h in handles:
            h.remove()
    worst = max(float((captured[i][0] @ unit).abs().max()) for i in range(len(blocks)))
    assert worst < 1e-3


def test_random_control_is_orthogonal_unit():
    unit = torch.nn.functional.normalize(torch.randn(576), dim=0)
    r = random_orthogonal(unit, seed=1)
    assert abs(float(r @ unit)) < 1e-5 and abs(float(r.norm()) - 1) < 1e-5
    assert torch.equal(r, random_orthogonal(unit, seed=1))


def test_cross_mode_signs():
    unit = torch.ones(4) / 2
    spec = SteeringSpec("probe", unit, 2.0, (0,), alpha=1.5, mode="cross")
    assert spec.row_alphas([1, 0]).tolist() == [-1.5, 1.5]


@pytest.mark.parametrize("backend_name", ["nnsight", "transformer_lens"])
def test_combined_score_equals_separate_runs(smol_backends, smol_tokenizer, backend_name):
    """`score` (one prompt pass, continuing from its cache) equals `generate` + `log_odds` run separately."""
    backend = smol_backends[backend_name]
    prompts = [_prompt(smol_tokenizer, u, label=i % 2) for i, u in enumerate(("Say hello.", "What is two plus two?",
                                                                            "Name a planet."))]
    unit = _unit(backend.model, seed=7)
    runner = SteeringRunner(backend)
    for spec in (None, SteeringSpec("probe", unit, 6.0, (LAYER,), alpha=1.0, mode="cross"),
                 SteeringSpec("ablation", unit, 6.0, (LAYER,))):
        texts, odds = runner.score(prompts, spec, "<request_fully_accepted/>", "<rejected/>", MAX_NEW)
        assert texts == runner.generate(prompts, spec, MAX_NEW)
        separate = runner.log_odds(prompts, spec, "<request_fully_accepted/>", "<rejected/>")
        assert max(abs(a - b) for a, b in zip(odds, separate)) < 1e-3
