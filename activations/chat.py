"""Sampled chat completions from a model loaded by afprobe (the local judge engine).

`LocalChatEngine.complete(messages, n, temperature, max_tokens, seed)` applies the tokenizer's chat
template, runs the prompt once, and samples n answers from that shared KV cache with HF `generate` in
batches of `batch_size` (temperature 0: greedy), so n votes cost one prompt forward, not n.
The torch RNG is seeded per call inside a forked RNG state, so a call's answers depend only on its
arguments and the caller's random state is left alone.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from afprobe.errors import BadInput


class LocalChatEngine:
    parallel = 1  # one generate at a time; batching happens inside `complete`

    def __init__(self, model: Any, tokenizer: Any, spec: str, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.identity = f"local:{spec}"
        self.batch_size = max(1, int(batch_size))
        self.calls = 0

    @classmethod
    def load(cls, spec: str, dtype: str = "float32", device: str = "auto", batch_size: int = 8) -> "LocalChatEngine":
        from afprobe.activations.loading import load_model

        model, tokenizer = load_model(spec, dtype=dtype, device=device)
        return cls(model, tokenizer, spec, batch_size)

    def _prompt_ids(self, messages: list[dict]) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and ids.shape[1] >= limit:
            raise BadInput(f"judge prompt has {ids.shape[1]} tokens; the local judge model takes {limit}")
        return ids.to(self.model.device)

    @torch.inference_mode()
    def complete(self, messages: list[dict], n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        self.calls += 1
        ids = self._prompt_ids(messages)
        sample = temperature > 0
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        out: list[str] = []
        # the prompt but its last token, once; generate runs the last token on top of a per-batch copy
        prefix = self.model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, n, self.batch_size):
                rows = min(self.batch_size, n - start)
                batch = ids.expand(rows, -1)
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(rows)
                # plain temperature sampling: no top-k / top-p truncation from the model's generation config
                knobs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
                gen = self.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), past_key_values=cache,
                                          max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id, **knobs)
                out += self.tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        return out
