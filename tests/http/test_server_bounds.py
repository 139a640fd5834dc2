"""The HTTP server's bounds over loopback sockets: strangers never send their
bodies, every wait has a deadline, connections are capped (the longest idle
makes room), a client that stops reading is cut, ambiguous framing closes,
errors keep the path's dialect, and addresses are filtered."""

from __future__ import annotations

import ipaddress
import json
import socket
import tracemalloc

import pytest
import trio
import trio.testing

from default_settings import server_settings
from ollama_proxy.app import server_settings as server_settings_of
from ollama_proxy.config import load_config
from ollama_proxy.http.clientip import AddressPolicy
from ollama_proxy.http.messages import Request
from ollama_proxy.http.responder import ClientStalled, Responder
from ollama_proxy.http.server import HttpServer
from wire import read_until_close


class Gate:
    """Refuses requests without ``Authorization`` before reading their body (as the
    relay does); echoes the body and the client address of the others."""

    def __init__(self) -> None:
        self.read = 0  # bodies read
        self.stalled = trio.Event()
        self.release = trio.Event()
        self._holding, self.held = trio.open_memory_channel[None](100)

    async def __call__(self, request: Request, responder: Responder) -> None:
        if request.path == "/hold":  # a request in flight until released
            self._holding.send_nowait(None)
            await self.release.wait()
        if request.path == "/flood":  # a response much larger than any socket buffer
            await responder.start(200, [])
            try:
                while True:
                    await responder.write(b"x" * 65536)
            except ClientStalled:
                self.stalled.set()
                raise
        if request.header(b"authorization") is None:
            body = json.dumps({"error": "no key"}).encode()
            await responder.respond(401, [(b"content-type", b"application/json")], body)
            return
        body = await request.read_body()
        self.read += 1
        answer = json.dumps({"size": len(body), "client": request.client}).encode()
        await responder.respond(200, [(b"content-type", b"application/json")], answer)


async def serve(nursery: trio.Nursery, **settings: object) -> tuple[HttpServer, Gate, int]:
    gate = Gate()
    server = HttpServer(gate, server_settings(**settings))
    _, port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, gate, port


def head_and_body(data: bytes) -> tuple[bytes, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, json.loads(body)


async def ask(port: int, raw: bytes) -> tuple[bytes, dict]:
    """Send ``raw`` on a new connection; the answer's head and JSON body, read to the close."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(raw)
    return head_and_body(await read_until_close(stream))


async def test_a_stranger_is_answered_before_sending_its_body():
    """A request refused on its head gets its answer after a few bytes of a 64 MB
    body: the body is never read, and the connection says and does close."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, gate, port = await serve(nursery)
            head, body = await ask(port, b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: 67108864\r\n\r\n" + b"{" * 1024)
            assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower()
            assert body == {"error": "no key"} and gate.read == 0
            nursery.cancel_scope.cancel()


async def test_a_body_takes_memory_as_it_arrives_not_as_announced():
    """A member announcing 64 MiB and sending one byte holds one byte, not 64 MiB (a
    buffer of the announced length let 16 connections pin a gigabyte)."""
    started = trio.Event()

    async def reader(request: Request, responder: Responder) -> None:
        started.set()
        await request.read_body()

    tracemalloc.start()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                server = HttpServer(reader, server_settings())
                _, port = await nursery.start(server.serve, "127.0.0.1", 0)
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 67108864\r\n\r\n{")
                await started.wait()
                await trio.testing.wait_all_tasks_blocked()  # the server waits for more
                assert tracemalloc.get_traced_memory()[1] < 8 * 1024 * 1024
                await stream.aclose()
                nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()


async def test_a_lingering_refusal_counts_until_closed_and_only_while_there_is_room():
    """A refused upload's socket lingers (so the client reads its answer) and counts
    against the cap meanwhile; with half the connections taken it closes at once."""
    head = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, port = await serve(nursery, max_connections=4)
            refused = await trio.open_tcp_stream("127.0.0.1", port)
            await refused.send_all(head)
            assert (await refused.receive_some(4096)).startswith(b"HTTP/1.1 401")
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.table) == 1  # lingering, counted
            await refused.aclose()
            others = await open_idle(port, 2)  # half the cap is taken
            refused = await trio.open_tcp_stream("127.0.0.1", port)
            await refused.send_all(head)
            assert (await read_until_close(refused)).startswith(b"HTTP/1.1 401")
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.table) == 2  # closed without a linger
            for stream in others:
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_expect_continue_is_not_granted_to_a_stranger():
    """A client waiting for 100 Continue gets the refusal instead, never the 100."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, _, port = await serve(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n")
            data = await read_until_close(stream)
            assert data.startswith(b"HTTP/1.1 401") and b" 100 " not in data
            nursery.cancel_scope.cancel()


async def test_a_trickled_body_meets_its_total_deadline(autojump_clock):
    """A body sent a byte a second (each gap well inside header_timeout_s) is cut at
    body_timeout_s with a 408 in the path's dialect."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            _, _, port = await serve(nursery, header_timeout_s=5, body_timeout_s=20)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: k\r\n"
                                  b"Content-Length: 1000\r\n\r\n")

            async def trickle() -> None:
                try:
                    for _ in range(1000):
                        await stream.send_all(b"x")
                        await trio.sleep(1)
                except trio.BrokenResourceError:
                    pass

            nursery.start_soon(trickle)
            started = trio.current_time()
            head, body = head_and_body(await read_until_close(stream))
            assert head.startswith(b"HTTP/1.1 408")
            assert body["error"]["type"] == "timeout_error"
            assert 20 <= trio.current_time() - started < 25
            nursery.cancel_scope.cancel()


async def test_a_new_connection_must_send_its_head_in_time(autojump_clock):
    """A connection that sends nothing is closed after header_timeout_s, not kept
    for the keep-alive time."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            _, _, port = await serve(nursery, header_timeout_s=5, keepalive_timeout_s=75)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            started = trio.current_time()
            assert await read_until_close(stream) == b""
            assert 5 <= trio.current_time() - started < 6
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("raw", "status", "shape"), [
    (b"GET /v1/models HTTP/1.1\r\nHost : x\r\n\r\n", b"400", "openai"),
    (b"GET /admin/api/users HTTP/1.1\r\nHost : x\r\n\r\n", b"400", "openai"),
    (b"GET /api/tags HTTP/1.1\r\nHost : x\r\n\r\n", b"400", "native"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n", b"431",
     "openai"),
], ids=["v1-400", "admin-400", "native-400", "v1-431"])
async def test_server_errors_speak_the_paths_dialect(raw, status, shape):
    """A malformed or oversized head on /v1 or /admin/api is answered in the OpenAI
    shape, elsewhere in Ollama's; the raw bytes h11 complains about are not echoed."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, _, port = await serve(nursery, max_header_bytes=2000)
            head, body = await ask(port, raw)
            assert head.startswith(b"HTTP/1.1 " + status)
            error = body["error"]
            if shape == "openai":
                assert error["type"] == "invalid_request_error" and "message" in error
                message = error["message"]
            else:
                message = error
            assert "Host : x" not in message and "bytearray" not in message
            nursery.cancel_scope.cancel()


async def test_a_slow_head_gets_408_in_the_paths_dialect(autojump_clock):
    """A head still incomplete at header_timeout_s: 408, OpenAI-shaped on /v1."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, _, port = await serve(nursery, header_timeout_s=5)
            head, body = await ask(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            assert head.startswith(b"HTTP/1.1 408") and body["error"]["type"] == "timeout_error"
            nursery.cancel_scope.cancel()


async def test_content_length_and_transfer_encoding_close_after_the_answer():
    """Both framings (RFC 9112 §6.1): answered, with Connection: close, then closed;
    a second request on the connection is never read."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, gate, port = await serve(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /a HTTP/1.1\r\nHost: x\r\nAuthorization: k\r\n"
                                  b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"3\r\nabc\r\n0\r\n\r\n"
                                  b"GET /b HTTP/1.1\r\nHost: x\r\nAuthorization: k\r\n\r\n")
            data = await read_until_close(stream)
            assert data.count(b"HTTP/1.1 200") == 1 and b"connection: close" in data.lower()
            assert gate.read == 1
            nursery.cancel_scope.cancel()


async def open_idle(port: int, count: int) -> list[trio.SocketStream]:
    return [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(count)]


async def wait_for_eof(stream: trio.SocketStream) -> None:
    assert await read_until_close(stream) == b""


async def test_at_the_connection_cap_the_longest_idle_makes_room():
    """max_connections idle connections and more: the oldest idle is closed each time
    (a connection that just served a request is the newest idle), the new one served."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, port = await serve(nursery, max_connections=3)
            idle = await open_idle(port, 3)
            await idle[0].send_all(b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: k\r\n\r\n")
            assert (await idle[0].receive_some(4096)).startswith(b"HTTP/1.1 200")
            fresh = await trio.open_tcp_stream("127.0.0.1", port)
            await wait_for_eof(idle[1])  # idle[0] served a request since: it is not the oldest
            await fresh.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: k\r\n\r\n")
            assert (await fresh.receive_some(4096)).startswith(b"HTTP/1.1 200")
            later = await trio.open_tcp_stream("127.0.0.1", port)
            await wait_for_eof(idle[2])
            assert server.evicted == 2 and all(c in server.table for c in server.table._idle)
            for stream in (idle[0], fresh, later):
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused():
    """No idle connection to close: the newcomer gets 503 with Retry-After at once."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, gate, port = await serve(nursery, max_connections=2)
            busy = await open_idle(port, 2)
            for stream in busy:
                await stream.send_all(b"GET /hold HTTP/1.1\r\nHost: x\r\nAuthorization: k\r\n\r\n")
            for _ in busy:  # both requests are in flight
                await gate.held.receive()
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            data = await read_until_close(extra)
            assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in data
            gate.release.set()
            for stream in busy:
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
            assert server.refused == 1
            nursery.cancel_scope.cancel()


async def test_one_address_may_hold_only_its_share():
    """max_connections_per_ip: the address's own longest-idle connection makes room."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, port = await serve(nursery, max_connections=100, max_connections_per_ip=2)
            idle = await open_idle(port, 2)
            newcomer = await trio.open_tcp_stream("127.0.0.1", port)
            await wait_for_eof(idle[0])
            assert server.evicted == 1 and len(server.table) == 2
            await newcomer.aclose()
            nursery.cancel_scope.cancel()


async def test_a_client_that_stops_reading_is_cut(autojump_clock):
    """A client that accepts no byte for send_timeout_s: the handler's write fails
    with ClientStalled and the connection closes."""
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            _, gate, port = await serve(nursery, send_timeout_s=30)
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            await sock.send(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            started = trio.current_time()
            await gate.stalled.wait()
            assert trio.current_time() - started >= 30
            sock.close()
            nursery.cancel_scope.cancel()


def policy(**lists: str) -> AddressPolicy:
    return AddressPolicy(**{name: tuple(ipaddress.ip_network(n) for n in value.split())
                            for name, value in lists.items()})


async def test_a_denied_address_gets_403_and_the_connection_closes():
    """deny holds on connect: the request is answered 403 in its dialect, unread."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, gate, port = await serve(nursery, addresses=policy(deny="127.0.0.0/8"))
            head, body = await ask(port, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                                   b"Authorization: k\r\nContent-Length: 5\r\n\r\nhello")
            assert head.startswith(b"HTTP/1.1 403") and body["error"]["code"] == "address_not_allowed"
            assert gate.read == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("forwarded", "status", "client"), [
    (b"10.1.2.3", b"200", "10.1.2.3"),
    (b"10.1.2.3, 127.0.0.5", b"200", "10.1.2.3"),  # a second trusted hop is skipped
    (b"10.1.2.3, 10.9.9.9", b"403", None),  # the client's own claim to the left is ignored
    (b"not-an-address", b"403", None),
    (None, b"200", "127.0.0.1"),  # the proxy itself
])
async def test_behind_a_trusted_proxy_x_forwarded_for_names_the_client(forwarded, status, client):
    """From a trusted proxy, the last untrusted X-Forwarded-For hop is the client for
    allow/deny and for the handler (logs, ledger)."""
    addresses = policy(allow="10.1.2.0/24 127.0.0.0/8", trusted_proxies="127.0.0.0/8")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, _, port = await serve(nursery, addresses=addresses)
            xff = b"X-Forwarded-For: " + forwarded + b"\r\n" if forwarded else b""
            head, body = await ask(port, b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: k\r\n"
                                   + xff + b"Connection: close\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 " + status)
            if client is not None:
                assert body["client"] == client
            nursery.cancel_scope.cancel()


async def test_x_forwarded_for_is_ignored_from_other_peers():
    """Without trusted_proxies, a client cannot pick its own address."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, _, port = await serve(nursery, addresses=policy(deny="10.0.0.0/8"))
            head, body = await ask(port, b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: k\r\n"
                                  b"X-Forwarded-For: 10.1.1.1\r\nConnection: close\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body["client"] == "127.0.0.1"
            nursery.cancel_scope.cancel()


def test_the_bounds_are_the_configs():
    """Each server setting is its [server] value, built by the app: no second default."""
    config = load_config(None, env={"OLLAMA_PROXY_SERVER_MAX_BODY_MB": "2",
                                    "OLLAMA_PROXY_SERVER_SEND_TIMEOUT_S": "7",
                                    "OLLAMA_PROXY_SERVER_MAX_CONNECTIONS": "99"})
    settings = server_settings_of(config.server)
    assert (settings.max_body_bytes, settings.send_timeout_s, settings.max_connections) == \
        (2 * 1024 * 1024, 7.0, 99)
    assert settings.max_header_bytes == config.server.max_header_bytes
