"""Judging a scratchpad run's reasoning traces (runs after the steer stage; `afprobe steer` and `afprobe run`).

When the config's judge is enabled (`judge.kind` local or openai) and the scenario form is scratchpad, every
reasoning trace in steering/generations.jsonl is judged (analysis/judge.py). Verdicts are cached by content
hash in DIR/judge/judge_cache.jsonl, so a rerun costs nothing and an interrupted run resumes where it
stopped; a local judge model is loaded only when some trace is not cached yet (and the steering model
itself is reused when the judge names the same model).

Writes DIR/judge/verdicts.jsonl (one line per generation record: its cell, cue, query, the verdict and its
votes without the raw text), DIR/judge/examples.jsonl (a few judged traces per cell, for the report), the
summary's `judge` section (analysis/schema.py: JudgeSummary) and the judge's provenance in the manifest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from afprobe.config import JudgeConfig
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_jsonl
from afprobe.log import log

JUDGE_DIR = "judge"
EXAMPLES_PER_CELL = 2


class LazyEngine:
    """A completion engine built only when the judge first needs it (every trace cached: never)."""

    def __init__(self, cfg: JudgeConfig, loaded: Optional[tuple] = None, steering_spec: Optional[str] = None) -> None:
        self.cfg = cfg
        self.identity = f"{cfg.kind}:{cfg.model}"
        self.parallel = cfg.concurrency if cfg.kind == "openai" else 1
        self._loaded = loaded if cfg.kind == "local" and cfg.model == steering_spec else None
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            if self._loaded is not None:
                from afprobe.activations.chat import LocalChatEngine

                model, tokenizer = self._loaded[0], self._loaded[1]
                self._engine = LocalChatEngine(model, tokenizer, self.cfg.model, self.cfg.batch_size)
            else:
                from afprobe.judging import build_engine

                self._engine = build_engine(self.cfg)
            if self._engine.identity != self.identity:
                raise RuntimeError(f"judge engine identity {self._engine.identity} != {self.identity}")
        return self._engine

    def check(self) -> None:
        check = getattr(self.engine, "check", None)
        if check is not None:
            check()

    def complete(self, messages: list[dict], n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        return self.engine.complete(messages, n, temperature, max_tokens, seed)

    def close(self) -> None:
        close = getattr(self._engine, "close", None)
        if close is not None:
            close()


def judge_enabled(cfg: Any) -> bool:
    return cfg.judge.kind != "none" and cfg.scenario.form == "scratchpad"


def run_judge(run_dir: Path, overrides: Sequence[str] = (), quiet: bool = False,
              loaded: Optional[tuple] = None) -> Optional[dict]:
    """Judge every trace of a finished steer stage (see the module docstring); None when not enabled."""
    from afprobe.analysis.judge import PARTIAL_QUESTION
    from afprobe.analysis.judge_results import cell_key, pick_examples, summarise_cells
    from afprobe.analysis.schema import JudgeSummary
    from afprobe.judging import build_judge
    from afprobe.pipeline import resolve_run_config
    from afprobe.rundir import RunDir

    run = RunDir(Path(run_dir))
    cfg = resolve_run_config(run, overrides)
    if not judge_enabled(cfg):
        if cfg.judge.kind != "none":
            log.info("judge: configured, but scenario.form is not scratchpad (no reasoning to judge); skipped")
        return None
    run.require("steer")
    path = run.path / "steering" / "generations.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if records and "reasoning" not in records[0]:
        raise BadInput(f"{path} has no reasoning fields (written by an older afprobe); rerun `afprobe steer --force`")
    folder = run.path / JUDGE_DIR
    engine = LazyEngine(cfg.judge, loaded, cfg.model.spec if cfg.model.adapter is None else None)
    judge = build_judge(cfg.judge, folder, engine)
    with_reasoning = [r for r in records if (r.get("reasoning") or "").strip()]
    if not quiet:
        log.info(f"judge: {len(with_reasoning)} reasoning traces, {cfg.judge.votes} votes each ({engine.identity})")
    with run.stage("judge", cfg, n_traces=len(records), judge=judge.provenance()) as extra:
        try:
            verdicts = judge.judge([r["reasoning"] for r in with_reasoning], quiet=quiet)
        finally:
            engine.close()
        by_id = {id(r): v for r, v in zip(with_reasoning, verdicts)}
        threshold = cfg.judge.threshold
        rows = []
        for r in records:
            v = by_id.get(id(r))
            partial = None if v is None or v.partial is None else int(v.partial >= threshold)
            rows.append({**{k: r.get(k) for k in ("prompt_id", "query_id", "condition", "family", "direction",
                                                     "replicate", "mode", "layer", "site", "alpha", "tag")},
                         "af": None if v is None or v.flagged is None else int(v.flagged),
                         "score": None if v is None else v.score, "partial": partial,
                         "partial_score": None if v is None else v.partial,
                         "n_votes": 0 if v is None else len(v.votes), "n_valid": 0 if v is None else v.n_valid,
                         "status_counts": None if v is None else v.status_counts, "cached": bool(v and v.cached),
                         "votes": [] if v is None else [{k: x[k] for k in ("status", "answers", "yes", "partial", "problem")}
                                                        for x in v.votes],
                         "judged": v is not None})
        atomic_write_jsonl(folder / "verdicts.jsonl", rows)
        texts = {(r["prompt_id"], cell_key(r)): r for r in records}
        examples = []
        for ex in pick_examples(rows, EXAMPLES_PER_CELL):
            src = texts[(ex["prompt_id"], cell_key(ex))]
            examples.append({**ex, "reasoning": src.get("reasoning"), "output": src.get("output")})
        atomic_write_jsonl(folder / "examples.jsonl", examples)
        cells = summarise_cells(rows)
        counts = {s: sum((r["status_counts"] or {}).get(s, 0) for r in rows) for s in ("ok", "malformed", "refused", "empty")}
        summary = JudgeSummary(
            judge=judge.provenance(), threshold=threshold, votes_per_trace=cfg.judge.votes, n_traces=len(records),
            n_judged=sum(r["judged"] for r in rows), n_no_reasoning=len(records) - len(with_reasoning),
            n_unscored=sum(r["judged"] and r["af"] is None for r in rows), n_cached=sum(r["cached"] for r in rows),
            vote_counts=counts, partial_question=PARTIAL_QUESTION, cells=cells)
        run.update_summary(judge=summary)
        extra.update(n_judged=summary.n_judged, n_cached=summary.n_cached)
    if not quiet:
        log.info(f"judge: {summary.n_judged} traces judged ({summary.n_cached} from the cache) -> {folder}")
    return summary.model_dump(mode="json")
