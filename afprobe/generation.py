"""How the steer stage generates and scores completions in each scenario form.

no_scratchpad: the answer is prefilled with `<OUTPUT>`; `steering.max_new_tokens` steps per prompt and the
whole completion is the answer (as before).

scratchpad: the model reasons first. Each sequence stops at the end of its OUTPUT block (`</OUTPUT>`) or
at EOS (a per-sequence check inside the batched decode, `activations.steering.StopRule`; finished rows
leave the batch, the shared prefix is reused), with a budget of `steering.max_new_tokens` (1024 unless
set; capped at the model's context). Each record carries the reasoning and the final output separately;
compliance (tag, refusal phrases) is scored on the output only. A "tokens" progress bar shows tokens per
second.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from afprobe.config import Config
from afprobe.log import log


class Generation:
    """Generation and scoring settings of one run (see the module docstring)."""

    def __init__(self, cfg: Config, quiet: bool = True) -> None:
        from tqdm.auto import tqdm

        from afprobe.activations.scenario_text import PREFILLS
        from afprobe.activations.steering import StopRule

        self.cfg = cfg
        self.scratchpad = cfg.scenario.form == "scratchpad"
        self.prefill = PREFILLS[cfg.scenario.prefill] if self.scratchpad else ""
        self.stop = StopRule() if self.scratchpad else None
        self.tokens = tqdm(desc="tokens", unit="tok", disable=quiet or not self.scratchpad)
        self._warned = False

    def budget(self, prompts: Sequence[Any], model: Any) -> int:
        """steering.max_new_tokens, capped so the longest prompt plus its completion fits the context."""
        wanted = self.cfg.steering.max_new_tokens
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        longest = max((len(p.input_ids) for p in prompts), default=0)
        if limit and longest + wanted > limit:
            room = max(1, int(limit) - longest)
            if not self._warned:
                log.warning(f"steering.max_new_tokens {wanted} + the longest prompt ({longest} tokens) exceeds the "
                            f"model's context ({limit}); generating at most {room} tokens")
                self._warned = True
            return room
        return wanted

    def score(self, runner: Any, prompts: Sequence[Any], spec: Any, progress: Optional[Callable[[int], None]] = None,
              sample: bool = True) -> tuple[list[str], list[float], list[dict]]:
        """(completions, log-odds, ends) for `prompts` under `spec`; ends: per prompt {"n_tokens", "stop"}."""
        from afprobe.activations.scenarios import answer_tags

        st = self.cfg.steering
        accept, reject = answer_tags()
        ends: list[dict] = []
        texts, odds = runner.score(prompts, spec, accept, reject, self.budget(prompts, runner.backend.model),
                                   st.do_sample and sample, st.temperature, self.cfg.seed, progress,
                                   stop=self.stop, ends=ends, on_tokens=self.tokens.update)
        return texts, odds, ends

    def fields(self, text: str, end: Optional[dict] = None) -> dict:
        """Record fields for one completion: completion, tag, refusal (scored on the output only in
        scratchpad form), and in scratchpad form reasoning, output, output_closed, n_tokens, stop."""
        from afprobe.analysis.compliance import refusal_score, tag_score
        from afprobe.analysis.scratchpad import scratchpad_record

        if not self.scratchpad:
            return {"completion": text, "tag": tag_score(text), "refusal": bool(refusal_score(text))}
        return {"completion": text, **scratchpad_record(text, self.prefill), **(end or {})}

    def refused(self, text: str) -> bool:
        return bool(self.fields(text)["refusal"])

    def close(self) -> None:
        self.tokens.close()
