"""Shared trunk (activations/trunk.py): a condition grid run with the unsteered prompt pass shared up to the first
steered block equals the same grid run condition by condition (`score`), on the tiny model and the embedded one."""
from __future__ import annotations

import pytest
import torch

from afprobe.activations.backends import make_backend
from afprobe.activations.steering import SteeringRunner, SteeringSpec, random_orthogonal
from afprobe.activations.trunk import trunk_boundary
from tests.test_steering import _prompt

ACCEPT, REJECT = "<request_fully_accepted/>", "<rejected/>"
USERS = ("Say hello.", "What is two plus two? Answer briefly please.", "Name a planet.", "Hi")


def _unit(d: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _grid(unit: torch.Tensor, layers: tuple[int, ...], site: str, separation: float) -> list[SteeringSpec]:
    """5 alphas (0 included) in both modes' worth of signs, plus two random controls, as the steer stage runs."""
    specs = [SteeringSpec("probe", unit, separation, layers, a, m, site=site)
             for a, m in ((-2.0, "same"), (-1.0, "cross"), (0.0, "same"), (1.0, "same"), (2.0, "cross"))]
    specs += [SteeringSpec("random", random_orthogonal(unit, k), separation, layers, 2.0, "same", site=site,
                           replicate=k) for k in range(2)]
    return specs


def _compare(backend, prompts, specs, max_new: int, reuse: bool = True) -> tuple[float, bool, dict]:
    shared = SteeringRunner(backend, prefix_reuse=reuse, trunk=True, stack=3)
    plain = SteeringRunner(backend, prefix_reuse=reuse, trunk=False)
    got = shared.score_grid(prompts, specs, ACCEPT, REJECT, max_new)
    ref = [plain.score(prompts, s, ACCEPT, REJECT, max_new) for s in specs]
    diff = max(abs(a - b) for (_, oa), (_, ob) in zip(got, ref) for a, b in zip(oa, ob))
    same = all(ta == tb for (ta, _), (tb, _) in zip(got, ref))
    return diff, same, shared.token_counts


def test_trunk_boundary() -> None:
    assert trunk_boundary((5,), "resid_pre", 30) == 5
    assert trunk_boundary((5, 9), "resid_mid", 30) == 5
    assert trunk_boundary((9, 5), "resid_post", 30) == 6  # block 5's output is block 6's input
    assert trunk_boundary((29,), "resid_post", 30) == 29


@pytest.mark.parametrize("backend_name,reuse", [("nnsight", True), ("nnsight", False), ("transformer_lens", True)])
def test_tiny_trunk_equals_unshared(tiny_model, smol_tokenizer, backend_name, reuse) -> None:
    """One steered layer and several, at every site (resid_post at L shares block L too)."""
    backend = make_backend(backend_name, tiny_model, smol_tokenizer)
    prompts = [_prompt(smol_tokenizer, u, label=i % 2) for i, u in enumerate(USERS)]
    unit = _unit(backend.d_model)
    for site, layers in (("resid_pre", (1,)), ("resid_mid", (1, 3)), ("resid_post", (2,)), ("resid_post", (1, 3))):
        diff, same, counts = _compare(backend, prompts, _grid(unit, layers, site, 6.0), 6, reuse)
        assert diff < 1e-5, (site, layers, diff)
        assert same, (site, layers)
        assert counts["layer_tokens"] < counts["layer_tokens_unshared"]  # the trunk was shared, not rerun


def test_tiny_log_odds_grid(tiny_model, smol_tokenizer) -> None:
    """log_odds_grid equals score's log-odds exactly-ish and the teacher-forced `log_odds` within 1e-4; ablation
    (no trunk) and mixed layer groups in one grid come back in order."""
    backend = make_backend("nnsight", tiny_model, smol_tokenizer)
    prompts = [_prompt(smol_tokenizer, u, label=i % 2) for i, u in enumerate(USERS)]
    unit = _unit(backend.d_model, 3)
    specs = _grid(unit, (1,), "resid_post", 6.0) + _grid(unit, (2, 3), "resid_pre", 6.0)
    specs.append(SteeringSpec("ablation", unit, 6.0, (1,)))
    runner = SteeringRunner(backend)
    grid = runner.log_odds_grid(prompts, specs, ACCEPT, REJECT)
    for spec, odds in zip(specs, grid):
        _, ref = runner.score(prompts, spec, ACCEPT, REJECT, 0)
        assert max(abs(a - b) for a, b in zip(odds, ref)) < 1e-5
        forced = runner.log_odds(prompts, spec, ACCEPT, REJECT)
        assert max(abs(a - b) for a, b in zip(odds, forced)) < 1e-4
    assert len({round(o[0], 4) for o in grid}) > len(specs) // 2  # the conditions differ


def test_tiny_sampling_matches_unshared(tiny_model, smol_tokenizer) -> None:
    """With sampling, conditions run one at a time with `score`'s seeds: the same samples."""
    backend = make_backend("nnsight", tiny_model, smol_tokenizer)
    prompts = [_prompt(smol_tokenizer, u, label=i % 2) for i, u in enumerate(USERS)]
    specs = _grid(_unit(backend.d_model), (2,), "resid_post", 6.0)[:3]
    shared = SteeringRunner(backend, trunk=True).score_grid(prompts, specs, ACCEPT, REJECT, 5, do_sample=True,
                                                            temperature=1.5, seed=3)
    plain = SteeringRunner(backend, trunk=False)
    for spec, (texts, _) in zip(specs, shared):
        assert texts == plain.score(prompts, spec, ACCEPT, REJECT, 5, do_sample=True, temperature=1.5, seed=3)[0]


@pytest.mark.slow
@pytest.mark.parametrize("layers", [(12,), (12, 20)])
def test_embedded_trunk_equals_unshared(smol_backends, smol_tokenizer, layers) -> None:
    backend = smol_backends["nnsight"]
    prompts = [_prompt(smol_tokenizer, u, label=i % 2) for i, u in enumerate(USERS[:3])]
    diff, same, _ = _compare(backend, prompts, _grid(_unit(backend.d_model, 5), layers, "resid_post", 6.0), 8)
    assert diff < 1e-5 and same, (diff, same)
