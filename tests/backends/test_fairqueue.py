"""backends/fairqueue.py: the Virtual Token Counter scheduler, driven by hand (sans-IO).

A bystander user "z" often holds a running request: an idle gateway forgets every
counter, so a test that reads a counter after a finish keeps the gateway busy."""

from __future__ import annotations

import heapq
import itertools

import pytest

from ollama_proxy.backends.fairqueue import (
    INPUT_WEIGHT,
    OUTPUT_WEIGHT,
    FairQueue,
    QueueFull,
    Service,
    UserQueueFull,
    Waiter,
)


def queue(*, max_queue: int = 256, per_user: int = 16, fair: bool = True) -> FairQueue:
    return FairQueue(max_queue=max_queue, max_queued_per_user=per_user, fair=fair)


def waiter(user: str, *, arrived: float = 0.0, prompt: int = 0, weight: float = 1.0,
           backends: tuple[str, ...] | None = None) -> Waiter:
    """A waiter that may use every backend, or only those named."""
    return Waiter(user, weight, prompt, lambda b: backends is None or b in backends, arrived)


def busy(q: FairQueue, user: str = "z") -> Service:
    """A running request at counter 0 that keeps the gateway from going idle."""
    return q.admit(user, 1.0, 0)


def served(q: FairQueue, user: str, prompt: int = 0, completion: int = 0) -> None:
    """One whole request of ``user``: admitted and finished."""
    q.finish(q.admit(user, 1.0, prompt), completion)


def grants(q: FairQueue, n: int, backend: str = "b") -> list[str]:
    """Who gets the next ``n`` slots (None once nobody waits)."""
    out = []
    for _ in range(n):
        w = q.grant_next(backend)
        out.append(w.user if w else None)
    return out


# -- counting -------------------------------------------------------------------------------


def test_the_weights_are_one_and_two():
    assert (INPUT_WEIGHT, OUTPUT_WEIGHT) == (1.0, 2.0)


@pytest.mark.parametrize("prompt, completion, weight, counter", [
    (10, 0, 1.0, 10.0),
    (0, 10, 1.0, 20.0),      # output counts twice
    (10, 5, 1.0, 20.0),
    (10, 5, 2.0, 10.0),      # weight divides the growth
    (10, 5, 0.5, 40.0),
    (0, 0, 1.0, 0.0),
])
def test_a_request_is_charged_prompt_then_completion(prompt, completion, weight, counter):
    q = queue()
    busy(q)
    service = q.admit("a", weight, prompt)
    assert q.counters["a"] == prompt * INPUT_WEIGHT / weight
    q.finish(service, completion)
    assert q.counters["a"] == counter


def test_finish_twice_charges_once():
    q = queue()
    busy(q)
    service = q.admit("a", 1.0, 1)
    q.finish(service, 10)
    q.finish(service, 10)
    q.finish(service, 30)
    assert q.counters["a"] == 21.0


def test_live_progress_is_charged_by_the_delta_since_the_last_sync():
    """When a slot frees and someone waits, running streams are charged what they sent
    since the last look (with nobody waiting there is no choice to make, and no sync)."""
    q = queue()
    busy(q)
    service = q.admit("a", 1.0, 0)
    streamed = [0]
    service.progress = lambda: streamed[0]
    q.push(waiter("w", backends=("elsewhere",)))  # someone waits, but not for "b"
    seen = []
    for tokens in (3, 3, 10, 12):
        streamed[0] = tokens
        assert q.grant_next("b") is None  # only the sync happens
        seen.append(q.counters["a"])
    assert seen == [6.0, 6.0, 20.0, 24.0]
    q.finish(service, 15)  # the rest: 3 more tokens
    assert q.counters["a"] == 30.0
    assert service.charged_output == 15


def test_finish_below_what_progress_counted_refunds_nothing():
    q = queue()
    busy(q)
    service = q.admit("a", 2.0, 0)
    service.progress = lambda: 8
    q.push(waiter("w", backends=("elsewhere",)))
    q.grant_next("b")  # a sync: someone waits
    q.finish(service, 5)
    assert q.counters["a"] == 8.0  # 8 tokens * 2 / weight 2


def test_progress_is_synced_before_choosing():
    """The user whose running request streamed more is served later."""
    q = queue()
    a, b = q.admit("a", 1.0, 0), q.admit("b", 1.0, 0)
    a.progress, b.progress = (lambda: 50), (lambda: 10)
    q.push(waiter("a", arrived=1.0))
    q.push(waiter("b", arrived=2.0))
    assert grants(q, 2) == ["b", "a"]


# -- who goes next ----------------------------------------------------------------------------


@pytest.mark.parametrize("counters, expected", [
    ({"a": 10, "b": 5, "c": 7}, ["b", "c", "a"]),
    ({"a": 0, "b": 5, "c": 7}, ["a", "b", "c"]),
    ({"a": 9, "b": 9, "c": 1}, ["c", "a", "b"]),  # a and b tie: a arrived first
])
def test_the_lowest_counter_goes_first(counters, expected):
    q = queue()
    busy(q)
    for user, prompt in counters.items():
        q.push(waiter(user, arrived=float(ord(user))))
        q.counters[user] = float(prompt)
    assert grants(q, 4) == [*expected, None]


def test_ties_go_to_the_earliest_arrival_then_the_first_pushed():
    q = queue()
    busy(q)
    q.push(waiter("b", arrived=5.0))
    q.push(waiter("c", arrived=3.0))
    q.push(waiter("a", arrived=3.0))
    assert grants(q, 3) == ["c", "a", "b"]


def test_one_user_is_served_first_come_first_served():
    q = queue()
    busy(q)
    mine = [waiter("a", arrived=float(i), prompt=i) for i in range(4)]
    for w in mine:
        q.push(w)
    granted = [q.grant_next("b") for _ in mine]
    assert granted == mine
    assert [w.granted for w in mine] == ["b"] * 4


def test_a_granted_waiter_is_off_the_queue_and_not_yet_charged():
    q = queue()
    busy(q)
    w = waiter("a", prompt=100)
    q.push(w)
    assert q.grant_next("gpu") is w
    assert (w.granted, q.waiting(), q.waiting_for("a")) == ("gpu", 0, 0)
    assert q.counters["a"] == 0.0
    assert q.active("a")


@pytest.mark.parametrize("pushed, backend, expected", [
    # (user, backends it may use) in arrival order; the counters are equal
    ([("a", ("x",)), ("b", ("y",))], "y", "b"),          # a cannot use y: skipped
    ([("a", ("x",)), ("a", ("y",))], "y", "a#1"),        # a's first cannot: its second can
    ([("a", ("x",)), ("b", ("x", "y"))], "x", "a#0"),
    ([("a", ("x",)), ("b", ("x",))], "y", None),         # nobody may use y
])
def test_a_waiter_that_may_not_use_the_backend_is_passed_over(pushed, backend, expected):
    q = queue()
    busy(q)
    made = []
    for i, (user, backends) in enumerate(pushed):
        made.append(waiter(user, arrived=float(i), backends=backends))
        q.push(made[-1])
    got = q.grant_next(backend)
    if expected is None:
        assert got is None
        assert q.waiting() == len(pushed)
    else:
        user, _, index = expected.partition("#")
        assert got is (made[int(index)] if index else next(w for w in made if w.user == user))
        assert q.waiting() == len(pushed) - 1


def test_the_lower_counter_wins_even_when_it_arrived_later():
    q = queue()
    busy(q)
    q.push(waiter("a", arrived=1.0))
    q.push(waiter("b", arrived=2.0))
    q.counters["a"] = 3.0
    assert grants(q, 1) == ["b"]


def test_fifo_mode_ignores_the_counters():
    q = queue(fair=False)
    busy(q)
    q.push(waiter("a", arrived=1.0))
    q.push(waiter("b", arrived=2.0))
    q.push(waiter("a", arrived=3.0))
    q.counters["a"] = 1000.0
    assert grants(q, 4) == ["a", "b", "a", None]


def test_fifo_mode_passes_over_waiters_that_may_not_use_the_backend():
    q = queue(fair=False)
    busy(q)
    q.push(waiter("a", arrived=1.0, backends=("x",)))
    q.push(waiter("b", arrived=2.0))
    assert grants(q, 2, backend="y") == ["b", None]


# -- idle time earns no credit --------------------------------------------------------------


@pytest.mark.parametrize("own, others, counter", [
    (10, [100, 30], 30.0),   # lifted to the lowest other
    (50, [100, 30], 50.0),   # already above it: kept
    (0, [100], 100.0),
    (70, [], 0.0),           # nobody else active: the idle gateway forgot everything
])
def test_a_user_returning_from_idle_is_lifted_to_the_lowest_active_counter(own, others, counter):
    q = queue()
    z = busy(q)
    served(q, "a", prompt=own)
    for i, prompt in enumerate(others):
        q.admit(f"o{i}", 1.0, prompt)
    q.finish(z, 0)
    q.admit("a", 1.0, 0)
    assert q.counters["a"] == counter


def test_arriving_in_the_queue_lifts_too():
    q = queue()
    q.admit("a", 1.0, 40)
    q.push(waiter("b"))
    assert q.counters["b"] == 40.0


def test_a_user_already_active_is_not_lifted():
    q = queue()
    q.admit("a", 1.0, 40)
    q.admit("b", 1.0, 5)  # lifted: 40 + 5
    q.admit("a", 1.0, 100)  # a: 140
    q.push(waiter("b"))  # b is running already: no lift to a's 140
    assert q.counters == {"a": 140.0, "b": 45.0}


def test_a_granted_user_is_not_lifted_when_admitted():
    """Between grant_next and admit the user was waiting, not idle: its credit stays."""
    q = queue()
    a = q.admit("a", 1.0, 0)
    b = waiter("b", prompt=5)
    q.push(b)  # lifted to a's 0
    a.progress = lambda: 50  # a streams 100 worth meanwhile
    assert q.grant_next("gpu") is b
    q.admit("b", 1.0, 5)
    assert q.counters == {"a": 100.0, "b": 5.0}


def test_admit_names_which_grant_it_is():
    q = queue()
    busy(q)
    first, second = waiter("a"), waiter("a")
    q.push(first)
    q.push(second)
    grants(q, 2)
    service = q.admit("a", 1.0, 0, waiter=second)
    q.abandon(first)
    assert q.active("a")
    q.finish(service, 0)  # had admit taken first's grant, second's would linger
    assert not q.active("a")


def test_an_abandoned_grant_makes_its_user_idle():
    q = queue()
    q.admit("a", 1.0, 30)
    w = waiter("b")
    q.push(w)
    q.grant_next("gpu")
    q.abandon(w)
    q.abandon(w)  # twice: a no-op
    assert not q.active("b")
    q.counters["a"] = 90.0
    q.admit("b", 1.0, 0)  # idle again: lifted anew
    assert q.counters["b"] == 90.0


def test_abandoning_a_queued_waiter_does_nothing():
    q = queue()
    w = waiter("a")
    q.push(w)
    q.abandon(w)
    assert q.waiting_for("a") == 1


def test_an_idle_gateway_forgets_every_counter():
    q = queue()
    served(q, "a", prompt=10, completion=10)
    assert q.counters == {}


def test_inactive_counters_a_return_would_lift_anyway_are_swept():
    q = queue()
    q.admit("heavy", 1.0, 1000)
    for i in range(200):
        served(q, f"u{i}", prompt=1)  # each lifted to 1000, then 1001 > 1000: kept
    assert len(q.counters) == 201
    q.admit("heavy", 1.0, 4000)  # now 1001 is below every active counter
    for i in range(200, 400):
        served(q, f"u{i}")  # lifted to 5000 and no more: forgettable at once
    assert len(q.counters) <= 65
    assert q.counters["heavy"] == 5000.0


def test_an_inactive_user_above_the_floor_keeps_its_debt_through_a_sweep():
    q = queue()
    busy(q)
    served(q, "debtor", prompt=500)
    for i in range(300):
        served(q, f"u{i}")  # counters at 0: forgettable
    assert len(q.counters) <= 65
    assert q.counters["debtor"] == 500.0


# -- bounds and leaving ----------------------------------------------------------------------


@pytest.mark.parametrize("max_queue, per_user, queued, user, error", [
    (4, 2, ["a", "a"], "a", UserQueueFull),
    (4, 2, ["a", "a"], "b", None),
    (2, 4, ["a", "b"], "c", QueueFull),
    (2, 2, ["a", "a"], "a", UserQueueFull),     # both apply: the user's own bound first
    (2, 1, ["a", "b"], "b", UserQueueFull),
    (0, 1, [], "a", QueueFull),
    (1, 0, [], "a", UserQueueFull),
])
def test_push_refuses_beyond_the_bounds(max_queue, per_user, queued, user, error):
    q = queue(max_queue=max_queue, per_user=per_user)
    busy(q)
    for u in queued:
        q.push(waiter(u))
    if error is None:
        q.push(waiter(user))
        assert q.waiting() == len(queued) + 1
    else:
        with pytest.raises(error):
            q.push(waiter(user))
        assert q.waiting() == len(queued)
        assert not q.active(user) or user in queued


def test_remove_frees_a_place_and_can_make_the_user_idle():
    q = queue(max_queue=2, per_user=2)
    busy(q)
    first, second = waiter("a", arrived=1.0), waiter("a", arrived=2.0)
    q.push(first)
    q.push(second)
    q.remove(first)
    assert (q.waiting(), q.waiting_for("a"), q.active("a")) == (1, 1, True)
    q.push(waiter("b"))
    q.remove(second)
    assert not q.active("a")
    assert grants(q, 2) == ["b", None]


def test_remove_of_a_granted_or_removed_waiter_is_a_no_op():
    q = queue()
    busy(q)
    granted, gone, other = waiter("a", arrived=1.0), waiter("b", arrived=2.0), waiter("c", arrived=3.0)
    for w in (granted, gone, other):
        q.push(w)
    q.grant_next("x")
    q.remove(gone)
    before = (q.waiting(), dict(q.counters), q.active("a"))
    q.remove(granted)
    q.remove(gone)
    q.remove(waiter("never"))
    assert (q.waiting(), dict(q.counters), q.active("a")) == before
    assert grants(q, 2) == ["c", None]


@pytest.mark.parametrize("weight, prompt", [(0.0, 1), (-1.0, 1), (1.0, -1)])
def test_bad_weights_and_token_counts_are_refused(weight, prompt):
    q = queue()
    with pytest.raises(ValueError):
        q.admit("a", weight, prompt)
    with pytest.raises(ValueError):
        q.push(waiter("a", weight=weight, prompt=prompt))
    assert (q.waiting(), q.active("a")) == (0, False)


def test_a_waiter_is_queued_once():
    q = queue()
    w = waiter("a")
    q.push(w)
    with pytest.raises(ValueError):
        q.push(w)
    assert q.waiting() == 1


# -- the scenario ---------------------------------------------------------------------


def simulate(*, fair: bool, slots: int = 4, b_requests: int = 6) -> list[int]:
    """User a keeps 16 requests queued; b sends one at a time, a while after the last ended.
    Every request: 10 prompt tokens, then 40 completion tokens at one a second.
    Returns, per b request, how many grants went to others while it waited."""
    prompt, completion, think = 10, 40, 7.0
    q = queue(fair=fair)
    clock = [0.0]
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()

    def start(user: str, w: Waiter | None = None) -> None:
        service = q.admit(user, 1.0, prompt, waiter=w)
        began = clock[0]
        service.progress = lambda: min(completion, int(clock[0] - began))
        heapq.heappush(events, (began + completion, next(seq), "end", service))

    def push(user: str) -> Waiter:
        w = waiter(user, arrived=clock[0], prompt=prompt)
        q.push(w)
        return w

    for i in range(slots):  # a fills the slots, a second apart, then its queue
        clock[0] = float(i)
        start("a")
    for _ in range(16):
        push("a")
    heapq.heappush(events, (slots + 0.5, next(seq), "b", None))
    passed_over: list[int] = []
    b_waiter: Waiter | None = None
    while len(passed_over) < b_requests or b_waiter is not None:
        clock[0], _, kind, payload = heapq.heappop(events)
        if kind == "b":
            b_waiter = push("b")
            passed_over.append(0)
            continue
        assert isinstance(payload, Service)
        q.finish(payload, completion)
        if payload.user == "b":
            heapq.heappush(events, (clock[0] + think, next(seq), "b", None))
        granted = q.grant_next("gpu")
        assert granted is not None
        start(granted.user, granted)
        while q.waiting_for("a") < 16:
            push("a")
        if granted is b_waiter:
            b_waiter = None
        elif b_waiter is not None:
            passed_over[-1] += 1
    return passed_over


def test_a_user_sending_one_at_a_time_gets_the_next_slot_each_time_it_waits():
    assert simulate(fair=True) == [0] * 6


def test_first_come_first_served_makes_that_user_wait_behind_the_queue():
    assert simulate(fair=False) == [16] * 6


def test_the_scenario_holds_with_a_single_slot():
    assert simulate(fair=True, slots=1) == [0] * 6
