"""An OpenAI-compatible HTTP client for the judge: any vLLM server or hosted endpoint.

One request per response asks for N critiques at once (`n=N`, shared prompt).
Transient failures (connection refused, timeouts, HTTP 429/5xx, empty or
malformed bodies) are retried with exponential backoff; after `max_retries`
the request abstains (N × None) and the failure is counted. The API key is
read from an environment variable at construction and only ever sent in the
Authorization header: it is not stored in the config, logged, or returned.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass

import requests


@dataclass(frozen=True)
class HttpJudgeConfig:
    """Where the endpoint is and how hard to try."""

    base_url: str
    model: str
    api: str = "chat"  # "chat" → /chat/completions, "completions" → /completions
    api_key_env: str = "CAPO_JUDGE_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    temperature: float = 0.7
    max_tokens: int = 512


class HttpJudgeClient:
    """Sends critique prompts to an OpenAI-compatible endpoint and returns N texts each."""

    def __init__(self, config: HttpJudgeConfig):
        if config.api not in ("chat", "completions"):
            raise ValueError(f"judge api={config.api!r}; choose chat or completions")
        self.config = config
        self._session = requests.Session()
        key = os.environ.get(config.api_key_env)
        if key:
            self._session.headers["Authorization"] = f"Bearer {key}"
        self.failures: Counter = Counter()

    def _payload(self, prompt: str, n: int) -> dict:
        c = self.config
        body = {"model": c.model, "n": n, "temperature": c.temperature, "max_tokens": c.max_tokens}
        if c.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def _texts(self, body: object, n: int) -> list[str | None]:
        """Pull the N texts out of a response body; anything malformed is None."""
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices:
            raise ValueError("no choices in response")
        out: list[str | None] = []
        for ch in choices[:n]:
            if not isinstance(ch, dict):
                out.append(None)
                continue
            text = (
                ch.get("message", {}).get("content")
                if self.config.api == "chat"
                else ch.get("text")
            )
            out.append(text if isinstance(text, str) and text.strip() else None)
        return out + [None] * (n - len(out))

    def critique(self, prompt: str, n: int) -> list[str | None]:
        """N critique texts for one prompt; N × None after the retries are spent."""
        url = self.config.base_url.rstrip("/") + (
            "/chat/completions" if self.config.api == "chat" else "/completions"
        )
        for attempt in range(self.config.max_retries + 1):
            reason = None
            try:
                resp = self._session.post(
                    url, json=self._payload(prompt, n), timeout=self.config.timeout_s
                )
                if resp.status_code == 200:
                    return self._texts(resp.json(), n)
                reason = f"http_{resp.status_code}"
                if resp.status_code < 500 and resp.status_code != 429:
                    self.failures[reason] += 1
                    return [None] * n  # a client error will not fix itself
            except requests.Timeout:
                reason = "timeout"
            except requests.ConnectionError:
                reason = "connection"
            except ValueError:  # JSON decode errors and malformed bodies
                reason = "malformed"
            self.failures[reason] += 1
            if attempt < self.config.max_retries:
                time.sleep(self.config.backoff_s * 2**attempt)
        self.failures["gave_up"] += 1
        return [None] * n
