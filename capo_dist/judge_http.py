"""An OpenAI-compatible HTTP client for the judge: any vLLM server or hosted endpoint.

One request per response asks for N critiques at once (`n=N`, shared prompt).
The endpoint is not trusted: whatever it sends, `critique` returns N texts or
N × None and never raises. Time is bounded by construction:

- each attempt (connect, send, headers, body) ends `timeout_s` after it starts
  (an asyncio deadline that cancels whatever is awaited, so a server that
  trickles bytes cannot stretch it);
- all attempts and the waits between them end `request_deadline_s` after the
  request starts: that is the longest one response can take.

The body is read up to `max_body_bytes` (also after gzip/deflate decoding,
done here with a bounded decompressor), then decoded as JSON and checked at
every level of the OpenAI shape. Connection errors, timeouts, HTTP 429/5xx,
cut-off, badly compressed, oversized or malformed bodies are retried (with
exponential backoff, or the server's `Retry-After` on 429/503, capped at
`retry_after_max_s`); after `max_retries`, or when the next try would start
past the deadline, the request abstains (N × None) and the failure is counted
by reason in `failures`. A client error (other 4xx, 3xx) is not retried. The
API key is read from an environment variable at construction and only ever
sent in the Authorization header: it is not stored in the config, logged, or
returned.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

# Everything talking to the endpoint can raise, once the deadline's TimeoutError is caught.
_IO_ERRORS = (aiohttp.ClientError, HttpProcessingError, OSError)
# Everything decoding a body can raise (UnicodeDecodeError and JSONDecodeError are ValueErrors;
# a deeply nested document raises RecursionError).
_DECODE_ERRORS = (ValueError, RecursionError, zlib.error)
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class HttpJudgeConfig:
    """Where the endpoint is and how hard to try."""

    base_url: str
    model: str
    api: str = "chat"  # "chat" → /chat/completions, "completions" → /completions
    api_key_env: str = "CAPO_JUDGE_API_KEY"
    timeout_s: float = 60.0  # one attempt, connect to last byte
    request_deadline_s: float = 180.0  # one response: all attempts and waits
    max_retries: int = 3
    backoff_s: float = 0.5
    retry_after_max_s: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 512
    max_body_bytes: int = 8 << 20


class BodyError(ValueError):
    """A response body that cannot be a completion: too large, cut off, badly encoded."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Attempt:
    """What one HTTP attempt gave: the texts, or why not and whether to try again."""

    texts: list[str | None] | None
    reason: str = ""
    retry: bool = True
    retry_after_s: float | None = None


def choice_texts(body: object, api: str, n: int) -> list[str | None] | None:
    """The N texts of a decoded completion body; None when the body does not have the
    OpenAI shape at every level (the endpoint is broken: retry). A choice with an
    empty or null text is a critique the model did not write (None, no retry)."""
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    out: list[str | None] = []
    for choice in choices[:n]:
        if not isinstance(choice, dict):
            return None
        holder = choice.get("message") if api == "chat" else choice
        if not isinstance(holder, dict):
            return None
        text = holder.get("content" if api == "chat" else "text")
        if text is not None and not isinstance(text, str):
            return None
        out.append(text if text and text.strip() else None)
    return out + [None] * (n - len(out))


def decode_body(raw: bytes, content_encoding: str, cap: int) -> bytes:
    """The body after its Content-Encoding (identity, gzip or deflate), at most `cap` bytes."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise BodyError("malformed")  # we asked for identity, gzip or deflate only
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # gzip or zlib header
    out = inflater.decompress(raw, cap + 1)
    if len(out) > cap:
        raise BodyError("too_large")
    if not inflater.eof:
        raise BodyError("malformed")  # cut off, or garbage after a valid start
    return out


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date, RFC 9110);
    None when absent or unreadable. `now` is the Unix time."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The raw body, refusing more than `cap` bytes before reading them."""
    if resp.content_length is not None and resp.content_length > cap:
        raise BodyError("too_large")
    parts, size = [], 0
    while chunk := await resp.content.read(_READ_CHUNK):
        size += len(chunk)
        if size > cap:
            raise BodyError("too_large")
        parts.append(chunk)
    return b"".join(parts)


class HttpJudgeClient:
    """Sends critique prompts to an OpenAI-compatible endpoint and returns N texts each."""

    def __init__(self, config: HttpJudgeConfig):
        if config.api not in ("chat", "completions"):
            raise ValueError(f"judge api={config.api!r}; choose chat or completions")
        self.config = config
        self._headers = {"Accept-Encoding": "gzip, deflate"}
        key = os.environ.get(config.api_key_env)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.url = config.base_url.rstrip("/") + (
            "/chat/completions" if config.api == "chat" else "/completions"
        )
        # One private event loop, reused: a DNS lookup abandoned at a deadline finishes in
        # its thread without holding up the next call.
        self._loop = asyncio.new_event_loop()
        self.failures: Counter = Counter()

    def _payload(self, prompt: str, n: int) -> dict:
        c = self.config
        body = {"model": c.model, "n": n, "temperature": c.temperature, "max_tokens": c.max_tokens}
        if c.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def critique(self, prompt: str, n: int) -> list[str | None]:
        """N critique texts for one prompt; N × None after the retries or the deadline."""
        return self._loop.run_until_complete(self._critique(self._payload(prompt, n), n))

    async def _critique(self, payload: dict, n: int) -> list[str | None]:
        c = self.config
        clock = self._loop.time
        deadline = clock() + c.request_deadline_s
        async with aiohttp.ClientSession(
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None),  # the deadlines below bound it
            auto_decompress=False,  # decoded here, bounded
            trust_env=True,  # HTTP(S)_PROXY
        ) as session:
            for attempt in range(c.max_retries + 1):
                remaining = deadline - clock()
                if remaining <= 0:
                    break
                try:
                    result = await asyncio.wait_for(
                        self._attempt(session, payload, n), min(c.timeout_s, remaining)
                    )
                except asyncio.TimeoutError:
                    result = Attempt(None, "timeout")
                if result.texts is not None:
                    return result.texts
                self.failures[result.reason] += 1
                if not result.retry or attempt == c.max_retries:
                    break
                wait = (
                    min(result.retry_after_s, c.retry_after_max_s)
                    if result.retry_after_s is not None
                    else c.backoff_s * 2**attempt
                )
                if clock() + wait >= deadline:
                    break  # the next try would start past the deadline
                await asyncio.sleep(wait)
        self.failures["gave_up"] += 1
        return [None] * n

    async def _attempt(self, session: aiohttp.ClientSession, payload: dict, n: int) -> Attempt:
        """One POST; every error the endpoint can cause becomes a failed `Attempt`."""
        try:
            async with session.post(self.url, json=payload, allow_redirects=False) as resp:
                if resp.status != 200:
                    status = resp.status
                    retry = status >= 500 or status == 429
                    after = None
                    if status in (429, 503):
                        after = retry_after_seconds(resp.headers.get("Retry-After"), time.time())
                    return Attempt(None, f"http_{status}", retry, after)
                cap = self.config.max_body_bytes
                raw = await _read_capped(resp, cap)
                body = decode_body(raw, resp.headers.get("Content-Encoding", ""), cap)
                texts = choice_texts(json.loads(body), self.config.api, n)
        except BodyError as err:
            return Attempt(None, err.reason)
        except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError, HttpProcessingError):
            return Attempt(None, "malformed")  # cut off mid-body, unreadable status or headers
        except _IO_ERRORS:
            return Attempt(None, "connection")
        except _DECODE_ERRORS:
            return Attempt(None, "malformed")
        return Attempt(texts) if texts is not None else Attempt(None, "malformed")
