"""backends/router.py: which backend a request gets and when; slots held and given back,
the fair queue's order, timeouts, cancellation, and the errors when nothing can serve.

Real ``Backend`` objects whose catalogue and health are set directly (no connection is
made: the pools are never asked), trio's autojump clock for the waiting."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from default_settings import pool_settings
from ollama_proxy.api.models import canonical_model
from ollama_proxy.backends.registry import Backend, BackendSet, BackendSpec
from ollama_proxy.backends.router import Lease, Router
from ollama_proxy.backends.settings import RoutingSettings
from ollama_proxy.errors import (
    ModelNotServed,
    NoBackendAvailable,
    Overloaded,
    ProxyError,
    TooManyQueued,
)
from ollama_proxy.http.client import UpstreamPool


def backend(name: str = "b", *, kind: str = "ollama", models: tuple[str, ...] | None = ("m",),
            loaded: tuple[str, ...] = (), slots: int = 1, priority: int = 0,
            globs: tuple[str, ...] | None = None, up: bool | None = True) -> Backend:
    """A backend that lists ``models`` (None: its list never learned), has ``loaded`` loaded."""
    spec = BackendSpec(name, kind=kind, url="http://127.0.0.1:1", base_path="", api_key=None,
                       priority=priority, slots=slots, globs=globs)
    b = Backend(spec, UpstreamPool(pool_settings(1)))
    if models is not None:
        learn(b, *models)
    b.catalogue.loaded = frozenset(canonical_model(m) for m in loaded)
    b.health.up = up
    return b


def learn(b: Backend, *models: str) -> None:
    if b.native:
        body = {"models": [{"name": m, "model": m} for m in models]}
        b.catalogue.learn_tags(json.dumps(body).encode(), 0.0)
    else:
        b.catalogue.learn_openai(json.dumps({"data": [{"id": m} for m in models]}).encode(), 0.0)


def router(*backends: Backend, **routing: Any) -> Router:
    return Router(BackendSet(list(backends), RoutingSettings(**routing)))


@pytest.fixture
def refreshes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``Backend.refresh`` counted by backend name, never fetching anything."""
    seen: list[str] = []

    async def refresh(self: Backend) -> None:
        seen.append(self.name)

    monkeypatch.setattr(Backend, "refresh", refresh)
    return seen


class Pending:
    """A lease asked for in a task of its own: its lease, its error, or cancelled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lease: Lease | None = None
        self.error: ProxyError | None = None
        self.cancelled = False
        self.waited: list[float] = []  # what on_waited heard
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    def __repr__(self) -> str:
        return f"Pending({self.name})"


async def ask(nursery: trio.Nursery, r: Router, name: str = "p", *, user: str = "a",
              model: str | None = "m", native: bool = True, slotted: bool = True,
              **kw: Any) -> Pending:
    """Ask for a lease in a new task; back when every task is blocked (it waits or has one)."""
    p = Pending(name)

    async def run() -> None:
        with p.scope:
            try:
                p.lease = await r.lease(model=model, native=native, slotted=slotted, user=user,
                                        on_waited=p.waited.append, **kw)
            except ProxyError as err:
                p.error = err
        p.cancelled = p.scope.cancelled_caught
        p.done.set()

    nursery.start_soon(run)
    await wait_all_tasks_blocked()
    return p


async def lease(r: Router, *, user: str = "a", model: str | None = "m", native: bool = True,
                slotted: bool = True, **kw: Any) -> Lease:
    return await r.lease(model=model, native=native, slotted=slotted, user=user, **kw)


def waiting(r: Router) -> int:
    """Requests in the fair queue, checked against the router's own list of them."""
    assert len(r._wakers) == r.queue.waiting()
    return r.queue.waiting()


# -- a free slot --------------------------------------------------------------------------


async def test_a_free_slot_is_leased_at_once():
    """The slot counts while held; release gives it back, and a second release is a no-op."""
    b = backend(slots=2)
    r = router(b)
    first = await lease(r)
    second = await lease(r, user="b")
    assert (first.backend, second.backend) == (b, b)
    assert (b.in_flight, b.requests) == (2, 2)
    first.release()
    assert (b.in_flight, b.requests) == (1, 1)
    first.release()
    assert (b.in_flight, b.requests) == (1, 1)
    second.release(completion_tokens=10)
    assert (b.in_flight, b.requests) == (0, 0)
    assert not r.queue.active("a") and not r.queue.active("b")


async def test_a_bad_weight_takes_no_slot():
    """The fair queue refuses a weight <= 0 before the slot is counted: nothing leaks."""
    b = backend()
    r = router(b)
    with pytest.raises(ValueError, match="weight"):
        await lease(r, weight=0.0)
    assert (b.in_flight, b.requests) == (0, 0)
    (await lease(r)).release()


# -- waiting for a slot -------------------------------------------------------------------


async def test_a_full_backend_makes_the_request_wait_for_the_next_slot(nursery, autojump_clock):
    b = backend(slots=1)
    r = router(b)
    holder = await lease(r, user="h")
    p = await ask(nursery, r)
    assert p.lease is None and p.error is None
    assert (waiting(r), r.queued_for(b), b.in_flight) == (1, 1, 1)
    await trio.sleep(3)
    assert p.lease is None  # nothing freed: still waiting
    holder.release()
    await wait_all_tasks_blocked()
    assert p.lease is not None and p.lease.backend is b
    assert p.waited == [pytest.approx(3)]  # it waited from its arrival to the release
    assert (waiting(r), r.queued_for(b), b.in_flight, b.requests) == (0, 0, 1, 1)
    p.lease.release()
    assert (b.in_flight, b.requests) == (0, 0)


async def grant_order(r: Router, holder: Lease, pendings: list[Pending],
                      completion_tokens: int = 0) -> list[str]:
    """Release the holder, then each request as it is granted: the names in grant order."""
    order: list[str] = []
    for _ in pendings:  # bounded: one grant per release
        holder.release(completion_tokens)
        await wait_all_tasks_blocked()
        granted = [p for p in pendings if p.lease is not None and p.name not in order]
        assert len(granted) == 1, granted
        order.append(granted[0].name)
        assert granted[0].lease is not None
        holder = granted[0].lease
    holder.release(completion_tokens)
    return order


async def test_a_user_with_one_request_is_served_before_a_flood(nursery, autojump_clock):
    """A has three waiting and has used its slot; B's one request, arrived last, gets the
    slot A frees. Within A: first come first served."""
    b = backend(slots=1)
    r = router(b)
    holder = await lease(r, user="A", prompt_tokens=100)
    flood = [await ask(nursery, r, f"A{i}", user="A", prompt_tokens=100) for i in range(3)]
    one = await ask(nursery, r, "B", user="B", prompt_tokens=100)
    assert r.queue.waiting_for("A") == 3
    assert await grant_order(r, holder, [*flood, one], completion_tokens=50) == [
        "B", "A0", "A1", "A2"]


async def test_the_prompt_of_a_request_served_at_once_counts(nursery, autojump_clock):
    """A's running request had a long prompt, B's a short one: B's waiter goes first
    although A's arrived first."""
    b = backend(slots=2)
    r = router(b)
    await lease(r, user="B", prompt_tokens=10)
    a_holder = await lease(r, user="A", prompt_tokens=1000)
    a0 = await ask(nursery, r, "A0", user="A")
    b0 = await ask(nursery, r, "B0", user="B")
    a_holder.release()
    await wait_all_tasks_blocked()
    assert (a0.lease, b0.lease is not None) == (None, True)


async def test_fifo_over_users_when_fair_queue_is_off(nursery, autojump_clock):
    b = backend(slots=1)
    r = router(b, fair_queue=False)
    holder = await lease(r, user="A", prompt_tokens=100)
    pendings = [await ask(nursery, r, f"A{i}", user="A", prompt_tokens=100) for i in range(3)]
    pendings.append(await ask(nursery, r, "B", user="B", prompt_tokens=100))
    assert await grant_order(r, holder, pendings, completion_tokens=50) == [
        "A0", "A1", "A2", "B"]


@pytest.mark.parametrize(("weight_b", "order"), [
    (1.0, ["A0", "B0", "A1", "B1", "A2", "B2"]),
    # B's prompts count a third: B gets three slots to A's one
    (3.0, ["A0", "B0", "B1", "B2", "A1", "A2"]),
])
async def test_a_weight_divides_the_service_counted(nursery, autojump_clock, weight_b, order):
    b = backend(slots=1)
    r = router(b)
    holder = await lease(r, user="h", prompt_tokens=30)
    pendings = [await ask(nursery, r, f"A{i}", user="A", prompt_tokens=30) for i in range(3)]
    pendings += [await ask(nursery, r, f"B{i}", user="B", weight=weight_b, prompt_tokens=30)
                 for i in range(3)]
    assert await grant_order(r, holder, pendings) == order


async def test_waiting_longer_than_queue_timeout_is_overloaded(nursery, autojump_clock):
    """503 with Retry-After, and the waiter is gone: a slot freed later goes to nobody."""
    b = backend(slots=1)
    r = router(b, queue_timeout_s=10)
    holder = await lease(r, user="h")
    p = await ask(nursery, r)
    await p.done.wait()
    assert isinstance(p.error, Overloaded)
    assert (p.error.status, p.error.code, p.error.retry_after_s) == (503, "overloaded", 3)
    assert p.error.reason == "queue_timeout"
    assert p.error.headers() == [(b"retry-after", b"3")]
    assert "queue_timeout_s (10 s)" in p.error.message
    assert (waiting(r), r.queued_for(b), r.queue.active("a")) == (0, 0, False)
    holder.release()
    assert (b.in_flight, b.requests) == (0, 0)


async def test_a_full_queue_is_overloaded_at_once(nursery, autojump_clock):
    b = backend(slots=1)
    r = router(b, max_queue=2, queue_timeout_s=100)
    holder = await lease(r, user="h")
    queued = [await ask(nursery, r, str(i), user=str(i)) for i in range(2)]
    with pytest.raises(Overloaded) as refused:
        await lease(r, user="late")
    assert (refused.value.status, refused.value.retry_after_s) == (503, 25)
    assert refused.value.reason == "queue_full"
    assert "2 requests are already waiting" in refused.value.message
    assert waiting(r) == 2 and not r.queue.active("late")
    assert await grant_order(r, holder, queued) == ["0", "1"]


async def test_a_user_with_too_many_waiting_is_told_429(nursery, autojump_clock):
    b = backend(slots=1)
    r = router(b, max_queued_per_user=2)
    holder = await lease(r, user="h")
    queued = [await ask(nursery, r, f"a{i}", user="a") for i in range(2)]
    with pytest.raises(TooManyQueued) as refused:
        await lease(r, user="a")
    assert (refused.value.status, refused.value.retry_after_s) == (429, 1)
    queued.append(await ask(nursery, r, "b", user="b"))  # another user still may wait
    assert waiting(r) == 3
    assert sorted(await grant_order(r, holder, queued)) == ["a0", "a1", "b"]


async def test_a_client_that_leaves_while_queued_leaves_the_queue_at_once(nursery,
                                                                         autojump_clock):
    b = backend(slots=1)
    r = router(b)
    holder = await lease(r, user="h")
    p = await ask(nursery, r, user="a")
    q = await ask(nursery, r, user="b")
    p.scope.cancel()
    await wait_all_tasks_blocked()
    assert p.cancelled and p.lease is None
    assert (waiting(r), r.queued_for(b), r.queue.active("a")) == (1, 1, False)
    holder.release()
    await wait_all_tasks_blocked()
    assert q.lease is not None and (b.in_flight, b.requests) == (1, 1)
    q.lease.release()
    assert (b.in_flight, b.requests) == (0, 0)


async def test_a_slot_granted_to_a_waiter_cancelled_in_the_same_tick_goes_on(nursery,
                                                                            autojump_clock):
    """The client left (its cancel delivered) and then the slot was granted to it, before
    its task ran again: the slot goes to the next waiter, counted once."""
    b = backend(slots=1)
    r = router(b)
    holder = await lease(r, user="h")
    p = await ask(nursery, r, "p", user="a")
    q = await ask(nursery, r, "q", user="b")
    p.scope.cancel()  # delivered at once: p's task is scheduled to see Cancelled
    holder.release()  # p is still queued: the fair queue grants it the slot
    assert p.lease is None and b.in_flight == 1  # reserved for p
    await wait_all_tasks_blocked()
    assert p.cancelled and p.lease is None
    assert q.lease is not None and q.lease.backend is b
    assert (b.in_flight, b.requests, waiting(r)) == (1, 1, 0)
    assert not r.queue.active("a")
    q.lease.release()
    assert (b.in_flight, b.requests) == (0, 0)


async def test_a_waiter_granted_then_cancelled_in_the_same_tick_has_its_lease(nursery,
                                                                              autojump_clock):
    """The other order: granted first, so the wait is over and the lease is the caller's
    (the relay releases it); nothing is counted twice."""
    b = backend(slots=1)
    r = router(b)
    holder = await lease(r, user="h")
    p = await ask(nursery, r, "p", user="a")
    q = await ask(nursery, r, "q", user="b")
    holder.release()
    p.scope.cancel()
    await wait_all_tasks_blocked()
    assert p.lease is not None and q.lease is None
    assert (b.in_flight, b.requests, waiting(r)) == (1, 1, 1)
    p.lease.release()
    await wait_all_tasks_blocked()
    assert q.lease is not None and (b.in_flight, b.requests) == (1, 1)


# -- which backend ------------------------------------------------------------------------


async def test_a_waiter_takes_a_slot_freed_at_any_backend_it_may_use(nursery, autojump_clock):
    one, two = backend("one"), backend("two")
    r = router(one, two)
    holders = [await lease(r, user="h"), await lease(r, user="h")]
    assert {h.backend for h in holders} == {one, two}
    p = await ask(nursery, r)
    assert (r.queued_for(one), r.queued_for(two)) == (1, 1)
    next(h for h in holders if h.backend is two).release()
    await wait_all_tasks_blocked()
    assert p.lease is not None and p.lease.backend is two
    assert (one.in_flight, two.in_flight) == (1, 1)


async def test_a_waiter_is_given_only_a_backend_that_serves_its_model(nursery, autojump_clock):
    only_n = backend("only_n", models=("n",))
    both = backend("both", models=("m", "n"))
    r = router(only_n, both)
    n_holder, m_holder = await lease(r, model="n"), await lease(r)
    assert (n_holder.backend, m_holder.backend) == (only_n, both)
    p = await ask(nursery, r, model="m")
    assert (r.queued_for(only_n), r.queued_for(both)) == (0, 1)
    n_holder.release()
    await wait_all_tasks_blocked()
    assert p.lease is None and only_n.in_flight == 0
    m_holder.release()
    await wait_all_tasks_blocked()
    assert p.lease is not None and p.lease.backend is both


async def test_queued_for_counts_the_waiters_that_may_use_each_backend(nursery, autojump_clock):
    mn = backend("mn", models=("m", "n"))
    n = backend("n", models=("n",))
    r = router(mn, n)
    await lease(r, model="m")
    await lease(r, model="n")
    for i in range(2):
        await ask(nursery, r, f"m{i}", model="m")
    await ask(nursery, r, "n", model="n")
    assert (r.queued_for(mn), r.queued_for(n)) == (3, 1)


@pytest.mark.parametrize("loaded_at", ["first", "second"])
async def test_a_free_backend_with_the_model_loaded_is_chosen(loaded_at):
    first = backend("first", loaded=("m",) if loaded_at == "first" else ())
    second = backend("second", loaded=("m",) if loaded_at == "second" else ())
    r = router(first, second)
    assert (await lease(r)).backend.name == loaded_at
    assert (await lease(r)).backend.name != loaded_at  # that one is full now


async def test_the_least_busy_free_backend_when_none_is_warm():
    first, second = backend("first", slots=3), backend("second", slots=3)
    r = router(first, second)
    got = [(await lease(r)).backend.name for _ in range(4)]
    assert got == ["first", "second", "first", "second"]


async def test_a_fallback_priority_only_when_the_preferred_are_full_or_down(autojump_clock):
    fallback = backend("fallback", priority=1, loaded=("m",))  # warm, listed first
    preferred = backend("preferred", priority=0)
    r = router(fallback, preferred)
    first = await lease(r)
    assert first.backend is preferred  # cold but preferred
    second = await lease(r)
    assert second.backend is fallback  # the preferred is full
    first.release()
    second.release()
    preferred.health.up = False
    assert (await lease(r)).backend is fallback  # the preferred is down


@pytest.mark.parametrize("state", ["down", "ejected", "retired"])
async def test_a_backend_down_ejected_or_retired_takes_nothing(state, nursery, autojump_clock):
    bad, good = backend("bad", slots=0, loaded=("m",)), backend("good", slots=1)
    backends = BackendSet([bad, good])
    r = Router(backends)
    if state == "down":
        bad.health.up = False
    elif state == "ejected":
        bad.health.ejected_until = trio.current_time() + 30
    else:
        backends.replace([good])
    assert (await lease(r)).backend is good
    p = await ask(nursery, r)  # good is full: it waits rather than use the bad one
    assert p.lease is None and (r.queued_for(bad), r.queued_for(good)) == (0, 1)
    assert (await lease(r, slotted=False)).backend is good
    r.wake_all()
    assert p.lease is None and (bad.in_flight, bad.requests) == (0, 0)


async def test_a_backend_that_comes_up_takes_the_waiters(nursery, autojump_clock):
    """``run`` hands free slots on when the set says it changed (a health check, a reload)."""
    full, down = backend("full"), backend("down", slots=2, up=False)
    backends = BackendSet([full, down])
    r = Router(backends)
    await lease(r)
    pendings = [await ask(nursery, r, str(i)) for i in range(3)]
    nursery.start_soon(r.run)
    await wait_all_tasks_blocked()
    assert all(p.lease is None for p in pendings)
    down.health.up = True
    backends.changed.unpark_all()
    await wait_all_tasks_blocked()
    assert [p.lease.backend.name if p.lease else None for p in pendings] == [
        "down", "down", None]
    assert (down.in_flight, r.queued_for(full), waiting(r)) == (2, 1, 1)


async def test_a_backend_added_by_a_reload_takes_the_waiters(nursery, autojump_clock):
    old = backend("old")
    backends = BackendSet([old])
    r = Router(backends)
    await lease(r)
    p = await ask(nursery, r)
    new = backend("new")
    backends.replace([old, new])
    r.wake_all()
    await wait_all_tasks_blocked()
    assert p.lease is not None and p.lease.backend is new


@pytest.mark.parametrize("better", ["warm", "preferred"])
async def test_when_several_free_at_once_a_waiter_gets_the_best(nursery, autojump_clock,
                                                                 better):
    """Two backends come up together: the waiter takes the one a newcomer would (the
    model loaded; a preferred priority before a warm fallback), whatever the config order."""
    full = backend("full")
    if better == "warm":
        worse, best = backend("cold", up=False), backend("warm", up=False, loaded=("m",))
    else:
        worse = backend("fallback", priority=1, up=False, loaded=("m",))
        best = backend("preferred", up=False)
    r = router(full, worse, best)
    await lease(r)
    p = await ask(nursery, r)
    worse.health.up = best.health.up = True
    r.wake_all()
    await wait_all_tasks_blocked()
    assert p.lease is not None and p.lease.backend is best
    assert (worse.in_flight, best.in_flight) == (0, 1)


async def test_a_slot_freed_at_a_fallback_goes_to_a_free_preferred_one_instead(nursery,
                                                                              autojump_clock):
    """A slot frees at the fallback while a preferred backend is free too (it came up and
    no change was handed on yet): the waiter is given the preferred one."""
    fallback = backend("fallback", priority=1)
    preferred = backend("preferred", up=False)
    r = router(fallback, preferred)
    holder = await lease(r)
    assert holder.backend is fallback
    p = await ask(nursery, r)
    preferred.health.up = True
    holder.release()
    await wait_all_tasks_blocked()
    assert p.lease is not None and p.lease.backend is preferred
    assert (fallback.in_flight, preferred.in_flight) == (0, 1)


# -- without a slot -----------------------------------------------------------------------


async def test_an_unslotted_lease_never_waits_and_takes_the_least_busy():
    busy, idle = backend("busy", slots=1), backend("idle", slots=1, loaded=("m",))
    r = router(busy, idle)
    held = [await lease(r, slotted=False) for _ in range(3)]
    assert [h.backend.name for h in held] == ["busy", "idle", "busy"]
    slotted = [await lease(r), await lease(r)]
    assert (busy.in_flight, idle.in_flight) == (1, 1)  # unslotted ones hold no slot
    other = await lease(r, slotted=False)  # every slot taken: it does not wait
    assert other.backend is idle and (idle.requests, busy.requests) == (3, 3)
    for h in [*held, *slotted, other]:
        h.release()
    assert (busy.requests, idle.requests, busy.in_flight, idle.in_flight) == (0, 0, 0, 0)


async def test_an_unslotted_lease_keeps_to_the_preferred_priority():
    fallback = backend("fallback", priority=1)
    preferred = backend("preferred")
    r = router(fallback, preferred)
    assert [(await lease(r, slotted=False)).backend.name for _ in range(2)] == [
        "preferred", "preferred"]
    preferred.health.up = False
    assert (await lease(r, slotted=False)).backend is fallback


async def test_pinned_takes_no_slot():
    b = backend(slots=1)
    r = router(b)
    pinned = r.pinned(b)
    assert (b.in_flight, b.requests) == (0, 1)
    pinned.release()
    assert b.requests == 0


# -- nothing to serve it ------------------------------------------------------------------


async def test_a_model_no_backend_lists_is_not_found(refreshes):
    r = router(backend("one"), backend("two"))
    with pytest.raises(ModelNotServed) as err:
        await lease(r, model="x")
    assert (err.value.status, err.value.message) == (404, "model 'x' not found")
    assert sorted(refreshes) == ["one", "two"]  # the lists were asked again first


async def test_an_openai_backend_whose_list_is_unknown_does_not_claim_every_model(refreshes):
    """An openai backend down since the start (its list never read) may serve anything on
    /v1, but a native request for a model no ollama backend has is plain "not found",
    not "served only by OpenAI-compatible backends"."""
    r = router(backend("ol1"), backend("ol2"), backend("oa", kind="openai", models=None,
                                                     up=False))
    with pytest.raises(ModelNotServed) as err:
        await lease(r, model="nowhere")
    assert err.value.message == "model 'nowhere' not found"


@pytest.mark.parametrize("ollama_backends", [1, 2])
async def test_a_model_only_openai_backends_serve_is_refused_on_the_native_api(
        refreshes, ollama_backends):
    """Also with one ollama backend: the openai one's list shows the model, so the
    single-backend rule (for a model no list shows) does not send it there."""
    ollamas = [backend(f"ol{i}") for i in range(ollama_backends)]
    r = router(*ollamas, backend("oa", kind="openai", models=("gpt",)))
    with pytest.raises(ModelNotServed) as err:
        await lease(r, model="gpt")
    assert err.value.status == 404
    assert "served only by OpenAI-compatible backends" in err.value.message
    assert sorted(refreshes) == [b.name for b in ollamas]  # a native request: ollama ones
    assert (await lease(r, model="gpt", native=False)).backend.name == "oa"
    assert all(b.requests == 0 for b in ollamas)


async def test_an_ollama_backend_serves_the_v1_api_too():
    ol = backend("ol")
    r = router(ol, backend("oa", kind="openai", models=("gpt",)))
    assert (await lease(r, native=False)).backend is ol


async def test_a_model_whose_backends_are_all_down_is_503(refreshes, autojump_clock):
    down = backend("down", up=False)
    ejected = backend("ejected")
    ejected.health.ejected_until = trio.current_time() + 42.5
    with pytest.raises(NoBackendAvailable) as err:
        await lease(router(ejected))
    assert (err.value.status, err.value.retry_after_s) == (503, 43)  # its ejection's end
    assert "model 'm'" in err.value.message
    with pytest.raises(NoBackendAvailable) as err:
        await lease(router(down))
    assert err.value.retry_after_s == 5  # down: ask after the next health check or so
    assert refreshes == []  # served, only not up: no list to learn


async def test_retry_after_is_the_soonest_a_backend_for_the_model_may_be_back(autojump_clock):
    """One backend of the model is down (a health check may find it up in seconds), the
    other ejected for long; a backend of another model ejected for longer does not count."""
    down = backend("down", up=False)
    ejected = backend("ejected")
    ejected.health.ejected_until = trio.current_time() + 100
    with pytest.raises(NoBackendAvailable) as err:
        await lease(router(down, ejected))
    assert err.value.retry_after_s == 5
    other = backend("other", models=("n",))
    other.health.ejected_until = trio.current_time() + 200
    with pytest.raises(NoBackendAvailable) as err:
        await lease(router(ejected, other))
    assert err.value.retry_after_s == 100


async def test_a_request_without_a_model_goes_to_any_backend_up(refreshes):
    down, up = backend("down", up=False), backend("up", models=())
    r = router(down, up)
    assert (await lease(r, model=None, slotted=False)).backend is up
    up.health.up = False
    with pytest.raises(NoBackendAvailable, match="this request"):
        await lease(r, model=None, slotted=False)
    assert refreshes == []


async def test_a_backend_whose_list_is_unknown_may_serve_anything(refreshes):
    known, unknown = backend("known"), backend("unknown", models=None)
    r = router(known, unknown)
    assert (await lease(r, model="x")).backend is unknown
    assert refreshes == []


async def test_globs_decide_and_are_never_refreshed(refreshes):
    b = backend("g", models=None, globs=("llama*",))
    r = router(b, backend("other", models=("n",)))
    assert (await lease(r, model="llama3.2")).backend is b
    with pytest.raises(ModelNotServed):
        await lease(r, model="qwen")
    assert refreshes == ["other"]


# -- learning a model on a miss -----------------------------------------------------------


async def test_a_miss_refreshes_each_backend_at_most_once_a_second(refreshes, autojump_clock):
    r = router(backend("one"), backend("two"))
    for _ in range(3):
        with pytest.raises(ModelNotServed):
            await lease(r, model="x")
    assert sorted(refreshes) == ["one", "two"]
    await trio.sleep(0.5)
    with pytest.raises(ModelNotServed):
        await lease(r, model="y")
    assert len(refreshes) == 2
    await trio.sleep(0.5)
    with pytest.raises(ModelNotServed):
        await lease(r, model="x")
    assert sorted(refreshes) == ["one", "one", "two", "two"]


async def test_a_model_pulled_a_moment_ago_is_found_by_the_refresh(monkeypatch):
    one, two = backend("one"), backend("two")

    async def refresh(self: Backend) -> None:
        if self is two:
            learn(two, "m", "new")

    monkeypatch.setattr(Backend, "refresh", refresh)
    assert (await lease(router(one, two), model="new:latest")).backend is two


async def test_requests_during_a_miss_refresh_wait_for_it(monkeypatch, nursery, autojump_clock):
    """Two requests for a model pulled a moment ago, the second while the first one's
    refresh is under way: both are served (the second does not get a 404 meanwhile)."""
    one, two = backend("one"), backend("two", slots=2)
    fetches: list[str] = []

    async def get(self: Backend, path: str, timeout_s: float) -> tuple[int, bytes]:
        fetches.append(self.name)
        await trio.sleep(0.5)
        names = ["m", "new"] if self is two else ["m"]
        return 200, json.dumps({"models": [{"name": n} for n in names]}).encode()

    monkeypatch.setattr(Backend, "get", get)
    r = router(one, two)
    first = await ask(nursery, r, "first", model="new")
    await trio.sleep(0.1)
    second = await ask(nursery, r, "second", model="new")
    await first.done.wait()
    await second.done.wait()
    assert (first.error, second.error) == (None, None)
    assert first.lease is not None and second.lease is not None
    assert (first.lease.backend, second.lease.backend) == (two, two)
    assert sorted(fetches) == ["one", "two"]  # one fetch each, shared


# -- one backend for the API ---------------------------------------------------------------


async def test_the_only_backend_answers_for_a_model_it_does_not_list(refreshes):
    b = backend("only")
    assert (await lease(router(b), model="x")).backend is b
    assert refreshes == ["only"]


async def test_the_only_native_backend_answers_beside_an_openai_one(refreshes):
    ol, oa = backend("ol"), backend("oa", kind="openai", models=("gpt",))
    r = router(ol, oa)
    assert (await lease(r, model="x")).backend is ol  # the one ollama backend for /api
    with pytest.raises(ModelNotServed):
        await lease(r, model="x", native=False)  # two for /v1: neither lists it


async def test_the_only_backend_down_is_not_asked(refreshes):
    b = backend("only", up=False)
    with pytest.raises(ProxyError):
        await lease(router(b), model="x")
    assert b.requests == 0


async def test_the_only_backend_full_serves_an_unlisted_model_when_a_slot_frees(
        refreshes, nursery, autojump_clock):
    b = backend("only", slots=1)
    r = router(b, queue_timeout_s=30)
    holder = await lease(r)
    p = await ask(nursery, r, model="x")
    assert r.queued_for(b) == 1
    holder.release()
    await wait_all_tasks_blocked()
    assert p.error is None and p.lease is not None and p.lease.backend is b


async def test_a_backend_down_since_the_start_does_not_stop_the_refresh_on_a_miss(monkeypatch):
    """A backend whose list was never read (down since the start) "may serve anything",
    but that must not keep a request for a model just pulled elsewhere from refreshing
    the lists: the model is found. A name no list shows is a 503 meanwhile: the dead
    one may have it."""
    one, dead = backend("one"), backend("dead", models=None, up=False)
    refreshed: list[str] = []

    async def refresh(self: Backend) -> None:
        refreshed.append(self.name)
        if self is one:
            learn(one, "m", "new")

    monkeypatch.setattr(Backend, "refresh", refresh)
    r = router(one, dead)
    got = await lease(r, model="new")
    assert (got.backend, refreshed) == (one, ["one"])  # the dead one is not asked
    got.release()
    with pytest.raises(NoBackendAvailable):
        await lease(r, model="typo")


async def test_free_slot_hands_the_slot_on_before_the_request_is_over(nursery, autojump_clock):
    """The relay frees the slot when the backend is done (before the ledger's commit and
    the client's last bytes): the waiter gets it then, while the request itself still
    counts (its connection is not back yet) until ``release``."""
    b = backend(slots=1)
    r = router(b)
    holder = await lease(r, user="h")
    p = await ask(nursery, r)
    holder.free_slot(completion_tokens=3)
    await wait_all_tasks_blocked()
    assert p.lease is not None and p.lease.backend is b
    assert (b.in_flight, b.requests) == (1, 2)
    holder.release()
    holder.free_slot()
    assert (b.in_flight, b.requests) == (1, 1)
    p.lease.release()
    assert (b.in_flight, b.requests) == (0, 0)


async def test_a_backend_whose_list_is_not_read_yet_waits_behind_one_known_to_serve(
        nursery, autojump_clock):
    """A backend a reload just added has no list yet: it may serve anything, but not a
    model another backend is known to serve: a request for that one waits for it (a
    guess would be the new backend's 404); a model nobody is known to serve may go there."""
    known, new = backend("known", slots=1), backend("new", models=None, slots=1)
    r = router(known, new)
    holder = await lease(r, model="m")
    assert holder.backend is known
    p = await ask(nursery, r, model="m")
    assert p.lease is None and r.queued_for(new) == 0
    other = await lease(r, model="elsewhere")
    assert other.backend is new
    holder.release()
    await wait_all_tasks_blocked()
    assert p.lease is not None and p.lease.backend is known
