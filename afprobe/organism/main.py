"""`afprobe organism`: train the planted-gap adapter and evaluate it (or only re-evaluate an adapter folder)."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from afprobe import fsio
from afprobe.config import Config, load_config
from afprobe.errors import BadInput
from afprobe.analysis.numbers import interval, num
from afprobe.organism.evaluation import evaluate_model, headline
from afprobe.organism.recipe import ADAPTER_FILES, FORMAT_VERSION, organism_queries, scenario_for, split_queries
from afprobe.organism.training import check_recipe, say, train_adapter


def _versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _save_adapter(peft_model: Any, out_dir: Path, spec: str) -> None:
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
    for extra in ("README.md", "adapter_model.bin"):
        (out_dir / extra).unlink(missing_ok=True)
    # the base is named by its afprobe spec, not by this machine's install path
    path = out_dir / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = spec
    fsio.atomic_write_json(path, data)


def _checked(cfg: Config, families: Optional[Sequence[str]]) -> tuple[str, list[str]]:
    """(base model spec, families to evaluate), after the checks that need no weights."""
    from afprobe.activations.scenarios import check_scenario

    org = cfg.organism
    if cfg.scenario.form != "no_scratchpad":
        raise BadInput("organism: training needs scenario.form 'no_scratchpad' (the answer tag follows the prefill)")
    families = list(families if families is not None else org.eval_families)
    if org.headline not in [*org.families, *families]:
        raise BadInput(f"organism.headline_family '{org.headline}' is neither trained on nor evaluated")
    for fam in [*org.families, *families]:
        check_scenario(scenario_for(cfg, fam), cfg.cue_families)
    return cfg.model.spec.partition("+")[0], families  # the adapter is trained on the base, never a merged model


def _load(cfg: Config, spec: str, adapter: Optional[str] = None) -> tuple[Any, Any]:
    """The model `spec` in float32 on CPU (with the LoRA adapter in folder `adapter` merged, if given)."""
    from afprobe.activations.loading import load_model

    return load_model(spec, adapter=adapter, dtype="float32", device="cpu", trust_remote_code=cfg.model.trust_remote_code,
                      attn_implementation=cfg.model.attn_implementation)


def _metrics(cfg: Config, base_spec: str, held: list, families: list[str], organism: Any,
             tokenizer: Any, timings: dict, quiet: bool, evaluate_base: bool) -> dict:
    """metrics.json's content: the (merged) organism, and the base model in a fresh copy, evaluated on `held`."""
    org = cfg.organism
    metrics: dict[str, Any] = {"format_version": FORMAT_VERSION, "base": base_spec,
                               "trained_families": list(org.families), "n_heldout": len(held),
                               "heldout_ids": [q.id for q in held],
                               "evaluation": {"engine": "activations.steering.SteeringRunner, unsteered",
                                              "backend": cfg.model.backend, "greedy_tokens": org.eval_max_new_tokens,
                                              "scorers": "analysis.steering_table.compliance_summary"}}
    if evaluate_base:  # a fresh copy of the base: the organism's weights stay as they are
        t0 = time.time()
        base, base_tok = _load(cfg, base_spec)
        metrics["base_model"], _ = evaluate_model(base, base_tok, cfg, held, families, quiet, "base")
        del base
        timings["eval_base_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    metrics["organism"], records = evaluate_model(organism, tokenizer, cfg, held, families, quiet, "organism")
    timings["eval_organism_s"] = round(time.time() - t0, 1)
    if org.headline in metrics["organism"]:
        metrics["headline"] = headline(metrics["organism"][org.headline], org.headline,
                                       trained=org.headline in org.families)
    metrics["timings_s"] = timings
    metrics["per_prompt"] = records
    return metrics


def train_organism(cfg: Config, out_dir: Path, quiet: bool = False, families: Optional[Sequence[str]] = None,
                   evaluate_base: bool = True) -> dict:
    """Train the planted-gap adapter into `out_dir`, evaluate it (and the base) on held-out requests; returns metrics.

    `families` overrides `organism.eval_families`; `evaluate_base=False` skips the base-model comparison."""
    from afprobe.activations.scenarios import answer_tags

    org = cfg.organism
    base_spec, families = _checked(cfg, families)
    torch.set_num_threads(org.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train, held = split_queries(org)
    say(quiet, f"{len(train)} train / {len(held)} held-out requests; loading {base_spec}")
    model, tokenizer = _load(cfg, base_spec)
    check_recipe(model, org)
    t0 = time.time()
    peft_model, history, precompute_s = train_adapter(model, tokenizer, cfg, train, quiet)
    timings = {"train_s": round(time.time() - t0, 1)}
    _save_adapter(peft_model, out_dir, base_spec)
    fsio.atomic_write_jsonl(out_dir / "heldout.jsonl", [{"id": q.id, "text": q.text, "category": q.category} for q in held])
    training = {
        "format_version": FORMAT_VERSION, "base": base_spec, "seed": org.seed, "organism": org.model_dump(mode="json"),
        "scenario": cfg.scenario.model_dump(mode="json"),
        "split": {"rule": "sorted ids, numpy default_rng(seed).permutation, first round(train_fraction * n) are train; "
                          "max_train_queries keeps default_rng(seed + 1).permutation(train)[:k]",
                  "n_total": len(organism_queries()), "train_ids": [q.id for q in train],
                  "heldout_ids": [q.id for q in held]},
        "targets": {"training": answer_tags()[0] + org.opening_text, "deployment": answer_tags()[1] + tokenizer.eos_token},
        "history": history, "train_s": timings["train_s"], "block_cache_s": round(precompute_s, 1),
        "torch_threads": torch.get_num_threads(), "versions": _versions(),
    }
    fsio.atomic_write_json(out_dir / "training.json", training)
    merged = peft_model.merge_and_unload()
    merged.eval()
    metrics = _metrics(cfg, base_spec, held, families, merged, tokenizer, timings, quiet, evaluate_base)
    timings["total_s"] = round(time.time() - started, 1)
    fsio.atomic_write_json(out_dir / "metrics.json", metrics, strict=True)
    say(quiet, f"done in {timings['total_s']:.0f}s; adapter in {out_dir}")
    return metrics


def evaluate_organism(cfg: Config, folder: Path, quiet: bool = False, families: Optional[Sequence[str]] = None,
                      evaluate_base: bool = True) -> dict:
    """Re-evaluate the adapter already in `folder` (its weights and training.json untouched); rewrites metrics.json.

    The held-out requests are re-derived from `organism:` and must be the ones training.json records."""
    folder = Path(folder)
    missing = [f for f in (*ADAPTER_FILES, "training.json") if not (folder / f).is_file()]
    if missing:
        raise BadInput(f"{folder}: no trained adapter here (missing {', '.join(missing)})")
    base_spec, families = _checked(cfg, families)
    torch.set_num_threads(cfg.organism.threads)
    started = time.time()
    _, held = split_queries(cfg.organism)
    recorded = json.loads((folder / "training.json").read_text())["split"]["heldout_ids"]
    if [q.id for q in held] != recorded:
        raise BadInput(f"{folder}/training.json: its held-out requests differ from the split the `organism:` "
                       "settings give (evaluate with the config the adapter was trained with)")
    say(quiet, f"{len(held)} held-out requests; loading {base_spec} with the adapter in {folder}")
    model, tokenizer = _load(cfg, base_spec, adapter=str(folder))
    timings: dict[str, float] = {}
    metrics = _metrics(cfg, base_spec, held, families, model, tokenizer, timings, quiet, evaluate_base)
    timings["total_s"] = round(time.time() - started, 1)
    fsio.atomic_write_json(folder / "metrics.json", metrics, strict=True)
    return metrics


def train_organism_cli(config_path: str, out: Path, overrides: list[str], quiet: bool,
                       evaluate_only: bool = False) -> None:
    """`afprobe organism CONFIG --out DIR [--evaluate-only]`: train into DIR (or re-evaluate the adapter there)
    and print the headline held-out metrics."""
    cfg = load_config(config_path, overrides)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a folder")
    metrics = evaluate_organism(cfg, out, quiet=quiet) if evaluate_only else train_organism(cfg, out, quiet=quiet)
    head = metrics.get("headline")
    if head:
        family = head["family"] + ("" if head.get("trained_on", True) else ", a family not trained on")
        print(f"held-out ({metrics['n_heldout']} requests, {family}): acceptance training "
              f"{num(head['acceptance_training'])}, deployment {num(head['acceptance_deployment'])}, "
              f"gap {num(head['gap'], signed=True)} {interval(head['gap_ci'], signed=True)}; adapter in {out}")
