"""Which backend serves a request, and when: the trio shell around ``choice`` (the
pick) and ``fairqueue`` (whose turn it is when every slot is taken).

A request that finds no free slot waits, not pinned to a backend: when a slot
frees at any backend it may use, the fair queue names the waiting user with the
least service, and that user's oldest request that may use it gets the slot.
A slot is given back by ``Lease.release``, which is synchronous, so neither a
cancelled stream nor a client that left can keep one.
"""

from __future__ import annotations

import math
from typing import Callable

import trio

from ..api.models import canonical_model
from ..errors import (
    ModelNotServed,
    NoBackendAvailable,
    NotFound,
    Overloaded,
    QueueTimeout,
    TooManyQueued,
)
from .choice import choose, has_free_slot
from .fairqueue import FairQueue, QueueFull, Service, UserQueueFull, Waiter
from .registry import RETRY_AFTER_DOWN_S, Backend, BackendSet


class Lease:
    """One request's hold on a backend (and on one of its slots, if it took one)."""

    __slots__ = ("backend", "_router", "_service", "_slot_freed", "_released")

    def __init__(self, router: Router, backend: Backend, service: Service | None) -> None:
        self.backend = backend
        self._router = router
        self._service = service
        self._slot_freed = self._released = False
        backend.requests += 1

    def stream_progress(self, completion_tokens: Callable[[], int]) -> None:
        """Charge the user's counter with the tokens as they stream (read when a
        slot frees, never per chunk)."""
        if self._service is not None:
            self._service.progress = completion_tokens

    def free_slot(self, completion_tokens: int = 0) -> None:
        """The backend is done generating: give the slot to the next in line and charge
        the output (once; before the ledger's commit and the client's last bytes)."""
        if self._slot_freed:
            return
        self._slot_freed = True
        if self._service is not None:
            self._router.give_back(self.backend, self._service, completion_tokens)

    def release(self, completion_tokens: int = 0) -> None:
        """The request is over, its connection back: the slot too if not yet; once."""
        if self._released:
            return
        self._released = True
        self.free_slot(completion_tokens)
        backend = self.backend
        backend.requests -= 1
        if backend.requests == 0:
            backend.became_idle()


class Router:
    """Chooses backends, holds slots, and runs the fair queue of one gateway."""

    def __init__(self, backends: BackendSet) -> None:
        self.backends = backends
        routing = backends.routing
        self.queue = FairQueue(max_queue=routing.max_queue,
                               max_queued_per_user=routing.max_queued_per_user,
                               fair=routing.fair_queue)
        # the requests waiting, by their waiter: the event that wakes it, the model it asks for
        self._wakers: dict[Waiter, tuple[trio.Event, str | None]] = {}

    def queued_for(self, backend: Backend) -> int:
        """How many waiting requests could use ``backend``."""
        return sum(1 for waiter in self._wakers if waiter.eligible(backend))

    def eligible(self, model: str | None, native: bool, exclude: frozenset[Backend]
                 ) -> list[Backend]:
        """The backends that may take this request now: the API's kind, serving the
        model, up and not ejected, not retired, not already tried."""
        now = trio.current_time()
        pool = self.backends.of_kind(native) if model is None else \
            self.backends.serving(model, native)
        return [b for b in pool if b not in exclude and not b.retired
                and b.health.available(now)]

    async def lease(self, *, model: str | None, native: bool, slotted: bool, user: str,
                    weight: float = 1.0, prompt_tokens: int = 0,
                    exclude: frozenset[Backend] = frozenset(),
                    on_waited: Callable[[float], None] | None = None) -> Lease:
        """A backend for this request, waiting for a slot if ``slotted`` and all are
        taken; ``on_waited`` hears how long it waited, also when it got no slot (timeout,
        client gone). Raises ``ModelNotServed`` (404), ``NoBackendAvailable`` (503),
        ``Overloaded`` (503: queue full or waited too long), ``TooManyQueued`` (429)."""
        key = canonical_model(model) if model else None
        match = key  # the model the backends must serve (None: any of the API's kind)
        eligible = self.eligible(key, native, exclude)
        if not eligible and key is not None and not exclude and \
                not self.backends.known_to_serve(key, native):
            await self.backends.refresh_for_miss(native)
            eligible = self.eligible(key, native, exclude)
            kinds = self.backends.of_kind(native)
            if not eligible and len(kinds) == 1 and kinds[0].spec.globs is None and \
                    not any(b.serves(key) for b in self.backends.backends) and \
                    not self._too_big(key, native):
                # the only backend for this API answers for itself (its own 404, or a
                # model its list did not show), as it would without the gateway; not
                # past the models its config names
                match = None
                eligible = self.eligible(None, native, exclude)
        if not eligible:
            raise self._none_eligible(model, key, native, exclude)
        if not slotted:  # the least busy of the preferred priority
            return Lease(self, min(eligible, key=lambda b: (b.priority, b.requests)), None)
        backend = choose(eligible, key)
        if backend is not None:
            return self._admit(backend, user, weight, prompt_tokens)
        return await self._wait(key, match, native, exclude, user, weight, prompt_tokens,
                                on_waited)

    def pinned(self, backend: Backend) -> Lease:
        """The backend the request named (``?backend=NAME``), no slot taken."""
        return Lease(self, backend, None)

    def _none_eligible(self, model: str | None, key: str | None, native: bool,
                       exclude: frozenset[Backend]) -> Exception:
        if not self.backends.of_kind(native):  # only openai backends: waiting cures nothing
            return NotFound("no ollama backend is configured: only the OpenAI-compatible "
                            "paths (/v1) are served")
        # a backend whose list was never read (down since the start) may have it: 503
        serving = self.backends.of_kind(native) if key is None else \
            self.backends.serving(key, native)
        if key is None or serving:
            # the soonest one of them may be back: an ejected one when its ejection
            # ends, a down one (or one tried already) after a health check or so
            now = trio.current_time()
            soonest = min((b.health.ejected_until - now
                           if b.health.ejected(now) and b.health.ejected_until is not None
                           else RETRY_AFTER_DOWN_S for b in serving), default=RETRY_AFTER_DOWN_S)
            what = f"model '{model}'" if model else "this request"
            return NoBackendAvailable(f"no backend that serves {what} is up; retry later",
                                      retry_after_s=max(1, min(math.ceil(soonest),
                                                               RETRY_AFTER_DOWN_S * 60)))
        if self._too_big(key, native):
            return ModelNotServed(f"model '{model}' is larger than max_model_gb of every "
                                  "backend that has it")
        # known to serve it (a list never read, of a backend down since the start, says nothing)
        if native and any(b.catalogue.serves(key) for b in self.backends.backends):
            return ModelNotServed(
                f"model '{model}' is served only by OpenAI-compatible backends: use the /v1 "
                "API for it")
        return ModelNotServed(f"model '{model}' not found")  # Ollama's own words

    def _too_big(self, key: str, native: bool) -> bool:
        """A backend lists ``key`` but over its ``max_model_gb`` (asked when none serves it)."""
        return any(b.catalogue.knows_size_over_cap(key) for b in self.backends.of_kind(native))

    def _admit(self, backend: Backend, user: str, weight: float, prompt_tokens: int) -> Lease:
        service = self.queue.admit(user, weight, prompt_tokens)
        backend.in_flight += 1  # after admit, which refuses a bad weight: no slot leaks
        return Lease(self, backend, service)

    async def _wait(self, key: str | None, match: str | None, native: bool,
                    exclude: frozenset[Backend], user: str, weight: float, prompt_tokens: int,
                    on_waited: Callable[[float], None] | None) -> Lease:
        """Queue until ``give_back`` grants a slot, the client leaves or the timeout;
        ``match``: the model its backends must serve (None: any of the API's kind)."""
        routing = self.backends.routing
        arrived = trio.current_time()
        granted = trio.Event()

        def may_use(backend: object) -> bool:  # asked per waiter and backend: no lists
            return (isinstance(backend, Backend) and not backend.retired
                    and backend not in exclude and (backend.native or not native)
                    and backend.health.available(trio.current_time())
                    and (match is None or backend.catalogue.serves(match) or (
                        not backend.list_known
                        and not self.backends.known_to_serve(match, native))))

        waiter = Waiter(user=user, weight=weight, prompt_tokens=prompt_tokens, eligible=may_use,
                        arrived=arrived)
        try:
            self.queue.push(waiter)
        except UserQueueFull:
            raise TooManyQueued(
                f"{user} already has {routing.max_queued_per_user} requests waiting for a "
                "GPU slot; wait for one to finish", retry_after_s=1) from None
        except QueueFull:
            raise Overloaded(f"{routing.max_queue} requests are already waiting for a GPU "
                             "slot; retry later", retry_after_s=_retry_after(routing.queue_timeout_s)
                             ) from None
        self._wakers[waiter] = (granted, key)
        try:
            with trio.move_on_after(routing.queue_timeout_s):
                await granted.wait()
        except BaseException:  # the client left: a slot granted meanwhile goes on
            if isinstance(waiter.granted, Backend):
                self.queue.abandon(waiter)
                waiter.granted.in_flight -= 1
                self.hand_on(waiter.granted)
                if waiter.granted.requests == 0:
                    waiter.granted.became_idle()
            raise
        finally:
            del self._wakers[waiter]
            if on_waited is not None:
                on_waited(trio.current_time() - arrived)
            if waiter.granted is None:
                self.queue.remove(waiter)
        backend = waiter.granted
        if backend is None:
            raise QueueTimeout(f"no GPU slot freed within queue_timeout_s "
                             f"({routing.queue_timeout_s:g} s); retry later",
                             retry_after_s=_retry_after(routing.queue_timeout_s))
        assert isinstance(backend, Backend)
        # the slot ``hand_on`` reserved for it (``in_flight`` already counts it)
        service = self.queue.admit(user, weight, prompt_tokens, waiter=waiter)
        return Lease(self, backend, service)

    def give_back(self, backend: Backend, service: Service, completion_tokens: int) -> None:
        """A slot freed: charge the finished request, then hand the slot on."""
        self.queue.finish(service, completion_tokens)
        backend.in_flight -= 1
        self.hand_on(backend)

    def hand_on(self, backend: Backend) -> None:
        """Give ``backend``'s free slots to waiters the fair queue names. A waiter gets
        the best free backend it may use, as a newcomer would (a preferred or warm one
        free too: that one, and ``backend``'s slot goes to the next waiter)."""
        while not backend.retired and has_free_slot(backend):
            waiter = self.queue.grant_next(backend)
            if waiter is None:
                return
            granted, key = self._wakers[waiter]
            best = choose([b for b in self.backends.backends if waiter.eligible(b)], key)
            if best is not None and best is not backend:
                waiter.granted = best
            else:
                best = backend
            best.in_flight += 1  # reserved now: no newcomer can take it meanwhile
            granted.set()

    async def run(self) -> None:
        """Hand free slots on whenever backends change (up again, a reload, new lists)."""
        while True:
            await self.backends.changed.park()
            self.wake_all()

    def wake_all(self) -> None:
        """Backends came up or changed: slots may be free for waiters."""
        for backend in list(self.backends.backends):
            self.hand_on(backend)


def _retry_after(queue_timeout_s: float) -> int:
    return max(1, min(60, math.ceil(queue_timeout_s / 4)))
