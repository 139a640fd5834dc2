"""The gateway end to end over loopback with httpx: bytes relayed unchanged,
exact usage, cancellation reaching the backend, broken backends, bad input."""

from __future__ import annotations

import json
from functools import partial

import httpx
import pytest
import trio

from gateway_stack import Stack, forwarded, gateway_config, start_gateway, start_stack
from ollama_proxy.http.messages import Request
from ollama_proxy.http.responder import Responder
from ollama_proxy.http.server import HttpServer
from ollama_proxy.sim.server import SERVER_SETTINGS, SimRecord, Simulator

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hello there"}]}


class TapResponder:
    """A Responder that keeps a copy of every body byte written through it."""

    def __init__(self, inner: Responder, sent: bytearray) -> None:
        self._inner = inner
        self._sent = sent

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def start(self, status, headers, *, length=None):
        await self._inner.start(status, headers, length=length)

    async def write(self, data: bytes) -> None:
        self._sent.extend(data)
        await self._inner.write(data)

    async def end(self) -> None:
        await self._inner.end()

    async def respond(self, status, headers, body) -> None:
        await self.start(status, headers, length=len(body))
        await self.write(body)
        await self.end()

    async def abort(self) -> None:
        await self._inner.abort()


class Tap:
    """Wraps the simulator's handler and keeps the exact body bytes it sent, by the
    request id the gateway forwarded."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.sent: dict[str, bytearray] = {}

    async def __call__(self, request: Request, responder: Responder) -> None:
        sent = self.sent[(request.header(b"x-request-id") or b"").decode()] = bytearray()
        await self.sim.handle(request, TapResponder(responder, sent))

    def of(self, response: httpx.Response) -> bytes:
        return bytes(self.sent[response.headers["x-request-id"]])


async def tapped_stack(nursery, **overrides) -> tuple[Stack, Tap]:
    sim = Simulator()
    tap = Tap(sim)
    server = HttpServer(tap, SERVER_SETTINGS)
    host, port = await nursery.start(server.serve, "127.0.0.1", 0)
    sim_url = f"http://{host}:{port}"
    gateway, url, sink, key = await start_gateway(nursery, gateway_config([sim_url], **overrides))
    return Stack(sim, sim_url, gateway, url, sink, key), tap


@pytest.fixture
async def tapped(nursery):
    return await tapped_stack(nursery)


async def record_of(stack: Stack, response: httpx.Response):
    return await stack.sink.record_of(response.headers["x-request-id"])


def sim_record(stack: Stack, request_id: str) -> SimRecord:
    """The simulator's record of the request that carried ``request_id`` (health
    probes come and go between a test's requests)."""
    [record] = forwarded(stack, request_id)
    return record


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", CHAT),
    ("/api/chat", {**CHAT, "stream": False}),
    ("/api/generate", {"model": "llama3.2", "prompt": "Say <b> & more"}),
    ("/api/embed", {"model": "all-minilm", "input": ["a b", "c"]}),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "llama3.2", "prompt": "x", "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/embeddings", {"model": "all-minilm", "input": "hello", "encoding_format": "base64"}),
], ids=["chat-stream", "chat", "generate-stream", "embed", "v1-chat-stream-usage", "v1-chat",
        "v1-completions-stream-usage", "v1-embeddings"])
async def test_bytes_unchanged_and_usage_exact(tapped, path, body):
    """The client gets exactly the simulator's bytes; the sink gets the simulator's counts."""
    stack, tap = tapped
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + path, json=body)
        assert response.status_code == 200
        assert response.content == tap.of(response)
        record = await record_of(stack, response)
        seen = sim_record(stack, record.request_id)
        assert (record.prompt_tokens, record.completion_tokens) == (
            seen.prompt_tokens, seen.completion_tokens)
        assert record.outcome == "ok" and not record.estimated and record.prompt_tokens > 0


@pytest.mark.parametrize(("path", "body", "dropped"), [
    ("/v1/chat/completions", {**CHAT, "stream": True}, b'"choices":[]'),
    ("/v1/completions", {"model": "llama3.2", "prompt": "x", "stream": True}, b'"usage"'),
], ids=["chat", "completions"])
async def test_injected_usage_is_invisible_to_client(tapped, path, body, dropped):
    """Without include_usage the proxy asks for it, counts it, and hides it from the client."""
    stack, tap = tapped
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + path, json=body)
        seen = sim_record(stack, response.headers["x-request-id"])
        assert seen.body["stream_options"] == {"include_usage": True}
        assert dropped in tap.of(response) and dropped not in response.content
        assert response.content.endswith(b"data: [DONE]\n\n")
        record = await record_of(stack, response)
        assert record.completion_tokens == seen.completion_tokens > 0
        assert not record.estimated


async def test_stream_headers_and_forwarding_rules(stack):
    """Streams are marked unbuffered; Host is rewritten; secrets and Origin never go upstream."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + "/api/chat", json=CHAT, headers={
                "Origin": "http://evil.example",
                "X-Request-Id": "abc-123", "X-Custom": "kept"})
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-request-id"] == "abc-123"
        seen = dict(sim_record(stack, "abc-123").headers)
        assert seen[b"host"] == stack.sim_url.split("//")[1].encode()
        assert b"authorization" not in seen and b"origin" not in seen
        assert b"accept-encoding" not in seen  # httpx asks for gzip; usage must stay readable
        assert seen[b"x-custom"] == b"kept"
        assert (await record_of(stack, response)).request_id == "abc-123"


async def test_max_completion_tokens_becomes_max_tokens(stack):
    """Ollama ignores max_completion_tokens, so the proxy sends max_tokens instead."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + "/v1/chat/completions",
                                         json={**CHAT, "max_completion_tokens": 3})
        assert response.json()["usage"]["completion_tokens"] == 3
        sent = sim_record(stack, response.headers["x-request-id"]).body
        assert sent["max_tokens"] == 3 and "max_completion_tokens" not in sent


# The simulator would stream for 20 s or wait 60 s: its request ending long before
# that was ended by the client leaving.
CANCELLED_WITHIN_S = 5.0


def sim_outcome(request_id: str, outcome: str):
    """A simulator condition: the request that carried ``request_id`` is at ``outcome``."""
    def check(sim: Simulator) -> bool:
        return any(r.outcome == outcome and (b"x-request-id", request_id.encode()) in r.headers
                   for r in sim.records)
    return check


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_client_leaving_midstream_cancels_upstream(stack, path):
    """A client that leaves mid-stream cancels the backend's request; usage estimated."""
    body = {**CHAT, "stream": True,
            "messages": [{"role": "user", "content": "go [[sim:tokens=1000]] [[sim:rate=50]]"}]}
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            async with client.stream("POST", stack.url + path, json=body) as response:
                request_id = response.headers["x-request-id"]
                async for _ in response.aiter_lines():
                    if sim_record(stack, request_id).completion_tokens >= 3:
                        break
        await stack.sim.wait_for(sim_outcome(request_id, "cancelled"),
                                 timeout_s=CANCELLED_WITHIN_S)
        record = await stack.sink.record_of(request_id)
        assert record.outcome == "client_closed" and record.estimated
        assert 3 <= record.completion_tokens <= sim_record(stack, request_id).completion_tokens


async def test_client_leaving_before_first_byte_cancels_upstream(stack):
    """A client that gives up during a long model load cancels the backend's request too."""
    body = {**CHAT, "messages": [{"role": "user", "content": "[[sim:delay=60]]"}]}
    headers = {**stack.headers, "X-Request-Id": "leaves-early"}
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=headers) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.post, stack.url + "/api/chat", json=body))
                await stack.sim.wait_for(sim_outcome("leaves-early", "pending"))
                nursery.cancel_scope.cancel()  # the backend has it: the client leaves
        await stack.sim.wait_for(sim_outcome("leaves-early", "cancelled"),
                                 timeout_s=CANCELLED_WITHIN_S)
        record = await stack.sink.record_of("leaves-early")
        assert record.outcome == "client_closed" and record.completion_tokens == 0


@pytest.mark.parametrize(("path", "tail_check"), [
    ("/api/chat", lambda tail: "error" in json.loads(tail)),
    ("/v1/chat/completions", lambda tail: tail.startswith("data: ") and "error" in json.loads(tail[6:])),
], ids=["ndjson", "sse"])
async def test_upstream_death_midstream_ends_well_formed(stack, path, tail_check):
    """A backend that drops mid-stream: the client gets an error frame and a clean end."""
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "[[sim:drop_after=3]]"}]}
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + path, json=body)
        assert response.status_code == 200
        lines = [line for line in response.text.splitlines() if line]
        assert tail_check(lines[-1])
        assert sim_record(stack, response.headers["x-request-id"]).outcome == "dropped"
        record = await record_of(stack, response)
        assert record.outcome == "upstream_error"
        assert record.completion_tokens == 3 and record.estimated


async def test_native_midstream_error_line_is_relayed(stack):
    """Ollama's own in-band error line reaches the client unchanged and is recorded."""
    body = {**CHAT, "messages": [{"role": "user", "content": "[[sim:error_after=2]]"}]}
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + "/api/chat", json=body)
        lines = response.text.splitlines()
        assert json.loads(lines[-1]) == {"error": "an error was encountered while running the model"}
        assert len(lines) == 3
        assert (await record_of(stack, response)).outcome == "upstream_error"


@pytest.mark.parametrize(("path", "shape"), [("/api/chat", "native"), ("/v1/chat/completions", "openai")])
async def test_unreachable_backend_is_502(nursery, path, shape):
    """Nothing listening upstream → 502 in the path's error shape, recorded as unreachable."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    gateway, url, sink, key = await start_gateway(nursery, gateway_config([dead]))
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as client:
            response = await client.post(url + path, json=CHAT)
        assert response.status_code == 502
        error = response.json()["error"]
        assert isinstance(error, str) if shape == "native" else error["code"] == "upstream_unreachable"
        record = await sink.record_of(response.headers["x-request-id"])
        assert record.outcome == "unreachable"
        nursery.cancel_scope.cancel()


async def test_first_byte_timeout_is_504(nursery):
    """A backend slower than first_byte_timeout_s → 504, and its request is cancelled."""
    stack = await start_stack(nursery, first_byte_timeout_s=0.2)
    body = {**CHAT, "messages": [{"role": "user", "content": "[[sim:delay=30]]"}]}
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + "/v1/chat/completions", json=body)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        await stack.sim.wait_for(sim_outcome(response.headers["x-request-id"], "cancelled"))
        assert (await record_of(stack, response)).outcome == "timeout"


@pytest.mark.parametrize(("path", "content", "status"), [
    ("/api/chat", b"{not json", 400),
    ("/api/chat", b"[1, 2]", 400),
    ("/api/generate", b'{"model": "m", "stream": "yes"}', 400),
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"", 400),
    ("/api/nope", b"{}", 404),
    ("/v1/nope", b"{}", 404),
], ids=["bad-json", "not-object", "bad-stream", "v1-bad-json", "v1-empty", "native-404", "v1-404"])
async def test_bad_requests_get_clean_errors(stack, path, content, status):
    """Malformed bodies and unknown paths: the right status, the path's shape, nothing sent upstream."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + path, content=content)
        assert response.status_code == status
        error = response.json()["error"]
        if path.startswith("/v1"):
            assert set(error) >= {"message", "type", "code"}
        else:
            assert isinstance(error, str) and error
        assert not [r for r in stack.sim.records if r.method == "POST"]


async def test_wrong_method_is_405(stack):
    """A known path with the wrong method → 405 in the path's shape."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.get(stack.url + "/api/chat")
        assert response.status_code == 405 and "error" in response.json()


async def test_root_health_and_info_paths(stack):
    """/ answers like Ollama; /health reports the backend; GET info paths relay."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            root = await client.get(stack.url + "/")
            assert root.text == "Ollama is running"
            head = await client.head(stack.url + "/")
            assert head.status_code == 200 and head.content == b""
            await stack.sim.wait_for(lambda sim: any(r.path == "/api/version" for r in sim.records))
            health = await client.get(stack.url + "/health")
            assert health.status_code == 200
            assert health.json()["backends"] == [{"name": "default", "up": True}]  # no URLs to strangers
            head = await client.head(stack.url + "/api/version")
            direct_head = await client.head(stack.sim_url + "/api/version")
            assert head.headers["content-length"] == direct_head.headers["content-length"] != "0"
            for path in ("/api/tags", "/api/ps", "/api/version", "/v1/models", "/v1/models/llama3.2"):
                response = await client.get(stack.url + path)
                direct = await client.get(stack.sim_url + path)
                assert response.status_code == direct.status_code == 200, path
            show = await client.post(stack.url + "/api/show", json={"model": "llama3.2"})
            assert "model_info" in show.json()


async def test_64_concurrent_streams(stack):
    """64 streams at once all complete with exact usage."""
    body = {**CHAT, "messages": [{"role": "user", "content": "[[sim:tokens=50]] [[sim:rate=200]]"}]}
    results: list[int] = []

    async def one(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", stack.url + "/api/chat", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
        results.append(len(lines))

    with trio.fail_after(30):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=20, headers=stack.headers) as client:
            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(one, client)
    assert results == [51] * 64
    await stack.sink.wait_for(lambda records: len(records) == 64)
    assert all(r.completion_tokens == 50 and r.outcome == "ok" for r in stack.sink.records)
