"""Noticing a client that leaves while its handler runs, so that the handler (and
the upstream request it waits on) is cancelled at once, even while nothing is
being written.

The request loop reads the client socket itself, so a request reaches its
handler without a hand-over from another task. A handler still running
``WATCH_AFTER_S`` after its whole request arrived (a stream, a model loading)
gets watched: the connection's watch task waits until the socket is readable
and peeks, never taking a byte; EOF or a reset means the client left. Bytes of
a pipelined request end the watch: they wait for the request loop. One task
per connection, waking at most every ``WATCH_AFTER_S`` while the connection is
busy: per request it costs nothing, and most small requests are over before it
looks.
"""

from __future__ import annotations

import socket
from typing import Callable

import trio

# A handler still running this long after its whole request arrived gets watched.
WATCH_AFTER_S = 0.05


class ClientWatch:
    """The watch task of one connection (``run``) and the cancel scope of its watch."""

    __slots__ = ("_sock", "_on_gone", "_busy", "_armed_at", "_scope")

    def __init__(self, sock: socket.socket, on_gone: Callable[[], None]) -> None:
        self._sock = sock
        self._on_gone = on_gone  # the client left: EOF or a reset
        self._busy = trio.Event()  # set once a request is armed; renewed when the connection rests
        self._armed_at = -1.0  # trio time the watched request was whole; -1: nothing to watch
        self._scope: trio.CancelScope | None = None  # a watch in progress

    def arm(self) -> None:
        """The handler's whole request is in: its client leaving is watched for from
        ``WATCH_AFTER_S`` on."""
        self._armed_at = trio.current_time()
        self._busy.set()

    def disarm(self) -> None:
        """Nothing to watch any more (the handler ended, its client left or its answer
        was cut short): the socket is the request loop's again."""
        self._armed_at = -1.0
        if self._scope is not None:
            self._scope.cancel()

    def rest(self) -> None:
        """Nothing will be armed for a while (the connection idles, or a body arrives):
        the task sleeps until the next ``arm`` instead of waking every ``WATCH_AFTER_S``."""
        if self._busy.is_set():
            self._busy = trio.Event()

    async def run(self) -> None:
        while True:
            await self._busy.wait()
            await trio.sleep(WATCH_AFTER_S)
            armed_at = self._armed_at
            if armed_at < 0:
                continue  # between requests, or a body still arriving: armed later
            await trio.sleep_until(armed_at + WATCH_AFTER_S)
            if self._armed_at == armed_at:  # the same request, still armed
                await self._watch()

    async def _watch(self) -> None:
        """Until ``disarm`` or the client leaves."""
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                while True:
                    await trio.lowlevel.wait_readable(self._sock)
                    if scope.cancel_called:  # disarmed as the socket turned readable
                        return
                    try:
                        peeked = self._sock.recv(1, socket.MSG_PEEK)
                    except BlockingIOError:
                        continue
                    except OSError:  # reset
                        peeked = b""
                    if peeked:  # a pipelined request: read after this handler
                        await trio.sleep_forever()
                    self._armed_at = -1.0  # nothing more to watch for this request
                    self._on_gone()
                    return
            finally:
                self._scope = None
