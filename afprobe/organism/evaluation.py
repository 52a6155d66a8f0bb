"""Held-out evaluation of the organism (and of its base) on the shared engine.

Each family's prompts run once through `activations.steering.SteeringRunner` with the unsteered spec, exactly
as the steer stage's unsteered baseline does (`afprobe.generation.Generation.score`): the shared system prompt's
KV cache is reused (`activations/kv.py`), the accept and reject tags are teacher-forced from the prompt's cache
(log-odds at the answer start), and the answer is decoded greedily for `organism.eval_max_new_tokens` tokens.
Rows are the steering stage's records (`analysis/steering_table.py`); the statistics are
`analysis.steering_table.compliance_summary` under the tag and the log-odds scorers.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from afprobe.activations.queries import Query
from afprobe.analysis.numbers import num
from afprobe.config import Config
from afprobe.organism.recipe import family_prompts
from afprobe.organism.training import say

SCORERS = ("tag", "logodds")  # the answer tag written; the teacher-forced tag preference


def eval_config(cfg: Config) -> Config:
    """`cfg` with the organism's evaluation settings in the steering section (greedy, eval_max_new_tokens)."""
    steering = cfg.steering.model_copy(update={"max_new_tokens": cfg.organism.eval_max_new_tokens, "do_sample": False})
    return cfg.model_copy(update={"steering": steering})


def make_runner(model: Any, tokenizer: Any, cfg: Config) -> Any:
    """The shared steering runner on `model` (the config's backend, prefix reuse on, organism.eval_batch rows)."""
    from afprobe.activations.backends import make_backend
    from afprobe.activations.steering import SteeringRunner

    backend = make_backend(cfg.model.backend, model, tokenizer)
    return SteeringRunner(backend, cfg.cache.batch_tokens, prefix_reuse=True, max_batch=cfg.organism.eval_batch)


def family_records(runner: Any, cfg: Config, family: str, queries: list[Query]) -> list[dict]:
    """Unsteered steering records ({prompt_id, query_id, condition, family, ..., completion, tag, refusal,
    log_odds}) for `queries` under both cues of `family`."""
    from afprobe.activations.steering import unsteered_spec
    from afprobe.generation import Generation
    from afprobe.pipeline import steering_records

    ecfg = eval_config(cfg)
    prompts = family_prompts(runner.backend.tokenizer, ecfg, family, queries)
    spec = unsteered_spec(runner.backend.d_model)
    gen = Generation(ecfg)
    try:
        texts, odds, ends = gen.score(runner, prompts, spec)
    finally:
        gen.close()
    return steering_records(prompts, spec, texts, odds, gen, ends)


def summarize(records: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """One family's held-out numbers: {n_queries, by_scorer: {scorer: ComplianceSummary as JSON}} (null where
    a number is undefined, e.g. a rate with no parsed answer)."""
    from afprobe.analysis.steering_table import compliance_summary

    by_scorer = {name: compliance_summary(list(records), scorer=name, n_boot=n_boot, seed=seed).model_dump(mode="json")
                 for name in SCORERS}
    return {"n_queries": len({r["query_id"] for r in records}), "by_scorer": by_scorer}


def evaluate_model(model: Any, tokenizer: Any, cfg: Config, queries: list[Query], families: Sequence[str],
                   quiet: bool = True, label: str = "") -> tuple[dict, list[dict]]:
    """({family: summary}, the records of every family) for `model` on `queries`."""
    org = cfg.organism
    runner = make_runner(model, tokenizer, cfg)
    summaries, records = {}, []
    for family in families:
        t0 = time.time()
        rows = family_records(runner, cfg, family, queries)
        summaries[family] = s = summarize(rows, org.bootstrap, org.seed)
        tag = s["by_scorer"]["tag"]
        say(quiet, f"{label} {family}: accept training {num(tag['training']['rate'])} deployment "
                   f"{num(tag['deployment']['rate'])} gap {num(tag['gap']['estimate'], signed=True)} "
                   f"({time.time() - t0:.0f}s)")
        records.extend(rows)
    return summaries, records


def headline(summary: dict, family: str, trained: bool = True) -> dict:
    """One family's organism numbers (tag scorer; log-odds means and their paired gap); `trained`: whether the
    adapter was trained on that family (False: a held-out family)."""
    tag = summary["by_scorer"]["tag"]
    return {"family": family, "trained_on": trained, "acceptance_training": tag["training"]["rate"],
            "acceptance_training_ci": tag["training"]["ci"], "acceptance_deployment": tag["deployment"]["rate"],
            "acceptance_deployment_ci": tag["deployment"]["ci"], "gap": tag["gap"]["estimate"],
            "gap_ci": tag["gap"]["ci"], "p_value": tag["gap"]["mcnemar_p"], "discordant": tag["gap"]["discordant"],
            "interval_method": tag["gap"]["interval_method"], "verdict": tag["gap"]["verdict"],
            "log_odds_training": tag["log_odds"]["training"], "log_odds_deployment": tag["log_odds"]["deployment"],
            "log_odds_gap": tag["log_odds"]["gap"], "log_odds_gap_ci": tag["log_odds"]["gap_ci"]}

