"""The refusal direction, computed once per steer stage: harmful minus benign mean activation at every cached
(layer, site, position), on the first cue family's prompts under both cues.

Harmful activations are read from the activation store (the steering fit queries, at most
`steering.refusal_queries`); benign ones are read from the model here (the bundled or configured benign
requests, as many queries, same family and cues), since the cache holds harmful requests only. The vectors
feed the known-answer check, `steering.direction: refusal` (and the projected-out variants), and the cosine
with the training-awareness direction per layer (summary.json `refusal`, files in steering/refusal/).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from afprobe.config import Config

FeatureKey = tuple[int, str, str]
N_RANDOM = 2000  # random directions in the |cosine| baseline
BASELINE = ("|cosine| of the awareness direction with {n} seeded Gaussian random directions in d = {d} "
            "dimensions (by symmetry: two random unit vectors; 95th percentile near 1.96/sqrt(d) = {q:.3f})")


@dataclass
class RefusalData:
    """Harmful [n, d] and benign [m, d] activations per cached key, with each row's query id."""

    harmful: dict[FeatureKey, np.ndarray]
    benign: dict[FeatureKey, np.ndarray]
    harmful_groups: np.ndarray  # [n]
    benign_groups: np.ndarray  # [m]
    family: str

    def diff(self, key: FeatureKey) -> np.ndarray:
        """The refusal vector [d] (harmful minus benign mean, unnormalised) at `key`."""
        from afprobe.probes.refusal import mean_difference

        return mean_difference(self.harmful[key], self.benign[key])


def compute_refusal(cfg: Config, backend: Any, store: Any, fit_queries: Sequence[str]) -> RefusalData:
    """Harmful rows from the store (first cue family, both cues, the first `steering.refusal_queries` fit
    queries) and benign rows read from the model for as many benign queries, at every cached key."""
    from afprobe.activations.batching import PrefixCache
    from afprobe.activations.cache import read_pooled
    from afprobe.pipeline import build_prompts_for

    family = cfg.scenario.cue_families[0]
    use = list(dict.fromkeys(fit_queries))[: cfg.steering.refusal_queries]
    groups, families = store.column("query_id"), store.column("family")
    rows = np.isin(groups, use) & (families == family)
    benign_prompts = [p for p in build_prompts_for(cfg, backend.tokenizer, harmful=False) if p.family == family]
    keep = set(list(dict.fromkeys(p.query_id for p in benign_prompts))[: len(use)])
    benign_prompts = [p for p in benign_prompts if p.query_id in keep]
    sites = list(dict.fromkeys((k[0], k[1]) for k in store.keys))
    positions = list(dict.fromkeys(k[2] for k in store.keys))
    shared = PrefixCache(backend.model, keep_new=False) if cfg.cache.prefix_reuse else None  # one system prompt
    pooled = read_pooled(backend, benign_prompts, sites, positions, cfg.cache.batch_tokens, shared)[0]
    return RefusalData(harmful={k: store.array(k)[rows] for k in store.keys},
                       benign={k: pooled[k].numpy() for k in store.keys}, harmful_groups=groups[rows],
                       benign_groups=np.array([p.query_id for p in benign_prompts]), family=family)


def refusal_summary(cfg: Config, run_path: Path, data: RefusalData) -> dict[str, Any]:
    """summary.json's `refusal` section: per layer with a saved probe direction, the cosine with the refusal
    direction at the probe's site and position; writes steering/refusal/layer<L>.safetensors."""
    from afprobe.analysis.verdicts import overlap_verdict
    from afprobe.probes.directions import load_direction, save_direction
    from afprobe.probes.refusal import alignment, unit

    folder = run_path / "probes" / "directions"
    best = load_direction(folder / "best.safetensors")[1]
    site, position = best["site"], best["position"]
    layers, d = [], 0
    for key in sorted(k for k in data.harmful if k[1:] == (site, position)):
        path = folder / f"layer{key[0]}.safetensors"
        if not path.is_file():
            continue
        awareness = np.asarray(load_direction(path)[0], np.float64)
        diff = data.diff(key)
        d, separation = diff.shape[0], float(np.linalg.norm(diff))
        save_direction(run_path / "steering" / "refusal" / f"layer{key[0]}.safetensors", unit(diff),
                       {"layer": key[0], "site": site, "position": position, "method": "harmful minus benign mean",
                        "separation": separation, "family": data.family})
        cell = alignment(awareness, data.harmful[key], data.benign[key], data.harmful_groups, data.benign_groups,
                         N_RANDOM, cfg.probes.bootstrap, cfg.probes.ci, cfg.seed, layer=key[0])
        layers.append({"layer": key[0], **cell, "refusal_separation": separation,
                       "verdict": overlap_verdict(cell["p_random"])})
    return {"site": site, "position": position, "family": data.family,
            "n_harmful_queries": len(set(data.harmful_groups.tolist())),
            "n_benign_queries": len(set(data.benign_groups.tolist())), "best_layer": int(best["layer"]),
            "n_random": N_RANDOM, "n_boot": cfg.probes.bootstrap,
            "baseline": BASELINE.format(n=N_RANDOM, d=d, q=1.96 / np.sqrt(max(d, 1))), "layers": layers}


def refusal_for(data: Optional[RefusalData], key: FeatureKey) -> tuple[np.ndarray, float]:
    """(unit refusal direction [d] float32, harmful-minus-benign separation along it) at `key`."""
    from afprobe.probes.refusal import unit

    if data is None or key not in data.harmful:
        raise KeyError(key)
    diff = data.diff(key)
    return unit(diff).astype(np.float32), float(np.linalg.norm(diff))
