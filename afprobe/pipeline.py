"""The stages, chained through files in a run directory: cache -> probe -> steer -> report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from afprobe.config import Config, apply_override, load_config, parse_override, validate_config
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_jsonl, safe_name
from afprobe.rundir import RunDir


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


def load_model_and_backend(cfg: Config) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, backend, fingerprint) for `cfg.model`."""
    from afprobe.activations.backends import make_backend
    from afprobe.activations.loading import load_model, model_fingerprint

    model, tokenizer = load_model(
        cfg.model.spec, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code, cfg.model.attn_implementation
    )
    return model, tokenizer, make_backend(cfg.model.backend, model, tokenizer), model_fingerprint(model)


def validate_inputs(cfg: Config) -> None:
    """Fail in seconds, before any weights load: model spec, layer indices, scenario, queries."""
    from afprobe.activations.cache import resolve_layers
    from afprobe.activations.loading import load_config_only
    from afprobe.activations.queries import load_queries
    from afprobe.activations.scenarios import check_scenario

    n_layers = int(load_config_only(cfg.model.spec, cfg.model.trust_remote_code).num_hidden_layers)
    resolve_layers(cfg.cache.layers, n_layers)
    if cfg.steering.layers != "best":
        resolve_layers(cfg.steering.layers, n_layers)
    check_scenario(cfg.scenario, cfg.cue_families)
    load_queries(cfg.queries, cfg.seed, harmful=True)


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
    print(f"wrote {len(prompts)} prompts to {out} (mean {sum(len(p.input_ids) for p in prompts) / len(prompts):.0f} tokens)")


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
    with run.stage("cache", cfg, n_prompts=len(prompts), backend=backend.name, n_layers=backend.n_layers) as extra:
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


def _steer_prompts(cfg: Config, tokenizer: Any) -> list[Any]:
    """Prompts of the steering cue family (the first configured one), limited to steering.n_queries queries."""
    family = cfg.scenario.cue_families[0]
    prompts = [p for p in build_prompts_for(cfg, tokenizer) if p.family == family]
    if cfg.steering.n_queries is not None:
        keep = list(dict.fromkeys(p.query_id for p in prompts))[: cfg.steering.n_queries]
        prompts = [p for p in prompts if p.query_id in set(keep)]
    return prompts


def _steering_specs(cfg: Config, run: RunDir, n_layers: int) -> list[Any]:
    import torch

    from afprobe.activations.steering import SteeringSpec, random_orthogonal
    from afprobe.fsio import safe_name
    from afprobe.probes.directions import load_direction

    folder = run.path / "probes" / "directions"
    st = cfg.steering
    names = ["best"] if st.layers == "best" else [f"layer{layer}" for layer in st.layers]
    if st.direction != "best":
        names = [st.direction]
    specs = []
    for name in names:
        vector, meta = load_direction(folder / f"{safe_name(name, 'direction name')}.safetensors")
        layer = int(meta["layer"])
        if not 0 <= layer < n_layers:
            raise BadInput(f"direction {name} is for layer {layer}, but the model has {n_layers} layers")
        unit = torch.tensor(vector, dtype=torch.float32)
        sep = float(meta["separation"])
        control = random_orthogonal(unit, cfg.seed + layer)
        for mode in st.modes:
            for alpha in st.alphas:
                if alpha == 0 and mode == "cross":
                    continue  # alpha 0 is the unsteered model in every mode: scored once, as "same"
                common = dict(separation=sep, layers=(layer,), alpha=float(alpha), mode=mode, positions=st.positions)
                specs.append(SteeringSpec("probe", unit, **common))
                if "random" in st.controls and alpha != 0 and (st.control_alphas is None or alpha in st.control_alphas):
                    specs.append(SteeringSpec("random", control, **common))
        if "ablation" in st.controls:
            specs.append(SteeringSpec("ablation", unit, sep, (layer,), alpha=0.0, mode="same", positions="all"))
    if 0 not in [s.alpha for s in specs if s.direction == "probe" and s.mode == "same"]:
        first = specs[0]
        specs.insert(0, SteeringSpec("probe", first.unit, first.separation, first.layers, 0.0, "same", st.positions))
    return specs


def _spec_name(spec: Any) -> str:
    alpha = "na" if spec.direction == "ablation" else f"{spec.alpha:+.3f}"
    return f"{spec.direction}.{spec.mode}.L{spec.layers[0]}.a{alpha}"


def run_steer(run_dir: Path, overrides: Sequence[str] = (), force: bool = False, quiet: bool = False,
              loaded: Optional[tuple] = None) -> RunDir:
    from tqdm.auto import tqdm

    from afprobe.activations.organism import adapter_card
    from afprobe.activations.scenarios import answer_tags
    from afprobe.activations.steering import SteeringRunner
    from afprobe.analysis.compliance import refusal_score, tag_score
    from afprobe.analysis.steering_table import (
        CSV_COLUMNS, baseline_records, compliance_summary, results_rows, steering_checks, steering_summary,
    )
    from afprobe.fsio import atomic_write_csv

    opened = _open_stage(run_dir, overrides, "steer", "probe", quiet)
    if opened is None:
        return RunDir(Path(run_dir))
    run, cfg = opened
    parts = run.path / "steering" / "parts"
    previous = run.manifest().get("stages", {}).get("steer", {})
    if previous.get("config_hash") not in (None, _stage_hash(cfg, "steer")) and parts.is_dir():
        for f in parts.glob("*.jsonl"):  # steering settings changed: old parts describe another run
            f.unlink()
    model, tokenizer, backend, fingerprint = loaded or load_model_and_backend(cfg)
    run.check_fingerprint(fingerprint, force)
    prompts = _steer_prompts(cfg, tokenizer)
    specs = _steering_specs(cfg, run, backend.n_layers)
    st = cfg.steering
    runner = SteeringRunner(backend, cfg.cache.batch_tokens, st.prefix_reuse, max_batch=st.batch_size)
    accept, reject = answer_tags()
    records: list[dict] = []
    with run.stage("steer", cfg, n_prompts=len(prompts), n_conditions=len(specs)) as extra:
        bar = tqdm(total=len(specs) * len(prompts), desc="steer", unit="gen", disable=quiet)
        for spec in specs:
            part = parts / f"{_spec_name(spec)}.jsonl"
            if part.is_file():
                done = [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
                records += done
                bar.update(len(prompts))
                continue
            texts, odds = runner.score(prompts, spec, accept, reject, st.max_new_tokens, st.do_sample,
                                       st.temperature, cfg.seed, bar.update)
            rows = [
                {"prompt_id": p.prompt_id, "query_id": p.query_id, "condition": p.condition, "family": p.family,
                 "direction": spec.direction, "mode": spec.mode, "layer": spec.layers[0],
                 "alpha": None if spec.direction == "ablation" else spec.alpha,
                 "completion": text, "tag": tag_score(text), "refusal": bool(refusal_score(text)), "log_odds": lo}
                for p, text, lo in zip(prompts, texts, odds)
            ]
            atomic_write_jsonl(part, rows)
            records += rows
        bar.close()
        atomic_write_jsonl(run.path / "steering" / "generations.jsonl", records)
        rows = results_rows(records, seed=cfg.seed, scorer=st.scorer)
        # alpha 0 is the unsteered model along any direction and in any mode: copy its row
        directions = ["probe", "random"] if "random" in st.controls else ["probe"]
        zero = [r for r in rows if r["direction"] == "probe" and r["alpha"] == 0]
        rows += [{**r, "direction": d, "mode": m} for r in zero for m in st.modes for d in directions
                 if (d, m) != ("probe", r["mode"])]
        atomic_write_csv(run.path / "steering" / "results.csv", rows, CSV_COLUMNS)
        base = baseline_records(records)
        by_family = _family_compliance(cfg, runner, tokenizer, prompts, base, parts, bar_quiet=quiet) if base else None
        known = None
        if st.known_answer and base:
            known = _known_answer(cfg, backend, runner, prompts, base, specs[0].layers[0])
        by_scorer = {name: compliance_summary(base, seed=cfg.seed, scorer=name) for name in ("tag", "logodds")} \
            if base else {}
        run.update_summary(compliance=by_scorer.get(st.scorer), compliance_by_scorer=by_scorer or None,
                           compliance_by_family=by_family, steering=steering_summary(rows),
                           steering_checks=steering_checks(rows), known_answer=known,
                           planted="+planted-gap" in cfg.model.spec, organism=adapter_card(cfg.model.spec))
        extra.update(runner.token_counts)
    run.update_summary()
    _say(quiet, f"steer: {len(specs)} conditions x {len(prompts)} prompts -> {run.path / 'steering'}")
    return run


def _family_compliance(cfg: Config, runner: Any, tokenizer: Any, prompts: list[Any], base: list[dict], parts: Path,
                       bar_quiet: bool) -> dict[str, Any]:
    """Unsteered compliance under every cue family present, on the steering queries (does the gap transfer?).

    The steered family's numbers come from the sweep's alpha-0 records; other families are scored here."""
    import torch
    from tqdm.auto import tqdm

    from afprobe.activations.scenarios import answer_tags
    from afprobe.activations.steering import SteeringSpec
    from afprobe.analysis.compliance import refusal_score, tag_score
    from afprobe.analysis.steering_table import compliance_summary

    keep = {p.query_id for p in prompts}
    steered = prompts[0].family
    others = [p for p in build_prompts_for(cfg, tokenizer) if p.family != steered and p.query_id in keep]
    part = parts / "unsteered.other_families.jsonl"
    if part.is_file():
        records = [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    else:
        records = []
        if others:
            spec = SteeringSpec("probe", torch.zeros(runner.backend.d_model), 0.0, (0,), alpha=0.0)  # unsteered
            accept, reject = answer_tags()
            bar = tqdm(total=len(others), desc="other cue families (unsteered)", unit="gen", disable=bar_quiet)
            texts, odds = runner.score(others, spec, accept, reject, cfg.steering.max_new_tokens,
                                       cfg.steering.do_sample, cfg.steering.temperature, cfg.seed, bar.update)
            bar.close()
            records = [{"prompt_id": p.prompt_id, "query_id": p.query_id, "condition": p.condition,
                        "family": p.family, "completion": t, "tag": tag_score(t), "refusal": bool(refusal_score(t)),
                        "log_odds": lo} for p, t, lo in zip(others, texts, odds)]
        atomic_write_jsonl(part, records)
    out = {}
    for family in [steered, *dict.fromkeys(r["family"] for r in records)]:
        recs = base if family == steered else [r for r in records if r["family"] == family]
        out[family] = compliance_summary(recs, seed=cfg.seed, scorer=cfg.steering.scorer)
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


def run_probe(run_dir: Path, overrides: Sequence[str] = (), force: bool = False, quiet: bool = False) -> RunDir:
    from afprobe.activations.store import open_store
    from afprobe.fsio import atomic_write_csv
    from afprobe.probes.directions import save_direction
    from afprobe.probes.sweep import ROW_FIELDS, run_sweep
    from afprobe.rundir import stage_hash

    opened = _open_stage(run_dir, overrides, "probe", "cache", quiet)
    if opened is None:
        return RunDir(Path(run_dir))
    run, cfg = opened
    store = open_store(run.path)
    fingerprint = run.manifest().get("model_fingerprint")
    if store.index.get("fingerprint") != fingerprint and not force:
        raise BadInput(f"the activation store in {run.path} was made by another model ({store.index.get('fingerprint')}"
                       f" vs {fingerprint}); recache or pass --force")
    labels, groups, families = store.column("label"), store.column("query_id"), store.column("family")
    with run.stage("probe", cfg) as extra:
        features = store.arrays()
        _say(quiet, f"probe: sweeping {len(features)} layer/site/position keys x {len(cfg.probes.methods)} methods")
        sweep = dict(methods=list(cfg.probes.methods), folds=cfg.probes.folds, n_boot=cfg.probes.bootstrap,
                     ci=cfg.probes.ci, seed=cfg.seed)
        result = run_sweep(features, labels, groups, families, **sweep)
        eligible = {k: v for k, v in features.items() if k[2] in (cfg.probes.best_positions or [k[2]])}
        if not eligible:
            raise BadInput(f"probes.best_positions {cfg.probes.best_positions} names no cached position")
        methods = list(cfg.probes.best_methods or cfg.probes.methods)
        if len(eligible) < len(features) or methods != list(cfg.probes.methods):
            rows = result.rows  # metrics.csv keeps every cell; the best (and the steering direction) among these
            result = run_sweep(eligible, labels, groups, families, **{**sweep, "methods": methods})
            result.rows = rows
        folder = run.path / "probes"
        atomic_write_csv(folder / "metrics.csv", result.rows, ROW_FIELDS)
        best = result.best
        best_key = (int(best["layer"]), best["site"], best["position"])
        meta_common = {"model_fingerprint": fingerprint, "config_hash": stage_hash(cfg, "probe")}
        for name, (dkey, (vector, separation)) in _directions_to_save(result, best_key, best["method"]).items():
            save_direction(folder / "directions" / f"{name}.safetensors", vector,
                           {**meta_common, "layer": dkey[0], "site": dkey[1], "position": dkey[2], "method": dkey[3],
                            "separation": float(separation)})
        unit = result.directions[(*best_key, best["method"])][0]
        atomic_write_csv(folder / "projection.csv",
                         _projection_rows(features[best_key], unit, families, store.column("condition")),
                         ["x", "y", "family", "condition"])
        extra.update(n_keys=len(features), best=best)
    run.update_summary(model=cfg.model.spec, n_queries=len(set(groups.tolist())),
                       n_layers=int(run.manifest().get("stages", {}).get("cache", {}).get("n_layers") or
                                    len(store.layers)),
                       probe=result.to_summary())
    _say(quiet, f"probe: best {best['method']} at layer {best['layer']} {best['site']}/{best['position']} "
                f"AUROC {best['auroc']:.3f} -> {run.path / 'probes'}")
    return run


def _directions_to_save(result: Any, best_key: tuple, best_method: str) -> dict[str, tuple]:
    """{file name: ((layer, site, position, method), (unit, separation))}: the best direction and, at the
    best site and position, one per layer (the best method there) for steering at other layers."""
    out = {"best": ((*best_key, best_method), result.directions[(*best_key, best_method)])}
    for dkey, value in sorted(result.directions.items(), key=lambda kv: kv[0][3] != best_method):
        if dkey[1:3] == best_key[1:]:
            out.setdefault(f"layer{dkey[0]}", (dkey, value))
    return out


def run_report(run_dir: Path, quiet: bool = False) -> dict[str, Path]:
    from afprobe.analysis.report import write_report

    run = RunDir(Path(run_dir))
    cfg = run.config()
    with run.stage("report", cfg):
        paths = write_report(run.path)
    run.update_summary()
    write_report(run.path)  # once more, so the report shows its own timing
    _say(quiet, f"report: {paths['html']}")
    return paths


def run_all(config: str, out: Optional[str], overrides: Sequence[str] = (), force: bool = False,
            quiet: bool = False) -> RunDir:
    """cache -> probe -> steer -> report, reusing every stage whose inputs are unchanged."""
    cfg = load_config(config, overrides)
    validate_inputs(cfg)
    run = RunDir(Path(out or f"runs/{safe_name(cfg.name, 'run name')}"))
    run.claim(cfg, force)
    loaded = None
    if not (run.stage_done("cache", cfg) and run.stage_done("steer", cfg)):
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


def _known_answer(cfg: Config, backend: Any, runner: Any, prompts: list[Any], baseline: list[dict],
                  layer: int) -> dict[str, Any]:
    """Known-answer check: the refusal direction (harmful minus benign mean at `layer`) steered
    negatively should make harmful requests less refused (higher accept-vs-reject log-odds)."""
    import torch

    from afprobe.activations.batching import PrefixCache
    from afprobe.activations.cache import read_pooled
    from afprobe.activations.scenarios import answer_tags
    from afprobe.activations.steering import SteeringSpec
    from afprobe.analysis.compliance import refusal_score
    from afprobe.analysis.stats import mean_diff_ci

    deploy = [p for p in prompts if p.condition == "deployment"]
    benign = [p for p in build_prompts_for(cfg, backend.tokenizer, harmful=False)
              if p.family == deploy[0].family and p.condition == "deployment"][: len(deploy)]
    key = (layer, "resid_post", "last")
    acts = {}
    shared = PrefixCache(backend.model, keep_new=False) if cfg.cache.prefix_reuse else None  # one system prompt
    for name, group in (("harmful", deploy), ("benign", benign)):
        acts[name] = read_pooled(backend, group, [key[:2]], ["last"], cfg.cache.batch_tokens, shared)[0][key]
    diff = acts["harmful"].mean(0) - acts["benign"].mean(0)
    unit = diff / diff.norm()
    separation = float((acts["harmful"] @ unit).mean() - (acts["benign"] @ unit).mean())
    spec = SteeringSpec("refusal", unit, separation, (layer,), alpha=-1.0, mode="same", positions=cfg.steering.positions)
    accept, reject = answer_tags()
    texts, odds = runner.score(deploy, spec, accept, reject, cfg.steering.max_new_tokens)
    base = {r["prompt_id"]: r for r in baseline}
    base_odds = [base[p.prompt_id]["log_odds"] for p in deploy]
    change = mean_diff_ci(odds, base_odds, paired=True, seed=cfg.seed)
    refusal_before = sum(base[p.prompt_id]["refusal"] for p in deploy) / len(deploy)
    refusal_after = sum(bool(refusal_score(t)) for t in texts) / len(deploy)
    passed = bool(change["ci"][0] > 0 or refusal_after < refusal_before)
    verdict = ("as expected, steering against the refusal direction made harmful requests less refused"
               if passed else "steering against the refusal direction did NOT measurably reduce refusal")
    return {"layer": layer, "alpha": -1.0, "n": len(deploy), "separation": separation,
            "log_odds_change": change["diff"], "log_odds_change_ci": change["ci"],
            "refusal_rate_before": refusal_before, "refusal_rate_after": refusal_after,
            "passed": passed, "statement": f"Known-answer check: {verdict} (log-odds change "
            f"{change['diff']:+.2f} [{change['ci'][0]:+.2f}, {change['ci'][1]:+.2f}], refusal rate "
            f"{refusal_before:.2f} -> {refusal_after:.2f}, n = {len(deploy)} deployment-cue requests)."}
