"""The OpenAI-compatible judge client against a real HTTP server on loopback.

The server here is a scripted stand-in for a remote LLM endpoint (a 70B
judge cannot run in CI); the end-to-end test against vLLM's own OpenAI server
is in tests/integration.
"""

import asyncio
import email.utils
import gzip
import json
import re
import socket
import socketserver
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capo_dist.config import JudgeConfig
from capo_dist.judge_health import DownDetector, JudgeDownError
from capo_dist.judge_http import (
    HttpJudgeClient,
    HttpJudgeConfig,
    Usage,
    choice_texts,
    retry_after_seconds,
    usage_of,
)
from capo_dist.judge_worker import HttpBackend, JudgeRequest, critique_all, judge_token_metrics


class ScriptedEndpoint:
    """A loopback HTTP server answering each request with the next scripted reply."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                status, payload, delay = outer.replies.pop(0) if outer.replies else (500, b"", 0)
                time.sleep(delay)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(
                    payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                )

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()


def chat(*texts):
    return {"choices": [{"message": {"content": t}} for t in texts]}


@pytest.fixture
def client_for(monkeypatch):
    servers = []

    def make(replies, **kw):
        server = ScriptedEndpoint(replies)
        servers.append(server)
        # One scripted reply per request: n=N as asked (the n fallback has its own tests).
        kw = {"n_per_request": "n", **kw}
        cfg = HttpJudgeConfig(
            base_url=server.url, model="judge", backoff_s=0.01, timeout_s=1.0, **kw
        )
        return server, HttpJudgeClient(cfg)

    yield make
    for s in servers:
        s.close()


def test_one_request_for_n_critiques_with_key_from_env(client_for, monkeypatch):
    monkeypatch.setenv("CAPO_JUDGE_API_KEY", "sk-secret-123")
    server, client = client_for([(200, chat("Wrong step list: [1]", "Wrong step list: []"), 0)])
    assert client.critique("prompt", 2) == ["Wrong step list: [1]", "Wrong step list: []"]
    ((path, headers, body),) = server.requests
    assert path == "/v1/chat/completions" and body["n"] == 2
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in repr(client.config)


def test_transient_errors_are_retried_then_succeed(client_for):
    server, client = client_for(
        [
            (500, b"boom", 0),
            (200, b"not json", 0),
            (429, b"slow down", 0),
            (200, chat("Wrong step list: [0]"), 0),
        ],
        max_retries=3,
    )
    assert client.critique("p", 1) == ["Wrong step list: [0]"]
    assert client.failures == {"http_500": 1, "malformed": 1, "http_429": 1}


def test_gives_up_and_abstains(client_for):
    server, client = client_for([(503, b"", 0)] * 3, max_retries=2)
    assert client.critique("p", 3) == [None, None, None]
    assert client.failures["gave_up"] == 1 and len(server.requests) == 3


def test_timeout_and_empty_bodies_abstain(client_for):
    server, client = client_for(
        [(200, chat("late"), 1.5), (200, {"choices": []}, 0)], max_retries=1
    )
    assert client.critique("p", 2) == [None, None]
    assert client.failures["timeout"] == 1 and client.failures["malformed"] == 1


def test_client_errors_are_not_retried(client_for):
    server, client = client_for([(400, b"bad request", 0)], max_retries=3)
    assert client.critique("p", 1) == [None]
    assert len(server.requests) == 1


def test_connection_refused_abstains():
    client = HttpJudgeClient(
        HttpJudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, backoff_s=0.01)
    )
    assert client.critique("p", 2) == [None, None]
    assert client.failures["connection"] == 2


def test_completions_api_and_partial_choices(client_for):
    server, client = client_for(
        [(200, {"choices": [{"text": "Wrong step list: []"}, {"text": ""}]}, 0)], api="completions"
    )
    assert client.critique("p", 3) == ["Wrong step list: []", None, None]
    assert server.requests[0][0] == "/v1/completions" and server.requests[0][2]["prompt"] == "p"


# ---------------------------------------------------------------- hostile endpoints


class RawEndpoint:
    """A loopback TCP server that reads each request and answers with raw bytes: each
    connection gets the next scripted reply, either bytes or a function of the socket
    (then a good reply after the script runs out). Counts the requests it read."""

    def __init__(self, replies, then=None):
        self.replies = list(replies)
        self.then = then
        self.times = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                conn = self.request
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body) < length:
                    body += conn.recv(65536)
                outer.times.append(time.monotonic())
                reply = outer.replies.pop(0) if outer.replies else outer.then
                try:
                    if callable(reply):
                        reply(conn)
                    elif reply is not None:
                        conn.sendall(reply)
                except OSError:
                    pass  # the client gave up (its deadline): fine

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def http(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    """A raw HTTP/1.1 response that closes the connection."""
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n"
    ).encode() + body


GOOD = json.dumps(chat("Wrong step list: [0]")).encode()


@pytest.fixture
def raw_client():
    servers = []

    def make(replies, then=http(GOOD), **kw):
        server = RawEndpoint(replies, then)
        servers.append(server)
        kw = {"backoff_s": 0.01, "timeout_s": 2.0, "max_retries": 1, "n_per_request": "n", **kw}
        return server, HttpJudgeClient(HttpJudgeConfig(base_url=server.url, model="judge", **kw))

    yield make
    for s in servers:
        s.close()


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": [{"message": "Wrong step list: []"}]}',  # message is not an object
        b'{"choices": [{"message": ["Wrong step list: []"]}]}',
        b'{"choices": [{"message": {"content": 7}}]}',  # content is not a string
        b'{"choices": [7]}',
        b'{"choices": {"0": {"message": {"content": "x"}}}}',
        b'[{"choices": []}]',
        b"[" * 100_000,  # nested past the recursion limit
        b"1" * 10_000,  # an int too long to convert
        b'{"choices": [{"message": {"content": "Wrong step',  # invalid JSON
        b"\xff\xfe\x00garbage",  # not UTF-8
    ],
)
def test_wrong_shapes_are_retried_then_succeed(raw_client, body):
    """A body that is not a chat completion at every level is a failed attempt (retried),
    never an exception out of the client."""
    server, client = raw_client([http(body)])
    assert client.critique("p", 2) == ["Wrong step list: [0]", None]
    assert client.failures == {"malformed": 1}


def _gzip_bomb() -> bytes:
    return gzip.compress(b" " * (64 << 20))  # 64 MiB of spaces in ~64 KiB


@pytest.mark.parametrize(
    "reply, reason",
    [
        # A body cut off mid-stream: fewer bytes than Content-Length, then the socket closes.
        (http(GOOD)[:-10], "malformed"),
        # ... and a chunked body cut off inside a chunk.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + GOOD[:20],
            "malformed",
        ),
        (http(b"\x1f\x8b\x08\x00garbage", headers="Content-Encoding: gzip\r\n"), "malformed"),
        (http(gzip.compress(GOOD)[:-12], headers="Content-Encoding: gzip\r\n"), "malformed"),
        (http(b"garbage", headers="Content-Encoding: deflate\r\n"), "malformed"),
        (http(GOOD, headers="Content-Encoding: br\r\n"), "malformed"),  # not what we accept
        (http(_gzip_bomb(), headers="Content-Encoding: gzip\r\n"), "too_large"),
        (http(GOOD + b" " * (2 << 20)), "too_large"),  # over max_body_bytes, refused unread
        (b"HTTP/1.1 200 OK\r\n\r\n" + GOOD + b" " * (2 << 20), "too_large"),  # no length
        (b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}", "malformed"),  # bad status line
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", "malformed"),  # huge header
        (b"", "connection"),  # closed without a byte
    ],
    ids=[
        "short-body",
        "cut-chunk",
        "gzip-garbage",
        "gzip-truncated",
        "deflate-garbage",
        "unasked-encoding",
        "gzip-bomb",
        "over-cap",
        "over-cap-unsized",
        "bad-status-line",
        "huge-header",
        "empty",
    ],
)
def test_broken_bodies_are_retried_then_succeed(raw_client, reply, reason):
    server, client = raw_client([reply], max_body_bytes=1 << 20)
    assert client.critique("p", 1) == ["Wrong step list: [0]"]
    assert client.failures == {reason: 1}


def test_compressed_bodies_are_decoded(raw_client):
    server, client = raw_client(
        [
            http(gzip.compress(GOOD), headers="Content-Encoding: gzip\r\n"),
            http(zlib.compress(GOOD), headers="Content-Encoding: deflate\r\n"),
        ]
    )
    assert client.critique("p", 1) == client.critique("p", 1) == ["Wrong step list: [0]"]
    assert not client.failures


def _trickle(prefix: bytes):
    """A reply that sends `prefix`, then one byte every 50 ms for up to 20 s."""

    def reply(conn):
        conn.sendall(prefix)
        for _ in range(400):
            conn.sendall(b"a")
            time.sleep(0.05)

    return reply


@pytest.mark.parametrize(
    "prefix",
    [b"HTTP/1.1 200 OK\r\nX-Slow: ", b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"],
    ids=["headers", "body"],
)
def test_an_attempt_has_a_total_deadline(raw_client, prefix):
    """A server that trickles bytes (each read well within timeout_s) cannot stretch an
    attempt past timeout_s: the deadline is total, not per socket read."""
    server, client = raw_client([], then=_trickle(prefix), timeout_s=0.5, max_retries=0)
    start = time.monotonic()
    assert client.critique("p", 1) == [None]
    elapsed = time.monotonic() - start
    assert client.failures == {"timeout": 1, "gave_up": 1}
    assert elapsed < 10.0  # 0.5 s by construction; the trickle lasts 20 s


def test_retry_after_seconds_and_date_are_honoured(raw_client):
    def unavailable_for_3_s(conn):
        date = email.utils.formatdate(time.time() + 3, usegmt=True)  # whole seconds
        conn.sendall(http(b"", "503 Service Unavailable", f"Retry-After: {date}\r\n"))

    server, client = raw_client(
        [http(b"", "429 Too Many Requests", "Retry-After: 1\r\n"), unavailable_for_3_s],
        max_retries=2,
    )
    assert client.critique("p", 1) == ["Wrong step list: [0]"]
    first, second, third = server.times
    assert second - first >= 0.9  # 1 s asked; backoff alone would wait 0.01 s
    assert third - second >= 1.5  # an HTTP date 3 s ahead (2-3 s at its 1 s resolution)
    assert client.failures == {"http_429": 1, "http_503": 1}


def test_retry_after_is_capped_and_never_past_the_deadline(raw_client):
    # Capped: an hour asked, retry_after_max_s=0.2 waited.
    server, client = raw_client(
        [http(b"", "503 Service Unavailable", "Retry-After: 3600\r\n")], retry_after_max_s=0.2
    )
    start = time.monotonic()
    assert client.critique("p", 1) == ["Wrong step list: [0]"]
    assert 0.15 <= server.times[1] - server.times[0] and time.monotonic() - start < 30
    # Past the deadline: the client gives up at once instead of waiting into it.
    server, client = raw_client(
        [http(b"", "429 Too Many Requests", "Retry-After: 3600\r\n")],
        retry_after_max_s=3600,
        request_deadline_s=1.0,
    )
    start = time.monotonic()
    assert client.critique("p", 1) == [None]
    assert time.monotonic() - start < 30 and len(server.times) == 1
    assert client.failures == {"http_429": 1, "gave_up": 1}


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5", "9" * 40, "Mon, 99 Foo 99999 99:99:99 GMT"):
        assert retry_after_seconds(bad, now) is None


@pytest.mark.parametrize("mode", ["accepts-never-answers", "drops-syns"])
def test_blackholed_endpoint_is_down_within_the_bound(mode):
    """A judge endpoint that accepts TCP and never answers (or never completes the
    handshake: a full accept queue drops SYNs) is declared down at most
    down_after_s + request_deadline_s after its first request, whatever
    max_retries and max_consecutive_failures allow (here 11 attempts per response
    and a million responses: hours at the old per-response counting)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accept()ed: the kernel completes handshakes, nobody answers
    fillers = []
    if mode == "drops-syns":  # fill the accept queue: further SYNs are dropped
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
            fillers.append(s)
        time.sleep(0.2)
    port = listener.getsockname()[1]
    cfg = JudgeConfig(
        backend="openai",
        base_url=f"http://127.0.0.1:{port}/v1",
        model="judge",
        timeout_s=0.2,
        request_deadline_s=0.5,
        max_retries=10,
        down_after_s=1.0,
        max_consecutive_failures=1_000_000,
    )
    backend = HttpBackend(cfg)
    down = DownDetector(cfg.max_consecutive_failures, cfg.down_after_s, "judge at test")
    requests = [JudgeRequest("1+1?", "2", ["1+1=2"])] * 200
    start = time.monotonic()
    try:
        with pytest.raises(JudgeDownError, match=r"s of failed requests"):
            critique_all(backend, requests, 2, down, batch_size=1)
    finally:
        listener.close()
        for s in fillers:
            s.close()
    elapsed = time.monotonic() - start
    assert elapsed >= cfg.down_after_s  # not declared down before the bound's first part...
    # ...and within it: 1.5 s documented; generous slack for a loaded machine.
    assert elapsed < cfg.down_after_s + cfg.request_deadline_s + 10.0
    assert backend.client.failures["timeout"] >= 2


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_CHOICES = st.builds(
    lambda c: {"choices": c},
    st.lists(st.fixed_dictionaries({"message": _JSON}) | _JSON, max_size=3),
)
_BODY = st.one_of(
    st.binary(max_size=200),
    (_JSON | _CHOICES).map(lambda v: json.dumps(v).encode()),
    (_JSON | _CHOICES).map(lambda v: gzip.compress(json.dumps(v).encode())),
)
_HEADER = st.sampled_from(
    [
        b"Content-Length: 5",
        b"Content-Length: -1",
        b"Content-Length: 99999999999999999999999",
        b"Transfer-Encoding: chunked",
        b"Content-Encoding: gzip",
        b"Content-Encoding: deflate",
        b"Content-Encoding: gzip, gzip",
        b"Retry-After: 1",
        b"Retry-After: Mon, 01 Jan 3000 00:00:00 GMT",
        b"Connection: keep-alive",
    ]
) | st.binary(max_size=40)
_REPLY = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda status, headers, body: (
            b"HTTP/1.1 "
            + status
            + b"\r\n"
            + b"".join(h + b"\r\n" for h in headers)
            + b"\r\n"
            + body
        ),
        st.sampled_from(
            [b"200 OK", b"200", b"429 Slow", b"503 Busy", b"301 Moved", b"999 ?", b"OK"]
        ),
        st.lists(_HEADER, max_size=4),
        _BODY,
    ),
)


def test_any_reply_bytes_never_escape_the_client():
    """Whatever bytes an endpoint answers with, `critique` returns N texts or N × None:
    it never raises (derandomized: the same examples every run)."""
    current = {}
    server = RawEndpoint([], then=lambda conn: conn.sendall(current["reply"]))
    client = HttpJudgeClient(
        HttpJudgeConfig(base_url=server.url, model="judge", timeout_s=2.0, max_retries=0)
    )

    @settings(
        max_examples=50,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(reply=_REPLY)
    def check(reply):
        current["reply"] = reply
        out = client.critique("p", 2)
        assert len(out) == 2 and all(t is None or (isinstance(t, str) and t.strip()) for t in out)

    try:
        check()
    finally:
        server.close()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(body=_JSON | _CHOICES, api=st.sampled_from(["chat", "completions"]), n=st.integers(1, 4))
def test_choice_texts_is_total(body, api, n):
    """Any JSON document: N texts (non-blank strings or None), or None (malformed); never raises."""
    out = choice_texts(body, api, n)
    assert out is None or (
        len(out) == n and all(t is None or (isinstance(t, str) and t.strip()) for t in out)
    )


# ---------------------------------------------------------------- concurrency, rate limits, n


class AioEndpoint:
    """A loopback aiohttp server (its own loop, in a thread) answering chat completions:
    each reply's texts echo the prompt; it records when each request arrived, the n
    asked, and the most requests it held at once. `choices_cap` caps the choices it
    returns (a server that ignores n); a prompt containing "fail" gets HTTP 500."""

    def __init__(self, delay=lambda prompt: 0.05, choices_cap=None):
        from aiohttp import web

        self.arrivals, self.ns = [], []
        self.in_flight = self.max_in_flight = 0

        async def handle(request):
            body = await request.json()
            prompt = body["messages"][0]["content"]
            self.arrivals.append(time.monotonic())
            self.ns.append(body["n"])
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(delay(prompt))
            finally:
                self.in_flight -= 1
            if "fail" in prompt:
                return web.Response(status=500, text="boom")
            k = body["n"] if choices_cap is None else min(body["n"], choices_cap)
            usage = {
                "prompt_tokens": 100,
                "completion_tokens": 7 * k,
                "prompt_tokens_details": {"cached_tokens": 64},
            }
            return web.json_response(
                {**chat(*(f"{prompt} #{j}" for j in range(k))), "usage": usage}
            )

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handle)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def aio_client():
    servers = []

    def make(server_kw=None, **kw):
        server = AioEndpoint(**(server_kw or {}))
        servers.append(server)
        kw = {"backoff_s": 0.01, "timeout_s": 5.0, "max_retries": 1, **kw}
        return server, HttpJudgeClient(HttpJudgeConfig(base_url=server.url, model="judge", **kw))

    yield make
    for s in servers:
        s.close()


def test_max_concurrency_requests_in_flight_and_order_kept(aio_client):
    """12 prompts, 4 slots: the server holds exactly 4 at once; the replies come back in
    the prompts' order although later prompts finish first (shorter delays)."""
    server, client = aio_client(
        {"delay": lambda p: 0.3 - 0.02 * int(p.split()[1])}, max_concurrency=4
    )
    prompts = [f"prompt {i}" for i in range(12)]
    seen = []
    out = client.critique_many(prompts, 2, on_reply=seen.append)
    assert out == [[f"{p} #0", f"{p} #1"] for p in prompts]
    assert server.max_in_flight == 4 and server.ns == [2] * 12
    assert sorted(map(tuple, seen)) == sorted(map(tuple, out)) and seen != out  # as they arrived
    assert client.tokens == {
        "prompt_tokens": 1200,
        "completion_tokens": 12 * 14,
        "cached_tokens": 12 * 64,
        "cached_prompt_tokens": 1200,
    }


@pytest.mark.parametrize(
    "limit",
    [
        {"rpm": 300.0},  # one start every 0.2 s
        {"tpm": 300.0 * (len("prompt 0") // 4 + 1 + 10)},  # its token estimate every 0.2 s
    ],
)
def test_rate_limits_space_the_starts(aio_client, limit):
    """6 requests, 8 slots: without a limit they would all arrive at once; spaced, the last
    starts 1.0 s after the first. The server's arrival stamps jitter under load (one request
    can be handled late, the next on time), so the span is checked, with 0.2 s of slack."""
    server, client = aio_client(max_concurrency=8, max_tokens=10, **limit)
    out = client.critique_many([f"prompt {i}" for i in range(6)], 1)
    assert all(t is not None for texts in out for t in texts)
    assert len(server.arrivals) == 6 and server.arrivals[-1] - server.arrivals[0] >= 0.8


def test_rate_limit_wait_past_the_deadline_abstains(aio_client):
    """rpm=6 (a start every 10 s) with a 1 s deadline: the first prompt goes, the second
    cannot start in time and abstains at once instead of waiting."""
    server, client = aio_client(rpm=6.0, request_deadline_s=1.0, max_concurrency=2)
    start = time.monotonic()
    out = client.critique_many(["prompt 0", "prompt 1"], 1)
    assert out == [["prompt 0 #0"], [None]] and len(server.arrivals) == 1
    assert client.failures["rate_limited"] == 1 and time.monotonic() - start < 5.0


def test_n_fallback_when_the_server_ignores_n(aio_client):
    """auto: n=3 gets one choice back, so the missing two are asked with n=1, and every
    later prompt goes as 3 requests of n=1 (remembered)."""
    server, client = aio_client({"choices_cap": 1}, max_concurrency=1)
    assert client.critique("prompt 0", 3) == ["prompt 0 #0"] * 3
    assert client.n_mode == "one" and server.ns == [3, 1, 1]
    assert client.critique("prompt 1", 3) == ["prompt 1 #0"] * 3
    assert server.ns == [3, 1, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "mode, ns, texts",
    [
        ("n", [3], ["p #0", None, None]),  # as asked: the missing choices abstain
        ("one", [1, 1, 1], ["p #0"] * 3),
    ],
)
def test_n_per_request_configured(aio_client, mode, ns, texts):
    server, client = aio_client({"choices_cap": 1}, n_per_request=mode)
    assert client.critique("p", 3) == texts
    assert server.ns == ns and client.n_mode == mode


def test_a_failing_request_abstains_the_others_answer(aio_client):
    server, client = aio_client(max_concurrency=4)
    out = client.critique_many(["prompt 0", "fail 1", "prompt 2"], 2)
    assert out == [["prompt 0 #0", "prompt 0 #1"], [None, None], ["prompt 2 #0", "prompt 2 #1"]]
    assert client.failures == {"http_500": 2, "gave_up": 1}  # max_retries=1: two attempts


@pytest.mark.parametrize(
    "usage, expected",
    [
        ({"prompt_tokens": 10, "completion_tokens": 3}, Usage(10, 3, None)),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
            Usage(10, 3, 8),
        ),
        ({"prompt_tokens": True, "completion_tokens": 3}, None),  # not a count
        ({"prompt_tokens": -1, "completion_tokens": 3}, None),
        ({"prompt_tokens": 10**15, "completion_tokens": 3}, None),  # past any real count
        (
            {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": 5},
            Usage(10, 3, None),
        ),
        ("usage", None),
    ],
)
def test_usage_is_read_as_bounded_counts(usage, expected):
    assert usage_of({"choices": [], "usage": usage}) == expected


def test_token_metrics_sum_the_judge_calls():
    """Per step: the calls' tokens summed, per policy token; the cache hit rate only over
    the prompt tokens whose engine reported it, and absent where none did."""
    calls = [
        {
            "judge_prompt_tokens": 100.0,
            "judge_completion_tokens": 50.0,
            "judge_cached_tokens": 60.0,
            "judge_cached_prompt_tokens": 80.0,
        },
        {
            "judge_prompt_tokens": 20.0,
            "judge_completion_tokens": 30.0,
            "judge_cached_tokens": 0.0,
            "judge_cached_prompt_tokens": 0.0,
        },
    ]
    assert judge_token_metrics(calls, policy_tokens=100.0) == {
        "judge_prompt_tokens": 120.0,
        "judge_completion_tokens": 80.0,
        "judge_tokens_per_policy_token": 2.0,
        "judge_prefix_cache_hit_rate": 0.75,
    }
    assert "judge_prefix_cache_hit_rate" not in judge_token_metrics(calls[1:], 10.0)
