"""backends/choice.py: priority groups, free slots, warm models, the least busy, config order."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ollama_proxy.backends.choice import choose, has_free_slot


@dataclass
class Fake:
    name: str
    priority: int = 0
    slots: int = 0
    in_flight: int = 0
    loaded: frozenset[str] = field(default_factory=frozenset)
    asked: list[str] = field(default_factory=list)

    def warm(self, model: str) -> bool:
        self.asked.append(model)
        return model in self.loaded


def fake(spec: str) -> Fake:
    """``name:priority:slots:in_flight[:warm models]``, e.g. ``a:0:2:1:m``."""
    name, priority, slots, in_flight, *warm = spec.split(":")
    return Fake(name, int(priority), int(slots), int(in_flight), frozenset(warm))


@pytest.mark.parametrize(("specs", "model", "chosen"), [
    ([], "m", None),
    (["a:0:0:0"], "m", "a"),
    # Slots: 0 is no limit; full is in_flight >= slots (also past it, after a reload).
    (["a:0:1:1"], "m", None),
    (["a:0:2:5"], "m", None),
    (["a:0:0:1000"], "m", "a"),
    (["a:0:1:1", "b:0:1:1"], "m", None),
    # Priority: lower preferred; a higher group only when every preferred one is full.
    (["b:1:0:0", "a:0:4:3"], "m", "a"),
    (["a:0:1:1", "b:1:1:0"], "m", "b"),
    (["a:0:1:1", "b:0:1:1", "c:1:1:0"], "m", "c"),
    (["a:0:1:1", "c:2:1:0", "b:1:1:0"], "m", "b"),
    (["a:-1:1:0", "b:0:1:0"], "m", "a"),
    # A warm fallback does not beat a cold free preferred backend.
    (["a:0:1:0", "b:1:1:0:m"], "m", "a"),
    # Warm and free first, even if busier; a warm full one does not count.
    (["a:0:4:0", "b:0:4:3:m"], "m", "b"),
    (["a:0:4:0", "b:0:1:1:m"], "m", "a"),
    (["a:0:0:9", "b:0:0:2:m"], "m", "b"),
    # Least busy, then config order.
    (["a:0:4:2", "b:0:4:1", "c:0:4:3"], "m", "b"),
    (["a:0:4:1", "b:0:4:1"], "m", "a"),
    (["b:0:4:1", "a:0:4:1"], "m", "b"),
    (["a:0:4:1:m", "b:0:4:0:m", "c:0:4:0:m"], "m", "b"),
    (["a:0:0:0", "b:0:4:0"], "m", "a"),
    # model None: nobody is warm, least busy decides.
    (["a:0:4:2:m", "b:0:4:1"], None, "b"),
    (["a:0:4:1:m", "b:0:4:1"], None, "a"),
    # Warm in another model's sense does not count.
    (["a:0:4:0", "b:0:4:1:other"], "m", "a"),
])
def test_choose(specs, model, chosen):
    backends = [fake(s) for s in specs]
    got = choose(backends, model)
    assert (got.name if got else None) == chosen


def test_model_none_never_asks_warm():
    backends = [Fake("a", loaded=frozenset({"m"})), Fake("b")]
    assert choose(backends, None) is backends[0]
    assert backends[0].asked == [] and backends[1].asked == []


def test_full_and_outranked_backends_are_not_asked_warm():
    """Called per request: a full backend, or one behind a chosen better group, costs no warm()."""
    full, best, fallback = Fake("full", slots=1, in_flight=1), Fake("best"), Fake("fallback", priority=1)
    assert choose([full, best, fallback], "m") is best
    assert full.asked == [] and fallback.asked == [] and best.asked == ["m"]


def test_returns_the_callers_own_object():
    backends = (Fake("a", in_flight=1), Fake("b"))
    chosen: Fake | None = choose(backends, "m")  # typed as the caller's class
    assert chosen is backends[1]


@pytest.mark.parametrize(("slots", "in_flight", "free"), [
    (0, 0, True), (0, 10**6, True), (1, 0, True), (1, 1, False), (3, 2, True), (3, 4, False),
])
def test_has_free_slot(slots, in_flight, free):
    assert has_free_slot(Fake("a", slots=slots, in_flight=in_flight)) is free

