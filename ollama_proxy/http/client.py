"""The upstream HTTP/1.1 client: h11 over trio, with a bounded keep-alive pool
per backend.

Timeouts are cancel scopes at the call sites below: connect, first byte (the
response head; Ollama sends it only once the model is loaded and the first
token exists) and the gap between body pieces. A response that was not read
to its end is never pooled: its connection is closed, which is also how the
backend learns that the client left and stops generating.

An ``https`` backend's connections are TLS (trio's ``SSLStream`` over the TCP stream);
a plain one keeps the stdlib socket calls of ``sockio`` on the hot path. Which one is
chosen at connect; the rest of the code calls the connection's ``send``/``receive``.
"""

from __future__ import annotations

import functools
import logging
import select
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable, cast

import h11
import trio

from ..errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from . import sockio
from .bodies import body_reader
from .messages import find_header

log = logging.getLogger("ollama_proxy.upstream")

# Bodies below this go out with the head in one write.
SMALL_BODY_BYTES = 64 * 1024
# A pooled connection unused this long is closed, not reused: its backend may have
# dropped it meanwhile.
IDLE_EXPIRY_S = 60.0


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """One backend's address, pool size and timeouts in seconds: an ``[upstream.NAME]``
    of the config (its one source; ``app`` builds this)."""

    host: str
    port: int
    max_connections: int
    connect_timeout_s: float
    first_byte_timeout_s: float
    chunk_gap_timeout_s: float
    tls: ssl.SSLContext | None  # None: plain TCP (an http:// backend)


def tls_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """The client side of an https backend: the system CA store, or ``ca_file`` (a
    private CA); ``verify`` False checks neither certificate nor name (testing only)."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Conn:
    """One upstream connection and its h11 client state. ``send``, ``receive`` and
    ``receive_first`` are its transport, chosen at connect: the stdlib socket calls
    of ``sockio`` (plain), or the ``SSLStream``'s (TLS)."""

    __slots__ = ("stream", "raw", "send", "receive", "receive_first", "h11", "idle_since")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.send: Callable[[bytes], Awaitable[None]]
        self.receive: Callable[[], Awaitable[bytes]]
        self.receive_first: Callable[[], Awaitable[bytes]]
        if isinstance(stream, trio.SSLStream):
            self.raw = sockio.raw_socket(stream.transport_stream.socket)
            self.send = stream.send_all
            receive = functools.partial(stream.receive_some, sockio.RECEIVE_SIZE)
            # typed bytes | bytearray; SSLObject.read gives bytes
            self.receive = self.receive_first = cast(Callable[[], Awaitable[bytes]], receive)
        else:
            self.raw = sockio.raw_socket(stream.socket)  # the hot path's calls
            self.send = functools.partial(sockio.send_all, self.raw)
            self.receive = functools.partial(sockio.recv, self.raw, sockio.RECEIVE_SIZE)
            self.receive_first = functools.partial(sockio.recv, self.raw, sockio.RECEIVE_SIZE,
                                                   wait_first=True)
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def reusable(self, now: float, expiry_s: float) -> bool:
        """Fit for another request: not expired, and no EOF or stray bytes waiting."""
        if now - self.idle_since > expiry_s:
            return False
        try:
            readable, _, _ = select.select([self.raw], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    async def aclose(self) -> None:
        await sockio.aclose(self.stream)


def checkout(idle: list[_Conn], now: float, expiry_s: float) -> tuple[_Conn | None, list[_Conn]]:
    """Pure pool decision: the freshest reusable idle connection, and the stale ones to close."""
    stale: list[_Conn] = []
    while idle:
        conn = idle.pop()  # most recently used first: the likeliest to be alive
        if conn.reusable(now, expiry_s):
            return conn, stale
        stale.append(conn)
    return None, stale


class UpstreamPool:
    """Keep-alive connections to one backend, at most ``max_connections`` at once."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self._idle: list[_Conn] = []
        self._slots = trio.Semaphore(settings.max_connections)
        self.in_use = 0

    def stats(self) -> dict[str, int]:
        return {"idle": len(self._idle), "in_use": self.in_use}

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | bytearray,
        on_sent: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """Send a request and wait for the response head (first-byte timeout);
        ``on_sent`` runs once the request is out, before the wait.

        Raises ``UpstreamUnreachable`` (nothing was sent), ``UpstreamTimeout``
        (no head in time) or ``UpstreamProtocolError``.
        """
        try:  # Semaphore.acquire yields to the scheduler even when a slot is free
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        self.in_use += 1
        try:
            return await self._request(method, target, headers, body, on_sent)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        self.in_use -= 1
        self._slots.release()

    async def _request(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                       body: bytes | bytearray, on_sent: Callable[[], None] | None) -> UpstreamResponse:
        conn, stale = checkout(self._idle, trio.current_time(), IDLE_EXPIRY_S)
        for old in stale:
            await old.aclose()
        if conn is not None:
            try:
                return await self._exchange(conn, method, target, headers, body, on_sent)
            except _StaleConnection:
                pass  # the backend closed it just now, before reading: retry on a new one
        conn = await self._connect()
        try:
            return await self._exchange(conn, method, target, headers, body, on_sent)
        except _StaleConnection as exc:
            raise UpstreamProtocolError("backend closed the connection without a response") from exc

    async def _connect(self) -> _Conn:
        s = self.settings
        with trio.move_on_after(s.connect_timeout_s) as scope:
            try:
                stream = await trio.open_tcp_stream(s.host, s.port)
            except OSError as exc:
                raise UpstreamUnreachable(f"backend {s.host}:{s.port} is unreachable: {exc}") from exc
            if s.tls is None:
                return _Conn(stream)
            return _Conn(await self._handshake(stream, s.tls))
        assert scope.cancelled_caught
        raise UpstreamUnreachable(
            f"backend {s.host}:{s.port} did not accept a connection"
            f"{' and complete the TLS handshake' if s.tls else ''} within {s.connect_timeout_s:g} s")

    async def _handshake(self, tcp: trio.SocketStream,
                         context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
        """TLS over ``tcp`` (closed if it fails); a failure says why, e.g. the certificate."""
        s = self.settings
        # https_compatible: servers often close without a close_notify
        stream = trio.SSLStream(tcp, context, server_hostname=s.host, https_compatible=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            await sockio.aclose(tcp)
            cause = exc.__cause__
            why = (f"certificate verify failed: {cause.verify_message}"
                   if isinstance(cause, ssl.SSLCertVerificationError)
                   else getattr(cause, "reason", None) or str(cause or exc) or "connection closed")
            raise UpstreamUnreachable(f"TLS handshake with backend {s.host}:{s.port} failed: {why}") from exc
        except BaseException:
            await sockio.aclose(tcp)
            raise
        return stream

    async def _exchange(self, conn: _Conn, method: str, target: str,
                        headers: list[tuple[bytes, bytes]], body: bytes | bytearray,
                        on_sent: Callable[[], None] | None) -> UpstreamResponse:
        """Send on ``conn`` and read the head; ``conn`` is closed on any failure."""
        try:
            parts = [conn.h11.send(h11.Request(method=method, target=target, headers=headers))]
            if body:
                # the body object itself, not a copy (bodies reach max_body_mb); h11 takes
                # any bytes-like object, its annotation says bytes
                data = h11.Data(data=cast(bytes, body))
                parts.extend(conn.h11.send_with_data_passthrough(data) or ())
            parts.append(conn.h11.send(h11.EndOfMessage()))
            # One deadline for sending (a backend that stops reading a big body) and for
            # the response head. A bare scope: fail_after's generator costs more.
            with trio.CancelScope(
                    deadline=trio.current_time() + self.settings.first_byte_timeout_s) as wait:
                if len(body) < SMALL_BODY_BYTES:
                    await conn.send(b"".join(parts))
                else:  # no copy of a big body just to save a syscall
                    for part in parts:
                        await conn.stream.send_all(part)
                if on_sent is not None:
                    on_sent()
                response = await self._read_head(conn)
            if wait.cancelled_caught:
                raise trio.TooSlowError()
        except trio.TooSlowError as exc:
            await conn.aclose()
            raise UpstreamTimeout(
                f"backend sent no response within {self.settings.first_byte_timeout_s:g} s"
            ) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await conn.aclose()
            raise _StaleConnection() from exc
        except h11.ProtocolError as exc:
            await conn.aclose()
            raise UpstreamProtocolError(f"backend sent malformed HTTP: {exc}") from exc
        except BaseException:
            await conn.aclose()
            raise
        return UpstreamResponse(self, conn, response, method)

    async def _read_head(self, conn: _Conn) -> h11.Response:
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                data = await conn.receive_first()
                if not data and conn.h11.their_state is h11.SEND_RESPONSE and not conn.h11.trailing_data[0]:
                    # EOF before a single byte of response: closed keep-alive race
                    raise _StaleConnection()
                conn.h11.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                return event
            else:
                raise UpstreamProtocolError("backend closed the connection without a response")

    async def _finish(self, conn: _Conn, reusable: bool) -> None:
        """Pool the connection if its response ended cleanly, else close it."""
        self._release()
        if reusable and conn.h11.our_state is h11.DONE:
            conn.h11 = h11.Connection(h11.CLIENT)  # h11 saw only the head: start afresh
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            await conn.aclose()

    async def close_idle(self) -> None:
        """Close every pooled connection (at shutdown)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


class ResponseTooLarge(UpstreamProtocolError):
    """A reply that does not stream grew past the cap on what is held in memory."""

    def __init__(self, limit: int, received: int) -> None:
        super().__init__(f"the backend's reply is larger than {limit} bytes "
                         f"([server] max_response_mb)")
        self.received = received


class _StaleConnection(Exception):
    """The connection broke before any response byte: safe to retry on a new one."""


class UpstreamResponse:
    """A response whose head has arrived; read the body with ``receive``, then ``aclose``."""

    __slots__ = ("_pool", "_conn", "status", "headers", "_body", "_leftover", "_keep_alive",
                 "_closed", "stopped")

    def __init__(self, pool: UpstreamPool, conn: _Conn, head: h11.Response, method: str) -> None:
        self._pool = pool
        self._conn = conn
        self.status: int = head.status_code
        self.headers: list[tuple[bytes, bytes]] = list(head.headers)
        # h11 parsed the head; the body is ours to decode (bodies.py: the hot path).
        self._body = body_reader(method, self.status, self.headers)
        self._leftover = bytes(conn.h11.trailing_data[0])
        self._keep_alive = head.http_version == b"1.1" and not any(
            name == b"connection" and b"close" in value.lower() for name, value in self.headers)
        self._closed = False
        self.stopped = False  # ``stop``ped: the body ended because we cut it

    def stop(self) -> None:
        """Cut the body short from outside (a drain): the connection closes under the
        reader, whose ``receive`` then raises ``UpstreamProtocolError``; what it was
        doing meanwhile (writing to its client) is never interrupted."""
        self.stopped = True
        raw = self._conn.raw
        if raw.fileno() != -1:
            trio.lowlevel.notify_closing(raw)
            raw.close()

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower-case), or None."""
        return find_header(self.headers, name)

    async def receive(self) -> bytes:
        """The body bytes available now, or b"" at its end.

        Waits at most ``chunk_gap_timeout_s`` for the next piece
        (``UpstreamTimeout``); a body cut short raises ``UpstreamProtocolError``.
        """
        body = self._body
        while not body.done:
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                data = await self._receive_more()
                if not data:
                    body.eof()  # raises unless the end of the connection is the end of the body
                    return b""
            out = body.feed(data)
            if out:
                return out
        return b""

    async def _receive_more(self) -> bytes:
        gap_s = self._pool.settings.chunk_gap_timeout_s
        # A bare cancel scope: fail_after's generator costs too much once per chunk.
        with trio.CancelScope(deadline=trio.current_time() + gap_s) as scope:
            try:
                # once per relayed chunk: straight on the socket (sockio) when plain
                return await self._conn.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamProtocolError(f"backend connection broke: {exc}") from exc
        assert scope.cancelled_caught
        raise UpstreamTimeout(f"backend went silent for {gap_s:g} s mid-response")

    async def read_all(self, limit: int) -> bytes:
        """The whole remaining body, refusing more than ``limit`` bytes (``ResponseTooLarge``)."""
        pieces: list[bytes] = []
        size = 0
        while True:
            data = await self.receive()
            if not data:
                return b"".join(pieces)
            size += len(data)
            if size > limit:
                raise ResponseTooLarge(limit, size)
            pieces.append(data)

    async def aclose(self) -> None:
        """Return the connection to the pool if the body was read to its end, else close it."""
        if self._closed:
            return
        self._closed = True
        body = self._body
        reusable = self._keep_alive and body.done and not body.overflow and not self._leftover
        await self._pool._finish(self._conn, reusable)
