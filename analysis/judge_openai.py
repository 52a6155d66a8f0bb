"""Completion engine for an OpenAI-compatible server (vLLM, llama.cpp's server, a hosted API).

An HTTP client, not a model: it lives in analysis/. The key comes from the environment variable named
by `judge.api_key_env` and is held only in the client object, never logged or written.

- `check()` (called by the judge before its first request): the endpoint answers `GET /models`, the
  model name is among those served, and the key variable, if named, is set; each failure is BadInput.
- Each vote is one request with its own seed (seed + vote index), so a vote is reproducible alone and
  servers that ignore `n` still work. At most `concurrency` requests are in flight at once.
- Connection errors, timeouts, 429 and 5xx are retried `retries` times with exponential backoff
  (0.5 s, 1 s, 2 s, ... capped at 30 s); then, and on any other error status, BadInput.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from afprobe.config import JudgeConfig
from afprobe.errors import BadInput

BACKOFF_S = 0.5
BACKOFF_MAX_S = 30.0
_NO_KEY = "not-needed"  # the client insists on some key; a server without auth ignores it


def _key_from_env(name: Optional[str]) -> str:
    if name is None:
        return _NO_KEY
    value = os.environ.get(name, "")
    if not value.strip():
        raise BadInput(f"judge.api_key_env names {name}, but that environment variable is not set")
    return value.strip()


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


class OpenAIEngine:
    """`complete()` through the `openai` client against `cfg.base_url` (see module docstring)."""

    def __init__(self, cfg: JudgeConfig) -> None:
        import openai

        if not cfg.model or not cfg.base_url:
            raise BadInput("the openai judge needs judge.model and judge.base_url")
        self.model = cfg.model
        self.base_url = cfg.base_url.rstrip("/")
        self.identity = f"openai:{cfg.model}"
        self.parallel = cfg.concurrency
        self.retries = cfg.retries
        self._openai = openai
        self._api_key_env = cfg.api_key_env
        self._timeout = cfg.timeout_s
        self._client: Any = None
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="judge-request")  # bounds requests in flight
        self.requests = 0  # requests sent (retries included)
        self._count_lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._openai.OpenAI(base_url=self.base_url, api_key=_key_from_env(self._api_key_env),
                                               timeout=self._timeout, max_retries=0)
        return self._client

    def served_models(self) -> list[str]:
        """Model names the endpoint serves (`GET /models`); BadInput when it cannot be asked."""
        o = self._openai
        try:
            return [m.id for m in self.client.models.list().data]
        except o.APIConnectionError as exc:  # includes timeouts
            raise BadInput(f"judge endpoint {self.base_url} is unreachable ({_first_line(exc)})") from None
        except (o.AuthenticationError, o.PermissionDeniedError):
            raise BadInput(f"judge endpoint {self.base_url} refused the key from "
                           f"{self._api_key_env or 'judge.api_key_env (none set)'}") from None
        except o.NotFoundError:
            raise BadInput(f"judge endpoint {self.base_url} has no /models; base_url usually ends in /v1") from None
        except o.APIStatusError as exc:
            raise BadInput(f"judge endpoint {self.base_url} answered {exc.status_code} to GET /models") from None

    def check(self) -> None:
        served = self.served_models()
        if self.model not in served:
            raise BadInput(f"judge model '{self.model}' is not served at {self.base_url} "
                           f"(served: {', '.join(served) or 'none'})")

    def _one(self, messages: list[dict], temperature: float, max_tokens: int, seed: int) -> str:
        o = self._openai
        retryable = (o.APIConnectionError, o.RateLimitError, o.InternalServerError)
        for attempt in range(self.retries + 1):
            try:
                with self._count_lock:
                    self.requests += 1
                resp = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens,
                    seed=seed, n=1)
                msg = resp.choices[0].message if resp.choices else None
                return (msg.content or getattr(msg, "refusal", None) or "") if msg is not None else ""
            except retryable as exc:
                if attempt == self.retries:
                    raise BadInput(f"judge endpoint {self.base_url} failed after {self.retries + 1} attempts "
                                   f"({_first_line(exc)}); rerun to resume from the cache") from None
                time.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt))
            except o.APIStatusError as exc:
                raise BadInput(f"judge endpoint {self.base_url} rejected a request with {exc.status_code} "
                               f"({_first_line(exc)})") from None
        raise AssertionError("unreachable")

    def complete(self, messages: list[dict], n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        futures = [self._pool.submit(self._one, messages, temperature, max_tokens, seed + i) for i in range(n)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
