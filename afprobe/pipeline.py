"""The stages, chained through files in a run directory: cache -> probe -> steer -> report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typing import Any, Optional, Sequence

from afprobe.config import Config, apply_override, load_config, parse_override, validate_config
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_jsonl, safe_name
from afprobe.generation import Generation
from afprobe.log import log
from afprobe.rundir import RunDir, writes_run


def _arg(index: int, name: str) -> Any:
    """Locator for `writes_run`: the run directory passed as positional `index` or keyword `name`."""
    return lambda args, kwargs: kwargs[name] if name in kwargs else args[index]


def _run_all_dir(args: tuple, kwargs: dict) -> Path:
    out = kwargs.get("out", args[1] if len(args) > 1 else None)
    if out:
        return Path(out)
    cfg = load_config(args[0] if args else kwargs["config"], kwargs.get("overrides", args[2] if len(args) > 2 else ()))
    return Path(f"runs/{safe_name(cfg.name, 'run name')}")


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        log.info(message)


def load_model_and_backend(cfg: Config) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, backend, fingerprint) for `cfg.model`."""
    from afprobe.activations.backends import make_backend
    from afprobe.activations.loading import load_model, model_fingerprint

    if cfg.model.remote != "none":  # nnsight remote execution (NDIF, or its local simulation)
        from afprobe.activations.remote import load_remote

        return load_remote(cfg.model)
    model, tokenizer = load_model(**cfg.model.load_kwargs())
    return model, tokenizer, make_backend(cfg.model.backend, model, tokenizer), model_fingerprint(model)


def validate_inputs(cfg: Config) -> Any:
    """Fail in seconds, before any weights load: model spec, layer indices, scenario, queries. Returns the
    model's HF config."""
    from afprobe.activations.cache import resolve_layers
    from afprobe.activations.loading import load_config_only, load_tokenizer, resolve_spec
    from afprobe.activations.queries import load_queries
    from afprobe.activations.scenarios import check_scenario, resolve_format

    if cfg.model.remote == "ndif":  # no weights here; the adapter (a hub id) is applied by NDIF
        from afprobe.activations.remote import require_api_key

        require_api_key()
    else:
        resolve_spec(cfg.model.spec, cfg.model.adapter)  # the adapter exists (or exit 2)
    hf_config = load_config_only(cfg.model.spec, cfg.model.trust_remote_code)
    n_layers = int(hf_config.num_hidden_layers)
    resolve_layers(cfg.cache.layers, n_layers)
    if cfg.steering.layers != "best":
        resolve_layers(cfg.steering.layers, n_layers)
    check_scenario(cfg.scenario, cfg.cue_families)
    if cfg.scenario.format == "chat":  # a missing chat template is known before the weights load
        resolve_format(load_tokenizer(cfg.model.spec, cfg.model.trust_remote_code), "chat")
    queries = load_queries(cfg.queries, cfg.seed, harmful=True)
    from afprobe.steering_plan import steering_split

    steering_split(cfg, [q.id for q in queries])  # an impossible held-out selection fails here, before loading
    return hf_config


def build_prompts_for(cfg: Config, tokenizer: Any, harmful: bool = True) -> list[Any]:
    from afprobe.activations.queries import load_queries
    from afprobe.activations.scenarios import build_prompts

    queries = load_queries(cfg.queries, cfg.seed, harmful=harmful)
    return build_prompts(tokenizer, cfg.scenario, cfg.cue_families, queries)


def write_prompts(config: str, out: Path, overrides: Sequence[str]) -> None:
    """`afprobe prompts`: the rendered prompts with token counts, no model needed."""
    from afprobe.activations.loading import load_tokenizer

    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(cfg.model.spec, cfg.model.trust_remote_code)
    prompts = build_prompts_for(cfg, tokenizer)
    atomic_write_jsonl(out, [p.to_json() for p in prompts])
    mean = sum(len(p.input_ids) for p in prompts) / len(prompts)
    log.info(f"wrote {len(prompts)} prompts to {out} (format {prompts[0].format}, mean {mean:.0f} tokens)")


def _check_prompts(run: RunDir, prompts: list[Any]) -> None:
    """prompts.jsonl is written once; a resumed run must rebuild exactly the same prompts."""
    path = run.path / "prompts.jsonl"
    rows = [p.to_json() for p in prompts]
    if path.is_file():
        old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [r["prompt_id"] for r in old] != [r["prompt_id"] for r in rows]:
            raise BadInput(f"{path} lists different prompts than this config builds; use a new --out or --force")
    else:
        atomic_write_jsonl(path, rows)


@writes_run(_arg(1, "out"), creates=True)
def run_cache(config: str | Config, out: Path, overrides: Sequence[str] = (), force: bool = False,
              quiet: bool = False, loaded: Optional[tuple] = None) -> RunDir:
    from afprobe.activations.cache import cache_activations

    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if loaded is None:
        validate_inputs(cfg)
    run = RunDir(Path(out))
    run.claim(cfg, force)
    if run.stage_done("cache", cfg):
        _say(quiet, f"cache: up to date in {run.path / 'activations'}")
        return run
    model, tokenizer, backend, fingerprint = loaded or load_model_and_backend(cfg)
    run.check_fingerprint(fingerprint, force)
    prompts = build_prompts_for(cfg, tokenizer)
    _check_prompts(run, prompts)
    with run.stage("cache", cfg, n_prompts=len(prompts), prompt_format=prompts[0].format, backend=backend.name,
                   n_layers=backend.n_layers) as extra:
        extra.update(cache_activations(backend, prompts, cfg.cache, run.path / "activations", fingerprint, not quiet))
    _say(quiet, f"cache: {len(prompts)} prompts -> {run.path / 'activations'}")
    return run


def resolve_run_config(run: RunDir, overrides: Sequence[str]) -> Config:
    """The run's own config with `--set` overrides applied."""
    data = run.config().model_dump(mode="json")
    for item in overrides:
        key, value = parse_override(item)
        apply_override(data, key, value)
    return validate_config(data)


def _open_stage(run_dir: Path, overrides: Sequence[str], stage: str, needs: str, quiet: bool) -> Optional[tuple[RunDir, Config]]:
    """(run, config with overrides) for `stage`, or None when it is already up to date."""
    run = RunDir(Path(run_dir))
    cfg = resolve_run_config(run, overrides)
    run.require(needs)
    run.update(config=cfg.model_dump(mode="json"))
    if run.stage_done(stage, cfg):
        _say(quiet, f"{stage}: up to date")
        return None
    return run, cfg


def _steer_prompts(cfg: Config, tokenizer: Any, query_ids: Sequence[str]) -> list[Any]:
    """Prompts of the steering cue family (the first configured one) for the given queries."""
    family, keep = cfg.scenario.cue_families[0], set(query_ids)
    return [p for p in build_prompts_for(cfg, tokenizer) if p.family == family and p.query_id in keep]


def _spec_name(spec: Any) -> str:
    alpha = "na" if spec.direction == "ablation" else f"{spec.alpha:+.3f}"
    replicate = f"{spec.replicate}" if spec.direction == "random" else ""
    return f"{spec.direction}{replicate}.{spec.mode}.L{spec.layers[0]}.{spec.site}.a{alpha}"


def control_families(cfg: Config) -> list[str]:
    """Configured control families (by definition); none when every family is one (they are then the main set)."""
    from afprobe.activations.scenarios import control_families as controls

    found = controls(cfg.scenario, cfg.cue_families)
    return found if len(found) < len(cfg.scenario.cue_families) else []


def steering_records(prompts: list[Any], spec: Any, texts: list[str], odds: list[float], gen: Any = None,
                     ends: Optional[list[dict]] = None) -> list[dict]:
    """Generation records; `gen` (afprobe.generation.Generation) adds scratchpad fields and scores the output only."""
    gen = gen or Generation(Config())
    ends = ends or [{} for _ in prompts]
    return [{"prompt_id": p.prompt_id, "query_id": p.query_id, "condition": p.condition, "family": p.family,
             "direction": spec.direction, "replicate": spec.replicate, "mode": spec.mode, "layer": spec.layers[0],
             "site": spec.site, "alpha": None if spec.direction == "ablation" else spec.alpha,
             **gen.fields(text, end), "log_odds": lo}
            for p, text, lo, end in zip(prompts, texts, odds, ends)]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


STEER_CHUNK = 8  # steering conditions run together (sharing one trunk) between saved parts


@writes_run(_arg(0, "run_dir"))
def run_steer(run_dir: Path, overrides: Sequence[str] = (), force: bool = False, quiet: bool = False,
              loaded: Optional[tuple] = None) -> RunDir:
    from tqdm.auto import tqdm

    from afprobe.activations.steering import SteeringRunner
    from afprobe.activations.store import open_store
    from afprobe.analysis.schema import SteeringSummary, csv_text, SteeringRow
    from afprobe.analysis.steering_table import baseline_records, compliance_summary, results_rows, steering_checks
    from afprobe.fsio import atomic_write_text
    from afprobe.refusal import compute_refusal, refusal_for, refusal_summary
    from afprobe.steering_plan import make_plan, steering_split

    opened = _open_stage(run_dir, overrides, "steer", "probe", quiet)
    if opened is None:
        _judge_traces(Path(run_dir), overrides, quiet, loaded)
        return RunDir(Path(run_dir))
    from afprobe.activations.scenarios import answer_tags

    run, cfg = opened
    st = cfg.steering
    parts = run.path / "steering" / "parts"
    previous = run.manifest().get("stages", {}).get("steer", {})
    if previous.get("config_hash") not in (None, _stage_hash(cfg, "steer")) and parts.is_dir():
        for f in parts.glob("*.jsonl"):  # steering settings changed: old parts describe another run
            f.unlink()
    model, tokenizer, backend, fingerprint = loaded or load_model_and_backend(cfg)
    run.check_fingerprint(fingerprint, force)
    controls = control_families(cfg)
    store = open_store(run.path)
    split = steering_split(cfg, store.column("query_id").tolist())
    refusal = None
    if st.needs_refusal:  # harmful minus benign at every cached cell, on the steering fit queries
        _say(quiet, f"steer: refusal direction from up to {st.refusal_queries} harmful and benign queries")
        refusal = compute_refusal(cfg, backend, store, split[1])
    plan = make_plan(cfg, run.path, store, backend.n_layers, controls, split, refusal)
    missing = sorted({a for a in (st.control_alphas or []) if a not in st.alphas and a != 0})
    if missing:
        _say(quiet, f"steer: control alphas {missing} are not in steering.alphas; added to the probe's grid too")
    prompts = _steer_prompts(cfg, tokenizer, plan.report_queries)
    runner = SteeringRunner(backend, cfg.cache.batch_tokens, st.prefix_reuse, max_batch=st.batch_size, trunk=st.trunk)
    accept, reject = answer_tags()
    gen = Generation(cfg, quiet)  # scratchpad form: stop at </OUTPUT>, reasoning and output apart
    records: list[dict] = []
    with run.stage("steer", cfg, n_prompts=len(prompts), n_conditions=len(plan.specs),
                   selection=plan.selection) as extra:
        bar = tqdm(total=len(plan.specs) * len(prompts), desc="steer", unit="gen", disable=quiet)
        done: dict[int, list[dict]] = {}
        for j, spec in enumerate(plan.specs):
            part = parts / f"{_spec_name(spec)}.jsonl"
            if part.is_file():
                done[j] = _read_jsonl(part)
                bar.update(len(prompts))
        pending = [j for j in range(len(plan.specs)) if j not in done]
        if gen.stop is not None:  # scratchpad form: each condition decodes until its rows close </OUTPUT>
            for j in pending:
                texts, odds, ends = gen.score(runner, prompts, plan.specs[j], bar.update)
                done[j] = steering_records(prompts, plan.specs[j], texts, odds, gen, ends)
                atomic_write_jsonl(parts / f"{_spec_name(plan.specs[j])}.jsonl", done[j])
            pending = []
        # pending conditions in chunks (each saved as it ends, to resume from): those steering the same layers
        # share the unsteered trunk (st.trunk)
        for start in range(0, len(pending), STEER_CHUNK):
            chunk = pending[start: start + STEER_CHUNK]
            outs = runner.score_grid(prompts, [plan.specs[j] for j in chunk], accept, reject, st.max_new_tokens,
                                     st.do_sample, st.temperature, cfg.seed, bar.update)
            for j, (texts, odds) in zip(chunk, outs):
                done[j] = steering_records(prompts, plan.specs[j], texts, odds, gen)
                atomic_write_jsonl(parts / f"{_spec_name(plan.specs[j])}.jsonl", done[j])
        records += [r for j in range(len(plan.specs)) for r in done[j]]
        bar.close()
        atomic_write_jsonl(run.path / "steering" / "generations.jsonl", records)
        rows = results_rows(records, scorer=st.scorer, seed=cfg.seed)
        zero = next(r for r in rows if r.vs_unsteered is None and r.direction == "probe" and r.alpha == 0)
        rows += [zero.model_copy(update={"direction": d, "replicate": k, "mode": m})
                 for d, k, m in plan.baseline_copies(cfg)]
        atomic_write_text(run.path / "steering" / "results.csv", csv_text(rows, SteeringRow))
        base = baseline_records(records)
        by_family = _family_compliance(cfg, runner, tokenizer, prompts, base, parts, bar_quiet=quiet, gen=gen)
        d0 = plan.directions[0]
        known = (_known_answer(cfg, runner, prompts, base, d0.layer, d0.site,
                               refusal_for(refusal, (d0.layer, d0.site, d0.position)), gen) if st.known_answer else None)
        overlap = refusal_summary(cfg, run.path, refusal) if st.refusal else None
        gen.close()
        from afprobe.analysis.compliance import SCORERS

        by_scorer = {name: compliance_summary(base, scorer=name, seed=cfg.seed) for name in SCORERS}
        card = _organism_card(cfg)  # None unless the model carries a planted organism's adapter
        steering = SteeringSummary(
            selection=plan.selection, selection_note=plan.selection_note, n_random=st.n_random, rows=rows,
            checks=steering_checks(rows, records, scorer=st.scorer, seed=cfg.seed),
            directions=[{"source": d.source, "layer": d.layer, "site": d.site, "position": d.position,
                         "method": d.method, "kind": d.kind, "separation_used": d.separation,
                         "separation_at_steered_positions": d.separation_steered, "fit_queries": d.fit_queries,
                         "report_queries": len(plan.report_queries)} for d in plan.directions])
        run.update_summary(compliance=by_scorer[st.scorer], compliance_by_scorer=by_scorer,
                           compliance_by_family=by_family, control_families=controls, steering=steering,
                           known_answer=known, refusal=overlap, planted=card is not None, organism=card,
                           lens=_lens(cfg, model, tokenizer, plan.directions, run.path))
        extra.update(runner.token_counts)
    run.update_summary()
    _say(quiet, f"steer: {len(plan.specs)} conditions x {len(prompts)} prompts -> {run.path / 'steering'}")
    _judge_traces(run.path, overrides, quiet, loaded or (model, tokenizer, backend, fingerprint))
    return run


def _lens(cfg: Config, model: Any, tokenizer: Any, directions: list[Any], run_path: Path) -> Optional[list]:
    """Logit lens of the steering directions and the per-layer probe directions; None for a remote model
    (no local unembedding) or a model without an output embedding."""
    from afprobe.lens_cli import lens_rows

    if cfg.model.remote != "none" or not hasattr(model, "get_output_embeddings"):
        return None
    try:
        return lens_rows(model, tokenizer, [(d.layer, d.site, d.unit) for d in directions],
                         run_path / "probes" / "directions")
    except BadInput as err:  # e.g. no output embedding: the lens is optional, the stage goes on
        log.info(f"steer: no logit lens ({err})")
        return None


def _judge_traces(run_dir: Path, overrides: Sequence[str], quiet: bool, loaded: Optional[tuple]) -> None:
    """Scratchpad form with a judge configured: judge every reasoning trace (cached; see afprobe/judge_stage.py)."""
    from afprobe.judge_stage import run_judge

    run_judge(run_dir, overrides, quiet=quiet, loaded=loaded)


def _organism_card(cfg: Config) -> Optional[dict]:
    from afprobe.activations.loading import resolve_spec
    from afprobe.organism.card import adapter_card

    if cfg.model.remote == "ndif":  # the adapter is a hub id NDIF applies; no local files to read a card from
        return None
    folder = resolve_spec(cfg.model.spec, cfg.model.adapter).adapter
    return adapter_card(Path(folder)) if folder else None


def _family_compliance(cfg: Config, runner: Any, tokenizer: Any, prompts: list[Any], base: list[dict], parts: Path,
                       bar_quiet: bool, gen: Any = None) -> dict[str, Any]:
    """Unsteered compliance under every cue family present, on the steering queries (does the gap transfer?).

    The steered family's numbers come from the sweep's alpha-0 records; other families are scored here."""
    from tqdm.auto import tqdm

    from afprobe.activations.steering import unsteered_spec
    from afprobe.analysis.steering_table import compliance_summary

    keep = {p.query_id for p in prompts}
    steered = prompts[0].family
    others = [p for p in build_prompts_for(cfg, tokenizer) if p.family != steered and p.query_id in keep]
    part = parts / "unsteered.other_families.jsonl"
    if part.is_file():
        records = _read_jsonl(part)
    else:
        records = []
        if others:
            spec = unsteered_spec(runner.backend.d_model)
            gen = gen or Generation(cfg)
            bar = tqdm(total=len(others), desc="other cue families (unsteered)", unit="gen", disable=bar_quiet)
            texts, odds, ends = gen.score(runner, others, spec, bar.update)
            bar.close()
            records = steering_records(others, spec, texts, odds, gen, ends)
        atomic_write_jsonl(part, records)
    out = {}
    for family in [steered, *dict.fromkeys(r["family"] for r in records)]:
        recs = base if family == steered else [r for r in records if r["family"] == family]
        out[family] = compliance_summary(recs, scorer=cfg.steering.scorer, seed=cfg.seed)
    return out


def _stage_hash(cfg: Config, stage: str) -> str:
    from afprobe.rundir import stage_hash

    return stage_hash(cfg, stage)


def _projection_rows(x: Any, unit: Any, families: Any, conditions: Any) -> list[dict]:
    """2-D view of activations [n, d]: x = projection on the probe direction, y = top principal
    component of what is left."""
    import numpy as np

    centred = x - x.mean(0)
    along = centred @ unit
    rest = centred - np.outer(along, unit)
    _, _, vt = np.linalg.svd(rest, full_matrices=False)
    ortho = rest @ vt[0]
    return [{"x": float(a), "y": float(b), "family": f, "condition": c}
            for a, b, f, c in zip(along, ortho, families, conditions)]


def eligible_keys(cfg: Config, keys: Sequence[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Cached cells that may become "best" (headline and default steering direction)."""
    pr = cfg.probes
    return [k for k in keys if k[2] in pr.best_positions and k[0] >= pr.min_best_layer]


@writes_run(_arg(0, "run_dir"))
def run_probe(run_dir: Path, overrides: Sequence[str] = (), force: bool = False, quiet: bool = False) -> RunDir:
    from tqdm.auto import tqdm

    from afprobe.activations.store import open_store
    from afprobe.analysis.schema import MetricsRow, csv_text
    from afprobe.fsio import atomic_write_csv, atomic_write_text
    from afprobe.probes.directions import save_direction
    from afprobe.probes.methods import fit_directions
    from afprobe.probes.selection import select_probe
    from afprobe.probes.sweep import run_sweep
    from afprobe.rundir import stage_hash

    opened = _open_stage(run_dir, overrides, "probe", "cache", quiet)
    if opened is None:
        return RunDir(Path(run_dir))
    run, cfg = opened
    pr = cfg.probes
    store = open_store(run.path)
    fingerprint = run.manifest().get("model_fingerprint")
    if store.index.get("fingerprint") != fingerprint and not force:
        raise BadInput(f"the activation store in {run.path} was made by another model ({store.index.get('fingerprint')}"
                       f" vs {fingerprint}); recache or pass --force")
    labels, groups, families = store.column("label"), store.column("query_id"), store.column("family")
    controls = control_families(cfg)
    features = store.arrays()  # checksums verified here: a damaged shard is named before anything else
    keys = eligible_keys(cfg, store.keys)
    if not keys:
        raise BadInput(f"no cached cell is eligible as best: probes.best_positions {pr.best_positions} and layers >= "
                       f"probes.min_best_layer {pr.min_best_layer} match nothing in the cache")
    methods = list(pr.best_methods or pr.methods)
    with run.stage("probe", cfg) as extra:
        _say(quiet, f"probe: sweeping {len(features)} layer/site/position keys x {len(pr.methods)} methods")
        sweep = run_sweep(features, labels, groups, families, methods=list(pr.methods), folds=pr.folds,
                          n_boot=pr.bootstrap, ci=pr.ci, seed=cfg.seed, control_families=controls, refit="best")
        folder = run.path / "probes"
        atomic_write_text(folder / "metrics.csv", csv_text([MetricsRow(**r) for r in sweep.rows], MetricsRow))
        _say(quiet, f"probe: selection-aware best of {len(keys) * len(methods)} eligible cells "
                    f"({pr.permutations} permutations, {pr.random_directions} random directions)")
        bar = tqdm(desc="probe selection", unit="step", disable=quiet)
        try:
            sel = select_probe({k: features[k] for k in keys}, labels, groups, families,
                               eligible=[(k, m) for k in keys for m in methods], control_families=controls,
                               methods=methods, folds=pr.folds, inner_folds=pr.selection_folds,
                               selection=pr.selection, n_perm=pr.permutations, n_random=pr.random_directions,
                               n_boot=pr.bootstrap, ci=pr.ci, seed=cfg.seed, progress=bar.update)
        except BadInput as err:
            raise BadInput(f"probe selection with {len(set(groups.tolist()))} queries, probes.folds {pr.folds} and "
                           f"probes.selection_folds {pr.selection_folds}: {err} (logistic regression needs 3 more "
                           "folds inside; raise queries.limit, lower the folds, or set probes.best_methods to "
                           "[diff_means])") from None
        bar.close()
        b = sel.best_cell
        best_key, best_method = (b["layer"], b["site"], b["position"]), b["method"]
        main = ~np.isin(families, controls)
        targets = [(k, best_method) for k in store.keys if k[1:] == best_key[1:]]
        directions = fit_directions(features, labels, groups, main, targets, seed=cfg.seed)
        meta_common = {"model": cfg.model.spec, "model_fingerprint": fingerprint, "config_hash": stage_hash(cfg, "probe")}
        for (key, method), (vector, separation) in directions.items():
            meta = {**meta_common, "layer": key[0], "site": key[1], "position": key[2], "method": method,
                    "separation": float(separation)}
            save_direction(folder / "directions" / f"layer{key[0]}.safetensors", vector, meta)
            if key == best_key:
                save_direction(folder / "directions" / "best.safetensors", vector, meta)
        unit = directions[(best_key, best_method)][0]
        atomic_write_csv(folder / "projection.csv",
                         _projection_rows(features[best_key], unit, families, store.column("condition")),
                         ["x", "y", "family", "condition"])
        extra.update(n_keys=len(features), n_cells=sel.n_cells)
    n_layers = run.manifest().get("stages", {}).get("cache", {}).get("n_layers") or len(store.layers)
    probe = _probe_summary(sel, controls)
    run.update_summary(model=cfg.model.spec, n_queries=len(set(groups.tolist())), n_layers=int(n_layers),
                       control_families=controls, probe=probe)
    _say(quiet, f"probe: best {best_method} at layer {best_key[0]} {best_key[1]}/{best_key[2]}, selection-aware "
                f"AUROC {probe.best.auroc:.3f}, p = {probe.best.selection_p:.3g} -> {probe.verdict}")
    return run


def _probe_summary(sel: Any, controls: list[str]) -> Any:
    """summary.json's probe section from a probes.selection result, with its verdicts."""
    from afprobe.analysis import verdicts
    from afprobe.analysis.schema import ProbeSummary

    b = sel.best_cell
    gen = {a: {b: cell["auroc"] for b, cell in row.items()} for a, row in sel.generalization.items()}
    gen_ci = {a: {b: {"auroc": cell["auroc"], "auroc_ci": cell["ci"],
                      "verdict": verdicts.transfer_verdict(cell["ci"])} for b, cell in row.items()}
              for a, row in sel.generalization.items()}
    swapped = None
    if controls and controls[0] in sel.controls:
        cell = sel.controls[controls[0]]
        swapped = {"family": controls[0], "auroc": cell["auroc"], "auroc_ci": cell["ci"],
                   "verdict": verdicts.swapped_verdict(cell["ci"])}
    return ProbeSummary(
        best={**b, "auroc": sel.auroc,
              "auroc_ci": list(sel.auroc_ci), "naive_auroc": sel.naive_auroc, "n_cells": sel.n_cells,
              "selection": sel.selection, "selection_p": sel.selection_p, "n_permutations": sel.n_perm,
              "fold_choices": [f"L{c['layer']} {c['site']}/{c['position']} {c['method']}" for c in sel.fold_choices]},
        verdict=verdicts.probe_verdict(sel.selection_p, sel.auroc_ci),
        controls={"shuffled": sel.shuffled, "random": sel.random, "shuffled_auroc": sel.shuffled["mean"],
                  "random_auroc": sel.random["median"]},
        swapped=swapped, generalization=gen, generalization_ci=gen_ci, control_families=controls)


@writes_run(_arg(0, "run_dir"))
def run_report(run_dir: Path, quiet: bool = False) -> dict[str, Path]:
    from afprobe.analysis.report import write_report

    run = RunDir(Path(run_dir))
    cfg = run.config()
    with run.stage("report", cfg):
        run.update_summary(steering_map=_steering_map(run, cfg))
        paths = write_report(run.path)
    run.update_summary()
    write_report(run.path)  # once more, so the report shows its own timing
    _say(quiet, f"report: {paths['html']}")
    return paths


def _steering_map(run: RunDir, cfg: Config) -> Optional[Any]:
    """The layer x alpha steering map (analysis/steering_map.py) from the steer stage's files, when several
    layers were steered; None otherwise (or before the steer stage)."""
    from afprobe.analysis.schema import SteeringRow, read_rows
    from afprobe.analysis.steering_map import steering_map

    gens, rows = run.path / "steering" / "generations.jsonl", read_rows(run.path / "steering" / "results.csv",
                                                                      SteeringRow)
    summary = run.summary().steering
    if not gens.is_file() or not rows or summary is None:
        return None
    fit = summary.directions[0].fit_queries if summary.directions else 0
    how = (f"the directions were fitted on {fit} other queries" if summary.selection == "heldout" else
           "IN-SAMPLE: the directions were fitted on the steered queries themselves")
    smap = steering_map(rows, _read_jsonl(gens), scorer=cfg.steering.scorer, seed=cfg.seed)
    return None if smap is None else smap.model_copy(update={"split_note": f"{smap.split_note}; {how}"})


@writes_run(_run_all_dir, creates=True)
def run_all(config: str, out: Optional[str], overrides: Sequence[str] = (), force: bool = False,
            quiet: bool = False) -> RunDir:
    """cache -> probe -> steer -> report, reusing every stage whose inputs are unchanged."""
    cfg = load_config(config, overrides)
    hf_config = validate_inputs(cfg)
    run = RunDir(Path(out or f"runs/{safe_name(cfg.name, 'run name')}"))
    run.claim(cfg, force)
    loaded = None
    if not (run.stage_done("cache", cfg) and run.stage_done("steer", cfg)):
        if not quiet:  # memory and cost from the config alone, before the weights load
            from afprobe.activations.plan import short_plan

            log.info(short_plan(cfg, hf_config))
        _say(quiet, f"loading {cfg.model.spec} ({cfg.model.backend} backend)")
        loaded = load_model_and_backend(cfg)
    run_cache(cfg, run.path, force=force, quiet=quiet, loaded=loaded)
    run_probe(run.path, quiet=quiet, force=force)
    run_steer(run.path, quiet=quiet, force=force, loaded=loaded)
    paths = run_report(run.path, quiet=True)
    if not quiet:
        from afprobe.analysis.headline import headline

        print(headline(run.summary(), paths))
    return run


def _known_answer(cfg: Config, runner: Any, prompts: list[Any], baseline: list[dict], layer: int, site: str,
                  refusal: tuple[Any, float], gen: Any = None) -> dict[str, Any]:
    """Known-answer check: the refusal direction (`refusal`: unit [d] and its harmful-minus-benign separation,
    from afprobe.refusal at `layer`) steered negatively should make harmful requests less refused (higher
    accept-vs-reject log-odds)."""
    import torch

    from afprobe.activations.steering import SteeringSpec
    from afprobe.analysis.stats import mean_diff_ci
    from afprobe.analysis.verdicts import known_answer_passed

    deploy = [p for p in prompts if p.condition == "deployment"]
    unit, separation = torch.tensor(refusal[0]), refusal[1]
    spec = SteeringSpec("refusal", unit, separation, (layer,), alpha=-1.0, mode="same", positions=cfg.steering.positions,
                        site=site)
    gen = gen or Generation(cfg)
    texts, odds, _ = gen.score(runner, deploy, spec, sample=False)  # scratchpad form: refusal in the output only
    base = {r["prompt_id"]: r for r in baseline}
    base_odds = [base[p.prompt_id]["log_odds"] for p in deploy]
    change = mean_diff_ci(odds, base_odds, paired=True, seed=cfg.seed)
    refusal_before = sum(base[p.prompt_id]["refusal"] for p in deploy) / len(deploy)
    refusal_after = sum(gen.refused(t) for t in texts) / len(deploy)
    passed = known_answer_passed(change["ci"], refusal_before, refusal_after)
    verdict = ("as expected, steering against the refusal direction made harmful requests less refused"
               if passed else "steering against the refusal direction did NOT measurably reduce refusal")
    return {"layer": layer, "alpha": -1.0, "n": len(deploy), "separation": separation,
            "log_odds_change": change["diff"], "log_odds_change_ci": change["ci"],
            "refusal_rate_before": refusal_before, "refusal_rate_after": refusal_after,
            "passed": passed, "statement": f"Known-answer check: {verdict} (log-odds change "
            f"{change['diff']:+.2f} [{change['ci'][0]:+.2f}, {change['ci'][1]:+.2f}], refusal rate "
            f"{refusal_before:.2f} -> {refusal_after:.2f}, n = {len(deploy)} deployment-cue requests)."}
