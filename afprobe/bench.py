"""`afprobe bench`: speed of the engine as ratios against plain Hugging Face, measured in one process.

Every figure compares two variants on the same prompts and the same batches, in the same process,
with the variants interleaved batch by batch (alternating which runs first) so that load from other
processes on a shared machine hits both alike:

- cache_vs_hf: caching without prefix reuse (`backend.read`, all configured layers/sites/positions)
  vs a plain HF forward `model(input_ids, attention_mask)`, tokens/s ratio.
- prefix_speedup: caching with prefix reuse vs without (plus `max_abs_diff` between the two paths).
- steer_vs_generate: `SteeringRunner.generate` (no reuse) vs plain `model.generate`, wall-time ratio.
- steer_prefix_speedup: steered generation with reuse vs without.
- rss_growth_mb: peak RSS of `cache_activations` on 10N prompts minus on N prompts (fresh processes).
- computed_token_fraction: tokens actually run / prompt tokens when caching with reuse.
- probe_sweep_speedup: the probe stage's sweep (`run_sweep` with the config's methods, folds and bootstrap) vs a
  straightforward per-key scikit-learn loop (`afprobe.probes.bench.sklearn_loop`) computing the same AUROCs (main
  families with true and with shuffled labels, each cue family alone, the random direction) on the same synthetic
  features (shaped like the config's cache: layers x sites x positions, d_model, queries x cue families) and the
  same folds, both single-threaded; the sweep also does the bootstrap and the final refits, the loop does not.
  The loop runs on `bench.sweep_ref_keys` keys and its time is scaled to all keys; details also give the ratio
  for the loop's main-family, true-label fits alone.
- trunk_speedup: a 5-alpha + 2-control steering grid at one layer (resid_post of `bench.trunk_layer`, by
  default n_layers // 2: the speedup grows with the layer, as more of the prompt pass lies below it) through
  `SteeringRunner.score_grid` (log-odds + greedy completions) with the shared trunk vs without (each condition its
  own `score`), same prompts and batches, the two interleaved batch by batch in alternating order.
- prefix_limit_fraction: prefix_speedup x computed_token_fraction, i.e. how close prefix reuse comes to its
  token-count limit (1 / computed_token_fraction: the speedup if every computed token cost the same). Details
  also give the flop-count limit (`flop_limit`: a suffix token attends to the whole prefix, which the token count
  leaves out) and the fraction of it reached.
- probe_max_auroc_diff: largest |held-out AUROC difference| between the two over every AUROC cell of the sweep's
  rows (main, shuffled, random, swapped family, generalisation matrix) on the keys the loop ran on.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from afprobe.config import Config, load_config, validate_config
from afprobe.errors import BadInput
from afprobe.log import log

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
NO_REUSE_PROMPTS = 16  # the no-reuse caching path runs every token of every prompt: a subset is enough
STEER_SEPARATION = 5.0
STEER_REUSE_PASSES = 3  # the reuse run is short: repeat it (fresh runner each time) to sample the machine's load
TARGETS = {
    "cache_vs_hf": (">=", 0.9),
    "prefix_speedup": (">=", 3.0),
    "steer_vs_generate": (">=", 0.85),
    "steer_prefix_speedup": (">=", 3.0),
    "rss_growth_mb": ("<=", 200.0),
    "max_abs_diff": ("<", 1e-3),
    "probe_sweep_speedup": (">=", 3.0),
    "probe_max_auroc_diff": ("<=", 0.01),
    "trunk_speedup": (">=", 2.0),
    "prefix_limit_fraction": (">=", 0.9),
}
FIGURES = ("cache_vs_hf", "prefix_speedup", "steer_vs_generate", "steer_prefix_speedup", "rss_growth_mb",
           "computed_token_fraction", "max_abs_diff", "probe_sweep_speedup", "probe_max_auroc_diff",
           "trunk_speedup", "prefix_limit_fraction")


# --------------------------------------------------------------------------------------------- helpers

def _load(config: Optional[str], overrides: Sequence[str]) -> Config:
    if config is None and DEFAULT_CONFIG.is_file():
        config = str(DEFAULT_CONFIG)
    return load_config(config, list(overrides))


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "cuda": torch.cuda.is_available(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "transformers", "nnsight", "transformer-lens", "afprobe")},
    }


def _bar(total: int, desc: str, quiet: bool, unit: str = "prompt"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False)


def _clock() -> float:
    """Wall time, after any queued GPU work has finished (so a timed span includes its kernels)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def _hf_forward(model: Any, inputs: Any, **extra: Any) -> None:
    import torch

    with torch.inference_mode():
        model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **extra)


def bench_prompts(cfg: Config, tokenizer: Any, n: int) -> list[Any]:
    """The first `n` prompts of the scenario's first cue family (what the steer stage runs on)."""
    from afprobe.pipeline import build_prompts_for

    prompts = build_prompts_for(cfg, tokenizer)
    family = cfg.scenario.cue_families[0]
    chosen = [p for p in prompts if p.family == family] or prompts
    return chosen[:n]


# --------------------------------------------------------------------------------------------- caching

class _Reader:
    """The cache stage's per-batch work (pool weights, `backend.read`, copy to CPU), into memory."""

    def __init__(self, backend: Any, prompts: Sequence[Any], cache_cfg: Any) -> None:
        import torch

        from afprobe.activations.cache import resolve_layers

        self.backend, self.prompts, self.positions = backend, prompts, list(cache_cfg.positions)
        layers = resolve_layers(cache_cfg.layers, backend.n_layers)
        self.sites = [(layer, site) for layer in layers for site in cache_cfg.sites]
        self.out = {(layer, site, pos): torch.empty((len(prompts), backend.d_model))
                    for layer, site in self.sites for pos in self.positions}

    def __call__(self, batch: Any) -> None:
        from afprobe.activations.cache import pool_weights, release

        pooled = self.backend.read(batch.inputs, self.sites, pool_weights(batch, self.prompts, self.positions))
        for (layer, site), values in pooled.items():
            for k, pos in enumerate(self.positions):
                self.out[(layer, site, pos)][batch.rows] = values[:, k].float().cpu()
        release()


def _collect(backend: Any, prompts: Sequence[Any], cache_cfg: Any, reuse: bool) -> tuple[list[Any], dict, float]:
    """The batches the cache stage forms for `prompts` (with a fresh prefix cache when `reuse`), their
    token counts, and the seconds it took to form them (with reuse, this computes the shared prefix)."""
    from afprobe.activations.batching import PrefixCache, run_batches
    from afprobe.activations.cache import earliest_needed

    batches: list[Any] = []
    t0 = _clock()
    stats = run_batches(
        [p.input_ids for p in prompts], [p.system_key for p in prompts],
        [earliest_needed(p, cache_cfg.positions) for p in prompts], cache_cfg.batch_tokens,
        backend.tokenizer.pad_token_id, backend.model, PrefixCache(backend.model, keep_new=False) if reuse else None,
        batches.append,
    )
    stats["n_batches"] = len(batches)
    return batches, stats, _clock() - t0


def _interleave(queues: dict[str, list[Callable[[], None]]], progress: Optional[Callable[[int], None]] = None) -> None:
    """Run every queued task, always taking the next one from the queue that is least far along, so that
    each variant is spread evenly over the whole measurement (load from other processes hits all alike)."""
    done = {name: 0 for name in queues}
    while True:
        pending = [name for name in queues if done[name] < len(queues[name])]
        if not pending:
            return
        name = min(pending, key=lambda n: (done[n] + 0.5) / len(queues[n]))
        queues[name][done[name]]()
        done[name] += 1
        if progress is not None:
            progress(1)


def _warmup(backend: Any, hf_model: Any, prompts: Sequence[Any], cache_cfg: Any) -> None:
    """One short forward of each kind, so that one-off costs (allocator, thread pools) are not timed."""
    import torch

    from afprobe.activations.batching import make_batch
    from afprobe.activations.devices import input_device

    ids = list(prompts[0].input_ids[-64:])
    device = input_device(hf_model)
    batch = make_batch([0], [ids], backend.tokenizer.pad_token_id, 0, None, device)
    sites = _Reader(backend, prompts[:1], cache_cfg).sites
    backend.read(batch.inputs, sites, torch.ones((1, 1, len(ids)), device=device) / len(ids))
    _hf_forward(hf_model, batch.inputs)


def _cache_round(backend: Any, hf_model: Any, prompts: Sequence[Any], subset: Sequence[Any], cache_cfg: Any,
                 rep: int, repeats: int, quiet: bool) -> dict[str, Any]:
    """One measurement of every caching variant, interleaved: no reuse + both HF forwards on the subset
    (batch by batch, alternating order), reuse on the subset, reuse on all prompts."""
    times = {"cache": 0.0, "hf": 0.0, "hf_last_logit": 0.0, "subset_reuse": 0.0, "full_reuse": 0.0}
    plain_batches, stats, times["cache"] = _collect(backend, subset, cache_cfg, False)
    sub_batches, sub_stats, times["subset_reuse"] = _collect(backend, subset, cache_cfg, True)
    full_batches, full_stats, times["full_reuse"] = _collect(backend, prompts, cache_cfg, True)
    plain, reused, full = (_Reader(backend, subset, cache_cfg), _Reader(backend, subset, cache_cfg),
                           _Reader(backend, prompts, cache_cfg))

    def timed(name: str, fn: Callable[[], None]) -> None:
        t0 = _clock()
        fn()
        times[name] += _clock() - t0

    def no_reuse_task(i: int, batch: Any) -> Callable[[], None]:
        def run() -> None:
            variants = [("cache", lambda: plain(batch)), ("hf", lambda: _hf_forward(hf_model, batch.inputs)),
                        ("hf_last_logit", lambda: _hf_forward(hf_model, batch.inputs, use_cache=False,
                                                               logits_to_keep=1))]
            for name, fn in (variants if (i + rep) % 2 == 0 else variants[::-1]):
                timed(name, fn)
        return run

    queues = {
        "no_reuse": [no_reuse_task(i, b) for i, b in enumerate(plain_batches)],
        "subset_reuse": [lambda b=b: timed("subset_reuse", lambda: reused(b)) for b in sub_batches],
        "full_reuse": [lambda b=b: timed("full_reuse", lambda: full(b)) for b in full_batches],
    }
    bar = _bar(sum(map(len, queues.values())), f"cache: reuse / no reuse / HF ({rep + 1}/{repeats})", quiet, "batch")
    _interleave(queues, bar.update)
    bar.close()
    max_diff = max(float((plain.out[k] - reused.out[k]).abs().max()) for k in plain.out)
    return dict(times, stats=stats, subset_reuse_stats=sub_stats, full_reuse_stats=full_stats, max_diff=max_diff)


def flop_limit(backend: Any, prompts: Sequence[Any], cache_cfg: Any) -> dict[str, Any]:
    """Prefix reuse's speedup limit counting floating-point operations instead of tokens: no-reuse flops / reuse
    flops for the cache stage's work on `prompts` (real tokens only, padding not counted; dense causal attention).

    Per token and block: 2 x the block's parameters (the linear maps) + 4 x heads x head_dim x the keys it attends
    to (scores and weighted values). Without reuse token j of a prompt attends to j keys; with reuse the prefix runs
    once per group and each suffix token attends to the whole prefix plus its own earlier tokens, so attention to
    the prefix is work the token-count limit leaves out."""
    from afprobe.activations.batching import group_prefixes
    from afprobe.activations.cache import earliest_needed, resolve_layers

    config = backend.model.config
    blocks = backend.adapter.blocks(backend.model)
    n_run = max(resolve_layers(cache_cfg.layers, backend.n_layers)) + 1  # the caching path stops there
    linear = 2 * sum(sum(p.numel() for p in blocks[i].parameters()) for i in range(n_run))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_key = 4 * heads * head_dim * n_run

    def causal(n: int, before: int = 0) -> float:  # n tokens after `before` keys: linear + sum of contexts
        return n * linear + per_key * (n * before + n * (n + 1) / 2)

    prefix = group_prefixes([p.input_ids for p in prompts], [p.system_key for p in prompts],
                            [earliest_needed(p, cache_cfg.positions) for p in prompts])
    plain = sum(causal(len(p.input_ids)) for p in prompts)
    reuse = sum(causal(n) for n in prefix.values())  # each group's prefix, run once
    reuse += sum(causal(len(p.input_ids) - prefix[p.system_key], prefix[p.system_key]) for p in prompts)
    return {"flop_limit": plain / reuse, "no_reuse_gflop": plain / 1e9, "reuse_gflop": reuse / 1e9,
            "linear_flops_per_token": linear, "attention_flops_per_key": per_key}


def bench_cache(backend: Any, hf_model: Any, prompts: Sequence[Any], cfg: Config, repeats: int,
                quiet: bool) -> dict[str, Any]:
    from afprobe.activations.cache import tensors_from_os

    subset = list(prompts[: min(NO_REUSE_PROMPTS, len(prompts))])
    with tensors_from_os():  # the allocator setting the cache stage runs with (process-wide: HF forwards too)
        _warmup(backend, hf_model, prompts, cfg.cache)
        rounds = [_cache_round(backend, hf_model, prompts, subset, cfg.cache, rep, repeats, quiet)
                  for rep in range(repeats)]
    max_diff = max(r["max_diff"] for r in rounds)

    tokens = rounds[0]["stats"]["total_tokens"]
    full_tokens = rounds[0]["full_reuse_stats"]["total_tokens"]
    cache_vs_hf = [_ratio(r["hf"], r["cache"]) for r in rounds]  # same tokens: tokens/s ratio = time ratio
    vs_last_logit = [_ratio(r["hf_last_logit"], r["cache"]) for r in rounds]
    # No-reuse time on all prompts, extrapolated from the subset's per-token rate.
    no_reuse_full = [r["cache"] * full_tokens / tokens for r in rounds]
    speedup = [_ratio(n, r["full_reuse"]) for n, r in zip(no_reuse_full, rounds)]
    subset_speedup = [_ratio(r["cache"], r["subset_reuse"]) for r in rounds]
    full = rounds[0]["full_reuse_stats"]
    return {
        "cache_vs_hf": _median(cache_vs_hf),
        "prefix_speedup": _median(speedup),
        "max_abs_diff": max_diff,
        "computed_token_fraction": full["computed_tokens"] / full["total_tokens"],
        "details": {
            "cache_vs_hf": {
                "ratio": _median(cache_vs_hf), "per_repeat": cache_vs_hf,
                "n_prompts": len(subset), "n_batches": rounds[0]["stats"]["n_batches"], "tokens": tokens,
                "cache_s": [r["cache"] for r in rounds], "hf_s": [r["hf"] for r in rounds],
                "cache_tokens_per_s": _median([tokens / r["cache"] for r in rounds]),
                "hf_tokens_per_s": _median([tokens / r["hf"] for r in rounds]),
                "vs_hf_last_logit": {
                    "ratio": _median(vs_last_logit), "per_repeat": vs_last_logit,
                    "hf_last_logit_s": [r["hf_last_logit"] for r in rounds],
                    "hf_last_logit_tokens_per_s": _median([tokens / r["hf_last_logit"] for r in rounds]),
                },
            },
            "prefix_speedup": {
                "ratio": _median(speedup), "per_repeat": speedup,
                "n_prompts_reuse": len(prompts), "n_prompts_no_reuse": len(subset),
                "n_batches_reuse": full["n_batches"],
                "reuse_s": [r["full_reuse"] for r in rounds], "no_reuse_s_extrapolated": no_reuse_full,
                "total_tokens": full["total_tokens"], "computed_tokens_reuse": full["computed_tokens"],
                "reuse_tokens_per_s": _median([full_tokens / r["full_reuse"] for r in rounds]),
                "no_reuse_extrapolated": len(subset) < len(prompts),
                "subset_measured": {
                    "ratio": _median(subset_speedup), "per_repeat": subset_speedup, "n_prompts": len(subset),
                    "reuse_s": [r["subset_reuse"] for r in rounds], "no_reuse_s": [r["cache"] for r in rounds],
                    "computed_tokens_reuse": rounds[0]["subset_reuse_stats"]["computed_tokens"],
                    "total_tokens": tokens,
                },
                "max_abs_diff": max_diff, "max_abs_diff_prompts": len(subset),
            },
        },
    }


# ------------------------------------------------------------------------------------------ generation

def _reuse_plan(prompts: Sequence[Any], budget: int, max_batch: int) -> list[list[int]]:
    """The batches `SteeringRunner` forms with prefix reuse (as `run_batches` plans them)."""
    from afprobe.activations.batching import budget_batches, group_prefixes

    keys = [p.system_key for p in prompts]
    prefix = group_prefixes([p.input_ids for p in prompts], keys, [p.user_span[0] for p in prompts])
    return budget_batches([len(p.input_ids) - prefix[p.system_key] for p in prompts], keys, budget, max_batch)


def bench_steer(backend: Any, hf_model: Any, prompts: Sequence[Any], cfg: Config, repeats: int,
                quiet: bool) -> dict[str, Any]:
    import torch

    from afprobe.activations.backends.base import generation_config
    from afprobe.activations.batching import budget_batches, make_batch
    from afprobe.activations.devices import input_device
    from afprobe.activations.steering import SteeringRunner, SteeringSpec

    n_new = cfg.bench.max_new_tokens
    layer = backend.n_layers // 2
    gen = torch.Generator().manual_seed(cfg.seed)
    unit = torch.randn(backend.d_model, generator=gen)
    unit = unit / unit.norm()
    spec = SteeringSpec("random", unit, STEER_SEPARATION, (layer,), alpha=1.0, mode="same", positions="user")
    budget, max_batch = cfg.cache.batch_tokens, cfg.steering.batch_size
    pad_id = backend.tokenizer.pad_token_id
    plain_config = generation_config(hf_model, backend.tokenizer, stop_at_eos=True, max_new_tokens=n_new,
                                     do_sample=False)
    # The batches each runner forms; a runner given one batch's prompts forms exactly that batch.
    batches = budget_batches([len(p.input_ids) for p in prompts], [p.system_key for p in prompts], budget, max_batch)
    reuse_batches = _reuse_plan(prompts, budget, max_batch)
    prompt_tokens = sum(len(p.input_ids) for p in prompts)

    def plain(sub: list[Any]) -> int:
        batch = make_batch(list(range(len(sub))), [p.input_ids for p in sub], pad_id, 0, None, input_device(hf_model))
        with torch.inference_mode():
            out = hf_model.generate(input_ids=batch.inputs.input_ids, attention_mask=batch.inputs.attention_mask,
                                    generation_config=plain_config)
        return (out.shape[1] - batch.inputs.input_ids.shape[1]) * len(sub)

    runner = SteeringRunner(backend, budget, prefix_reuse=False, max_batch=max_batch)
    runner.generate(prompts[:1], spec, 2)  # warm-up
    rounds = []
    for rep in range(repeats):
        times = {"steered": 0.0, "plain": 0.0, "reuse": 0.0}
        plain_generated = [0]
        texts = {"steered": [""] * len(prompts), "reuse": [""] * len(prompts)}
        # Fresh runners, so that every pass pays for computing the shared prefix.
        reuse_runners = [SteeringRunner(backend, budget, prefix_reuse=True, max_batch=max_batch)
                         for _ in range(STEER_REUSE_PASSES)]

        def steered(rows: list[int], which: str, run: Any) -> None:
            t0 = _clock()
            out = run.generate([prompts[r] for r in rows], spec, n_new)
            times[which] += _clock() - t0
            for r, text in zip(rows, out):
                texts[which][r] = text

        def pair(i: int, rows: list[int]) -> Callable[[], None]:
            def run() -> None:
                def plain_task() -> None:
                    t0 = _clock()
                    plain_generated[0] += plain([prompts[r] for r in rows])
                    times["plain"] += _clock() - t0

                tasks = [lambda: steered(rows, "steered", runner), plain_task]
                for task in (tasks if (i + rep) % 2 == 0 else tasks[::-1]):
                    task()
            return run

        queues = {"no_reuse": [pair(i, rows) for i, rows in enumerate(batches)],
                  "reuse": [lambda rows=rows, run=run: steered(rows, "reuse", run)
                            for run in reuse_runners for rows in reuse_batches]}
        bar = _bar(sum(map(len, queues.values())), f"steer: reuse / no reuse / HF generate ({rep + 1}/{repeats})",
                   quiet, "batch")
        _interleave(queues, bar.update)
        bar.close()
        same = sum(a == b for a, b in zip(texts["steered"], texts["reuse"])) / len(prompts)
        times["reuse"] /= STEER_REUSE_PASSES
        rounds.append(dict(times, plain_generated=plain_generated[0], same=same,
                           reuse_counts=dict(reuse_runners[0].token_counts)))

    steered_generated = n_new * len(prompts)  # EOS never stops the steered run early (truncated afterwards)
    vs_plain = [_ratio(r["plain"], r["steered"]) for r in rounds]
    tok_ratio = [_ratio((prompt_tokens + steered_generated) / r["steered"],
                        (prompt_tokens + r["plain_generated"]) / r["plain"]) for r in rounds]
    speedup = [_ratio(r["steered"], r["reuse"]) for r in rounds]
    counts = rounds[0]["reuse_counts"]
    return {
        "steer_vs_generate": _median(vs_plain),
        "steer_prefix_speedup": _median(speedup),
        "details": {
            "steer_vs_generate": {
                "ratio": _median(vs_plain), "ratio_definition": "plain generate wall time / steered wall time",
                "per_repeat": vs_plain, "tokens_per_s_ratio": _median(tok_ratio),
                "n_prompts": len(prompts), "n_batches": len(batches), "max_new_tokens": n_new,
                "layer": layer, "alpha": 1.0, "separation": STEER_SEPARATION, "positions": "user",
                "prompt_tokens": prompt_tokens, "steered_generated_tokens": steered_generated,
                "plain_generated_tokens": rounds[0]["plain_generated"],
                "steered_s": [r["steered"] for r in rounds], "plain_s": [r["plain"] for r in rounds],
                "steered_tokens_per_s": _median([(prompt_tokens + steered_generated) / r["steered"] for r in rounds]),
                "plain_tokens_per_s": _median([(prompt_tokens + r["plain_generated"]) / r["plain"] for r in rounds]),
            },
            "steer_prefix_speedup": {
                "ratio": _median(speedup), "per_repeat": speedup, "n_prompts": len(prompts),
                "n_batches_reuse": len(reuse_batches), "n_batches_no_reuse": len(batches),
                "no_reuse_s": [r["steered"] for r in rounds], "reuse_s": [r["reuse"] for r in rounds],
                "reuse_passes": STEER_REUSE_PASSES,
                "reuse_total_tokens": counts["total_tokens"], "reuse_computed_tokens": counts["computed_tokens"],
                "same_text_fraction": _median([r["same"] for r in rounds]),
            },
        },
    }


# ------------------------------------------------------------------------------------------------ trunk

TRUNK_ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)
TRUNK_CONTROLS = 2  # random orthogonal directions at the largest alpha


def trunk_grid(unit: Any, layer: int, site: str = "resid_post") -> list[Any]:
    """The 5-alpha + 2-control grid at one layer that `trunk_speedup` runs."""
    from afprobe.activations.steering import SteeringSpec, random_orthogonal

    specs = [SteeringSpec("probe", unit, STEER_SEPARATION, (layer,), a, "same", "user", site) for a in TRUNK_ALPHAS]
    specs += [SteeringSpec("random", random_orthogonal(unit, 100 + k), STEER_SEPARATION, (layer,),
                           max(TRUNK_ALPHAS), "same", "user", site, k) for k in range(TRUNK_CONTROLS)]
    return specs


def trunk_layer(cfg: Config, n_layers: int) -> int:
    """The layer `trunk_speedup` steers at: `bench.trunk_layer`, or the middle layer."""
    layer = cfg.bench.trunk_layer
    if layer is None:
        return n_layers // 2
    if layer >= n_layers:
        raise BadInput(f"bench.trunk_layer {layer} is not a layer of this model (0..{n_layers - 1})")
    return layer


def bench_trunk(backend: Any, prompts: Sequence[Any], cfg: Config, repeats: int, quiet: bool) -> dict[str, Any]:
    """`score_grid` over the grid with the shared trunk vs without (each condition its own `score`), the same
    prompts and batches, interleaved batch by batch in alternating order; fresh runners per repeat (both pay for
    the shared prefix once)."""
    import torch

    from afprobe.activations.scenarios import answer_tags
    from afprobe.activations.steering import SteeringRunner
    from afprobe.activations.trunk import trunk_boundary

    n_new = cfg.bench.max_new_tokens
    layer = trunk_layer(cfg, backend.n_layers)
    gen = torch.Generator().manual_seed(cfg.seed)
    unit = torch.randn(backend.d_model, generator=gen)
    unit = unit / unit.norm()
    specs = trunk_grid(unit, layer)
    accept, reject = answer_tags()
    budget, max_batch = cfg.cache.batch_tokens, cfg.steering.batch_size
    batches = _reuse_plan(prompts, budget, max_batch)
    SteeringRunner(backend, budget, max_batch=max_batch).score_grid(prompts[:1], specs[:2], accept, reject, 2)  # warm-up
    rounds = []
    for rep in range(repeats):
        runners = {"shared": SteeringRunner(backend, budget, max_batch=max_batch, trunk=True),
                   "unshared": SteeringRunner(backend, budget, max_batch=max_batch, trunk=False)}
        times = {name: 0.0 for name in runners}
        outs: dict[str, list] = {name: [None] * len(batches) for name in runners}

        def run(name: str, i: int) -> None:
            t0 = _clock()
            outs[name][i] = runners[name].score_grid([prompts[r] for r in batches[i]], specs, accept, reject, n_new)
            times[name] += _clock() - t0

        def pair(i: int) -> Callable[[], None]:
            def task() -> None:
                order = ["shared", "unshared"] if (i + rep) % 2 == 0 else ["unshared", "shared"]
                for name in order:
                    run(name, i)
            return task

        bar = _bar(len(batches), f"trunk: shared / unshared ({rep + 1}/{repeats})", quiet, "batch")
        _interleave({"pairs": [pair(i) for i in range(len(batches))]}, bar.update)
        bar.close()
        diff, same, n = 0.0, 0, 0
        for a, b in zip(outs["shared"], outs["unshared"]):
            for (ta, oa), (tb, ob) in zip(a, b):
                diff = max([diff, *(abs(x - y) for x, y in zip(oa, ob))])
                same += sum(x == y for x, y in zip(ta, tb))
                n += len(ta)
        rounds.append(dict(times, max_logodds_diff=diff, same_text_fraction=same / n,
                           counts=dict(runners["shared"].token_counts)))
    speedup = [_ratio(r["unshared"], r["shared"]) for r in rounds]
    counts = rounds[0]["counts"]
    return {
        "trunk_speedup": _median(speedup),
        "details": {"trunk_speedup": {
            "ratio": _median(speedup), "per_repeat": speedup, "n_prompts": len(prompts), "n_batches": len(batches),
            "n_conditions": len(specs), "alphas": list(TRUNK_ALPHAS), "n_random": TRUNK_CONTROLS, "layer": layer,
            "site": "resid_post", "trunk_blocks": trunk_boundary((layer,), "resid_post", backend.n_layers),
            "n_layers": backend.n_layers, "max_new_tokens": n_new,
            "shared_s": [r["shared"] for r in rounds], "unshared_s": [r["unshared"] for r in rounds],
            "prompt_pass_block_tokens": {"shared": counts["layer_tokens"], "unshared": counts["layer_tokens_unshared"]},
            "max_logodds_diff": max(r["max_logodds_diff"] for r in rounds),
            "same_text_fraction": min(r["same_text_fraction"] for r in rounds),
            "what": "SteeringRunner.score_grid (log-odds + greedy completions) over 5 alphas + 2 random controls at "
                    "one layer, with the shared trunk and stacked branches vs each condition's own `score` "
                    "(prefix reuse on in both)",
        }},
    }


# --------------------------------------------------------------------------------------------- memory

_RSS_CHILD = "import sys; from afprobe.bench import _rss_child; _rss_child(sys.argv[1], int(sys.argv[2]))"


def _rss_child(config_json: str, n: int) -> None:
    """In a fresh process: load the model, cache `n` prompts with reuse into a temp dir, print peak RSS."""
    import psutil

    from afprobe.activations.cache import cache_activations
    from afprobe.pipeline import build_prompts_for, load_model_and_backend

    cfg = validate_config(json.loads(Path(config_json).read_text()))
    _, tokenizer, backend, fingerprint = load_model_and_backend(cfg)
    prompts = build_prompts_for(cfg, tokenizer)
    prompts = (prompts * math.ceil(n / len(prompts)))[:n]
    after_load = psutil.Process().memory_info().rss
    rows = max(len(b) for start in range(0, n, cfg.cache.shard_prompts)
               for b in _cache_plan(prompts[start: start + cfg.cache.shard_prompts], cfg.cache))
    with tempfile.TemporaryDirectory(prefix="afprobe-bench-") as tmp:
        t0 = time.perf_counter()
        counts = cache_activations(backend, prompts, cfg.cache.model_copy(update={"prefix_reuse": True}),
                                   Path(tmp) / "activations", fingerprint, show_progress=False)
        seconds = time.perf_counter() - t0
    print(json.dumps({"n_prompts": n, "peak_rss_mb": _peak_rss_mb(), "rss_after_load_mb": after_load / 2**20,
                      "max_batch_rows": rows, "cache_s": seconds, **counts}))


def _cache_plan(prompts: Sequence[Any], cache_cfg: Any) -> list[list[int]]:
    """The batches (row indices) the cache stage forms with prefix reuse, as `run_batches` plans them."""
    from afprobe.activations.batching import budget_batches, group_prefixes
    from afprobe.activations.cache import earliest_needed

    keys = [p.system_key for p in prompts]
    prefix = group_prefixes([p.input_ids for p in prompts], keys,
                            [earliest_needed(p, cache_cfg.positions) for p in prompts])
    return budget_batches([len(p.input_ids) - prefix[p.system_key] for p in prompts], keys, cache_cfg.batch_tokens)


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the current address space; ru_maxrss would also count the
    parent's RSS at fork time (Linux keeps it across exec), which is larger than the child's own peak here."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_children(config_json: Path, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Run one fresh child per size, concurrently (each reports its own peak), and parse their reports."""
    procs = [subprocess.Popen([sys.executable, "-c", _RSS_CHILD, str(config_json), str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT)) for n in sizes]
    reports = []
    for n, proc in zip(sizes, procs):
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"bench RSS subprocess for {n} prompts failed (exit {proc.returncode}):\n{tail}")
        reports.append(json.loads(lines[-1]))
    return reports


def bench_rss(cfg: Config, quiet: bool) -> dict[str, Any]:
    n = cfg.bench.rss_n
    with tempfile.TemporaryDirectory(prefix="afprobe-bench-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg.model_dump(mode="json")))
        if not quiet:
            log.info(f"rss: caching {n} and {10 * n} prompts in two fresh processes ...")
        small, large = _rss_children(path, [n, 10 * n])
    return {
        "rss_growth_mb": large["peak_rss_mb"] - small["peak_rss_mb"],
        "details": {"rss_growth_mb": {"value": large["peak_rss_mb"] - small["peak_rss_mb"], "small": small,
                                      "large": large, "method": "peak RSS (VmHWM) of a fresh `python -c` process "
                                      "that loads the model and runs cache_activations (prefix reuse on) into a temp "
                                      "dir; the two processes run concurrently"}},
    }


# ------------------------------------------------------------------------------------------ probe sweep

def _spread(n: int, k: int) -> list[int]:
    """`k` indices spread evenly over range(n), ends included (all of them when k is 0 or >= n)."""
    if k <= 0 or k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def sweep_shape(cfg: Config, n_layers: int, d_model: int) -> dict[str, Any]:
    """The shape of the probe stage's input for this config and model (what the synthetic features copy)."""
    from afprobe.activations.cache import resolve_layers
    from afprobe.activations.queries import load_queries
    from afprobe.pipeline import control_families

    n_queries = cfg.bench.sweep_queries or len(load_queries(cfg.queries, cfg.seed))
    if n_queries < cfg.probes.folds:
        raise BadInput(f"the probe-sweep benchmark needs at least probes.folds={cfg.probes.folds} queries, got "
                       f"{n_queries}; raise queries.limit or set bench.sweep_queries")
    return {"layers": resolve_layers(cfg.cache.layers, n_layers), "sites": list(cfg.cache.sites),
            "positions": list(cfg.cache.positions), "d": d_model, "n_queries": n_queries,
            "families": list(cfg.scenario.cue_families), "methods": list(cfg.probes.methods),
            "controls": control_families(cfg),
            "folds": cfg.probes.folds, "bootstrap": cfg.probes.bootstrap, "ci": cfg.probes.ci, "seed": cfg.seed}


def _synthetic_sweep_data(shape: dict[str, Any]) -> tuple[dict, Any, Any, Any]:
    """Synthetic features keyed like the cache stage's store ((layer, site, position), layer-major), with labels,
    query groups and families laid out as the cache stage lays out prompts (query x family x condition)."""
    from afprobe.probes.bench import synthetic_features

    layers, n_layers = shape["layers"], len(shape["layers"])
    per_site = {}
    for s, site in enumerate(shape["sites"]):
        data = synthetic_features(shape["n_queries"], n_layers, shape["d"], n_layers // 2, seed=shape["seed"] + s,
                                  positions=tuple(shape["positions"]), site=site, families=tuple(shape["families"]))
        per_site[site] = data
    features = {(layer, site, pos): per_site[site].features[(i, site, pos)]
                for i, layer in enumerate(layers) for site in shape["sites"] for pos in shape["positions"]}
    first = per_site[shape["sites"][0]]
    return features, first.labels, first.groups, first.families


def bench_probe_sweep(shape: dict[str, Any], ref_keys: int, quiet: bool) -> dict[str, Any]:
    """Time `run_sweep` (as the probe stage calls it) against the per-key scikit-learn loop on the same data,
    both computing the same AUROCs (main, shuffled and random controls, swapped family, generalisation matrix)."""
    import numpy as np
    import sklearn.discriminant_analysis  # noqa: F401  (imported before the thread limit below: importing
    import sklearn.linear_model  # noqa: F401  scikit-learn loads SciPy's own BLAS, which must be limited too)
    from threadpoolctl import threadpool_limits

    from afprobe.probes.bench import LABEL_SETS, auroc_diffs, cell_kind, diff_summary, sklearn_loop, with_reference
    from afprobe.probes.sweep import main_family_mask, run_sweep

    features, labels, groups, families = _synthetic_sweep_data(shape)
    keys = list(features)
    methods = tuple(shape["methods"])
    checked = with_reference(methods)  # the scikit-learn loop checks the methods registered with a reference
    if set(checked) != set(methods):
        log.warning(f"probe sweep: no reference for {sorted(set(methods) - set(checked))}; the scikit-learn loop "
                    "skips them (timed in the sweep, not checked)")
    controls = list(shape["controls"])  # the probe stage's control families
    sweep_kw = dict(methods=methods, folds=shape["folds"], n_boot=shape["bootstrap"], ci=shape["ci"],
                    seed=shape["seed"], control_families=controls)

    def sweep(feats: dict) -> tuple[Any, float]:
        t0 = _clock()
        res = run_sweep(feats, labels, groups, families, **sweep_kw)
        return res, _clock() - t0

    def loop(feats: dict) -> tuple[Any, float]:
        t0 = _clock()
        with threadpool_limits(limits=1):  # run_sweep is single-threaded: like for like
            ref = sklearn_loop(feats, labels, groups, families, shape["folds"], shape["seed"], methods=checked,
                               control_families=controls)
        return ref, _clock() - t0

    # Warm-up on a thin slice of one key, so that one-off costs (lazy imports, thread pools) are timed for neither.
    thin = {keys[0]: np.ascontiguousarray(features[keys[0]][:, :8])}
    sweep(thin)
    loop(thin)
    chosen = [keys[i] for i in _spread(len(keys), ref_keys)]
    if not quiet:
        log.info(f"probe sweep: run_sweep on {len(keys)} keys x {len(methods)} methods ({len(labels)} rows, "
                 f"d {shape['d']}); scikit-learn loop on {len(chosen)} keys ...")
    result, sweep_s = sweep(features)
    ref, loop_s = loop({k: features[k] for k in chosen})
    subset_sweep_s = sweep({k: features[k] for k in chosen})[1] if len(chosen) < len(keys) else sweep_s
    diffs = auroc_diffs(ref.aurocs, result.rows)
    max_diff = max(diffs.values())
    scale = len(keys) / len(chosen)  # the loop's time per key, scaled to all keys
    loop_all_s, main_all_s = loop_s * scale, ref.seconds["main"] * scale
    speedup = _ratio(loop_all_s, sweep_s)
    summary = diff_summary(diffs)
    n_main = int(main_family_mask(families, controls).sum())
    return {
        "probe_sweep_speedup": speedup,
        "probe_max_auroc_diff": max_diff,
        "details": {
            "probe_sweep_speedup": {
                "ratio": speedup, "sweep_s": sweep_s, "sklearn_loop_s_extrapolated": loop_all_s,
                "sklearn_loop_s_measured": loop_s, "n_keys": len(keys), "n_keys_sklearn_loop": len(chosen),
                "sklearn_loop_keys": [list(k) for k in chosen],
                "sweep_s_per_key": sweep_s / len(keys), "sklearn_loop_s_per_key": loop_s / len(chosen),
                "sklearn_loop_s_measured_by_part": {p: ref.seconds[p] for p in LABEL_SETS},
                "main_only": {"ratio": _ratio(main_all_s, sweep_s), "sklearn_loop_s_extrapolated": main_all_s,
                              "sklearn_loop_s_measured": ref.seconds["main"],
                              "what": "the loop's main-family, true-label fits alone against the whole sweep "
                                      "(the comparison before the loop computed the controls and the matrix)"},
                "subset_measured": {"ratio": _ratio(loop_s, subset_sweep_s), "sweep_s": subset_sweep_s,
                                    "sklearn_loop_s": loop_s, "n_keys": len(chosen)},
                "computes": "both: per key, outer fold and method, fits on the main families with true and with "
                            "shuffled labels and on each cue family alone, plus the seeded random direction, "
                            "scoring every held-out row; the sweep also computes the bootstrap CIs and the final "
                            "refits, which the loop does not, so the ratio is conservative",
                "data": "synthetic (afprobe.probes.bench.synthetic_features): the sweep takes arrays only",
                "n_rows": len(labels), "n_main_rows": n_main,
                "shape": {k: v for k, v in shape.items() if k != "layers"},
                "n_layers": len(shape["layers"]), "threads": {"run_sweep": 1, "sklearn_loop_blas": 1},
            },
            "probe_max_auroc_diff": {
                "value": max_diff, "n_compared": len(diffs),
                "unchecked_methods": sorted(set(methods) - set(checked)),  # registered without a reference
                "per_method": {m: max(s["max"] for s in kinds.values()) for m, kinds in summary["per_method"].items()},
                "per_kind": summary["per_kind"], "per_method_kind": summary["per_method"],
                "kinds": "main: main -> main rows; shuffled: shuffled labels, main rows; random: random direction, "
                         "main rows; swapped: main -> swapped family; family: each cue family -> each family",
                "mean_auroc_sklearn": float(np.mean([v for c, v in ref.aurocs.items() if cell_kind(c) == "main"])),
            },
        },
    }


# ------------------------------------------------------------------------------------------------ main

def _passes(name: str, value: float) -> Optional[bool]:
    if name not in TARGETS or not math.isfinite(value):
        return None
    op, target = TARGETS[name]
    return {">=": value >= target, "<=": value <= target, "<": value < target}[op]


def format_table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"afprobe bench: {results['model']} via {results['backend']} on {results['device']}, "
        f"{m['usable_cores']} cores ({m['torch_threads']} torch threads), {results['elapsed_s']:.0f} s",
        f"{'figure':<24} {'value':>10}  {'target':<9} ok",
    ]
    for name in FIGURES:
        value = results[name]
        op, target = TARGETS.get(name, ("", None))
        ok = results["pass"].get(name)
        shown = {"max_abs_diff": f"{value:.2e}", "probe_max_auroc_diff": f"{value:.4f}"}.get(name, f"{value:.2f}")
        tgt = f"{op} {target:g}" if target is not None else "-"
        lines.append(f"{name:<24} {shown:>10}  {tgt:<9} {'-' if ok is None else ('yes' if ok else 'NO')}")
    d = results["details"]
    lines.append(
        f"cache tok/s: no reuse {d['cache_vs_hf']['cache_tokens_per_s']:.0f}, HF forward "
        f"{d['cache_vs_hf']['hf_tokens_per_s']:.0f}, reuse {d['prefix_speedup']['reuse_tokens_per_s']:.0f} "
        f"(prompt tokens/s); steered {d['steer_vs_generate']['steered_tokens_per_s']:.0f} vs generate "
        f"{d['steer_vs_generate']['plain_tokens_per_s']:.0f} tok/s"
    )
    pl = d["prefix_limit_fraction"]
    lines.append(
        f"prefix reuse limits: {pl['token_count_limit']:.2f}x counting tokens, {pl['flop_count']['flop_limit']:.2f}x "
        f"counting flops (attention to the prefix included); prefix_speedup reaches "
        f"{pl['flop_count']['fraction_reached']:.2f} of the second"
    )
    ps = d["probe_sweep_speedup"]
    lines.append(
        f"probe sweep: {ps['sweep_s']:.1f} s for {ps['n_keys']} keys x {len(ps['shape']['methods'])} methods "
        f"({ps['n_rows']} rows, d {ps['shape']['d']}, bootstrap {ps['shape']['bootstrap']}) vs scikit-learn loop "
        f"{ps['sklearn_loop_s_extrapolated']:.1f} s (measured {ps['sklearn_loop_s_measured']:.1f} s on "
        f"{ps['n_keys_sklearn_loop']} keys), same AUROCs; main-family fits alone {ps['main_only']['ratio']:.2f}x"
    )
    return "\n".join(lines)


def run_bench(config: Optional[str], overrides: Sequence[str] = (), json_path: Optional[str] = None,
              quiet: bool = False) -> dict[str, Any]:
    """Measure every figure, print a table, and write `json_path` (atomically) when given."""
    import torch

    from afprobe.activations.devices import input_device
    from afprobe.fsio import atomic_write_json
    from afprobe.pipeline import load_model_and_backend

    cfg = _load(config, overrides)
    bc = cfg.bench
    start = _clock()
    machine = machine_info()
    model, tokenizer, backend, _ = load_model_and_backend(cfg)
    hf_model = model
    notes = []
    if backend.name != "nnsight":
        # TransformerLens rewires the HF modules in place (eager attention): baseline on a fresh plain copy.
        from afprobe.activations.loading import load_model

        hf_model, _ = load_model(**cfg.model.load_kwargs())
        notes.append("the HF baselines run on a separately loaded plain model (the TransformerLens bridge "
                     "rewires its own copy in place)")
    prompts = bench_prompts(cfg, tokenizer, max(bc.n_prompts, bc.n_generate))
    if not prompts:
        raise BadInput("the config builds no prompts to benchmark")
    cache_prompts, gen_prompts = prompts[: bc.n_prompts], prompts[: bc.n_generate]
    if len(cache_prompts) < bc.n_prompts or len(gen_prompts) < bc.n_generate:
        notes.append(f"the config builds only {len(prompts)} prompts of family {cfg.scenario.cue_families[0]}; "
                     "raise queries.limit for the requested sizes")

    shape = sweep_shape(cfg, backend.n_layers, backend.d_model)  # checked before the long measurements
    trunk_layer(cfg, backend.n_layers)

    phases = {"load_and_prompts": _clock() - start}
    t0 = _clock()
    cache = bench_cache(backend, hf_model, cache_prompts, cfg, bc.repeats, quiet)
    phases["cache"], t0 = _clock() - t0, _clock()
    steer = bench_steer(backend, hf_model, gen_prompts, cfg, bc.repeats, quiet)
    phases["steer"], t0 = _clock() - t0, _clock()
    trunk = bench_trunk(backend, gen_prompts, cfg, bc.repeats, quiet)
    phases["trunk"], t0 = _clock() - t0, _clock()
    rss = bench_rss(cfg, quiet)
    phases["rss"], t0 = _clock() - t0, _clock()
    probe = bench_probe_sweep(shape, bc.sweep_ref_keys, quiet)
    phases["probe_sweep"] = _clock() - t0
    details = {**cache.pop("details"), **steer.pop("details"), **trunk.pop("details"), **rss.pop("details"),
               **probe.pop("details")}
    pd = details["prefix_speedup"]
    if pd["no_reuse_extrapolated"]:
        notes.append(
            f"prefix_speedup: the no-reuse time for {pd['n_prompts_reuse']} prompts is extrapolated from the "
            f"per-token rate of the no-reuse path measured on {pd['n_prompts_no_reuse']} of them "
            f"(subset_measured holds the directly measured speedup on those {pd['n_prompts_no_reuse']})")
    notes.append("every ratio compares variants measured in this process on the same prompts, interleaved: "
                 "cache_vs_hf and steer_vs_generate run both variants on each identical batch in alternating "
                 "order; the reuse runs' batches are spread evenly between them; reuse times include computing "
                 "the shared prefix; steered generation with reuse is run "
                 f"{STEER_REUSE_PASSES} times per repeat (fresh prefix each time) and its mean time used")
    rd = details["rss_growth_mb"]
    notes.append(f"rss_growth_mb: the largest batch has {rd['small']['max_batch_rows']} rows for "
                 f"{rd['small']['n_prompts']} prompts and {rd['large']['max_batch_rows']} for "
                 f"{rd['large']['n_prompts']}; peak memory follows the batch shape (rows x prefix+suffix "
                 "attention), so growth beyond that shape difference is what accumulates with the prompt count")
    notes.append("cache_vs_hf: the HF forward computes logits for every token; the caching path stops after the "
                 "last cached layer. details.cache_vs_hf.vs_hf_last_logit compares against an HF forward that "
                 "computes only the last token's logits (use_cache=False, logits_to_keep=1)")
    ps = details["probe_sweep_speedup"]
    notes.append(
        "probe_sweep_speedup: the sweep takes arrays only, so it runs on synthetic features with a planted direction, "
        f"shaped like this config's cache ({ps['n_keys']} layer/site/position keys, {ps['n_rows']} rows = "
        f"{shape['n_queries']} queries x {len(shape['families'])} cue families x 2 conditions, d {shape['d']}); "
        "timed: the whole run_sweep call as the probe stage makes it (methods, folds, bootstrap, controls, "
        "generalisation matrix, refits) against a per-key scikit-learn loop that computes the same held-out AUROCs "
        "(main families with true and shuffled labels, each cue family alone, the random direction) on the same "
        "outer and inner folds but no bootstrap or refits, both single-threaded; "
        + (f"the loop ran on {ps['n_keys_sklearn_loop']} keys spread over all {ps['n_keys']} and its time is scaled "
           f"per key to all of them (subset_measured: run_sweep on the same {ps['n_keys_sklearn_loop']} keys); "
           if ps["n_keys_sklearn_loop"] < ps["n_keys"] else "the loop ran on every key; ")
        + f"main_only: the loop's main-family, true-label fits alone give {ps['main_only']['ratio']:.2f}x; "
        + "probe_max_auroc_diff is over every AUROC cell of the sweep's rows on the keys the loop ran on "
        f"({details['probe_max_auroc_diff']['n_compared']} cells, every method; per_kind breaks them down)")
    if bc.repeats > 1:
        notes.append(f"{bc.repeats} repeats: each caching and generation figure is the median of the per-repeat "
                     "ratios (the probe sweep and the RSS check run once)")

    results: dict[str, Any] = {**cache, **steer, **trunk, **rss, **probe}
    results["prefix_limit_fraction"] = results["prefix_speedup"] * results["computed_token_fraction"]
    flops = flop_limit(backend, cache_prompts, cfg.cache)
    details["prefix_limit_fraction"] = {
        "value": results["prefix_limit_fraction"], "prefix_speedup": results["prefix_speedup"],
        "computed_token_fraction": results["computed_token_fraction"],
        "token_count_limit": 1 / results["computed_token_fraction"],
        "flop_count": {**flops, "fraction_reached": results["prefix_speedup"] / flops["flop_limit"]}}
    notes.append(
        f"prefix_limit_fraction: the token-count limit {1 / results['computed_token_fraction']:.2f}x counts every "
        f"computed token alike, but with reuse each suffix token attends to the whole shared prefix; counting "
        f"flops (linear maps + dense attention, padding excluded) the limit is {flops['flop_limit']:.2f}x and "
        f"prefix_speedup reaches {details['prefix_limit_fraction']['flop_count']['fraction_reached']:.2f} of it "
        "(details.prefix_limit_fraction.flop_count)")
    td = details["trunk_speedup"]
    bt = td["prompt_pass_block_tokens"]
    notes.append(f"trunk_speedup: {td['n_conditions']} conditions at layer {td['layer']} of {td['n_layers']} "
                 f"(the trunk covers blocks 0..{td['trunk_blocks'] - 1}); the prompt pass from block "
                 f"{td['trunk_blocks']} on, the answer-tag continuations and decoding stay per condition, so the "
                 "ratio is bounded by the share of work below the steered layer (block x token products of the "
                 f"prompt passes, unshared / shared: {bt['unshared'] / bt['shared']:.2f}); shared and unshared outputs "
                 f"agree (max log-odds diff {td['max_logodds_diff']:.1e}, same text {td['same_text_fraction']:.2f})")
    results = {k: float(results[k]) for k in FIGURES}
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results.update(
        targets={k: f"{op} {t:g}" for k, (op, t) in TARGETS.items()},
        model=cfg.model.spec, backend=backend.name, device=str(input_device(model)), dtype=cfg.model.dtype,
        attn_implementation=getattr(hf_model.config, "_attn_implementation", None),
        settings={"bench": bc.model_dump(), "batch_tokens": cfg.cache.batch_tokens,
                  "steer_batch_size": cfg.steering.batch_size, "layers": cfg.cache.layers,
                  "sites": cfg.cache.sites, "positions": cfg.cache.positions,
                  "family": cfg.scenario.cue_families[0]},
        prompts={"n_cache": len(cache_prompts), "n_cache_no_reuse": pd["n_prompts_no_reuse"],
                 "n_generate": len(gen_prompts),
                 "mean_tokens": sum(len(p.input_ids) for p in cache_prompts) / len(cache_prompts),
                 "mean_user_tokens": sum(len(p.input_ids) - p.user_span[0] for p in cache_prompts) / len(cache_prompts),
                 "rss_n": bc.rss_n},
        machine=machine, details=details, notes=notes, phases_s=phases, elapsed_s=_clock() - start,
    )
    results["pass"] = {k: _passes(k, results[k]) for k in FIGURES}
    results["torch_threads"] = torch.get_num_threads()
    print(format_table(results), flush=True)
    if json_path is not None:
        atomic_write_json(json_path, results)
    return results
