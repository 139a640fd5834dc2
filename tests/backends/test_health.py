"""backends/health.py: probes, request failures in a row, ejection and its doubling."""

from __future__ import annotations

import pytest

from ollama_proxy.backends.health import MAX_EJECT_S, Health


def health(after: int = 3, eject_s: float = 30.0) -> Health:
    h = Health(eject_after_failures=after, eject_s=eject_s)
    h.probed(True, None, 0.0)
    return h


def fail(h: Health, now: float, times: int) -> list[bool]:
    return [h.failed(now, "boom") for _ in range(times)]


def test_a_new_backend_is_available_before_any_probe():
    """Not probed yet is not down: the first requests need not wait for a probe."""
    h = Health(eject_after_failures=3, eject_s=30)
    assert h.up is None and h.available(0.0) and not h.ejected(0.0)
    assert h.describe(0.0) == {"up": False, "ejected": False, "ejected_for_s": 0.0,
                               "failures_in_a_row": 0, "error": None}


@pytest.mark.parametrize("after", [1, 2, 3, 5])
def test_ejected_at_the_threshold_not_before(after):
    h = health(after)
    assert fail(h, 10.0, after - 1) == [False] * (after - 1)
    assert h.available(10.0) and h.failures == after - 1
    assert h.failed(10.0, "boom") is True
    assert h.ejected(10.0) and not h.available(10.0)
    assert h.failures == 0 and h.ejections == 1 and h.ejected_until == 40.0


def test_zero_failures_never_ejects():
    h = health(after=0)
    assert fail(h, 1.0, 100) == [False] * 100
    assert h.available(1.0) and h.last_error == "boom"


def test_the_ejection_doubles_each_repeat_up_to_five_minutes():
    h = health()
    now = 0.0
    lengths = []
    for _ in range(7):
        assert fail(h, now, 3)[-1]
        lengths.append(h.ejected_until - now)
        now = h.ejected_until  # over exactly then: counted again
    assert lengths == [30, 60, 120, 240, 300, 300, 300]
    assert MAX_EJECT_S == 300


def test_a_long_streak_does_not_overflow():
    h = health(after=1, eject_s=30)
    h.ejections = 5000
    assert h.failed(0.0, "x") and h.ejected_until == MAX_EJECT_S


def test_the_cap_holds_for_the_first_ejection_too():
    h = health(after=1, eject_s=1000)
    h.failed(0.0, "x")
    assert h.ejected_until == MAX_EJECT_S


@pytest.mark.parametrize(("now", "ejected"), [(39.999, True), (40.0, False), (40.001, False)])
def test_available_again_exactly_at_ejected_until(now, ejected):
    h = health()
    fail(h, 10.0, 3)
    assert h.ejected_until == 40.0
    assert h.ejected(now) is ejected and h.available(now) is not ejected


def test_a_success_resets_the_failures_and_the_doubling():
    h = health()
    fail(h, 0.0, 3)
    fail(h, 30.0, 3)
    assert h.ejections == 2 and h.ejected_until == 90.0
    fail(h, 90.0, 2)
    assert h.succeeded() is False  # it was up: nothing to log
    assert h.failures == 0 and h.ejections == 0 and h.last_error is None
    fail(h, 100.0, 2)
    assert h.failures == 2 and h.available(100.0)  # the count starts over
    assert fail(h, 100.0, 1) == [True]
    assert h.ejected_until == 130.0  # back to eject_s


def test_failures_must_be_in_a_row():
    h = health()
    fail(h, 0.0, 2)
    h.succeeded()
    assert fail(h, 0.0, 2) == [False, False] and h.available(0.0)


def test_failures_while_ejected_do_not_count():
    """Requests sent before the ejection fail late: no second, doubled, ejection."""
    h = health()
    fail(h, 0.0, 3)
    assert fail(h, 5.0, 10) == [False] * 10
    assert h.failures == 0 and h.ejections == 1 and h.ejected_until == 30.0
    assert h.last_error == "boom"


def test_a_success_does_not_end_an_ejection():
    h = health()
    fail(h, 0.0, 3)
    h.succeeded()
    assert h.ejected(29.0) and h.ejections == 0


@pytest.mark.parametrize(("before", "ok", "changed"), [
    (None, True, True), (None, False, True),
    (True, True, False), (True, False, True),
    (False, True, True), (False, False, False),
])
def test_a_probe_says_when_it_turned_up_or_down(before, ok, changed):
    h = Health(eject_after_failures=3, eject_s=30)
    h.up = before
    assert h.probed(ok, None if ok else "refused", 0.0) is changed
    assert h.up is ok and h.last_error == (None if ok else "refused")
    assert h.available(0.0) is ok


def test_a_request_success_turns_it_up():
    h = Health(eject_after_failures=3, eject_s=30)
    h.probed(False, "refused", 0.0)
    assert h.succeeded() is True and h.up is True and h.available(0.0)
    assert h.succeeded() is False


def test_a_good_probe_does_not_end_an_ejection_early():
    h = health()
    fail(h, 0.0, 3)
    assert h.probed(True, None, 10.0) is False
    assert h.ejected(10.0) and not h.available(10.0)


def test_a_failed_probe_while_ejected_keeps_it_ejected_and_down():
    h = health()
    fail(h, 0.0, 3)
    assert h.probed(False, "refused", 10.0) is True
    assert h.ejected(10.0) and h.ejected_until == 30.0
    assert not h.available(31.0)  # over, but down: the probe decides
    assert h.probed(True, None, 35.0) is True
    assert h.available(35.0) and h.ejected_until is None


def test_a_good_probe_does_not_reset_the_doubling():
    """A backend that answers probes but fails requests is ejected longer each time."""
    h = health()
    fail(h, 0.0, 3)
    h.probed(True, None, 30.0)
    fail(h, 30.0, 3)
    assert h.ejected_until == 90.0


def test_describe_while_ejected():
    h = health()
    fail(h, 0.0, 3)
    assert h.describe(12.34) == {"up": True, "ejected": True, "ejected_for_s": 17.7,
                                 "failures_in_a_row": 0, "error": "boom"}
    h.failed(30.0, "again")
    assert h.describe(30.0) == {"up": True, "ejected": False, "ejected_for_s": 0.0,
                                "failures_in_a_row": 1, "error": "again"}


@pytest.mark.parametrize(("after", "eject_s"), [(-1, 30), (3, -1)])
def test_nonsense_settings_are_refused(after, eject_s):
    with pytest.raises(ValueError):
        Health(eject_after_failures=after, eject_s=eject_s)
