"""What one client connection is doing, as one enum, and the moves it may make.

Theory of operation
===================

Three parties act on a connection: the request loop (it reads heads and bodies),
the handler's ``Responder`` (it writes the answer) and the client-gone watcher
(it peeks at the socket while a handler runs). None of them sets flags for the
others to re-check: each fires an event here, ``TRANSITIONS`` says where it
leads, and an event the table does not list for the current state is a bug,
raised where it happens. h11 keeps the protocol's state (what was sent and
received, ``our_state``/``their_state``); this keeps what the connection does
about it, as h11's ``_state.py`` and httpcore's connection states do::

    IDLE ─head begins→ READING ─head ends→ HANDLING ─request ends→ WATCHED
     ↑                                        │                      │
     └──────── next request ──── ANSWERED ←───┴──── response ends ───┘

    HANDLING, WATCHED ─client left→ GONE      (the handler is cancelled)
    any handling state ─abort→ ABORTED        (the answer was cut short)
    any state but GONE, ABORTED ─close→ CLOSING

A client leaving once its answer is complete cancels nothing (ANSWERED stays):
requests it pipelined before leaving are still read. A response ending or a
client leaving after the answer was cut short, or after the client left, changes
nothing either: those states only wait for the close.

Whether a next request may follow is decided in one place, ``may_continue``:
it writes the response's ``Connection: close``, and ``next_request`` applies it
once the handler is over.
"""

from __future__ import annotations

import enum


class ConnState(enum.Enum):
    IDLE = "idle"  # waiting for a request of which nothing arrived: an eviction or a drain ends it
    READING = "reading"  # a request head is arriving (a drain lets it finish)
    HANDLING = "handling"  # a handler runs; its request body may still arrive (the socket is its)
    WATCHED = "watched"  # a handler runs with its whole request in: the client leaving cancels it
    ANSWERED = "answered"  # the response is complete; the handler may still run
    GONE = "gone"  # the client left before its answer was complete; the connection closes
    ABORTED = "aborted"  # the answer was cut short: close at once, never linger
    CLOSING = "closing"  # no further request on this connection


class ConnEvent(enum.Enum):
    HEAD_BEGINS = "head begins"  # the first bytes of a request head arrived
    HEAD_ENDS = "head ends"
    REQUEST_ENDS = "request ends"  # the whole request is in (no body, or all of it read)
    RESPONSE_ENDS = "response ends"  # the last of the answer is handed to h11
    CLIENT_LEFT = "client left"  # EOF or a reset seen, or a write that failed
    ABORT = "abort"  # the handler dropped the connection, or failed mid-answer
    NEXT_REQUEST = "next request"  # kept alive: wait for another request
    CLOSE = "close"  # no further request


S, E = ConnState, ConnEvent

TRANSITIONS: dict[ConnState, dict[ConnEvent, ConnState]] = {
    S.IDLE: {E.HEAD_BEGINS: S.READING, E.CLOSE: S.CLOSING},
    S.READING: {E.HEAD_ENDS: S.HANDLING, E.CLOSE: S.CLOSING},
    S.HANDLING: {E.REQUEST_ENDS: S.WATCHED, E.RESPONSE_ENDS: S.ANSWERED, E.CLIENT_LEFT: S.GONE,
                 E.ABORT: S.ABORTED, E.CLOSE: S.CLOSING},
    S.WATCHED: {E.RESPONSE_ENDS: S.ANSWERED, E.CLIENT_LEFT: S.GONE, E.ABORT: S.ABORTED,
                E.CLOSE: S.CLOSING},
    # A body read after the answer is not watched; a client leaving now cancels nothing.
    S.ANSWERED: {E.REQUEST_ENDS: S.ANSWERED, E.CLIENT_LEFT: S.ANSWERED, E.ABORT: S.ABORTED,
                 E.NEXT_REQUEST: S.IDLE, E.CLOSE: S.CLOSING},
    # A cancelled handler may still finish what needs no checkpoint (a buffered body).
    S.GONE: {E.REQUEST_ENDS: S.GONE, E.RESPONSE_ENDS: S.GONE, E.CLIENT_LEFT: S.GONE,
             E.ABORT: S.ABORTED, E.CLOSE: S.GONE},
    S.ABORTED: {E.REQUEST_ENDS: S.ABORTED, E.RESPONSE_ENDS: S.ABORTED, E.CLIENT_LEFT: S.ABORTED,
                E.ABORT: S.ABORTED, E.CLOSE: S.ABORTED},
    S.CLOSING: {E.CLOSE: S.CLOSING},
}
del S, E


class StateError(RuntimeError):
    """An event the connection's state does not allow: a bug in the server."""


class Lifecycle:
    """One connection's ``ConnState``, moved only by ``fire``, and whether it is kept alive."""

    __slots__ = ("state", "must_close")

    def __init__(self) -> None:
        self.state = ConnState.IDLE
        # This request closes the connection whatever comes: its framing was ambiguous,
        # or it was refused unread. Set per request.
        self.must_close = False

    def fire(self, event: ConnEvent) -> ConnState:
        """Move on ``event``; ``StateError`` when the table has no such move."""
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise StateError(f"{event.value!r} cannot happen to a connection in state "
                             f"{self.state.value!r}") from None
        return self.state

    def may_continue(self, *, draining: bool, their_done: bool) -> bool:
        """Whether another request may follow the one being answered: not when the
        server drains, the request must close, or its body was left unread."""
        return their_done and not (draining or self.must_close)

    def next_request(self, *, draining: bool, our_done: bool, their_done: bool) -> bool:
        """Once the handler is over: True and IDLE for a next request, or False and
        closing (the answer is incomplete, was cut short or its client left)."""
        keep = (self.state is ConnState.ANSWERED and our_done
                and self.may_continue(draining=draining, their_done=their_done))
        self.fire(ConnEvent.NEXT_REQUEST if keep else ConnEvent.CLOSE)
        return keep
