"""backends/registry.py: the backends, the order to try them in, and their health checks
against a canned server on loopback (trio's autojump clock stands in for waiting)."""

from __future__ import annotations

import functools
import logging

import pytest
import trio

from default_settings import pool_settings
from ollama_proxy.backends.registry import (
    HEALTH_TIMEOUT_S,
    Backend,
    BackendSet,
    BackendSpec,
)
from ollama_proxy.backends.settings import RoutingSettings
from ollama_proxy.http.client import UpstreamPool


def backend(name: str = "b", *, port: int = 1, host: str = "127.0.0.1", kind: str = "ollama",
            base_path: str = "", api_key: str | None = None) -> Backend:
    spec = BackendSpec(name, kind=kind, url=f"http://{host}:{port}{base_path}",
                       base_path=base_path, api_key=api_key)
    return Backend(spec, UpstreamPool(pool_settings(port, host=host)))


class HealthServer:
    """Answers each request head with ``reply`` (None: never answers); keeps the heads."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.heads: list[bytes] = []
        self.asked = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        self.heads.append(buf.partition(b"\r\n\r\n")[0])
        self.asked.set()
        if self.reply is None:
            await trio.sleep_forever()
        await stream.send_all(self.reply)


async def serve(nursery: trio.Nursery, server: HealthServer) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, server.handle, 0,
                                                      host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


def reply(status: int, reason: bytes = b"X") -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Length: 2\r\n\r\nok" % (status, reason)


# -- the set and its order ----------------------------------------------------------------


def test_a_set_needs_a_backend():
    with pytest.raises(ValueError, match="at least one backend"):
        BackendSet([])


@pytest.mark.parametrize(("states", "up"), [
    ((None,), False), ((False, None), False), ((False, True), True), ((True, True), True),
])
def test_any_up(states, up):
    """Up only once a health check (or a request) found a backend up."""
    backends = [backend(str(i)) for i in range(len(states))]
    for b, state in zip(backends, states):
        b.health.up = state
    assert BackendSet(backends).any_up() is up


# -- one backend ------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "base_path", "host_header", "target"), [
    ("127.0.0.1", "", b"127.0.0.1:11434", "/api/chat?x=1"),
    ("gpu1.local", "/ollama", b"gpu1.local:11434", "/ollama/api/chat?x=1"),
    ("::1", "", b"[::1]:11434", "/api/chat?x=1"),
])
def test_host_header_and_target(host, base_path, host_header, target):
    """The Host a backend is sent (IPv6 in brackets) and its URL's path before the target."""
    b = backend(host=host, port=11434, base_path=base_path)
    assert (b.host_header, b.target("/api/chat?x=1")) == (host_header, target)


async def test_probe_results_log_changes_only(caplog):
    """Up and down are logged when they change; the last error is kept for the admin API."""
    b = backend("gpu")
    with caplog.at_level(logging.INFO, logger="ollama_proxy.backends"):
        b.unreachable("refused")
        b.unreachable("refused again")
        b.succeeded()
        b.succeeded()
    assert [r.getMessage() for r in caplog.records] == ["backend gpu is down: refused",
                                                        "backend gpu is up"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    described = b.describe()
    assert {k: described[k] for k in ("name", "url", "kind", "up", "error", "in_flight",
                                      "queued", "models_from")} == {
        "name": "gpu", "url": "http://127.0.0.1:1", "kind": "ollama", "up": True, "error": None,
        "in_flight": 0, "queued": 0, "models_from": "backend"}


# -- health checks ----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "api_key", "head"), [
    ("ollama", None, [b"GET /api/version HTTP/1.1", b"host: 127.0.0.1:{port}",
                      b"content-length: 0"]),
    ("openai", "sk-1", [b"GET /base/v1/models HTTP/1.1", b"host: 127.0.0.1:{port}",
                        b"content-length: 0", b"authorization: Bearer sk-1"]),
])
async def test_a_probe_asks_what_every_backend_of_its_kind_answers(nursery, kind, api_key,
                                                                  head):
    """Ollama is asked its version, an OpenAI-compatible server its models (with the key)."""
    server = HealthServer(reply(200))
    port = await serve(nursery, server)
    b = backend(port=port, kind=kind, api_key=api_key,
                base_path="/base" if kind == "openai" else "")
    await b.probe()
    expected = [line.replace(b"{port}", str(port).encode()) for line in head]
    assert server.heads[0].lower().split(b"\r\n") == [line.lower() for line in expected]
    assert (b.health.up, b.health.last_error) == (True, None)


@pytest.mark.parametrize(("status", "up", "error"), [
    (200, True, None), (404, True, None),  # it answers: it is there
    (401, False, "health check answered 401: the backend refuses the gateway's key "
                 "(api_key_env / api_key_file)"),
    (403, False, "health check answered 403: the backend refuses the gateway's key "
                 "(api_key_env / api_key_file)"),
    (500, False, "health check answered 500"), (503, False, "health check answered 503"),
])
async def test_a_probe_judges_by_the_status(nursery, status, up, error):
    """Any answer below 500 means the backend is up, but a refusal of the gateway's key
    (401, 403): no request would pass; a 5xx means it is not."""
    b = backend(port=await serve(nursery, HealthServer(reply(status))))
    await b.probe()
    assert (b.health.up, b.health.last_error) == (up, error)


async def test_a_silent_backend_is_down_after_the_timeout(nursery, autojump_clock):
    """No answer within HEALTH_TIMEOUT_S: down, saying so."""
    server = HealthServer(None)
    b = backend(port=await serve(nursery, server))
    started = trio.current_time()
    await b.probe()
    assert server.asked.is_set()
    assert trio.current_time() - started == pytest.approx(HEALTH_TIMEOUT_S)
    assert (b.health.up, b.health.last_error) == (
        False, f"no answer to a health check within {HEALTH_TIMEOUT_S:g} s")


async def test_an_unreachable_backend_is_down_with_the_reason():
    """A refused connection marks the backend down with the client's message."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    b = backend(port=port)
    await b.probe()
    assert b.health.up is False and b.health.last_error


async def test_health_checks_probe_every_backend_each_interval(nursery, autojump_clock):
    """All backends at once at the start, then again every interval."""
    servers = [HealthServer(reply(200)), HealthServer(reply(503))]
    backends = [backend(str(i), port=await serve(nursery, s)) for i, s in enumerate(servers)]
    with trio.move_on_after(25):
        await BackendSet(backends, RoutingSettings(health_interval_s=10, refresh_s=1000)
                         ).run_health_checks()
    versions = [[h for h in s.heads if h.startswith(b"GET /api/version ")] for s in servers]
    assert [len(v) for v in versions] == [3, 3]  # at 0, 10 and 20 s
    # the model list once (refresh_s is long); the loaded models with each check that passed
    assert [sum(h.startswith(b"GET /api/tags ") for h in s.heads) for s in servers] == [1, 1]
    assert [sum(h.startswith(b"GET /api/ps ") for h in s.heads) for s in servers] == [3, 0]
    assert [b.health.up for b in backends] == [True, False]
