"""Which backend takes a request, given their state, sans-IO; called once a request.

The order of preference: a lower ``priority`` first (a backend at a higher one is a
fallback, used only when every preferred one is full); in that group a backend with
the model already loaded (warm: no load of seconds to minutes), then the least busy,
then the order given (config order). None when every backend is full: the caller queues.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar


class Slotted(Protocol):
    """What choice reads of a backend (read-only, so attributes or properties do)."""

    @property
    def name(self) -> str: ...
    @property
    def priority(self) -> int: ...  # lower is preferred
    @property
    def slots(self) -> int: ...  # 0: no limit
    @property
    def in_flight(self) -> int: ...  # requests holding a slot now
    def warm(self, model: str) -> bool: ...


B = TypeVar("B", bound=Slotted)


def has_free_slot(b: Slotted) -> bool:
    return b.slots == 0 or b.in_flight < b.slots


def choose(eligible: Sequence[B], model: str | None) -> B | None:
    """The backend for a request among ``eligible`` (already filtered: serves the model,
    available, not excluded), or None when all are full. ``model`` None: none is warm.

    One pass, the smallest (priority, cold, in_flight) among the free ones, the first
    on a tie; ``warm`` is asked only of free backends that can still win."""
    best: B | None = None
    best_key = (0, False, 0)
    for b in eligible:
        if not has_free_slot(b):
            continue
        if best is not None and b.priority > best_key[0]:
            continue
        key = (b.priority, model is None or not b.warm(model), b.in_flight)
        if best is None or key < best_key:
            best, best_key = b, key
    return best
