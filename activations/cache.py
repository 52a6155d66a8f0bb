"""The cache stage: residual activations of every prompt at the requested layers, sites, positions."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from afprobe.activations.backends import Backend
from afprobe.activations.batching import Batch, PrefixCache, run_batches
from afprobe.activations.store import FeatureKey, StoreWriter
from afprobe.config import CacheConfig
from afprobe.errors import BadInput


def resolve_layers(layers: Any, n_layers: int) -> list[int]:
    if layers == "all":
        return list(range(n_layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise BadInput(f"layer {bad[0]} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
    if not layers:
        raise BadInput("cache.layers is empty")
    return sorted(set(layers))


def position_spans(prompt: Any, positions: Sequence[str]) -> list[tuple[int, int]]:
    """Token [start, end) spans averaged for each requested position of one prompt."""
    n = len(prompt.input_ids)
    spans = {"last": (n - 1, n), "cue": tuple(prompt.cue_span), "user_mean": tuple(prompt.user_span)}
    return [spans[p] for p in positions]


def earliest_needed(prompt: Any, positions: Sequence[str]) -> int:
    return min(start for start, _ in position_spans(prompt, positions))


def pool_weights(batch: Batch, prompts: Sequence[Any], positions: Sequence[str]) -> torch.Tensor:
    """[b, k, t] averaging weights: row k of prompt r averages that position's tokens."""
    b, t = batch.inputs.input_ids.shape
    weights = torch.zeros((b, len(positions), t))
    for r, row in enumerate(batch.rows):
        for k, (start, end) in enumerate(position_spans(prompts[row], positions)):
            weights[r, k, batch.column(r, start): batch.column(r, end)] = 1.0 / (end - start)
    return weights.to(batch.inputs.input_ids.device)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.lru_cache(maxsize=1)
def _glibc_mallopt() -> Optional[Callable[[int, int], int]]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None


@contextlib.contextmanager
def tensors_from_os() -> Iterator[None]:
    """glibc only: meanwhile, allocate blocks of 1 MiB and more (tensors) straight from the OS, so that freeing
    one returns it at once. By default glibc raises this threshold (up to 32 MiB) whenever such a block is
    freed; a forward's layer-sized tensors then come from its heaps, which fragment: the peak RSS of one and
    the same batch varied by ~300 MB and crept up batch after batch. Costs a few % of a CPU forward (fresh pages).
    Afterwards the threshold stays fixed at 32 MiB, where glibc's dynamic one ends up. Process-wide."""
    mallopt = _glibc_mallopt()
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def release() -> None:
    """Free a finished batch's memory now. A traced forward ends in reference cycles (nnsight stops the trace by
    raising; the traceback keeps the forward's frames and their tensors alive), which would otherwise last
    until the garbage collector next runs, often after the next batch has reached its peak."""
    gc.collect(1)  # the cycles are young; a full collection would cost ~0.2 s with a model's objects loaded


def read_pooled(
    backend: Backend,
    prompts: Sequence[Any],
    sites: list[tuple[int, str]],
    positions: Sequence[str],
    batch_tokens: int,
    prefix_cache: Optional[PrefixCache],
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[dict[FeatureKey, torch.Tensor], dict[str, int]]:
    """Pooled residuals of `prompts`: {(layer, site, position): [n, d_model] float32}, plus token counts."""
    from afprobe.activations.remote import is_remote, read_pooled_remote

    if is_remote(backend):  # pooled on the server, many prompts per job, no prefix reuse
        return read_pooled_remote(backend, prompts, sites, positions, batch_tokens, progress)
    out = {(layer, site, pos): torch.empty((len(prompts), backend.d_model)) for layer, site in sites for pos in positions}

    def run(batch: Batch) -> None:
        pooled = backend.read(batch.inputs, sites, pool_weights(batch, prompts, positions))
        for (layer, site), values in pooled.items():
            for k, pos in enumerate(positions):
                out[(layer, site, pos)][batch.rows] = values[:, k].float().cpu()
        release()

    stats = run_batches(
        [p.input_ids for p in prompts], [p.system_key for p in prompts],
        [earliest_needed(p, positions) for p in prompts], batch_tokens, backend.tokenizer.pad_token_id,
        backend.model, prefix_cache, run, progress=progress,
    )
    return out, stats


def cache_activations(
    backend: Backend,
    prompts: Sequence[Any],
    cfg: CacheConfig,
    folder: Path,
    fingerprint: str,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write the store for `prompts` (resuming after the last complete shard); returns token counts."""
    layers = resolve_layers(cfg.layers, backend.n_layers)
    sites = [(layer, site) for layer in layers for site in cfg.sites]
    keys: list[FeatureKey] = [(layer, site, pos) for layer, site in sites for pos in cfg.positions]
    writer = StoreWriter(folder, keys, backend.d_model, cfg.dtype, len(prompts), cfg.shard_prompts, fingerprint)
    start = writer.resume_from
    prefix_cache = PrefixCache(backend.model, keep_new=False) if cfg.prefix_reuse else None
    counts = {"total_tokens": 0, "computed_tokens": 0, "resumed_at": start}
    bar = tqdm(total=len(prompts), initial=start, desc="cache", unit="prompt", disable=not show_progress)
    with tensors_from_os():
        while start < len(prompts):
            chunk = list(prompts[start: start + cfg.shard_prompts])
            out, stats = read_pooled(backend, chunk, sites, cfg.positions, cfg.batch_tokens, prefix_cache,
                                     bar.update)
            counts["total_tokens"] += stats["total_tokens"]
            counts["computed_tokens"] += stats["computed_tokens"]
            writer.write_shard(start, out)
            start += len(chunk)
    bar.close()
    return counts
