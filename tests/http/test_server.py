"""The HTTP server shell over real loopback sockets: keep-alive, pipelining,
body framing, limits with clean errors, client-gone cancellation, drain."""

from __future__ import annotations

import errno
import json
import os

import pytest
import trio

from default_settings import server_settings
from ollama_proxy.http.messages import Request
from ollama_proxy.http.responder import ClientGone, Responder
from ollama_proxy.http.server import HttpServer
from wire import read_until_close

TICKS = 50  # /stream writes this many lines


async def sleep_until_cancelled(cancelled: trio.Event) -> None:
    """Never return (a cold model load, a stream waiting for its backend); set
    ``cancelled`` when cancelled."""
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        cancelled.set()
        raise


class Echo:
    """A handler that echoes the body, streams when asked to (its first line at once,
    the rest once the test sets ``go_on``), or never answers."""

    def __init__(self) -> None:
        self.cancelled = trio.Event()
        self.started = trio.Event()
        self.go_on = trio.Event()

    async def __call__(self, request: Request, responder: Responder) -> None:
        if request.path == "/stream":
            try:
                await responder.start(200, [(b"content-type", b"text/plain")])
                await responder.write(b"tick\n")
                self.started.set()
                await self.go_on.wait()  # mid-stream
                for _ in range(TICKS - 1):
                    await responder.write(b"tick\n")
                await responder.end()
            except (trio.Cancelled, ClientGone):  # whichever notices first: watcher or write
                self.cancelled.set()
                raise
            return
        if request.path == "/wait":  # never answers: like a cold model load
            self.started.set()
            await sleep_until_cancelled(self.cancelled)
        body = json.dumps({"method": request.method, "path": request.path,
                           "body": (await request.read_body()).decode()}).encode()
        await responder.respond(200, [(b"content-type", b"application/json")], body)


async def start(nursery, settings=None, handler=None):
    handler = handler or Echo()
    server = HttpServer(handler, settings or server_settings())
    host, port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, handler, port


async def read_responses(stream, count) -> bytes:
    """Read until ``count`` complete Content-Length responses arrived."""
    data = b""
    while True:
        done = 0
        rest = data
        while b"\r\n\r\n" in rest:
            head, _, rest = rest.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) < length:
                break
            rest = rest[length:]
            done += 1
        if done >= count:
            return data
        piece = await stream.receive_some(65536)
        assert piece, f"closed after {data!r}"
        data += piece


async def test_keepalive_and_pipelining():
    """Two pipelined requests on one connection get two answers in order."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server, _, port = await start(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await read_responses(stream, 2)
            assert data.index(b'"path": "/a"') < data.index(b'"path": "/b"')
            assert data.count(b"HTTP/1.1 200") == 2
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_chunked_request_body_and_expect_continue():
    """Chunked bodies are joined; Expect: 100-continue gets its 100 first."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n")
            interim = await stream.receive_some(1000)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            data = await read_responses(stream, 1)
            assert b'"body": "abcde"' in data
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("request_bytes", "status"), [  # noqa
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", b"431"),
    (b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", b"413"),
    (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"1000\r\n" + b"a" * 4096 + b"\r\n", b"413"),
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", b"400"),
], ids=["431", "413-length", "413-chunked", "400-garbage", "400-length"])
async def test_limits_and_malformed_get_clean_errors(request_bytes, status):
    """Header too big → 431, body too big → 413, malformed → 400; then close."""
    settings = server_settings(max_body_bytes=1000, max_header_bytes=2000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, settings)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(request_bytes)
            data = await read_until_close(stream)
            assert data.startswith(b"HTTP/1.1 " + status), data[:200]
            body = data.split(b"\r\n\r\n", 1)[1]
            assert "error" in json.loads(body)
            nursery.cancel_scope.cancel()


async def test_openai_paths_get_openai_error_shape():
    """A 413 on /v1 is rendered {"error": {"message", "type", "code"}}."""
    settings = server_settings(max_body_bytes=10)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, settings)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 50\r\n\r\n")
            data = await read_until_close(stream)
            error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["type"] == "invalid_request_error" and "message" in error
            nursery.cancel_scope.cancel()


async def test_header_timeout_gives_408(autojump_clock):
    """A request head that never completes gets 408 after header_timeout_s."""
    settings = server_settings(header_timeout_s=5)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, settings)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            data = await read_until_close(stream)
            assert data.startswith(b"HTTP/1.1 408")
            nursery.cancel_scope.cancel()


async def test_idle_keepalive_connection_closed_silently(autojump_clock):
    """An idle keep-alive connection is closed after keepalive_timeout_s, no bytes."""
    settings = server_settings(keepalive_timeout_s=3)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, settings)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_responses(stream, 1)
            start_time = trio.current_time()
            assert await read_until_close(stream) == b""
            assert trio.current_time() - start_time >= 3
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("path", ["/stream", "/wait"])
async def test_client_gone_cancels_handler(path, autojump_clock):
    """Closing the client mid-stream or before any byte cancels the handler at once
    (neither writes meanwhile: the watcher notices)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, handler, port = await start(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await handler.started.wait()
            await stream.aclose()
            with trio.fail_after(1):
                await handler.cancelled.wait()
            nursery.cancel_scope.cancel()


async def test_drain_finishes_inflight_then_stops():
    """drain(): no new connections; an in-flight response completes within the grace."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server, handler, port = await start(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            await handler.started.wait()
            server.drain(30)
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            handler.go_on.set()
            data = await read_until_close(stream, limit=1 << 30)
            assert data.count(b"tick\n") == TICKS and data.endswith(b"0\r\n\r\n")
            assert not handler.cancelled.is_set()


async def test_drain_grace_expiry_cancels(autojump_clock):
    """After the grace period, remaining responses are cancelled and serve() returns."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server, handler, port = await start(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
            await handler.started.wait()
            server.drain(0.2)
            await handler.cancelled.wait()


async def test_eof_seen_by_the_watcher_reaches_h11(autojump_clock):
    """A client that pipelines part of a head and leaves while a finished response's
    handler runs on: the request loop hears the EOF (400), it does not wait for more."""

    async def answer_then_linger(request: Request, responder: Responder) -> None:
        await responder.respond(200, [], b"ok")
        await trio.sleep(1)  # long enough for the watcher to arm and see the EOF

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, handler=answer_then_linger)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo")
            await stream.send_eof()
            data = await read_until_close(stream)
            assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in data
            nursery.cancel_scope.cancel()


async def test_abort_while_watched_is_no_connection_failure(autojump_clock, caplog):
    """A handler that drops its connection (the simulator's crash) after the watcher
    armed: the watcher's wait ends quietly, nothing is logged as a failure."""
    async def crash_later(request: Request, responder: Responder) -> None:
        await responder.start(200, [])
        await responder.write(b"partial")
        await trio.sleep(1)  # the watcher is waiting on the socket by now
        await responder.abort()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, handler=crash_later)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await read_until_close(stream)
            assert data.startswith(b"HTTP/1.1 200") and not data.endswith(b"0\r\n\r\n")
            nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


async def test_no_watch_after_abort(autojump_clock, caplog):
    """A handler still running after it dropped its connection gets no watcher (its
    socket is closed): nothing is logged as a connection failure."""
    async def crash_then_linger(request: Request, responder: Responder) -> None:
        await responder.start(200, [])
        await responder.abort()
        await trio.sleep(1)  # past WATCH_AFTER_S

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, handler=crash_then_linger)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_until_close(stream)).startswith(b"HTTP/1.1 200")
            await trio.sleep(2)  # the handler's end (virtual time)
            nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


async def test_a_pipelined_request_whose_body_trickles_is_still_watched(autojump_clock):
    """A pipelined request's body that arrives slowly: its bytes are not taken for a
    next request's, and once it is in, the client leaving cancels the handler (the
    watch armed on the previous request's time used to sleep on those bytes)."""
    cancelled = trio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        await request.read_body()
        if request.path == "/a":
            await responder.respond(200, [], b"ok")
            return
        await sleep_until_cancelled(cancelled)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, handler=handler)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
            await trio.sleep(1)  # the body's second half comes late
            await stream.send_all(b"67890")
            await trio.sleep(1)  # the handler waits, watched
            await stream.aclose()
            await cancelled.wait()
            nursery.cancel_scope.cancel()


class FlakyListener:
    """A listener whose ``accept`` fails with each errno in turn."""

    def __init__(self, errnos: list[int]) -> None:
        self.errnos = errnos
        self.calls = 0

    async def accept(self):
        self.calls += 1
        code = self.errnos.pop(0)
        raise OSError(code, os.strerror(code))


async def test_accept_retries_only_when_out_of_resources(autojump_clock, caplog):
    """Running out of file descriptors or buffers is waited out (closing connections free
    them); any other accept failure is the listener's and ends the server."""
    server = HttpServer(Echo(), server_settings())
    listener = FlakyListener([errno.EMFILE, errno.ENOBUFS, errno.EBADF])
    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError) as info:
            await server._accept_loop(listener, nursery)  # type: ignore[arg-type]
    assert info.value.errno == errno.EBADF and listener.calls == 3
    assert len([r for r in caplog.records if "accept failed" in r.getMessage()]) == 2


async def test_a_pipelined_request_of_a_client_gone_is_cancelled_quietly(autojump_clock, caplog):
    """A whole request pipelined before the client left: its handler is cancelled at its
    first checkpoint, and reading the body already buffered on the way is no failure."""
    cancelled = trio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/a":
            await responder.respond(200, [], b"ok")
            await trio.sleep(1)  # the watcher sees the EOF meanwhile
            return
        assert await request.read_body() == b"12345"  # buffered: no checkpoint
        await sleep_until_cancelled(cancelled)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, _, port = await start(nursery, handler=handler)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n12345")
            await stream.send_eof()
            assert (await read_until_close(stream)).startswith(b"HTTP/1.1 200")
            await cancelled.wait()
            nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
