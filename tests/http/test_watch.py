"""The client-gone watch on a socket pair, in trio time."""

from __future__ import annotations

import socket

import trio

from ollama_proxy.http.watch import WATCH_AFTER_S, ClientWatch


class Watched:
    """A watch on one end of a socket pair; the other end is the client."""

    def __init__(self) -> None:
        self.server, self.client = socket.socketpair()
        self.server.setblocking(False)
        self.gone = trio.Event()
        self.watch = ClientWatch(self.server, self.gone.set)

    def close(self) -> None:
        self.server.close()
        self.client.close()


async def test_a_client_leaving_while_armed_is_noticed_once_the_watch_begins(autojump_clock):
    """EOF after arming: noticed, and not before WATCH_AFTER_S (short requests pay nothing)."""
    w = Watched()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.watch.run)
        armed_at = trio.current_time()
        w.watch.arm()
        w.client.close()
        with trio.fail_after(1):
            await w.gone.wait()
        assert trio.current_time() - armed_at >= WATCH_AFTER_S
        nursery.cancel_scope.cancel()
    w.close()


async def test_pipelined_bytes_are_not_a_client_leaving(autojump_clock):
    """A next request's bytes end nothing and are never taken; after disarm, EOF is the
    request loop's to find."""
    w = Watched()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.watch.run)
        w.client.send(b"GET /next HTTP/1.1\r\n")
        w.watch.arm()
        await trio.sleep(1)
        w.watch.disarm()
        w.client.close()
        await trio.sleep(1)
        assert not w.gone.is_set()
        assert w.server.recv(100) == b"GET /next HTTP/1.1\r\n"
        nursery.cancel_scope.cancel()
    w.close()


async def test_nothing_is_watched_unless_armed(autojump_clock):
    """Between requests, or while a body arrives, the socket is the request loop's."""
    w = Watched()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.watch.run)
        w.watch.arm()
        w.watch.disarm()  # a request over before the watch began
        w.watch.rest()
        w.client.close()
        await trio.sleep(1)
        assert not w.gone.is_set()
        nursery.cancel_scope.cancel()
    w.close()
