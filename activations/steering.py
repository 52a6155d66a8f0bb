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


def unsteered_spec(d_model: int) -> SteeringSpec:
    """The unsteered model as a spec (alpha 0: no edit, the shared prefix reused), for records that need one."""
    return SteeringSpec("probe", torch.zeros(d_model), 0.0, (0,), alpha=0.0)


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
    trunk: bool = True  # condition grids share the unsteered prompt pass up to the first steered block
    stack: int = 8  # conditions whose prompt passes (from the trunk on) run stacked in one forward

    def __post_init__(self) -> None:
        self._prefix_cache = PrefixCache(self.backend.model) if self.prefix_reuse else None
        self.token_counts = {"total_tokens": 0, "computed_tokens": 0}
        # block x token products of prompt passes run by `score_grid` with the trunk, and without it
        self.token_counts.update(layer_tokens=0, layer_tokens_unshared=0)

    def _run(self, seqs: list[list[int]], prompts: Sequence[Any], spec: Optional[SteeringSpec],
             fn: Callable[[Batch, Optional[ResidualEdit]], None], progress: Optional[Callable[[int], None]]) -> None:
        cache = None if spec is not None and spec.touches_prefix else self._prefix_cache
        earliest = [p.user_span[0] for p in prompts]
        stats = run_batches(
            seqs, [p.system_key for p in prompts], earliest, self.batch_tokens, self.backend.tokenizer.pad_token_id,
            self.backend.model, cache, lambda batch: (self._count(batch, 1, 0),
                                                      fn(batch, spec.edit(batch, prompts) if spec else None)),
            progress, self.max_batch,
        )
        for k in ("total_tokens", "computed_tokens"):
            self.token_counts[k] += stats[k]

    def _count(self, batch: Batch, conditions: int, trunk_blocks: int) -> None:
        """Block x token products of a batch's prompt pass (its own tokens, padding included; the shared prefix
        not counted) for `conditions` conditions, with the first `trunk_blocks` blocks run once, and without."""
        b, t = batch.inputs.input_ids.shape
        n = self.backend.n_layers
        self.token_counts["layer_tokens"] += b * t * (trunk_blocks + conditions * (n - trunk_blocks))
        self.token_counts["layer_tokens_unshared"] += b * t * n * conditions

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
        if is_remote(self.backend):
            return self._remote(prompts, spec, None, _settings(max_new_tokens, do_sample, temperature), progress)[0]
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
        if is_remote(self.backend):
            return self._remote(prompts, spec, tags, None, progress)[1]
        seqs = [list(p.input_ids) + tag for p in prompts for tag in tags]
        doubled = [p for p in prompts for _ in tags]
        logps = [0.0] * len(seqs)

        def fn(batch: Batch, edit: Optional[ResidualEdit]) -> None:
            logits, _ = self.backend.logits(batch.inputs, edit)
            for row, logp in zip(batch.rows, tag_logps(logits, batch, seqs, tags)):
                logps[row] = logp

        self._run(seqs, doubled, spec, fn, progress)
        return [logps[2 * i] - logps[2 * i + 1] for i in range(len(prompts))]

    def score(self, prompts: Sequence[Any], spec: Optional[SteeringSpec], accept: str, reject: str,
              max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
              progress: Optional[Callable[[int], None]] = None, stop: Optional["StopRule"] = None,
              ends: Optional[list] = None, on_tokens: Optional[Callable[[int], None]] = None
              ) -> tuple[list[str], list[float]]:
        """Completions and log-odds together, running each prompt once.

        The prompt pass keeps its KV cache; the two answer tags are teacher-forced from a copy of it,
        and generation continues from it, so per prompt only the suffix plus a few tokens are computed.
        Equal to `generate` and `log_odds` run separately (tested). `max_new_tokens` 0: log-odds only.

        stop: end each sequence at its own stop text (e.g. "</OUTPUT>") or EOS (see `StopRule`); finished
        rows leave the batch, and the batch ends when every row has stopped or `max_new_tokens` is reached.
        Without it every row runs `max_new_tokens` steps (EOS padded). ends: a list that receives, per
        prompt, {"n_tokens", "stop"} with stop "stop_text" | "eos" | "length". on_tokens(n): called with
        the number of new tokens after each decoding chunk (for a tokens-per-second display).
        """
        tokenizer = self.backend.tokenizer
        tags = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (accept, reject)]
        if is_remote(self.backend):  # no KV copies remotely: log-odds and generation are two traces of one job
            ids, odds_ = self._remote(prompts, spec, tags, _settings(max_new_tokens, do_sample, temperature), progress)
            return [tokenizer.decode(row, skip_special_tokens=True) for row in ids], odds_
        texts: list[str] = [""] * len(prompts)
        odds: list[float] = [0.0] * len(prompts)

        def fn(batch: Batch, edit: Optional[ResidualEdit]) -> None:
            inputs = batch.inputs
            logits, past = self.backend.logits(replace(inputs, keep_cache=True, last_logits_only=True), edit)
            layers = as_prefix_layers(past, self.backend.model.config)
            if stop is None:
                got_texts, got_odds = self._continue(inputs, logits, layers, edit, tags, max_new_tokens, do_sample,
                                                     temperature, seed + batch.rows[0])
                if on_tokens is not None:
                    on_tokens(len(batch.rows) * max_new_tokens)
                for r, row in enumerate(batch.rows):
                    texts[row], odds[row] = got_texts[r], got_odds[r]
                    stops[row] = {"n_tokens": max_new_tokens, "stop": "length"}
                return
            logps = self._tag_logps(inputs, layers, logits, tags, edit)
            settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
            if do_sample:
                settings["temperature"] = temperature
                torch.manual_seed(seed + batch.rows[0])
            rows_ids, row_ends = self._decode_until(inputs, layers, edit, max_new_tokens, settings, stop, on_tokens)
            for r, row in enumerate(batch.rows):
                odds[row] = logps[r][0] - logps[r][1]
                texts[row] = tokenizer.decode(rows_ids[r], skip_special_tokens=True)
                stops[row] = row_ends[r]

        stops: list[dict] = [{} for _ in prompts]
        self._run([list(p.input_ids) for p in prompts], prompts, spec, fn, progress)
        if ends is not None:
            ends[:] = stops
        return texts, odds

    def _remote(self, prompts: Sequence[Any], spec: Optional[SteeringSpec], tags: Optional[list[list[int]]],
                gen: Optional[dict], progress: Optional[Callable[[int], None]]) -> tuple[Any, Any]:
        from afprobe.activations.remote import steer_remote

        return steer_remote(self.backend, prompts, spec, tags=tags, gen=gen, batch_tokens=self.batch_tokens,
                            max_batch=self.max_batch, progress=progress, counts=self.token_counts)

    def _continue(self, inputs: ModelInputs, logits: torch.Tensor, layers: list[PrefixLayer],
                  edit: Optional[ResidualEdit], tags: list[list[int]], max_new_tokens: int, do_sample: bool,
                  temperature: float, seed: int) -> tuple[list[str], list[float]]:
        """From a prompt pass (last-position logits [b, 1, vocab] and its cache layers): the tags' log-odds, and
        completions unless `max_new_tokens` is 0 (texts are then empty)."""
        logps = self._tag_logps(inputs, layers, logits, tags, edit)
        odds = [lp[0] - lp[1] for lp in logps]
        if max_new_tokens == 0:
            return [""] * len(odds), odds
        settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            settings["temperature"] = temperature
            torch.manual_seed(seed)
        # generation re-runs the prompt's last token; new tokens are written into the buffer in place
        cropped = cache_from_layers([layer.derived(drop_last=1, room=max_new_tokens + 1) for layer in layers])
        resumed = replace(inputs, past=cropped, keep_cache=False)
        new = self.backend.generate(resumed, _continuation_edit(edit, 1), **settings)
        tokenizer = self.backend.tokenizer
        return [tokenizer.decode(row, skip_special_tokens=True) for row in new], odds

    # ------------------------------------------------------------------------------------ condition grids

    def score_grid(self, prompts: Sequence[Any], specs: Sequence[Optional[SteeringSpec]], accept: str, reject: str,
                   max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                   progress: Optional[Callable[[int], None]] = None) -> list[tuple[list[str], list[float]]]:
        """`score` for every spec, (texts, log-odds) per spec in order. With `trunk` on, specs that add at the
        same layers and site share the unsteered prompt pass up to the first steered block (`activations.trunk`)
        and their prompt passes from there run stacked, `stack` conditions per forward. Decoding shares nothing
        (the generated tokens differ by condition): greedy decoding runs the stacked conditions as rows of one
        `generate`, sampling runs them one at a time with `score`'s seeds. Ablation, and everything when `trunk` is off, runs `score` per spec.
        `max_new_tokens` 0: log-odds only (texts empty)."""
        from afprobe.activations.trunk import trunk_boundary

        results: list[Optional[tuple[list[str], list[float]]]] = [None] * len(specs)
        groups: dict[tuple, list[int]] = {}
        for j, spec in enumerate(specs):
            if not self.trunk or spec is None or spec.ablate:
                continue
            groups.setdefault((tuple(spec.layers), spec.site, spec.touches_prefix), []).append(j)
        n_layers = self.backend.n_layers
        for (layers, site, touches), members in groups.items():
            if trunk_boundary(layers, site, n_layers) == 0 and len(members) == 1:
                continue  # nothing to share
            for j, out in zip(members, self._grid_group(prompts, [specs[j] for j in members], layers, site, touches,
                                                        accept, reject, max_new_tokens, do_sample, temperature,
                                                        seed, progress)):
                results[j] = out
        for j, spec in enumerate(specs):
            if results[j] is None:
                results[j] = self.score(prompts, spec, accept, reject, max_new_tokens, do_sample, temperature,
                                        seed, progress)
        return results  # type: ignore[return-value]

    def log_odds_grid(self, prompts: Sequence[Any], specs: Sequence[Optional[SteeringSpec]], accept: str,
                      reject: str, progress: Optional[Callable[[int], None]] = None) -> list[list[float]]:
        """`log_odds` for every spec (teacher-forced from the prompt pass), sharing the trunk like `score_grid`."""
        return [odds for _, odds in self.score_grid(prompts, specs, accept, reject, 0, progress=progress)]

    def _grid_group(self, prompts: Sequence[Any], specs: list[SteeringSpec], layers: tuple[int, ...], site: str,
                    touches_prefix: bool, accept: str, reject: str, max_new_tokens: int, do_sample: bool,
                    temperature: float, seed: int, progress: Optional[Callable[[int], None]]
                    ) -> list[tuple[list[str], list[float]]]:
        from afprobe.activations.trunk import run_branch, run_trunk, tile_inputs, trunk_boundary

        tokenizer, model, adapter = self.backend.tokenizer, self.backend.model, self.backend.adapter
        tags = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (accept, reject)]
        k = trunk_boundary(layers, site, self.backend.n_layers)
        first_at_input = min(layers) if site == "resid_post" and k == min(layers) + 1 else None
        texts = [[""] * len(prompts) for _ in specs]
        odds = [[0.0] * len(prompts) for _ in specs]
        stack = 1 if do_sample else max(1, self.stack)  # sampling: one condition at a time, seeded as `score`
        cache = None if touches_prefix else self._prefix_cache

        def fn(batch: Batch) -> None:
            inputs = batch.inputs
            b, t = inputs.input_ids.shape
            trunk = run_trunk(model, adapter, inputs, k)
            self._count(batch, len(specs), k)
            for start in range(0, len(specs), stack):
                chunk = specs[start: start + stack]
                c = len(chunk)
                edit = _stacked_edit([s.edit(batch, prompts) for s in chunk], layers, site, b, t,
                                     inputs.input_ids.device)
                logits, cache_layers = run_branch(model, adapter, trunk, inputs, c, edit, first_at_input)
                stacked = tile_inputs(inputs, c)
                got_odds = self._tag_logps_odds(stacked, cache_layers, logits, tags, edit)
                for j in range(c):
                    for r, row in enumerate(batch.rows):
                        odds[start + j][row] = got_odds[j * b + r]
                if max_new_tokens and not do_sample:  # greedy decoding: the conditions stacked as rows
                    resumed = replace(stacked, past=cache_from_layers(
                        [layer.derived(drop_last=1, room=max_new_tokens + 1) for layer in cache_layers]))
                    new = self.backend.generate(resumed, _continuation_edit(edit, 1), max_new_tokens=max_new_tokens,
                                                do_sample=False)
                    for j in range(c):
                        for r, row in enumerate(batch.rows):
                            texts[start + j][row] = tokenizer.decode(new[j * b + r], skip_special_tokens=True)
                elif max_new_tokens:
                    for j in range(c):  # sampling: per condition, seeded as `score` is
                        sl = slice(j * b, (j + 1) * b)
                        sub_layers = [layer.derived(drop_last=1, room=max_new_tokens + 1, rows=sl)
                                      for layer in cache_layers]
                        resumed = replace(inputs, past=cache_from_layers(sub_layers), keep_cache=False)
                        settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
                        if do_sample:
                            settings["temperature"] = temperature
                            torch.manual_seed(seed + batch.rows[0])
                        sub_edit = _rows(edit, sl)
                        new = self.backend.generate(resumed, _continuation_edit(sub_edit, 1), **settings)
                        for r, row in enumerate(batch.rows):
                            texts[start + j][row] = tokenizer.decode(new[r], skip_special_tokens=True)
                if progress is not None:
                    progress(c * b)

        stats = run_batches([list(p.input_ids) for p in prompts], [p.system_key for p in prompts],
                            [p.user_span[0] for p in prompts], self.batch_tokens, tokenizer.pad_token_id, model,
                            cache, fn, None, self.max_batch)
        self.token_counts["total_tokens"] += stats["total_tokens"] * len(specs)
        self.token_counts["computed_tokens"] += stats["computed_tokens"] * len(specs)
        return list(zip(texts, odds))

    def _tag_logps_odds(self, inputs: ModelInputs, layers: list[PrefixLayer], logits: torch.Tensor,
                        tags: list[list[int]], edit: Optional[ResidualEdit]) -> list[float]:
        return [lp[0] - lp[1] for lp in self._tag_logps(inputs, layers, logits, tags, edit)]

    def _decode_until(self, inputs: ModelInputs, layers: list[PrefixLayer], edit: Optional[ResidualEdit],
                      max_new_tokens: int, settings: dict[str, Any], stop: "StopRule",
                      on_tokens: Optional[Callable[[int], None]]) -> tuple[list[list[int]], list[dict]]:
        """Batched decoding in chunks of `stop.chunk` steps from the prompt's KV cache (`layers`, shared
        prefix kept), checking every sequence for its stop after each chunk. A finished row is cut right
        after the token that completed the stop text (or at EOS) and leaves the batch: its cache rows,
        ids, mask and steering vector are dropped, so later chunks run only unfinished rows.

        inputs: the prompt batch (full_ids [b, p + t], attention_mask [b, p + t]). Returns per row the new
        token ids and {"n_tokens", "stop": "stop_text" | "eos" | "length"}.
        """
        tokenizer = self.backend.tokenizer
        b = inputs.full_ids.shape[0]
        eos = stop_token_ids(self.backend.model, tokenizer)
        out: list[list[int]] = [[] for _ in range(b)]
        ends: list[dict] = [{"n_tokens": 0, "stop": "length"} for _ in range(b)]
        active = list(range(b))
        full, mask = inputs.full_ids, inputs.attention_mask
        cont = _continuation_edit(edit, 1)
        # the prompt's last token is run again by the first chunk; afterwards the cache always holds all but
        # the last token of `full` (generate computes the last sampled token's keys only when it continues)
        cache = [layer.derived(drop_last=1, room=min(max_new_tokens, stop.chunk) + 1) for layer in layers]
        done = 0
        while active and done < max_new_tokens:
            steps = min(stop.chunk, max_new_tokens - done)
            resumed = replace(inputs, full_ids=full, attention_mask=mask, past=cache_from_layers(cache), keep_cache=False)
            new = self.backend.generate(resumed, cont, **{**settings, "max_new_tokens": steps}).to(full.device)
            done += steps
            if on_tokens is not None:
                on_tokens(len(active) * steps)
            keep: list[int] = []
            for j, row in enumerate(active):
                before = len(out[row])
                piece = new[j].tolist()
                hit_eos = next((i for i, t in enumerate(piece) if t in eos), None)
                out[row] += piece if hit_eos is None else piece[: hit_eos + 1]
                cut = stop_cut(tokenizer, out[row], stop.texts, before)
                if cut is not None:
                    out[row] = out[row][:cut]
                    ends[row] = {"n_tokens": len(out[row]), "stop": "stop_text"}
                elif hit_eos is not None:
                    ends[row] = {"n_tokens": len(out[row]), "stop": "eos"}
                else:
                    ends[row] = {"n_tokens": len(out[row]), "stop": "length"}
                    keep.append(j)
            if not keep or done >= max_new_tokens:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long)
                cache = [layer.derived(rows=index, room=max(1, min(stop.chunk, max_new_tokens - done))) for layer in cache]
                full, mask, new = full[index.to(full.device)], mask[index.to(mask.device)], new[index.to(new.device)]
                cont = _select_rows(cont, index)
                active = [active[j] for j in keep]
            full = torch.cat([full, new], dim=1)
            mask = torch.cat([mask, torch.ones_like(new, dtype=mask.dtype)], dim=1)
        return out, ends

    def _tag_logps(self, inputs: ModelInputs, layers: list[PrefixLayer], logits: torch.Tensor,
                   tags: list[list[int]], edit: Optional[ResidualEdit]) -> list[list[float]]:
        """log P(tag | prompt) for each row and tag, teacher-forced from the prompt's cache, steered by `edit`."""
        return cached_tag_logps(lambda cont: self.backend.logits(cont, _continuation_edit(edit, len(tags)))[0],
                                self.backend.tokenizer.pad_token_id, inputs, layers, logits, tags)


def cached_tag_logps(forward: Callable[[ModelInputs], torch.Tensor], pad_id: int, inputs: ModelInputs,
                     layers: list[PrefixLayer], logits: torch.Tensor, tags: list[list[int]]) -> list[list[float]]:
    """log P(tag | prompt) for each prompt row and tag, teacher-forced from the prompt pass: `logits` [b, t', vocab]
    (its last column is the prompt's last position) and the prompt's cache `layers`. The tags' tokens after the
    first run as one continuation of every row (rows repeated per tag, tag-minor) through `forward`, which returns
    their logits [b * n_tags, width, vocab] (the caller applies any edit)."""
    first = torch.log_softmax(logits[:, -1].float(), dim=-1)  # [b, vocab]: the answer's first token
    b, n_tags = first.shape[0], len(tags)
    width = max(len(t) for t in tags) - 1
    out = [[float(first[r, tag[0]]) for tag in tags] for r in range(b)]
    if width == 0:
        return out
    ids = torch.full((b * n_tags, width), pad_id, dtype=torch.long)
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
    logprobs = torch.log_softmax(forward(cont).float(), dim=-1)
    for r in range(b):
        for j, tag in enumerate(tags):
            row = r * n_tags + j
            out[r][j] += float(sum(logprobs[row, i, tok] for i, tok in enumerate(tag[1:])))
    return out


def tag_logps(logits: torch.Tensor, batch: Batch, seqs: Sequence[Sequence[int]], tags: list[list[int]],
              first_column: int = 0) -> list[float]:
    """Teacher-forced log P(tag | prompt) for each row of a batch whose sequence seqs[row] is a prompt followed by
    tags[row % 2]. logits: [b, t', vocab], the batch's columns from `first_column` on (t' = t with full logits,
    fewer with `logits_to_keep`). Returns one float per batch row, in batch order."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for r, row in enumerate(batch.rows):
        tag, n = tags[row % 2], len(seqs[row])
        cols = torch.tensor([batch.column(r, i) - first_column for i in range(n - len(tag) - 1, n - 1)])
        out.append(float(logprobs[r, cols, torch.tensor(tag)].sum()))
    return out


def is_remote(backend: Backend) -> bool:
    from afprobe.activations.remote import is_remote as remote

    return remote(backend)


def _settings(max_new_tokens: int, do_sample: bool, temperature: float) -> dict[str, Any]:
    """Generate settings for a remote model (sampling there is not seeded per batch as it is locally)."""
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        settings["temperature"] = temperature
    return settings

def _stacked_edit(edits: list[Optional[ResidualEdit]], layers: tuple[int, ...], site: str, b: int, t: int,
                  device: torch.device) -> Optional[ResidualEdit]:
    """The conditions' edits (each for b rows, or None = unsteered) as one edit over [c * b] rows."""
    if all(e is None for e in edits):
        return None
    adds, masks = [], []
    for e in edits:
        d = next(x for x in edits if x is not None).add.shape[1]
        adds.append(torch.zeros((b, d), device=device) if e is None else e.add.float())
        masks.append(torch.ones((b, t), device=device) if e is None or e.add_mask is None else e.add_mask.float())
    return ResidualEdit(layers=layers, add=torch.cat(adds), add_mask=torch.cat(masks), site=site)


def _rows(edit: Optional[ResidualEdit], rows: slice) -> Optional[ResidualEdit]:
    if edit is None or not bool(edit.add[rows].any()):
        return None  # an unsteered condition decodes with no edit, as `score` does
    return ResidualEdit(layers=edit.layers, add=edit.add[rows],
                        add_mask=None if edit.add_mask is None else edit.add_mask[rows], site=edit.site)

@dataclass(frozen=True)
class StopRule:
    """Where a generated sequence ends: at the first occurrence of any of `texts` in its new text (kept, cut
    right after), or at EOS. `chunk`: decoding steps between checks (finished rows then leave the batch)."""

    texts: tuple[str, ...] = ("</OUTPUT>",)
    chunk: int = 32


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The model's end-of-sequence token ids (generation config and tokenizer)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = {eos} if isinstance(eos, int) else set(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def stop_cut(tokenizer: Any, ids: Sequence[int], texts: Sequence[str], start: int = 0) -> Optional[int]:
    """The smallest k > start such that decode(ids[:k]) contains one of `texts` (None: none does). Tokens
    before `start` are known not to complete a stop text."""
    if not texts:
        return None
    full = tokenizer.decode(list(ids), skip_special_tokens=True)
    if not any(t in full for t in texts):
        return None
    for k in range(max(1, start + 1), len(ids) + 1):
        text = tokenizer.decode(list(ids[:k]), skip_special_tokens=True)
        if any(t in text for t in texts):
            return k
    return None


def _select_rows(edit: Optional[ResidualEdit], index: torch.Tensor) -> Optional[ResidualEdit]:
    """The edit for a subset of the batch's rows (index [b'])."""
    if edit is None or edit.add is None:
        return edit
    return replace(edit, add=edit.add.index_select(0, index.to(edit.add.device)), add_mask=None)


def _continuation_edit(edit: Optional[ResidualEdit], repeat: int) -> Optional[ResidualEdit]:
    """The same edit for tokens after the prompt (every position steered), rows repeated."""
    if edit is None:
        return None
    add = None if edit.add is None else edit.add.repeat_interleave(repeat, 0)
    return ResidualEdit(layers=edit.layers, add=add, add_mask=None, ablate=edit.ablate, site=edit.site)
