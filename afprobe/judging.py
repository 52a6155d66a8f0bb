"""Glue between a config's `judge:` section and the judge: builds the engine, runs `afprobe judge-eval`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from afprobe.config import JudgeConfig, load_config
from afprobe.errors import BadInput
from afprobe.fsio import atomic_write_json

DEFAULT_CACHE = Path("runs") / "judge-cache"


def build_engine(cfg: JudgeConfig) -> Any:
    """The completion engine for `cfg.kind`: OpenAI-compatible client, or a local model (loaded here)."""
    if cfg.kind == "openai":
        from afprobe.analysis.judge_openai import OpenAIEngine

        return OpenAIEngine(cfg)
    if cfg.kind == "local":
        from afprobe.activations.chat import LocalChatEngine

        return LocalChatEngine.load(cfg.model, cfg.dtype, cfg.device, cfg.batch_size)
    raise BadInput("judge.kind is 'none'; set judge.kind to local or openai (and judge.model)")


def build_judge(cfg: JudgeConfig, cache_dir: Union[str, Path], engine: Any = None) -> Any:
    """A `Judge` for `cfg`, caching in `cache_dir`. The engine is built (and a local model loaded) unless given."""
    from afprobe.analysis.judge import Judge, user_template

    user_template(cfg)  # a bad prompt_file fails before any model loads
    return Judge(engine if engine is not None else build_engine(cfg), cfg, cache_dir)


def judge_eval(config: str, labels: str, json_out: Optional[str] = None, overrides: Sequence[str] = (),
               cache_dir: Optional[str] = None, quiet: bool = False, engine: Any = None) -> dict:
    """`afprobe judge-eval`: score every labelled trace with the configured judge and compare."""
    from afprobe.analysis.judge_eval import evaluate, format_report, read_labels

    cfg = load_config(config, overrides)
    texts, y = read_labels(labels)
    judge = build_judge(cfg.judge, Path(cache_dir) if cache_dir else DEFAULT_CACHE, engine)
    try:
        verdicts = judge.judge(texts, quiet=quiet)
    finally:
        close = getattr(judge.engine, "close", None)
        if close is not None:
            close()
    scores = [v.score for v in verdicts]
    result = evaluate(scores, y, cfg.judge.threshold, seed=cfg.judge.seed)
    result["votes"] = {s: sum(v.status_counts[s] for v in verdicts) for s in ("ok", "malformed", "refused", "empty")}
    result["malformed_votes"] = sum(v.n_invalid for v in verdicts)
    result["scores"] = scores
    result["labels"] = y
    result["partial"] = [v.partial for v in verdicts]
    result["cached"] = sum(v.cached for v in verdicts)
    result["judge"] = judge.provenance()
    if not quiet:
        print(format_report(result))
    if json_out:
        atomic_write_json(json_out, result)
        if not quiet:
            print(f"wrote {json_out}")
    return result
