"""Who gets a freed slot: the Virtual Token Counter scheduler (sans-IO).

VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024) counts each
user's service in tokens and gives a freed slot to the waiting user with the least, so a
user who keeps many requests queued cannot starve one who sends a request at a time.
Prompt tokens count when a request takes a slot, completion tokens as they stream (read
through ``Service.progress`` whenever a slot frees, so streaming costs nothing per chunk).

Idle time earns no credit: a user who becomes active (a request waiting, granted or
running) is lifted to the lowest counter among the other active users.

Memory: counters that can no longer change an outcome are forgotten. When no user is
active at all, every counter is dropped (contention only exists in a busy period; the
next one starts from 0). Within a busy period the lowest active counter never falls, so
an inactive user at or below it would be lifted to it anyway on return: such counters
are swept out now and then. Inactive users above it keep their counter (their debt).

No I/O and no clock: the trio shell (``router``) holds the slots and wakes the waiters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

INPUT_WEIGHT = 1.0  # the one place for the weights: an output token costs two input tokens
OUTPUT_WEIGHT = 2.0

_SWEEP_MIN = 64  # counters kept before the first sweep of forgettable ones


class QueueFull(Exception):
    """``max_queue`` requests are waiting in all."""


class UserQueueFull(Exception):
    """This user already has ``max_queued_per_user`` requests waiting."""


@dataclass(eq=False)
class Waiter:
    """One queued request; the shell keeps its own wake-up state beside it."""

    user: str
    weight: float
    prompt_tokens: int
    eligible: Callable[[object], bool]  # may it use this backend?
    arrived: float
    granted: object | None = None  # the backend it was given (set by FairQueue.grant_next)


@dataclass(eq=False)
class Service:
    """One admitted request, charged to its user as it runs."""

    user: str
    weight: float
    progress: Callable[[], int] | None = None  # completion tokens so far (set by the shell)
    charged_output: int = 0  # completion tokens already in the user's counter


class FairQueue:
    """Per-user queues of waiters and per-user token counters (``fair=False``: first
    come first served over all users, for comparison; counters are kept all the same)."""

    def __init__(self, *, max_queue: int, max_queued_per_user: int, fair: bool = True) -> None:
        if max_queue < 0 or max_queued_per_user < 0:
            raise ValueError("queue bounds must be >= 0")
        self.max_queue = max_queue
        self.max_queued_per_user = max_queued_per_user
        self.fair = fair
        self.counters: dict[str, float] = {}
        self._queues: dict[str, deque[Waiter]] = {}  # users with a waiter, in arrival order
        self._order: dict[Waiter, int] = {}  # queued waiter -> push number (ties, membership)
        self._pushed = 0
        self._granted: dict[str, list[Waiter]] = {}  # granted, not admitted yet: still active
        self._running: dict[Service, None] = {}
        self._load: dict[str, int] = {}  # active users: waiters + grants + services
        self._sweep_at = _SWEEP_MIN

    # -- counting ---------------------------------------------------------------------

    def admit(self, user: str, weight: float, prompt_tokens: int, *,
              waiter: Waiter | None = None) -> Service:
        """A request takes a slot now (at once, or after ``grant_next`` chose it).

        After a grant the user was active all along, so no lift; ``waiter`` names which
        grant this is (without it, the user's oldest grant)."""
        _check(weight, prompt_tokens)
        grants = self._granted.get(user)
        if grants:
            grants.remove(waiter if waiter is not None and waiter in grants else grants[0])
            if not grants:
                del self._granted[user]
        else:
            self._activate(user)
        self._charge(user, prompt_tokens * INPUT_WEIGHT / weight)
        service = Service(user, weight)
        self._running[service] = None
        return service

    def finish(self, service: Service, completion_tokens: int) -> None:
        """The request is over: charge the output not yet counted (never a refund) and drop
        it. Finishing twice charges once."""
        if service not in self._running:
            return
        del self._running[service]
        self._charge_output(service, completion_tokens)
        self._deactivate(service.user)

    def _charge_output(self, service: Service, completion_tokens: int) -> None:
        delta = completion_tokens - service.charged_output
        if delta > 0:
            service.charged_output = completion_tokens
            self._charge(service.user, delta * OUTPUT_WEIGHT / service.weight)

    def _charge(self, user: str, amount: float) -> None:
        self.counters[user] = self.counters.get(user, 0.0) + amount

    def _sync(self) -> None:
        """Bring every running request's streamed output into its user's counter."""
        for service in self._running:
            if service.progress is not None:
                self._charge_output(service, service.progress())

    # -- waiting ----------------------------------------------------------------------

    def push(self, waiter: Waiter) -> None:
        """Queue a request that found no free slot (the per-user bound is checked first)."""
        _check(waiter.weight, waiter.prompt_tokens)
        if waiter in self._order or waiter.granted is not None:
            raise ValueError("this waiter was queued before")
        if self.waiting_for(waiter.user) >= self.max_queued_per_user:
            raise UserQueueFull(waiter.user)
        if len(self._order) >= self.max_queue:
            raise QueueFull()
        self._activate(waiter.user)
        self._queues.setdefault(waiter.user, deque()).append(waiter)
        self._order[waiter] = self._pushed
        self._pushed += 1

    def remove(self, waiter: Waiter) -> None:
        """The waiter left (timeout, client gone); a no-op once granted or removed."""
        if self._order.pop(waiter, None) is None:
            return
        queue = self._queues[waiter.user]
        queue.remove(waiter)  # at most max_queued_per_user long
        if not queue:
            del self._queues[waiter.user]
        self._deactivate(waiter.user)

    def abandon(self, waiter: Waiter) -> None:
        """A granted waiter that will not be admitted after all (it left between the grant
        and ``admit``): its user stops counting as active for it. A no-op otherwise."""
        grants = self._granted.get(waiter.user)
        if grants is None or waiter not in grants:
            return
        grants.remove(waiter)
        if not grants:
            del self._granted[waiter.user]
        self._deactivate(waiter.user)

    def grant_next(self, backend: object) -> Waiter | None:
        """A slot is free at ``backend``: the waiter to give it to, taken off the queue, or
        None. Fair: the user with the lowest counter among those with a waiter that may use
        ``backend`` (ties: the earlier arrival); FIFO: the earliest such waiter. Within a
        user, first come first served. Does not admit: the shell calls ``admit``."""
        if not self._queues:
            return None  # nobody waits (the common case: every slot freed when all are idle)
        self._sync()
        best: Waiter | None = None
        best_key: tuple[float, ...] = ()
        for user, queue in self._queues.items():
            first = next((w for w in queue if w.eligible(backend)), None)
            if first is None:
                continue
            key: tuple[float, ...] = (first.arrived, self._order[first])
            if self.fair:
                key = (self.counters.get(user, 0.0), *key)
            if best is None or key < best_key:
                best, best_key = first, key
        if best is None:
            return None
        del self._order[best]
        queue = self._queues[best.user]
        queue.remove(best)
        if not queue:
            del self._queues[best.user]
        self._granted.setdefault(best.user, []).append(best)  # load unchanged: still active
        best.granted = backend
        return best

    def waiting(self) -> int:
        return len(self._order)

    def waiting_for(self, user: str) -> int:
        queue = self._queues.get(user)
        return len(queue) if queue is not None else 0

    def active(self, user: str) -> bool:
        """Has ``user`` a request waiting, granted or running?"""
        return user in self._load

    # -- who is active ----------------------------------------------------------------

    def _activate(self, user: str) -> None:
        """One more waiting or running request of ``user``; lift the user if it was idle."""
        load = self._load.get(user, 0)
        if load == 0:
            self._sync()
            others = [self.counters.get(u, 0.0) for u in self._load]
            own = self.counters.get(user, 0.0)
            self.counters[user] = max(own, min(others)) if others else own
        self._load[user] = load + 1

    def _deactivate(self, user: str) -> None:
        load = self._load[user] - 1
        if load:
            self._load[user] = load
            return
        del self._load[user]
        if not self._load:
            self.counters.clear()  # an idle gateway: the next busy period starts even
        elif len(self.counters) > self._sweep_at:
            self._sweep()

    def _sweep(self) -> None:
        """Forget inactive users whose counter a return would lift anyway."""
        floor = min(self.counters.get(u, 0.0) for u in self._load)
        for user in [u for u, c in self.counters.items() if c <= floor and u not in self._load]:
            del self.counters[user]
        self._sweep_at = max(_SWEEP_MIN, 2 * len(self.counters))


def _check(weight: float, prompt_tokens: int) -> None:
    if not weight > 0:
        raise ValueError(f"weight must be > 0, not {weight!r}")
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be >= 0, not {prompt_tokens!r}")
