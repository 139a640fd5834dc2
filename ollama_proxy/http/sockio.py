"""Socket reads and writes on the hot path, without trio's schedule point per call,
and the read size and bounded close that the server and the upstream client share.

A trio socket method yields to the scheduler after every call that succeeds:
a full pass of the run loop (an epoll call and the task queue), so a small
relayed request paid four such passes for nothing. These helpers call the
stdlib socket directly and park the task only when the call would block.

The price is fairness: code whose socket calls never block would never yield.
So every ``YIELD_EVERY``-th call that did not wait (counted across the whole
process) takes a checkpoint, which also notices cancellation.
"""

from __future__ import annotations

import socket

import trio

YIELD_EVERY = 16
_unyielded = 0  # calls since the last one that waited or yielded (one trio thread)
# Large reads keep per-request work low; h11 buffers what it is not asked for yet.
RECEIVE_SIZE = 64 * 1024
# A polite close is shielded from cancellation but bounded: a stuck peer cannot hold a task.
CLOSE_TIMEOUT_S = 1.0


def raw_socket(sock: trio.socket.SocketType) -> socket.socket:
    """The stdlib socket inside a trio socket (trio is pinned by build_pyz.py; a test checks it)."""
    return sock._sock  # type: ignore[attr-defined,no-any-return]


async def _did_not_wait() -> None:
    global _unyielded
    _unyielded += 1
    if _unyielded >= YIELD_EVERY:
        _unyielded = 0
        await trio.lowlevel.checkpoint()


async def recv(sock: socket.socket, size: int, *, wait_first: bool = False) -> bytes:
    """``sock.recv(size)``, waiting while there is nothing to read.

    ``wait_first``: we expect nothing yet (a request just sent, a response just
    read), so skip the attempt that would fail.
    """
    global _unyielded
    if wait_first:
        await trio.lowlevel.wait_readable(sock)
        _unyielded = 0
    while True:
        try:
            data = sock.recv(size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            _unyielded = 0
            continue
        await _did_not_wait()
        return data


class Stalled(Exception):
    """The peer accepted no byte for the whole stall timeout."""


async def send_all(sock: socket.socket, data: bytes, stall_timeout_s: float | None = None) -> None:
    """Write all of ``data``, waiting while the socket's buffer is full; ``Stalled``
    when one wait for room lasts ``stall_timeout_s`` (a peer that stopped reading)."""
    global _unyielded
    sent = 0
    view: memoryview | None = None
    while True:
        try:
            sent += sock.send(data if view is None else view[sent:])
        except BlockingIOError:
            if stall_timeout_s is None:
                await trio.lowlevel.wait_writable(sock)
            else:
                with trio.CancelScope(deadline=trio.current_time() + stall_timeout_s) as wait:
                    await trio.lowlevel.wait_writable(sock)
                if wait.cancelled_caught:
                    raise Stalled() from None
            _unyielded = 0
            continue
        if sent >= len(data):
            await _did_not_wait()
            return
        if view is None:
            view = memoryview(data)


async def aclose(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream``, even in a cancelled scope, within ``CLOSE_TIMEOUT_S``."""
    with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
        scope.shield = True
        await stream.aclose()
