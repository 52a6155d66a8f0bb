"""Steered generation and teacher-forced log-odds over prompts, batched with shared-prefix reuse.

A `SteeringSpec` says what to do to the residual stream: add `alpha * separation * unit` at the
direction's site (resid_pre / resid_mid / resid_post) of the given layers (from the user turn on, or at
all positions), or project `unit` out everywhere (ablation). Prefix reuse is decided here: it stays on only when the edit leaves the prefix untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from afprobe.activations.backends import Backend, ModelInputs, ResidualEdit
from afprobe.activations.batching import Batch, PrefixCache, run_batches
from afprobe.activations.kv import PrefixLayer, as_prefix_layers, cache_from_layers

Direction = Literal["probe", "random", "ablation", "refusal"]


@dataclass(frozen=True)
class SteeringSpec:
    """One steering condition. `alpha` is in units of the class-mean separation along `unit`.

    mode "same": every prompt gets +alpha. mode "cross": deployment prompts get +alpha (toward
    training), training prompts -alpha (toward deployment).
    """

    direction: Direction
    unit: torch.Tensor  # [d], unit norm, pointing toward "training"
    separation: float
    layers: tuple[int, ...]
    alpha: float = 0.0
    mode: Literal["same", "cross"] = "same"
    positions: Literal["user", "all"] = "user"
    site: str = "resid_post"  # where the direction was learned, and so where it is added
    replicate: int = 0  # which random direction, for the random control

    @property
    def ablate(self) -> bool:
        return self.direction == "ablation"

    @property
    def touches_prefix(self) -> bool:
        return self.ablate or self.positions == "all"

    def row_alphas(self, labels: Sequence[int]) -> torch.Tensor:
        """[b] signed alpha per prompt (label 1 = training cue)."""
        if self.mode == "same":
            return torch.full((len(labels),), float(self.alpha))
        return torch.tensor([-self.alpha if y == 1 else self.alpha for y in labels], dtype=torch.float32)

    def edit(self, batch: Batch, prompts: Sequence[Any]) -> Optional[ResidualEdit]:
        if self.ablate:
            return ResidualEdit(ablate=self.unit.to(batch.inputs.input_ids.device))
        alphas = self.row_alphas([prompts[r].label for r in batch.rows])
        if not bool(alphas.any()):
            return None  # alpha = 0 is exactly the unsteered model
        add = alphas[:, None] * self.separation * self.unit[None, :]
        mask = None
        if self.positions == "user":
            b, t = batch.inputs.input_ids.shape
            mask = torch.zeros((b, t))
            for r, row in enumerate(batch.rows):
                mask[r, max(0, batch.column(r, prompts[row].user_span[0])):] = 1.0
        device = batch.inputs.input_ids.device
        return ResidualEdit(layers=self.layers, add=add.to(device), add_mask=None if mask is None else mask.to(device),
                            site=self.site)


def random_orthogonal(unit: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random unit vector orthogonal to `unit` ([d])."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(unit.shape[0], generator=gen, dtype=torch.float64)
    u = unit.to(torch.float64)
    v = v - (v @ u) * u
    return (v / v.norm()).to(unit.dtype)


@dataclass
class SteeringRunner:
    """Runs a `SteeringSpec` over prompts: completions and accept-vs-reject log-odds per prompt."""

    backend: Backend
    batch_tokens: int = 4096
    prefix_reuse: bool = True
    max_batch: int = 16

    def __post_init__(self) -> None:
        self._prefix_cache = PrefixCache(self.backend.model) if self.prefix_reuse else None
        self.token_counts = {"total_tokens": 0, "computed_tokens": 0}

    def _run(self, seqs: list[list[int]], prompts: Sequence[Any], spec: Optional[SteeringSpec],
             fn: Callable[[Batch, Optional[ResidualEdit]], None], progress: Optional[Callable[[int], None]]) -> None:
        cache = None if spec is not None and spec.touches_prefix else self._prefix_cache
        earliest = [p.user_span[0] for p in prompts]
        stats = run_batches(
            seqs, [p.system_key for p in prompts], earliest, self.batch_tokens, self.backend.tokenizer.pad_token_id,
            self.backend.model, cache, lambda batch: fn(batch, spec.edit(batch, prompts) if spec else None),
            progress, self.max_batch,
        )
        for k in self.token_counts:
            self.token_counts[k] += stats[k]

    def generate(self, prompts: Sequence[Any], spec: Optional[SteeringSpec], max_new_tokens: int,
                 do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                 progress: Optional[Callable[[int], None]] = None) -> list[str]:
        """Completion text per prompt (greedy unless `do_sample`)."""
        ids = self.generate_ids(prompts, spec, max_new_tokens, do_sample, temperature, seed, progress)
        return [self.backend.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def generate_ids(self, prompts: Sequence[Any], spec: Optional[SteeringSpec], max_new_tokens: int,
                     do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                     progress: Optional[Callable[[int], None]] = None) -> list[list[int]]:
        """New token ids per prompt (up to `max_new_tokens` each; padding after an EOS)."""
        out: list[list[int]] = [[] for _ in prompts]

        def fn(batch: Batch, edit: Optional[ResidualEdit]) -> None:
            settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
            if do_sample:
                settings["temperature"] = temperature
                torch.manual_seed(seed + batch.rows[0])
            new = self.backend.generate(batch.inputs, edit, **settings).cpu()
            for r, row in enumerate(batch.rows):
                out[row] = new[r].tolist()

        self._run([list(p.input_ids) for p in prompts], prompts, spec, fn, progress)
        return out

    def log_odds(self, prompts: Sequence[Any], spec: Optional[SteeringSpec], accept: str, reject: str,
                 progress: Optional[Callable[[int], None]] = None) -> list[float]:
        """Teacher-forced log P(accept tag) - log P(reject tag) at the answer start, per prompt."""
        tokenizer = self.backend.tokenizer
        tags = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (accept, reject)]
        seqs = [list(p.input_ids) + tag for p in prompts for tag in tags]
        doubled = [p for p in prompts for _ in tags]
        logps = [0.0] * len(seqs)

        def fn(batch: Batch, edit: Optional[ResidualEdit]) -> None:
            logits, _ = self.backend.logits(batch.inputs, edit)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for r, row in enumerate(batch.rows):
                tag = tags[row % 2]
                n = len(seqs[row])
                cols = [batch.column(r, i) for i in range(n - len(tag) - 1, n - 1)]
                logps[row] = float(sum(logprobs[r, c, tok] for c, tok in zip(cols, tag)))

        self._run(seqs, doubled, spec, fn, progress)
        return [logps[2 * i] - logps[2 * i + 1] for i in range(len(prompts))]

    def score(self, prompts: Sequence[Any], spec: Optional[SteeringSpec], accept: str, reject: str,
              max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
              progress: Optional[Callable[[int], None]] = None) -> tuple[list[str], list[float]]:
        """Completions and log-odds together, running each prompt once.

        The prompt pass keeps its KV cache; the two answer tags are teacher-forced from a copy of it,
        and generation continues from it, so per prompt only the suffix plus a few tokens are computed.
        Equal to `generate` and `log_odds` run separately (tested).
        """
        tokenizer = self.backend.tokenizer
        tags = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (accept, reject)]
        texts: list[str] = [""] * len(prompts)
        odds: list[float] = [0.0] * len(prompts)

        def fn(batch: Batch, edit: Optional[ResidualEdit]) -> None:
            inputs = batch.inputs
            logits, past = self.backend.logits(replace(inputs, keep_cache=True, last_logits_only=True), edit)
            layers = as_prefix_layers(past, self.backend.model.config)
            first = torch.log_softmax(logits[:, -1].float(), dim=-1)  # [b, vocab]: the answer's first token
            logps = self._tag_logps(inputs, layers, first, tags, edit)
            for r, row in enumerate(batch.rows):
                odds[row] = logps[r][0] - logps[r][1]
            settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
            if do_sample:
                settings["temperature"] = temperature
                torch.manual_seed(seed + batch.rows[0])
            # generation re-runs the prompt's last token; new tokens are written into the buffer in place
            cropped = cache_from_layers([layer.derived(drop_last=1, room=max_new_tokens + 1) for layer in layers])
            resumed = replace(inputs, past=cropped, keep_cache=False)
            new = self.backend.generate(resumed, _continuation_edit(edit, 1), **settings)
            for r, row in enumerate(batch.rows):
                texts[row] = tokenizer.decode(new[r], skip_special_tokens=True)

        self._run([list(p.input_ids) for p in prompts], prompts, spec, fn, progress)
        return texts, odds

    def _tag_logps(self, inputs: ModelInputs, layers: list[PrefixLayer], first: torch.Tensor, tags: list[list[int]],
                   edit: Optional[ResidualEdit]) -> list[list[float]]:
        """log P(tag | prompt) for each row and tag, teacher-forced from the prompt's cache."""
        b, n_tags = first.shape[0], len(tags)
        width = max(len(t) for t in tags) - 1
        out = [[float(first[r, tag[0]]) for tag in tags] for r in range(b)]
        if width == 0:
            return out
        ids = torch.full((b * n_tags, width), self.backend.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b * n_tags, width), dtype=torch.long)
        for j, tag in enumerate(tags):
            ids[j::n_tags, : len(tag) - 1] = torch.tensor(tag[:-1])
            mask[j::n_tags, : len(tag) - 1] = 1
        device = inputs.input_ids.device
        last = inputs.position_ids[:, -1:].repeat_interleave(n_tags, 0)
        cache = cache_from_layers([layer.derived(repeat=n_tags, room=width) for layer in layers])
        cont = ModelInputs(
            input_ids=ids.to(device),
            attention_mask=torch.cat([inputs.attention_mask.repeat_interleave(n_tags, 0), mask.to(device)], dim=1),
            position_ids=last + 1 + torch.arange(width, device=device)[None, :], past=cache,
        )
        logits, _ = self.backend.logits(cont, _continuation_edit(edit, n_tags))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for r in range(b):
            for j, tag in enumerate(tags):
                row = r * n_tags + j
                out[r][j] += float(sum(logprobs[row, i, tok] for i, tok in enumerate(tag[1:])))
        return out


def _continuation_edit(edit: Optional[ResidualEdit], repeat: int) -> Optional[ResidualEdit]:
    """The same edit for tokens after the prompt (every position steered), rows repeated."""
    if edit is None:
        return None
    add = None if edit.add is None else edit.add.repeat_interleave(repeat, 0)
    return ResidualEdit(layers=edit.layers, add=add, add_mask=None, ablate=edit.ablate, site=edit.site)
