"""Activation patching: a source prompt's residual stream written into a target prompt's run, with the accept-vs-reject
log-odds of the patched run.

The residual stream is indexed by *stream index* s in 0..N (N blocks): s < N is block s's input (resid_pre of layer
s), s = N the last block's output. resid_post of layer L is the same tensor as resid_pre of layer L + 1, so a patch
at (L, resid_post) is a patch at stream index L + 1 (`stream_index`).

Positions are aligned between the source and the target (`align`):
- "cue":  the cue spans (already widened by `scenarios._align_pair` so the two prompts of one query agree outside
          them), token by token from the span start; only when both spans have the same token length;
- "user": the user-turn spans, token by token; only when both have the same token length;
- "last": the last prompt token of each;
- "all":  every token from the first computed position on (equal-length prompts only; a test uses it).
A pair that cannot be aligned is skipped (`align` returns None) and counted by the caller.

Runs: `clean` runs each prompt twice, with the accept tag and with the reject tag appended (teacher-forced, scored by
the engine's `steering.tag_logps` as `SteeringRunner.log_odds` is), batched with the shared system-prompt prefix
reused (`batching.run_batches`), and captures the residual stream of every prompt at every stream index for the
computed (suffix) positions. The patch only touches positions from the cue / user turn on, never the prefix.
`patched` at a block's input shares each target's unpatched blocks 0..s-1 between all the jobs patching that target
(`activations.trunk`) and scores both tags from one prompt pass; at the last block's output (and with `trunk` off)
each job runs in full, twice.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from afprobe.activations.attention import split_prefix
from afprobe.activations.backends import ModelInputs
from afprobe.activations.batching import Batch, PrefixCache, run_batches
from afprobe.activations.steering import cached_tag_logps, tag_logps
from afprobe.activations.trunk import run_branch, run_trunk, tile, tile_inputs

POSITIONS = ("cue", "last", "user")


def stream_index(layer: int, site: str) -> int:
    """The stream index of `site` at `layer` (resid_pre L -> L, resid_post L -> L + 1)."""
    if site == "resid_pre":
        return layer
    if site == "resid_post":
        return layer + 1
    raise ValueError(f"patching supports resid_pre and resid_post, not {site!r}")


def first_computed(prompt: Any) -> int:
    """The first position a patch can touch (cue or user turn, whichever starts first)."""
    return min(prompt.cue_span[0], prompt.user_span[0])


def align(source: Any, target: Any, positions: str) -> Optional[tuple[list[int], list[int]]]:
    """(source positions, target positions) for a position set, or None when the spans cannot be aligned."""
    if positions == "last":
        return [len(source.input_ids) - 1], [len(target.input_ids) - 1]
    if positions == "all":
        a, b = first_computed(source), first_computed(target)
        if len(source.input_ids) != len(target.input_ids) or a != b:
            return None
        return list(range(a, len(source.input_ids))), list(range(b, len(target.input_ids)))
    span = {"cue": "cue_span", "user": "user_span"}[positions]
    (s0, s1), (t0, t1) = getattr(source, span), getattr(target, span)
    if s1 - s0 != t1 - t0:
        return None
    return list(range(s0, s1)), list(range(t0, t1))


@dataclass(frozen=True)
class PatchJob:
    """Run prompt `target` with the residual of prompt `source` at `source_positions` written over the target's
    `target_positions` (same length) at one stream index."""

    target: int
    source: int
    source_positions: tuple[int, ...]
    target_positions: tuple[int, ...]


@dataclass
class Clean:
    """Unpatched runs. log_odds: [n prompts]; resid[i]: [N + 1, t_i, d] float32 on the CPU, the residual of prompt i
    at every stream index for positions first_computed(prompt) .. end of prompt."""

    log_odds: list[float]
    resid: list[torch.Tensor]


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _stream_hook(blocks: Any, s: int, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Iterator[None]:
    """Call fn on the residual at stream index s ([b, t, d]); a returned tensor replaces it."""
    if s < len(blocks):
        def pre(module: Any, args: tuple, kwargs: dict) -> Any:
            out = fn(_hidden(args, kwargs))
            if out is None:
                return None
            return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})
        handle = blocks[s].register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(module: Any, args: tuple, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            out = fn(h)
            if out is None:
                return None
            return (out, *output[1:]) if isinstance(output, tuple) else out
        handle = blocks[-1].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Patcher:
    """Clean and patched log-odds over prompts (`scenarios.Prompt`s) for a HF model with a family adapter."""

    model: Any
    tokenizer: Any
    adapter: Any
    accept: str
    reject: str
    batch_tokens: int = 4096
    max_batch: int = 16
    prefix_reuse: bool = True
    trunk: bool = True  # patched runs of one target share its unpatched blocks before the patch (`patched`)

    def __post_init__(self) -> None:
        self.tags = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (self.accept, self.reject)]
        self._cache = PrefixCache(self.model, keep_new=False) if self.prefix_reuse else None
        self._trunk_cache = PrefixCache(self.model) if self.prefix_reuse else None  # keeps the prompt's KV
        self.blocks = self.adapter.blocks(self.model)
        self.token_counts = {"total_tokens": 0, "computed_tokens": 0}

    @property
    def n_streams(self) -> int:
        return len(self.blocks) + 1

    def _run(self, prompts: Sequence[Any], targets: Sequence[int],
             fn: Callable[[Batch, list[int]], Any], progress: Optional[Callable[[int], None]]) -> list[float]:
        """Log-odds of prompts[targets[j]] for each j; fn(batch, jobs of its rows) is a context manager factory
        (hooks) entered around each batch's forward."""
        seqs = [list(prompts[i].input_ids) + tag for i in targets for tag in self.tags]
        keys = [prompts[i].system_key for i in targets for _ in self.tags]
        earliest = [first_computed(prompts[i]) for i in targets for _ in self.tags]
        logps = [0.0] * len(seqs)
        keep = max(len(tag) for tag in self.tags) + 1

        def batch_fn(batch: Batch) -> None:
            kwargs = batch.inputs.forward_kwargs()
            kwargs["logits_to_keep"] = keep  # rows are left-padded: the tag positions are the last columns
            with torch.inference_mode(), fn(batch, [row // 2 for row in batch.rows]):
                logits = self.model(**kwargs).logits
            t = batch.inputs.input_ids.shape[1]
            for row, logp in zip(batch.rows, tag_logps(logits, batch, seqs, self.tags, t - keep)):
                logps[row] = logp
            if progress is not None:
                progress(len(batch.rows) / 2)

        stats = run_batches(seqs, keys, earliest, self.batch_tokens, self.tokenizer.pad_token_id, self.model,
                            self._cache, batch_fn, None, self.max_batch)
        for k in self.token_counts:
            self.token_counts[k] += stats[k]
        return [logps[2 * j] - logps[2 * j + 1] for j in range(len(targets))]

    def clean(self, prompts: Sequence[Any], progress: Optional[Callable[[int], None]] = None) -> Clean:
        """Unpatched log-odds of every prompt and its residual stream at every stream index (see `Clean`)."""
        resid: list[Optional[torch.Tensor]] = [None] * len(prompts)

        @contextmanager
        def capture(batch: Batch, jobs: list[int]) -> Iterator[None]:
            got: list[torch.Tensor] = []
            hooks = [_stream_hook(self.blocks, s, lambda h: got.append(h.detach().float().cpu()))
                     for s in range(self.n_streams)]
            for h in hooks:
                h.__enter__()
            try:
                yield
            finally:
                for h in reversed(hooks):
                    h.__exit__(None, None, None)
            stacked = torch.stack(got)  # [N + 1, b, t, d]
            for r, (row, j) in enumerate(zip(batch.rows, jobs)):
                if row % 2 == 0:  # the prompt's residual is the same under either tag (causal)
                    p = prompts[j]
                    cols = [batch.column(r, i) for i in range(first_computed(p), len(p.input_ids))]
                    resid[j] = stacked[:, r, cols].clone()

        odds = self._run(prompts, range(len(prompts)), capture, progress)
        return Clean(odds, resid)  # type: ignore[arg-type]

    def patched(self, prompts: Sequence[Any], clean: Clean, jobs: Sequence[PatchJob], s: int,
                progress: Optional[Callable[[int], None]] = None) -> list[float]:
        """Log-odds of each job's target with its patch applied at stream index s: from the target's shared trunk
        (`_patched_trunk`) when `trunk` is on and s is a block's input, else by a full forward per job."""
        if self.trunk and s < len(self.blocks):
            return self._patched_trunk(prompts, clean, jobs, s, progress)
        return self._patched_full(prompts, clean, jobs, s, progress)

    def _patched_trunk(self, prompts: Sequence[Any], clean: Clean, jobs: Sequence[PatchJob], s: int,
                       progress: Optional[Callable[[int], None]]) -> list[float]:
        """Every job patching the same target shares the target's unpatched blocks 0..s-1 (`trunk.run_trunk`, once
        per target); the jobs then run stacked from block s (`trunk.run_branch`) with their patches written into
        block s's input, and the answer tags are scored from the branch's cache (`steering.cached_tag_logps`), so the
        prompt is run once rather than once per tag. Equal to `_patched_full` within float error (tests)."""
        by_target: dict[int, list[int]] = {}
        for j, job in enumerate(jobs):
            by_target.setdefault(job.target, []).append(j)
        targets = list(by_target)
        c = max(len(v) for v in by_target.values())
        out = [0.0] * len(jobs)
        model, pad = self.model, self.tokenizer.pad_token_id

        def forward(cont: ModelInputs) -> torch.Tensor:
            with torch.inference_mode(), split_prefix(model):
                return model(**cont.forward_kwargs()).logits

        def batch_fn(batch: Batch) -> None:
            inputs, b = batch.inputs, len(batch.rows)
            trunk = run_trunk(model, self.adapter, inputs, s)
            residual = tile(trunk.residual, c).clone()  # [c * b, t, d]; row j * b + r: target r's j-th job
            for r, row in enumerate(batch.rows):
                for j, index in enumerate(by_target[targets[row]]):
                    job = jobs[index]
                    base = first_computed(prompts[job.source])
                    take = torch.tensor([i - base for i in job.source_positions], dtype=torch.long)
                    cols = torch.tensor([batch.column(r, i) for i in job.target_positions], dtype=torch.long)
                    residual[j * b + r, cols.to(residual.device)] = clean.resid[job.source][s].index_select(0, take).to(
                        residual.device, residual.dtype)
            logits, layers = run_branch(model, self.adapter, trunk, inputs, c, None, residual=residual)
            logps = cached_tag_logps(forward, pad, tile_inputs(inputs, c), layers, logits, self.tags)
            for r, row in enumerate(batch.rows):
                for j, index in enumerate(by_target[targets[row]]):
                    out[index] = logps[j * b + r][0] - logps[j * b + r][1]
                if progress is not None:
                    progress(len(by_target[targets[row]]))

        stats = run_batches([list(prompts[i].input_ids) for i in targets], [prompts[i].system_key for i in targets],
                            [first_computed(prompts[i]) for i in targets], max(1, self.batch_tokens // c), pad, model,
                            self._trunk_cache, batch_fn, None, max(1, self.max_batch // c))
        for k in self.token_counts:  # each job's prompt tokens once (the branch runs them from block s on)
            self.token_counts[k] += stats[k] * c
        return out

    def _patched_full(self, prompts: Sequence[Any], clean: Clean, jobs: Sequence[PatchJob], s: int,
                      progress: Optional[Callable[[int], None]]) -> list[float]:
        """`patched` by a full forward of each job's target with each tag appended (both tags' rows patched)."""

        @contextmanager
        def patch(batch: Batch, rows: list[int]) -> Iterator[None]:
            idx_r, idx_c, values = [], [], []
            for r, j in enumerate(rows):
                job = jobs[j]
                src = prompts[job.source]
                base = first_computed(src)
                take = torch.tensor([i - base for i in job.source_positions], dtype=torch.long)
                values.append(clean.resid[job.source][s].index_select(0, take))
                idx_c += [batch.column(r, i) for i in job.target_positions]
                idx_r += [r] * len(job.target_positions)
            rr, cc, vv = torch.tensor(idx_r), torch.tensor(idx_c), torch.cat(values)

            def write(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                h[rr.to(h.device), cc.to(h.device)] = vv.to(h.device, h.dtype)
                return h

            with _stream_hook(self.blocks, s, write):
                yield

        return self._run(prompts, [job.target for job in jobs], patch, progress)
