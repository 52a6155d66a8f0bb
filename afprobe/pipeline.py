"""The stages, chained through files in a run directory: cache -> probe -> steer -> report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from afprobe.config import Config, apply_override, load_config, parse_override, validate_config
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_jsonl
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
    run = RunDir(Path(out))
    run.claim(cfg, force)
    if run.stage_done("cache", cfg):
        _say(quiet, f"cache: up to date in {run.path / 'activations'}")
        return run
    model, tokenizer, backend, fingerprint = loaded or load_model_and_backend(cfg)
    run.check_fingerprint(fingerprint, force)
    prompts = build_prompts_for(cfg, tokenizer)
    _check_prompts(run, prompts)
    with run.stage("cache", cfg, n_prompts=len(prompts), backend=backend.name) as extra:
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
    from afprobe.probes.directions import load_direction

    folder = run.path / "probes" / "directions"
    st = cfg.steering
    names = ["best"] if st.layers == "best" else [f"layer{layer}" for layer in st.layers]
    if st.direction != "best":
        names = [st.direction]
    specs = []
    for name in names:
        from afprobe.fsio import safe_name

        vector, meta = load_direction(folder / f"{safe_name(name, 'direction name')}.safetensors")
        layer = int(meta["layer"])
        if not 0 <= layer < n_layers:
            raise BadInput(f"direction {name} is for layer {layer}, but the model has {n_layers} layers")
        unit = torch.tensor(vector, dtype=torch.float32)
        sep = float(meta["separation"])
        control = random_orthogonal(unit, cfg.seed + layer)
        for alpha in st.alphas:
            common = dict(separation=sep, layers=(layer,), alpha=float(alpha), mode=st.mode, positions=st.positions)
            specs.append(SteeringSpec("probe", unit, **common))
            if "random" in st.controls and alpha != 0:
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

    from afprobe.activations.scenarios import answer_tags
    from afprobe.activations.steering import SteeringRunner
    from afprobe.analysis.compliance import refusal_score, tag_score
    from afprobe.analysis.steering_table import (
        CSV_COLUMNS, baseline_records, compliance_summary, results_rows, steering_summary,
    )
    from afprobe.fsio import atomic_write_csv

    run = RunDir(Path(run_dir))
    cfg = resolve_run_config(run, overrides)
    run.require("probe")
    if run.stage_done("steer", cfg):
        _say(quiet, "steer: up to date")
        return run
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
            texts = runner.generate(prompts, spec, st.max_new_tokens, st.do_sample, st.temperature, cfg.seed, bar.update)
            odds = runner.log_odds(prompts, spec, accept, reject)
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
        rows = results_rows(records, seed=cfg.seed)
        atomic_write_csv(run.path / "steering" / "results.csv", rows, CSV_COLUMNS)
        base = baseline_records(records)
        run.update_summary(compliance=compliance_summary(base, seed=cfg.seed) if base else None,
                           steering=steering_summary(rows))
        extra.update(runner.token_counts)
    run.update_summary()
    _say(quiet, f"steer: {len(specs)} conditions x {len(prompts)} prompts -> {run.path / 'steering'}")
    return run


def _stage_hash(cfg: Config, stage: str) -> str:
    from afprobe.rundir import stage_hash

    return stage_hash(cfg, stage)
