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
