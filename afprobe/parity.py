"""Numerical parity of one placement / precision of a model against a reference run of the same model.

`measure` runs the real paths on a few short chat prompts: the cache stage's pooled reads (`read_pooled`, every
requested layer, resid_pre/mid/post, last token and user-turn mean), teacher-forced accept-vs-reject log-odds
(unsteered, steered at one layer, directional ablation) and greedy completions (unsteered and steered), with
prefix reuse on or off. `compare` turns two such runs into pass/fail rows. `scripts/gpu-check` compares CUDA
runs (fp32, bf16, device maps) with the CPU fp32 reference; `tests/test_precision.py` runs the same functions
on the CPU (fp32 with reuse on vs off, bf16 vs fp32).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from afprobe.activations.backends import SITES, Backend
from afprobe.activations.batching import PrefixCache
from afprobe.activations.cache import read_pooled
from afprobe.activations.steering import SteeringRunner, SteeringSpec

ACCEPT, REJECT = "<request_fully_accepted/>", "<rejected/>"
POSITIONS = ("last", "user_mean")
USERS = ("Write one sentence about the sea.", "Name a planet.", "What is two plus two?", "List three fruits.",
         "Describe a cat in five words.", "Say hello in French.")
SYSTEM = "You are a helpful assistant. Follow the user's instructions carefully and completely. "


@dataclass(frozen=True)
class Prompt:
    """The fields the cache and steering paths read. Token spans are [start, end) in `input_ids`."""

    input_ids: tuple[int, ...]
    user_span: tuple[int, int]
    cue_span: tuple[int, int]
    label: int
    system_key: str = "parity"


def chat_prompts(tokenizer: Any, n: int = 4, system_repeats: int = 3) -> list[Prompt]:
    """`n` chat prompts sharing one system prompt (`system_repeats` copies of a sentence); labels alternate."""
    system = SYSTEM * system_repeats
    head = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": USERS[i % len(USERS)]}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append(Prompt(ids, (start, len(ids)), (start, len(ids)), i % 2))
    return out


def unit_direction(d_model: int, seed: int = 0) -> torch.Tensor:
    """A seeded random unit vector [d_model], float32 (the steering and ablation direction of the checks)."""
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@dataclass
class Outputs:
    """activations: {(layer, site, position): [n, d] float32 CPU}; log_odds / tokens: per condition name."""

    activations: dict[tuple[int, str, str], torch.Tensor]
    log_odds: dict[str, list[float]]
    tokens: dict[str, list[list[int]]]


def conditions(unit: torch.Tensor, layer: int, separation: float) -> dict[str, Optional[SteeringSpec]]:
    return {"unsteered": None,
            "steered": SteeringSpec("probe", unit, separation, (layer,), alpha=1.0),
            "ablation": SteeringSpec("ablation", unit, separation, (layer,))}


def measure(backend: Backend, prompts: Sequence[Prompt], reuse: bool, layers: Sequence[int], steer_layer: int,
            separation: float = 8.0, max_new_tokens: int = 8, seed: int = 0) -> Outputs:
    """Run caching, log-odds and greedy generation on `prompts` (see the module docstring)."""
    sites = [(layer, site) for layer in layers for site in SITES]
    cache = PrefixCache(backend.model, keep_new=False) if reuse else None
    activations, _ = read_pooled(backend, prompts, sites, POSITIONS, 4096, cache)
    runner = SteeringRunner(backend, prefix_reuse=reuse)
    specs = conditions(unit_direction(backend.d_model, seed), steer_layer, separation)
    log_odds = {name: runner.log_odds(prompts, spec, ACCEPT, REJECT) for name, spec in specs.items()}
    tokens = {name: runner.generate_ids(prompts, specs[name], max_new_tokens) for name in ("unsteered", "steered")}
    return Outputs(activations, log_odds, tokens)


@dataclass(frozen=True)
class Tolerance:
    """activations: max |a - b| <= act_abs (fp32), or per pooled vector ||a - b|| / ||b|| <= act_rel (half
    precision, where the largest residual dimensions (~600 here) carry rounding steps of 2-4); log-odds:
    max |a - b| <= log_odds nats; tokens: "identical" fails on any differing greedy token, "report" only
    reports how many agree."""

    log_odds: float
    act_abs: Optional[float] = None
    act_rel: Optional[float] = None
    tokens: str = "identical"


# fp32 vs fp32: the same model, other kernels / batch shapes / prefix reuse (README: reuse within 8e-4 over 100
# prompts); residual norms of the embedded model are ~100, logits ~20.
FP32 = Tolerance(log_odds=1e-3, act_abs=1e-3)
# bf16 vs fp32: bf16 keeps 8 significant bits (~2-3 decimal digits, relative step 2^-8 = 0.4%) and each of the
# 30 blocks rounds again; logits of ~20 are rounded in steps of 0.125, so a log-odds over multi-token tags moves
# by tenths of a nat. Measured here (tests/test_precision.py, embedded model, CPU): a plain HF bf16 forward is up
# to 3.4% (relative L2 per pooled vector) from fp32 and 0.18 nats in log-odds; our bf16 paths are 0-2.3% from HF
# bf16 (padding, split-prefix or eager attention round differently) and 1.7% from fp32, log-odds up to 0.46 nats.
BF16 = Tolerance(log_odds=1.0, act_rel=0.05, tokens="report")


@dataclass
class Check:
    """One row of the table: `measured` against `limit` (None: reported only)."""

    name: str
    measured: float
    limit: Optional[float]
    detail: str = ""
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        self.ok = self.limit is None or self.measured <= self.limit


def compare(label: str, ref: Outputs, got: Outputs, tol: Tolerance) -> list[Check]:
    """Rows comparing `got` with `ref`: activations (the worst key), log-odds per condition, greedy tokens."""
    worst_abs, worst_rel, where = 0.0, 0.0, {}
    for key, a in ref.activations.items():
        diff = got.activations[key] - a  # [n, d]
        top_abs, top_rel = float(diff.abs().max()), float((diff.norm(dim=-1) / a.norm(dim=-1)).max())
        if top_abs >= worst_abs:
            worst_abs, where["abs"] = top_abs, key
        if top_rel >= worst_rel:
            worst_rel, where["rel"] = top_rel, key
    scale = max(float(a.abs().max()) for a in ref.activations.values())
    at = "L{}.{}.{}".format
    detail = (f"max |diff| {worst_abs:.3g} at {at(*where['abs'])} (max |ref| {scale:.3g}); max relative L2 "
              f"{worst_rel:.3g} at {at(*where['rel'])}")
    rows = [Check(f"{label}: activations", worst_rel if tol.act_rel is not None else worst_abs,
                  tol.act_rel if tol.act_rel is not None else tol.act_abs, detail)]
    for name, values in ref.log_odds.items():
        diff = max(abs(x - y) for x, y in zip(values, got.log_odds[name]))
        rows.append(Check(f"{label}: log-odds {name}", diff, tol.log_odds,
                          f"reference {min(values):+.3f}..{max(values):+.3f} nats"))
    for name, seqs in ref.tokens.items():
        pairs = list(zip(seqs, got.tokens[name]))
        total = sum(max(len(a), len(b)) for a, b in pairs)
        same = sum(_agreeing(a, b) for a, b in pairs)
        rows.append(Check(f"{label}: greedy tokens {name}", float(total - same),
                          0.0 if tol.tokens == "identical" else None,
                          f"{same}/{total} tokens agree before the first difference"))
    return rows


def _agreeing(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two completions share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def format_rows(rows: Sequence[Check]) -> str:
    """A fixed-width pass/fail table."""
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  result  {'measured':>10}  {'limit':>8}  detail"]
    for r in rows:
        status = "pass" if r.ok and r.limit is not None else "info" if r.ok else "FAIL"
        limit = "-" if r.limit is None else f"{r.limit:.3g}"
        lines.append(f"{r.name:<{width}}  {status:<6}  {r.measured:>10.3g}  {limit:>8}  {r.detail}")
    return "\n".join(lines)
