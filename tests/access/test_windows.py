"""access/windows.py: the sliding windows, the quota's months and the reset format, with
``now`` passed in."""

from __future__ import annotations

import calendar

import pytest

from ollama_proxy.access.windows import Quota, Window, format_reset, month_key, month_start, next_month_start

T = 1_700_000_040.0  # a minute boundary (divisible by 60)
assert T % 60 == 0


def utc(*ymdhms: int) -> float:
    return float(calendar.timegm((*ymdhms, 0, 0, 0)))


# -- Window ------------------------------------------------------------------------


@pytest.mark.parametrize(("at", "used"), [
    (T, 1), (T + 0.999, 1), (T + 59.999, 1), (T + 60.0, 1), (T + 60.999, 1), (T + 61.0, 0),
])
def test_minute_window_forgets_one_window_after_its_bucket_ends(at, used):
    """An event in second [T, T+1) counts until T+61: any 60 s span holds it or not."""
    w = Window(60, 1)
    w.add(T + 0.5, 1)
    assert w.used(at) == used


@pytest.mark.parametrize(("at", "used"), [
    (T + 86_400 - 1, 1), (T + 86_400 + 59, 1), (T + 86_400 + 60, 0),
])
def test_day_window_uses_minute_buckets(at, used):
    """The day window forgets an event one day after the end of its minute."""
    w = Window(86_400, 60)
    w.add(T + 30, 1)
    assert w.used(at) == used


def test_a_window_is_whole_buckets():
    """A length that is not a multiple of the bucket is refused."""
    with pytest.raises(ValueError, match="multiple"):
        Window(60, 7)


@pytest.mark.parametrize(("events", "now", "amount", "limit", "expected"), [
    ([], T, 1, 2, 0),                                  # fits now
    ([(T, 1), (T + 10.5, 1)], T + 20, 1, 2, 41),       # T's bucket frees at T+61
    ([(T, 1), (T + 10.5, 1)], T + 20, 2, 2, 51),       # need both: T+10's frees at T+71
    ([(T, 1)], T + 60.9, 1, 1, 1),                     # 0.1 s left -> at least 1
    ([(T, 5)], T + 1, 3, 2, None),                     # more than the limit: never
    ([(T, 5)], T + 1, 1, 0, None),                     # limit 0: never
    ([(T, 3), (T + 30, 3)], T + 40, 2, 6, 21),         # need 2: the oldest 3 free at T+61
])
def test_seconds_until(events, now, amount, limit, expected):
    """Retry-After: whole seconds (ceil, >= 1) until `amount` more fits."""
    w = Window(60, 1)
    for at, n in events:
        w.add(at, n)
    assert w.seconds_until(now, amount, limit) == expected


def test_adjust_settles_in_the_reserved_bucket():
    """Settling later adjusts the bucket of the reservation, which expires on its own schedule."""
    w = Window(60, 1)
    w.add(T, 100)
    w.add(T + 30, 7)
    w.adjust(T + 30, -80, T)
    assert w.used(T + 30) == 27
    assert w.used(T + 61) == 7  # the settled 20 left with T's bucket
    w.adjust(T + 200, -5, T)  # its bucket is gone: nothing to do
    assert w.used(T + 200) == 0


def test_adjust_never_goes_below_zero_and_fills_an_empty_older_bucket():
    """A bucket clamps at zero; a late positive adjustment lands in its own older bucket."""
    w = Window(60, 1)
    w.add(T + 5, 10)
    w.adjust(T + 5, -50, T + 5)
    assert w.used(T + 5) == 0
    w.adjust(T + 10, 4, T)
    assert w.used(T + 60) == 4 and w.used(T + 61) == 0


def test_expire_forgets_what_left_the_window():
    """``expire`` drops the buckets ``used`` would no longer count, and nothing else."""
    w = Window(60, 1)
    w.add(T, 3)
    w.add(T + 30, 4)
    w.expire(T + 61)
    assert list(w._order) == [int(T) + 30]
    assert w.used(T + 61) == 4


def test_window_memory_is_bounded():
    """Only the buckets inside the window are kept."""
    w = Window(60, 1)
    for i in range(10_000):
        w.add(T + i * 0.5, 1)
    assert len(w._order) <= 61
    assert w.used(T + 5000) == 120  # buckets T+4940 .. T+4999, two each


@pytest.mark.parametrize(("added", "now", "expiry", "reset"), [
    ([], T, 61.0, 0.0),
    ([T], T + 0.5, 60.5, 60.5),
    ([T, T + 30], T + 40, 61.0, 51.0),
])
def test_expiry_and_reset(added, now, expiry, reset):
    """expiry_s: when what is added now leaves; reset_s: when all counted now has left."""
    w = Window(60, 1)
    for at in added:
        w.add(at, 1)
    assert (w.expiry_s(now), w.reset_s(now)) == (expiry, reset)


# -- months and Quota ------------------------------------------------------------------


@pytest.mark.parametrize(("now", "key", "start", "next_start"), [
    (utc(2025, 1, 31, 23, 59, 59), "2025-01", utc(2025, 1, 1, 0, 0, 0),
     utc(2025, 2, 1, 0, 0, 0)),
    (utc(2025, 2, 1, 0, 0, 0), "2025-02", utc(2025, 2, 1, 0, 0, 0), utc(2025, 3, 1, 0, 0, 0)),
    (utc(2024, 12, 15, 12, 0, 0), "2024-12", utc(2024, 12, 1, 0, 0, 0),
     utc(2025, 1, 1, 0, 0, 0)),
])
def test_month_key(now, key, start, next_start):
    """UTC calendar months, December rolls into January."""
    assert month_key(now) == key
    assert month_start(now) == start
    assert next_month_start(now) == next_start


def test_january_reservation_settled_in_february_leaves_february_alone():
    """A settle crossing the month changes the total only, like the ledger row (time = start)."""
    q = Quota()
    jan, feb = utc(2025, 1, 31, 23, 59, 59), utc(2025, 2, 1, 0, 0, 5)
    q.reserve(jan, 100)
    q.settle(feb, -70, jan)
    assert (q.used(feb, "month"), q.used(feb, "total")) == (0, 30)


def test_roll_starts_a_new_month_at_zero_and_keeps_the_total():
    """``roll`` into another month empties the month's sum; within the month it keeps it."""
    q = Quota()
    jan = utc(2025, 1, 10, 0, 0, 0)
    q.reserve(jan, 40)
    q.roll(jan + 86_400)
    assert (q.month, q.month_used, q.total) == ("2025-01", 40, 40)
    q.roll(utc(2025, 2, 1, 0, 0, 0))
    assert (q.month, q.month_used, q.total) == ("2025-02", 0, 40)


def test_a_month_quota_resets_at_the_month_end_and_a_total_never():
    """reset_s: seconds to the next UTC month, or None for a total quota."""
    q = Quota()
    now = utc(2025, 3, 31, 23, 54, 0)
    assert q.reset_s(now, "month") == 360
    assert q.reset_s(now, "total") is None


# -- the reset format -------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-3, "0s"), (0.02, "20ms"), (0.0001, "1ms"), (1, "1s"), (1.2, "2s"),
    (59, "59s"), (60, "1m0s"), (360, "6m0s"), (3723, "1h2m3s"), (86_460, "24h1m0s"),
])
def test_format_reset(seconds, text):
    """Reset durations as OpenAI writes them."""
    assert format_reset(seconds) == text
