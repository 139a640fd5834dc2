"""A connection's states and moves, and its keep-alive decision, without sockets."""

from __future__ import annotations

import itertools

import pytest

from ollama_proxy.http.connstate import (
    TRANSITIONS,
    Lifecycle,
    StateError,
)
from ollama_proxy.http.connstate import (
    ConnEvent as E,
)
from ollama_proxy.http.connstate import (
    ConnState as S,
)


def at(state: S, *, must_close: bool = False) -> Lifecycle:
    life = Lifecycle()
    life.state, life.must_close = state, must_close
    return life


@pytest.mark.parametrize(("events", "states"), [
    # a request without a body, kept alive
    ([E.HEAD_BEGINS, E.HEAD_ENDS, E.REQUEST_ENDS, E.RESPONSE_ENDS, E.NEXT_REQUEST],
     [S.READING, S.HANDLING, S.WATCHED, S.ANSWERED, S.IDLE]),
    # a body read by the handler, then the client leaves mid-stream
    ([E.HEAD_BEGINS, E.HEAD_ENDS, E.REQUEST_ENDS, E.CLIENT_LEFT, E.RESPONSE_ENDS, E.CLOSE],
     [S.READING, S.HANDLING, S.WATCHED, S.GONE, S.GONE, S.GONE]),
    # refused before its body was read; the body never arrives
    ([E.HEAD_BEGINS, E.HEAD_ENDS, E.RESPONSE_ENDS, E.CLOSE],
     [S.READING, S.HANDLING, S.ANSWERED, S.CLOSING]),
    # the client leaves after its answer: nothing to cancel, pipelined requests still read
    ([E.HEAD_BEGINS, E.HEAD_ENDS, E.REQUEST_ENDS, E.RESPONSE_ENDS, E.CLIENT_LEFT, E.NEXT_REQUEST],
     [S.READING, S.HANDLING, S.WATCHED, S.ANSWERED, S.ANSWERED, S.IDLE]),
    # a simulated crash: the handler drops the connection mid-body
    ([E.HEAD_BEGINS, E.HEAD_ENDS, E.REQUEST_ENDS, E.ABORT, E.CLIENT_LEFT, E.CLOSE],
     [S.READING, S.HANDLING, S.WATCHED, S.ABORTED, S.ABORTED, S.ABORTED]),
    # gone before its handler began: the handler, cancelled, still takes a buffered body
    ([E.HEAD_BEGINS, E.HEAD_ENDS, E.CLIENT_LEFT, E.REQUEST_ENDS, E.RESPONSE_ENDS, E.CLOSE],
     [S.READING, S.HANDLING, S.GONE, S.GONE, S.GONE, S.GONE]),
    # a new connection that never sends a byte
    ([E.CLOSE], [S.CLOSING]),
], ids=["keep-alive", "client-left", "refused", "left-after-answer", "abort", "gone-early",
        "silent"])
def test_a_connections_life_moves_through_the_table(events, states):
    """Each event leads where the table says, from IDLE on."""
    life = Lifecycle()
    assert life.state is S.IDLE
    assert [life.fire(event) for event in events] == states


@pytest.mark.parametrize(("state", "event"), [
    (state, event) for state, event in itertools.product(S, E) if event not in TRANSITIONS[state]
])
def test_a_move_the_table_does_not_list_is_refused(state, event):
    """An event a state does not allow raises and leaves the state as it was."""
    life = at(state)
    with pytest.raises(StateError):
        life.fire(event)
    assert life.state is state


def test_every_state_is_reachable_and_every_state_can_close():
    """No state is dead code, and none can keep a connection open for ever."""
    reached, frontier = {S.IDLE}, [S.IDLE]
    while frontier:
        for target in TRANSITIONS[frontier.pop()].values():
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(S)
    assert all(E.CLOSE in TRANSITIONS[state] for state in S)


@pytest.mark.parametrize(("state", "must_close", "draining", "our_done", "their_done", "keep"), [
    (S.ANSWERED, False, False, True, True, True),
    (S.ANSWERED, True, False, True, True, False),  # ambiguous framing, or refused
    (S.ANSWERED, False, True, True, True, False),  # the server drains
    (S.ANSWERED, False, False, False, True, False),  # h11 must close (Connection: close)
    (S.ANSWERED, False, False, True, False, False),  # the body was left unread
    (S.WATCHED, False, False, True, True, False),  # the handler never ended its answer
    (S.HANDLING, False, False, True, True, False),
    (S.GONE, False, False, True, True, False),
    (S.ABORTED, False, False, True, True, False),
])
def test_keep_alive_is_decided_in_one_place(state, must_close, draining, our_done, their_done,
                                           keep):
    """Only a complete answer on a connection nothing forbids to continue keeps it alive."""
    life = at(state, must_close=must_close)
    assert life.next_request(draining=draining, our_done=our_done, their_done=their_done) is keep
    assert life.state is (S.IDLE if keep else TRANSITIONS[state][E.CLOSE])


@pytest.mark.parametrize(("must_close", "draining", "their_done", "closes"), [
    (False, False, True, False),
    (True, False, True, True),
    (False, True, True, True),
    (False, False, False, True),
])
def test_the_connection_header_says_what_keep_alive_will_decide(must_close, draining, their_done,
                                                                closes):
    """A response says Connection: close exactly when its connection will not continue."""
    life = at(S.WATCHED, must_close=must_close)
    assert life.may_continue(draining=draining, their_done=their_done) is not closes
