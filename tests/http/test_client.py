"""The upstream client and pool against canned-bytes servers on loopback."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

from default_settings import pool_settings
from ollama_proxy.app import make_backend
from ollama_proxy.config import load_config
from ollama_proxy.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from ollama_proxy.http.client import UpstreamPool

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HEADERS = [(b"host", b"backend"), (b"content-length", b"0")]


class CannedServer:
    """Answers each request on a connection with the next canned reply; counts connections."""

    def __init__(self, replies, *, close_after=None, delay_s=0.0) -> None:
        self.replies = replies
        self.close_after = close_after  # close each connection after N replies
        self.delay_s = delay_s
        self.connections = 0
        self.eofs = 0
        self.saw_eof = trio.Event()

    async def handle(self, stream) -> None:
        self.connections += 1
        served = 0
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        self.eofs += 1
                        self.saw_eof.set()
                        return
                    buf += data
                _, _, buf = buf.partition(b"\r\n\r\n")
                await trio.sleep(self.delay_s)
                await stream.send_all(self.replies[min(served, len(self.replies) - 1)])
                served += 1
                if self.close_after and served >= self.close_after:
                    await stream.aclose()
                    return
        except trio.BrokenResourceError:
            self.eofs += 1
            self.saw_eof.set()


async def start(nursery, server, **settings) -> UpstreamPool:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return UpstreamPool(pool_settings(port, **settings))


async def get(pool) -> bytes:
    response = await pool.request("GET", "/", HEADERS, b"")
    try:
        return await response.read_all(1 << 20)
    finally:
        await response.aclose()


async def test_keepalive_connection_is_reused(nursery):
    """Sequential requests share one pooled connection."""
    server = CannedServer([OK])
    pool = await start(nursery, server)
    for _ in range(3):
        assert await get(pool) == b"ok"
    assert server.connections == 1
    assert pool.stats() == {"idle": 1, "in_use": 0}


async def test_stale_idle_connection_is_detected(nursery):
    """A pooled connection the backend closed is not used: a new one is made, no error."""
    server = CannedServer([OK], close_after=1)
    pool = await start(nursery, server)
    assert await get(pool) == b"ok"
    await trio.testing.wait_all_tasks_blocked()
    assert await get(pool) == b"ok"
    assert server.connections == 2


async def test_unfinished_response_is_never_pooled(nursery):
    """Closing a response before its end closes the connection (the backend sees EOF)."""
    server = CannedServer([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"])
    pool = await start(nursery, server)
    response = await pool.request("GET", "/", HEADERS, b"")
    assert await response.receive() == b"hello"
    await response.aclose()
    assert pool.stats() == {"idle": 0, "in_use": 0}
    with trio.fail_after(5):
        await server.saw_eof.wait()


async def test_connection_refused_is_unreachable():
    """Nothing listening → UpstreamUnreachable (502)."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = UpstreamPool(pool_settings(port))
    with pytest.raises(UpstreamUnreachable) as info:
        await get(pool)
    assert info.value.status == 502
    assert pool.stats()["in_use"] == 0


async def test_first_byte_timeout(nursery, autojump_clock):
    """No response head within first_byte_timeout_s → UpstreamTimeout (504)."""
    server = CannedServer([OK], delay_s=100)
    pool = await start(nursery, server, first_byte_timeout_s=10)
    with pytest.raises(UpstreamTimeout) as info:
        await get(pool)
    assert info.value.status == 504


async def test_chunk_gap_timeout(nursery, autojump_clock):
    """A body that stalls longer than chunk_gap_timeout_s → UpstreamTimeout."""
    server = CannedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
    pool = await start(nursery, server, chunk_gap_timeout_s=3)
    response = await pool.request("GET", "/", HEADERS, b"")
    assert await response.receive() == b"abc"
    with pytest.raises(UpstreamTimeout):
        await response.receive()
    await response.aclose()


@pytest.mark.parametrize("reply", [b"NOT HTTP AT ALL\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"],
                         ids=["garbage", "truncated"])
async def test_broken_backend_is_protocol_error(nursery, reply):
    """Garbage or a body cut short → UpstreamProtocolError (502)."""
    server = CannedServer([reply], close_after=1)
    pool = await start(nursery, server)
    with pytest.raises(UpstreamProtocolError):
        await get(pool)


async def test_pool_is_bounded(nursery, autojump_clock):
    """At most max_connections requests run at once; the next waits for a slot."""
    server = CannedServer([OK])
    pool = await start(nursery, server, max_connections=1)
    first = await pool.request("GET", "/", HEADERS, b"")
    with trio.move_on_after(60) as scope:  # in trio time: the wait has no end of its own
        await pool.request("GET", "/", HEADERS, b"")
    assert scope.cancelled_caught
    await first.read_all(100)
    await first.aclose()
    assert await get(pool) == b"ok"


def test_a_pools_settings_are_its_upstreams():
    """Each pool setting is its [upstream.NAME] value, built by the app: no second default."""
    config = load_config(None, env={}, upstream_urls=["http://[::1]:9000"])
    backend = make_backend(config.upstreams[0])
    pool = backend.pool
    assert (pool.settings.host, pool.settings.port) == ("::1", 9000)
    assert pool.settings.first_byte_timeout_s == config.upstreams[0].first_byte_timeout_s
    assert backend.host_header == b"[::1]:9000"
