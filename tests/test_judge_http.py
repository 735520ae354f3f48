"""The OpenAI-compatible judge client against a real HTTP server on loopback.

The server here is a scripted stand-in for a remote LLM endpoint (a 70B
judge cannot run in CI); the end-to-end test against vLLM's own OpenAI server
is in tests/integration.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from capo_dist.judge_http import HttpJudgeClient, HttpJudgeConfig


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
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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
