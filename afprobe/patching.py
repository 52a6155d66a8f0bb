"""`afprobe patch RUN`: activation patching between the training-cue and deployment-cue prompts of each query.

For each query q of the patched cue family (the first configured one unless --family): denoise = the training
prompt's residual written into the deployment prompt's run, noise = the reverse; control "other_query" takes the
source from the next query (cyclically) with the same cue as the *target* (so it carries no cue information, only
another query's activations), written at the aligned positions
(`activations.patching.align`). Every (stream index, job) runs once; resid_post at L is resid_pre at L + 1 (one
tensor), so the two sites share their runs. The recovered fraction is measured against the query's own clean gap
(`probes.patching.recovered_fraction`). Writes RUN/patching/results.csv and the summary's `patching` section.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from afprobe.errors import BadInput
from afprobe.log import log
from afprobe.rundir import RunDir, writes_run

DIRECTIONS = {"denoise": ("training", "deployment"), "noise": ("deployment", "training")}  # (source, target)
CONTROLS = ("none", "other_query")


def parse_list(text: Optional[str], known: Sequence[str], what: str) -> list[str]:
    if text is None:
        return list(known)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise BadInput(f"--{what}: unknown {', '.join(bad) or '(empty)'} (known: {', '.join(known)})")
    return items


def parse_layers(text: Optional[str], n_layers: int) -> list[int]:
    """'all', or comma-separated layers and ranges (e.g. 0-5,10)."""
    if text is None or text == "all":
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise BadInput(f"--layers: expected 'all' or numbers and ranges like 0-5,10, got {text!r}") from None
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise BadInput(f"--layers: {bad} outside the model's {n_layers} layers")
    return sorted(set(out))


def _pairs(prompts: list[Any], family: str, n_queries: Optional[int]) -> list[tuple[int, int]]:
    """(training index, deployment index) per query of `family`, in prompt order, at most n_queries."""
    by_query: dict[str, dict[str, int]] = {}
    for i, p in enumerate(prompts):
        if p.family == family:
            by_query.setdefault(p.query_id, {})[p.condition] = i
    pairs = [(c["training"], c["deployment"]) for c in by_query.values() if len(c) == 2]
    if n_queries is not None:
        if n_queries < 2:
            raise BadInput("--n-queries must be at least 2 (the other-query control needs a second query)")
        pairs = pairs[:n_queries]
    if len(pairs) < 2:
        raise BadInput(f"patching needs at least 2 queries of family '{family}' (found {len(pairs)})")
    return pairs


def build_jobs(prompts: list[Any], pairs: list[tuple[int, int]], positions: Sequence[str]) -> tuple[list, list, dict]:
    """Patch jobs and their keys ((direction, control, positions, query index)); skipped counts per positions set."""
    from afprobe.activations.patching import PatchJob, align

    jobs, keys, skipped = [], [], {pos: 0 for pos in positions}
    for q, pair in enumerate(pairs):
        cond = dict(zip(("training", "deployment"), pair))
        other = dict(zip(("training", "deployment"), pairs[(q + 1) % len(pairs)]))
        for direction, (src, tgt) in DIRECTIONS.items():
            for control in CONTROLS:
                source = cond[src] if control == "none" else other[tgt]  # control: the target's own cue
                for pos in positions:
                    aligned = align(prompts[source], prompts[cond[tgt]], pos)
                    if aligned is None:
                        skipped[pos] += 1
                        continue
                    jobs.append(PatchJob(cond[tgt], source, tuple(aligned[0]), tuple(aligned[1])))
                    keys.append((direction, control, pos, q))
    return jobs, keys, skipped


def patch_rows(layers: Sequence[int], sites: Sequence[str], positions: Sequence[str], keys: list[tuple],
               patched: dict[int, list[float]], clean: Sequence[float], pairs: list[tuple[int, int]],
               n_skipped: dict[tuple, int], seed: int) -> list[Any]:
    """PatchRow per (layer, site, positions, direction, control) from the patched log-odds per stream index."""
    from afprobe.activations.patching import stream_index
    from afprobe.analysis.schema import PatchRow
    from afprobe.probes.patching import recovered_fraction

    rows = []
    for layer in layers:
        for site in sites:
            got = patched[stream_index(layer, site)]
            for pos in positions:
                for direction, (src, tgt) in DIRECTIONS.items():
                    for control in CONTROLS:
                        sel = [(j, k[3]) for j, k in enumerate(keys) if k[:3] == (direction, control, pos)]
                        side = {"training": 0, "deployment": 1}
                        p = np.array([got[j] for j, _ in sel])
                        t = np.array([clean[pairs[q][side[tgt]]] for _, q in sel])
                        s = np.array([clean[pairs[q][side[src]]] for _, q in sel])
                        stat = recovered_fraction(p, t, s, seed=seed)
                        rows.append(PatchRow(layer=layer, site=site, positions=pos, direction=direction,
                                             control=control, recovered=stat["recovered"], ci_lo=stat["ci_lo"],
                                             ci_hi=stat["ci_hi"], n=stat["n"],
                                             skipped=n_skipped.get((direction, control, pos), 0)))
    return rows


def best_rows(rows: list[Any]) -> list[Any]:
    """Per (positions, direction, control): the row with the largest recovered fraction."""
    from afprobe.analysis.schema import PatchBest

    out = []
    groups: dict[tuple, list[Any]] = {}
    for r in rows:
        groups.setdefault((r.positions, r.direction, r.control), []).append(r)
    for (pos, direction, control), members in groups.items():
        finite = [r for r in members if r.recovered is not None]
        top = max(finite, key=lambda r: r.recovered) if finite else None
        out.append(PatchBest(positions=pos, direction=direction, control=control,
                             **({} if top is None else {"layer": top.layer, "site": top.site,
                                                        "recovered": top.recovered, "ci_lo": top.ci_lo,
                                                        "ci_hi": top.ci_hi})))
    return out


@writes_run(lambda args, kwargs: Path(kwargs.get("run_dir", args[0] if args else "")))
def run_patch(run_dir: Path, layers: Optional[str] = None, positions: Optional[str] = None,
              sites: Optional[str] = None, n_queries: Optional[int] = None, family: Optional[str] = None,
              quiet: bool = False, loaded: Optional[tuple] = None) -> list[Any]:
    """Patch, write RUN/patching/results.csv and summary.json's `patching`; returns the PatchRows."""
    from tqdm.auto import tqdm

    from afprobe.activations.patching import POSITIONS, PatchJob, Patcher, stream_index
    from afprobe.activations.scenarios import answer_tags
    from afprobe.analysis.schema import PatchingSummary, PatchRow, csv_text
    from afprobe.fsio import atomic_write_text
    from afprobe.pipeline import build_prompts_for, load_model_and_backend

    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        raise BadInput(f"{run.path} is not a directory; give a run directory made by `afprobe cache`")
    cfg = run.config()
    run.require("cache")
    pos_list = parse_list(positions, POSITIONS, "positions")
    site_list = parse_list(sites, ("resid_pre", "resid_post"), "sites")
    family = family or cfg.scenario.cue_families[0]
    if family not in cfg.scenario.cue_families:
        raise BadInput(f"--family {family!r} is not one of the run's cue families ({', '.join(cfg.scenario.cue_families)})")
    if cfg.model.remote != "none":
        raise BadInput("afprobe patch runs local models only (model.remote is set)")
    model, tokenizer, backend, fingerprint = loaded or load_model_and_backend(cfg)
    run.check_fingerprint(fingerprint, False)
    layer_list = parse_layers(layers, backend.n_layers)
    prompts = build_prompts_for(cfg, tokenizer)
    pairs = _pairs(prompts, family, n_queries)
    used = sorted({i for pair in pairs for i in pair})
    accept, reject = answer_tags()
    patcher = Patcher(model, tokenizer, backend.adapter, accept, reject, cfg.cache.batch_tokens,
                      cfg.steering.batch_size, cfg.steering.prefix_reuse, trunk=cfg.steering.trunk)
    start = time.perf_counter()
    jobs, keys, skipped = build_jobs(prompts, pairs, pos_list)
    streams = sorted({stream_index(layer, site) for layer in layer_list for site in site_list})
    bar = tqdm(total=len(used) + len(streams) * len(jobs), desc="patch", unit="run", disable=quiet)
    sub = [prompts[i] for i in used]
    clean_sub = patcher.clean(sub, bar.update)
    index = {i: k for k, i in enumerate(used)}
    local_pairs = [(index[a], index[b]) for a, b in pairs]
    local_jobs = [PatchJob(index[j.target], index[j.source], j.source_positions, j.target_positions) for j in jobs]
    patched = {s: patcher.patched(sub, clean_sub, local_jobs, s, bar.update) for s in streams}
    bar.close()
    n_skipped = {(d, c, pos): len(pairs) - sum(1 for k in keys if k[:3] == (d, c, pos))
                 for d in DIRECTIONS for c in CONTROLS for pos in pos_list}
    rows = patch_rows(layer_list, site_list, pos_list, keys, patched, clean_sub.log_odds, local_pairs, n_skipped,
                      cfg.seed)
    seconds = time.perf_counter() - start
    out = run.path / "patching"
    atomic_write_text(out / "results.csv", csv_text(rows, PatchRow))
    gap = float(np.mean([clean_sub.log_odds[a] - clean_sub.log_odds[b] for a, b in local_pairs]))
    summary = PatchingSummary(family=family, n_queries=len(pairs), gap_log_odds=gap, layers=layer_list,
                              sites=site_list, positions=pos_list, best=best_rows(rows), skipped=skipped,
                              seconds=round(seconds, 2), forward_tokens=patcher.token_counts["computed_tokens"])
    run.update_summary(patching=summary)
    if not quiet:
        log.info(f"patch: {len(pairs)} queries, {len(streams)} stream indices x {len(jobs)} patched runs in "
                 f"{seconds:.1f} s -> {out / 'results.csv'}")
    return rows
