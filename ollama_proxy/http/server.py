"""The HTTP/1.1 server: listeners, one ``ServerConnection`` task per socket (keep-alive
and pipelining, request limits with clean errors, client-gone detection), the
connection caps, and a graceful drain. What to do with a request is injected as a
``Handler``.

Every resource a client can hold is bounded: connections (in all and per address;
at the cap the longest-idle connection makes room), and per connection the times
``ServerSettings`` names.
"""

from __future__ import annotations

import errno
import logging
import math
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from ..errors import ApiFamily, error_body
from . import sockio
from .clientip import AddressPolicy
from .connection import ServerConnection, address_refused
from .conntable import ConnectionTable
from .messages import JSON_TYPE, Request
from .responder import Responder

log = logging.getLogger("ollama_proxy.server")

# After a drain's grace, interrupted handlers get this long to end their responses
# well (an error line, the ledger row) before they are cancelled outright.
FINISH_S = 2.0
# accept() failing for want of a resource (file descriptors, memory) is retried after
# a pause, as trio's serve_listeners does: connections closing free them. Any other
# failure is the listener's and ends the server.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_S = 0.1


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Limits of the HTTP server, in bytes and seconds: ``[server]`` of the config
    (its one source; ``app`` builds this)."""

    max_body_bytes: int
    max_header_bytes: int
    header_timeout_s: float
    keepalive_timeout_s: float
    body_timeout_s: float
    send_timeout_s: float
    max_connections: int
    max_connections_per_ip: int
    addresses: AddressPolicy


Handler = Callable[[Request, Responder], Awaitable[None]]

_REFUSED_FULL = error_body(ApiFamily.NATIVE, 503, "the gateway has too many connections; retry",
                           "too_many_connections")
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: %b\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%b"
            % (JSON_TYPE, len(_REFUSED_FULL), _REFUSED_FULL))


class HttpServer:
    """Accepts connections and runs one ``ServerConnection`` task per socket.

    At most ``max_connections`` connections in all and ``max_connections_per_ip``
    from one address (trusted proxies excepted) are open at once; a new one past
    either cap closes the longest-idle connection with no request in flight (in
    that address's, for the per-address cap), or is answered 503 and closed when
    there is none.
    """

    def __init__(self, handler: Handler, settings: ServerSettings) -> None:
        self.handler = handler
        self.settings = settings
        self.draining = False
        self._accept_scope = trio.CancelScope()
        self.table: ConnectionTable[ServerConnection] = ConnectionTable(
            self.settings.max_connections, self.settings.max_connections_per_ip,
            exempt=self.settings.addresses.is_trusted_proxy)
        self._conn_nursery: trio.Nursery | None = None
        self._grace = trio.CancelScope()  # a drain sets its deadline: the grace's end
        self._stopping = False  # the grace ran out
        self._emptied = trio.Event()  # draining, the last connection closed
        self._on_stop: set[Callable[[], None]] = set()
        self.evicted = 0  # idle connections closed to make room (stats, tests)
        self.refused = 0  # connections refused at a cap

    def on_stop(self, callback: Callable[[], None]) -> None:
        """``Responder.on_stop``: ``callback`` runs when the drain's grace runs out."""
        if self._stopping:
            callback()
        else:
            self._on_stop.add(callback)

    def forget(self, callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            self._on_stop.discard(callback)

    async def _stop_when_the_grace_ends(self) -> None:
        with self._grace:
            await self._emptied.wait()  # all done in time: nothing to stop
        if self._emptied.is_set():
            return
        self._stopping = True
        callbacks, self._on_stop = self._on_stop, set()
        for callback in callbacks:
            callback()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 = any free port) until drained or cancelled.

        ``task_status.started`` reports the bound ``(host, port)``.
        """
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        if port == 0 and len(listeners) > 1:  # each would get its own random port: keep one
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        bound = listeners[0].socket.getsockname()
        async with trio.open_nursery() as conns:
            self._conn_nursery = conns
            with self._accept_scope:
                async with trio.open_nursery() as accept:
                    for listener in listeners:
                        accept.start_soon(self._accept_loop, listener, conns)
                    task_status.started((bound[0], bound[1]))
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, conns: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("accept failed: %s; retrying in %g s", exc, ACCEPT_RETRY_S)
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            conn = self._admit(stream)
            if conn is None:
                self.refused += 1
                conns.start_soon(_refuse, stream)
            else:
                conns.start_soon(self._handle, conn)

    def _admit(self, stream: trio.SocketStream) -> ServerConnection | None:
        """A connection for ``stream``, room made for it; None when there is no room."""
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:
            peer = "?"
        conn = ServerConnection(self, stream, peer)
        addresses = self.settings.addresses
        if not addresses.is_trusted_proxy(peer) and not addresses.admits(peer):
            conn.refusal = address_refused()  # behind a proxy: checked per request
        admitted, evict = self.table.admit(conn, peer)
        for victim in evict:
            victim.evict()
        self.evicted += len(evict)
        return conn if admitted else None

    async def _handle(self, conn: ServerConnection) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.watch.run)
                try:
                    await conn.run()
                finally:
                    nursery.cancel_scope.cancel()
        except Exception:  # contained: one bad connection never stops the server
            log.exception("connection from %s failed", conn.client)
        finally:
            # Counted until closed (a lingering socket is a file descriptor too); no
            # linger once half the connections are taken: then refusals close at once.
            await conn.aclose(linger=len(self.table) < self.settings.max_connections // 2)
            self.table.remove(conn)
            if self.draining and not self.table:
                self._emptied.set()

    def drain(self, grace_s: float) -> None:
        """Stop accepting and close idle connections. In-flight responses get
        ``grace_s``; then their ``on_stop`` callbacks run (a stream's backend
        connection is closed, so it ends with an error frame), and whatever still runs
        ``FINISH_S`` later is cancelled outright. A second drain can only shorten it."""
        self.draining = True
        self._accept_scope.cancel()
        for conn in list(self.table):
            conn.stop_waiting()
        if not self.table:
            self._emptied.set()
        first = self._grace.deadline == math.inf
        stop_at = min(self._grace.deadline, trio.current_time() + grace_s)
        self._grace.deadline = stop_at
        if self._conn_nursery is not None:
            if first:
                self._conn_nursery.start_soon(self._stop_when_the_grace_ends)
            self._conn_nursery.cancel_scope.deadline = stop_at + FINISH_S


async def _refuse(stream: trio.SocketStream) -> None:
    """Answer 503 to a connection there is no room for, without waiting for it."""
    try:
        sockio.raw_socket(stream.socket).send(_REFUSAL)  # never blocks: whatever fits
    except OSError:
        pass
    await sockio.aclose(stream)
