"""An OpenAI-compatible HTTP client for the judge: any vLLM server or hosted endpoint.

A batch of prompts (`critique_many`) runs on one event loop and one HTTP session,
with at most `max_concurrency` requests in flight; their replies come back in
the prompts' order. Each response asks for its N critiques in one request
(`n=N`, one shared prompt: the server prefills it once) where the server
honours `n`, and in N requests of `n=1` where it does not (`n_per_request`:
`n`, `one`, or `auto`, which sends `n=N` until a reply brings fewer choices
than asked, then asks the missing ones with `n=1` and keeps doing that).

Rate limits (`rpm`, `tpm`; 0 = none) space the requests' starts evenly: a
request may start once the previous one's share of the minute has passed
(60/rpm seconds for rpm; for tpm, its token ESTIMATE x 60/tpm seconds, the
estimate being a token per 4 bytes of prompt plus `max_tokens` for each
critique asked, known before sending; the usage the server reports is counted
in `tokens` but does not feed the limiter). Each retry is a request too.

The endpoint is not trusted: whatever it sends, `critique` returns N texts or
N × None and never raises. Time is bounded by construction:

- each attempt (connect, send, headers, body) ends `timeout_s` after it starts
  (an asyncio deadline that cancels whatever is awaited, so a server that
  trickles bytes cannot stretch it);
- all attempts, the waits between them and the rate limiter's waits end
  `request_deadline_s` after the request gets its concurrency slot: that is
  the longest one request can take (a wait that would end past it abstains).

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
from collections.abc import Callable, Sequence
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
    max_concurrency: int = 8  # HTTP requests in flight at once
    rpm: float = 0.0  # requests started per minute, 0 = no limit
    tpm: float = 0.0  # estimated tokens per minute (see the module doc), 0 = no limit
    n_per_request: str = "auto"  # auto | n (n=N in one request) | one (N requests of n=1)


N_PER_REQUEST = ("auto", "n", "one")
# A usage figure above this is not a token count (a hostile or broken endpoint).
_MAX_USAGE = 1 << 40


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
    choices: int = 0  # how many choices the reply held (at most the n asked)
    usage: Usage | None = None


@dataclass(frozen=True)
class Usage:
    """The token counts a reply's `usage` reports; `cached_tokens` None where it does
    not say how many prompt tokens came from the server's prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None


def _count(value: object) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_USAGE
    return value if ok else None


def usage_of(body: object) -> Usage | None:
    """The OpenAI `usage` of a decoded body (prompt_tokens, completion_tokens and
    prompt_tokens_details.cached_tokens); None when absent or not counts."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(prompt, completion, cached)


class RateLimiter:
    """Spaces request starts so that at most `per_minute` units start per minute, evenly:
    a request costing `cost` units holds the next `cost * 60 / per_minute` seconds."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.next_free = float("-inf")

    def reserve(self, now: float, cost: float, not_after: float) -> float | None:
        """The time this request may start; None (nothing reserved) if after `not_after`."""
        start = max(now, self.next_free)
        if start > not_after:
            return None
        self.next_free = start + cost * self.interval
        return start


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
    """Sends critique prompts to an OpenAI-compatible endpoint and returns N texts each.

    `failures` counts failed attempts by reason (and `gave_up`: requests that
    abstained); `tokens` counts what the successful replies' `usage` reported:
    prompt_tokens, completion_tokens, cached_tokens and cached_prompt_tokens (the
    prompt tokens of the replies that said how many were cached), and
    no_usage (replies without a usage).
    """

    def __init__(self, config: HttpJudgeConfig):
        if config.api not in ("chat", "completions"):
            raise ValueError(f"judge api={config.api!r}; choose chat or completions")
        if config.n_per_request not in N_PER_REQUEST:
            raise ValueError(
                f"judge n_per_request={config.n_per_request!r}; choose one of {N_PER_REQUEST}"
            )
        if config.max_concurrency < 1:
            raise ValueError(f"judge max_concurrency={config.max_concurrency}; must be >= 1")
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
        self.tokens: Counter = Counter()
        # "auto" becomes "one" the first time a reply to n=N brings fewer choices.
        self.n_mode = config.n_per_request
        self._rpm = RateLimiter(config.rpm)
        self._tpm = RateLimiter(config.tpm)

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
        return self.critique_many([prompt], n)[0]

    def critique_many(
        self,
        prompts: Sequence[str],
        n: int,
        on_reply: Callable[[list[str | None]], None] | None = None,
    ) -> list[list[str | None]]:
        """N critique texts for each prompt, in the prompts' order, `max_concurrency`
        requests in flight. `on_reply` sees each prompt's texts as they arrive; an
        exception it raises cancels the requests still running and propagates."""
        return self._loop.run_until_complete(self._many(list(prompts), n, on_reply))

    async def _many(
        self,
        prompts: list[str],
        n: int,
        on_reply: Callable[[list[str | None]], None] | None,
    ) -> list[list[str | None]]:
        slots = asyncio.Semaphore(self.config.max_concurrency)
        out: list[list[str | None]] = [[None] * n for _ in prompts]
        async with aiohttp.ClientSession(
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None),  # the deadlines below bound it
            auto_decompress=False,  # decoded here, bounded
            trust_env=True,  # HTTP(S)_PROXY
            connector=aiohttp.TCPConnector(limit=self.config.max_concurrency),
        ) as session:

            async def one(i: int) -> tuple[int, list[str | None]]:
                return i, await self._texts(session, slots, prompts[i], n)

            tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
            try:
                for done in asyncio.as_completed(tasks):
                    i, texts = await done
                    out[i] = texts
                    if on_reply is not None:
                        on_reply(texts)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return out

    async def _texts(
        self, session: aiohttp.ClientSession, slots: asyncio.Semaphore, prompt: str, n: int
    ) -> list[str | None]:
        """One prompt's N texts: one request of n=N, or N of n=1 (`n_per_request`)."""
        if n > 1 and self.n_mode != "one":
            texts, choices = await self._request(session, slots, prompt, n)
            if not (self.n_mode == "auto" and 0 < choices < n):
                return texts
            self.n_mode = "one"  # the server ignores n: ask the missing ones one by one
            rest = await asyncio.gather(
                *(self._request(session, slots, prompt, 1) for _ in range(n - choices))
            )
            return texts[:choices] + [t[0] for t, _ in rest]
        replies = await asyncio.gather(
            *(self._request(session, slots, prompt, 1) for _ in range(n))
        )
        return [t[0] for t, _ in replies]

    async def _request(
        self, session: aiohttp.ClientSession, slots: asyncio.Semaphore, prompt: str, n: int
    ) -> tuple[list[str | None], int]:
        """One request for n texts (with its retries), holding a concurrency slot;
        returns the texts and how many choices the reply held (0 when it abstained)."""
        async with slots:
            return await self._attempts(session, self._payload(prompt, n), n, len(prompt.encode()))

    async def _wait_for_rate(self, cost_tokens: int, deadline: float) -> bool:
        """Waits for this attempt's turn under rpm and tpm; False if it would start
        past `deadline` (nothing is reserved then)."""
        clock = self._loop.time
        now = clock()
        start = self._rpm.reserve(now, 1.0, deadline)
        if start is None:
            return False
        tpm_start = self._tpm.reserve(start, cost_tokens, deadline)
        if tpm_start is None:
            return False
        if tpm_start > now:
            await asyncio.sleep(tpm_start - now)
        return True

    async def _attempts(
        self, session: aiohttp.ClientSession, payload: dict, n: int, prompt_bytes: int
    ) -> tuple[list[str | None], int]:
        c = self.config
        clock = self._loop.time
        deadline = clock() + c.request_deadline_s
        cost = prompt_bytes // 4 + 1 + n * c.max_tokens  # the tpm estimate (module doc)
        for attempt in range(c.max_retries + 1):
            if not await self._wait_for_rate(cost, deadline):
                self.failures["rate_limited"] += 1
                break
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
                self._count_usage(result.usage)
                return result.texts, result.choices
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
        return [None] * n, 0

    def _count_usage(self, usage: Usage | None) -> None:
        if usage is None:
            self.tokens["no_usage"] += 1
            return
        self.tokens["prompt_tokens"] += usage.prompt_tokens
        self.tokens["completion_tokens"] += usage.completion_tokens
        if usage.cached_tokens is not None:
            self.tokens["cached_tokens"] += usage.cached_tokens
            self.tokens["cached_prompt_tokens"] += usage.prompt_tokens

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
                doc = json.loads(body)
                texts = choice_texts(doc, self.config.api, n)
        except BodyError as err:
            return Attempt(None, err.reason)
        except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError, HttpProcessingError):
            return Attempt(None, "malformed")  # cut off mid-body, unreadable status or headers
        except _IO_ERRORS:
            return Attempt(None, "connection")
        except _DECODE_ERRORS:
            return Attempt(None, "malformed")
        if texts is None:
            return Attempt(None, "malformed")
        return Attempt(texts, choices=min(len(doc["choices"]), n), usage=usage_of(doc))
