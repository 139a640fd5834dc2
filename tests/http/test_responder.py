"""The Responder's whole-response send: another thread may send it first."""

from __future__ import annotations

import socket

import pytest

from ollama_proxy.http.responder import ClientGone, Delivery, Responder


async def test_a_delivery_is_sent_once_by_whoever_takes_it():
    """Responder.deliver sends what another thread did not: all, the rest, or nothing."""
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        class Conn:  # what Responder.deliver needs of a connection
            raw = a
            sent = bytearray()
            failed = False

            class h11:  # noqa: N801
                @staticmethod
                def send_failed() -> None:
                    Conn.failed = True

            @staticmethod
            async def send_bytes(data: bytes) -> None:
                Conn.sent.extend(data)

        responder = Responder.__new__(Responder)
        responder._conn = Conn

        untaken = Delivery(a, b"hello")  # no other thread got to it: we send it all
        await responder.deliver(untaken)
        assert bytes(Conn.sent) == b"hello"
        untaken.from_thread()  # too late for the thread: it sends nothing
        with pytest.raises(BlockingIOError):
            b.recv(16, socket.MSG_DONTWAIT)

        Conn.sent.clear()
        early = Delivery(a, b"world")
        early.from_thread()  # the thread sent it all
        await responder.deliver(early)
        assert b.recv(16) == b"world" and Conn.sent == bytearray()

        partial = Delivery(a, b"abcdef")
        partial.from_thread()
        partial.sent = 2  # as if the socket had taken two bytes only
        await responder.deliver(partial)
        assert bytes(Conn.sent) == b"cdef"

        Conn.sent.clear()
        broken = Delivery(a, b"zz")
        broken.take()
        broken.failed = broken.done = True  # the thread's send failed: the client is gone
        with pytest.raises(ClientGone):
            await responder.deliver(broken)
        assert Conn.failed and Conn.sent == bytearray()
