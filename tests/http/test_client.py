"""The upstream client and pool against canned-bytes servers on loopback."""

from __future__ import annotations

import functools
import ssl

import pytest
import trio
import trio.testing
import trustme

from default_settings import pool_settings
from ollama_proxy.app import make_backend
from ollama_proxy.backends.settings import RoutingSettings
from ollama_proxy.config import load_config
from ollama_proxy.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from ollama_proxy.http.client import UpstreamPool, tls_context

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
    backend = make_backend(config.upstreams[0], RoutingSettings())
    pool = backend.pool
    assert (pool.settings.host, pool.settings.port) == ("::1", 9000)
    assert pool.settings.first_byte_timeout_s == config.upstreams[0].first_byte_timeout_s
    assert backend.host_header == b"[::1]:9000"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def start_tls(nursery, server, ca, *, names=("127.0.0.1",), ca_file=None, verify=True):
    """``server`` behind TLS with a certificate of ``ca`` for ``names``; a pool to it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    listeners = await nursery.start(functools.partial(
        trio.serve_ssl_over_tcp, server.handle, 0, context, host="127.0.0.1"))
    port = listeners[0].transport_listener.socket.getsockname()[1]
    return UpstreamPool(pool_settings(port, tls=tls_context(ca_file, verify)))


async def test_tls_connection_is_verified_and_reused(nursery, ca, tmp_path):
    """A certificate of the private CA in ca_file passes; keep-alive pools the TLS connection."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = CannedServer([OK])
    pool = await start_tls(nursery, server, ca, ca_file=str(tmp_path / "ca.pem"))
    with trio.fail_after(10):
        for _ in range(3):
            assert await get(pool) == b"ok"
    assert server.connections == 1
    assert pool.stats() == {"idle": 1, "in_use": 0}
    with trio.fail_after(10):
        await pool.close_idle()
        await server.saw_eof.wait()


@pytest.mark.parametrize(("names", "trusted", "why"), [
    (("127.0.0.1",), False, "certificate verify failed: unable to get local issuer certificate"),
    (("other.example",), True, "certificate verify failed: IP address mismatch"),
], ids=["untrusted", "wrong-name"])
async def test_a_bad_certificate_is_unreachable_saying_why(nursery, ca, tmp_path, names, trusted, why):
    """A certificate the system store does not trust, or for another name → 502 naming TLS."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    pool = await start_tls(nursery, CannedServer([OK]), ca, names=names,
                           ca_file=str(tmp_path / "ca.pem") if trusted else None)
    with trio.fail_after(10), pytest.raises(UpstreamUnreachable) as info:
        await get(pool)
    assert info.value.status == 502
    assert "TLS handshake with backend 127.0.0.1:" in info.value.message and why in info.value.message
    assert pool.stats() == {"idle": 0, "in_use": 0}


async def test_tls_verify_false_accepts_any_certificate(nursery, ca):
    """tls_verify = false: an untrusted certificate for another name still connects."""
    pool = await start_tls(nursery, CannedServer([OK]), ca, names=("other.example",), verify=False)
    with trio.fail_after(10):
        assert await get(pool) == b"ok"


async def test_tls_to_a_plain_backend_is_unreachable(nursery):
    """https to a server that speaks plain HTTP: the handshake fails, with the reason."""
    async def plain(stream) -> None:
        await stream.receive_some(65536)  # the ClientHello, to it a malformed request
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, plain, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    pool = UpstreamPool(pool_settings(port, tls=tls_context(None, True)))
    with trio.fail_after(10), pytest.raises(UpstreamUnreachable) as info:
        await get(pool)
    assert "TLS handshake" in info.value.message and "WRONG_VERSION_NUMBER" in info.value.message.upper()


async def test_a_tls_handshake_counts_against_the_connect_timeout(nursery, autojump_clock):
    """A server that accepts but never answers the handshake: unreachable within connect_timeout_s."""
    async def silent(stream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    pool = UpstreamPool(pool_settings(port, connect_timeout_s=3, tls=tls_context(None, True)))
    with pytest.raises(UpstreamUnreachable) as info:
        await get(pool)
    assert "complete the TLS handshake within 3 s" in info.value.message


async def test_stop_cuts_a_tls_body(nursery, ca, tmp_path):
    """``stop`` closes a TLS connection under its reader as it does a plain one."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = CannedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
    pool = await start_tls(nursery, server, ca, ca_file=str(tmp_path / "ca.pem"))
    with trio.fail_after(10):
        response = await pool.request("GET", "/", HEADERS, b"")
        assert await response.receive() == b"abc"
        response.stop()
        with pytest.raises(UpstreamProtocolError):
            await response.receive()
        await response.aclose()
        await server.saw_eof.wait()
    assert pool.stats() == {"idle": 0, "in_use": 0}
