"""Rate windows and quotas: the arithmetic, with ``now`` passed in (sans-IO).

Nothing here reads a clock, a socket or the ledger; the relay passes ``now``
(Unix seconds, UTC) and the ledger rows in. Single-threaded use is assumed
(one trio thread): ``admit`` (or ``check`` then ``reserve`` with no ``await``
between them) is atomic.

Theory of operation
-------------------
* **Windows** (``Window``) are sliding-window counters over buckets: per
  second for a minute, per minute for a day. A window of ``n`` buckets counts
  the current bucket and the ``n`` before it, so an event is forgotten one
  full window *after the end of its bucket*. Consequence: in any span of
  ``length_s`` seconds there are never more than ``limit`` units (no double
  burst at a minute boundary); the price is that capacity frees up to one
  bucket late. Memory is bounded by ``n + 1`` buckets (only non-empty ones
  are stored).
* **Tokens** are ``prompt + completion``: both count against
  ``tokens_per_minute``, ``tokens_per_day`` and ``token_quota``.
* **Reserve, then settle.** Before a request goes out it reserves
  ``prompt_estimate + cap`` tokens against every token limit (the caller
  estimates the prompt, e.g. ``usage.estimate_prompt_tokens``; ``cap`` is the
  completion cap, which the relay injects as ``num_predict`` / ``max_tokens``)
  and counts one request. When it ends, ``settle`` replaces the reservation by
  the real ``prompt + completion`` *in the bucket it was reserved in* (the
  ledger row's ``time`` is the request's start, so a rebuild puts it in the
  same bucket). Completion tokens therefore can never push a limit past its
  value; only a prompt larger than its estimate can (by that difference).
* **Cap** = ``min(requested, max_tokens_per_request, budget_left -
  prompt_estimate)`` where ``budget_left`` is the least room left in any token
  limit. A completion request is admitted only if that cap is at least 1; an
  embeddings request (``completion=False``) is charged its prompt tokens and
  is admitted while ``budget_left >= max(1, prompt_estimate)``.
* **Quota** keeps both an all-time total and the current UTC month's sum, so
  ``quota_period`` can be edited at any time and a month quota resets by
  itself when ``month_key(now)`` changes (no cron job).
* **Refusals**: ``Decision.retry_after_s is None`` on a refused 429 means
  "retrying will not help" (exhausted quota, a limit set to 0, a request
  larger than the limit): the caller sends ``x-should-retry: false``. Any
  limit set to ``0`` refuses with code ``insufficient_quota``.

Headers (``x-ratelimit-*``) describe the tightest limit (least remaining) of
each family: requests (``requests_per_minute``, ``requests_per_day``) and
tokens (``tokens_per_minute``, ``tokens_per_day``, ``token_quota``). For an
admitted request they show the state *after* its reservation. Reset values
are the time until the limit is back to its initial state (all current usage
expired), formatted like OpenAI: ``"0s"``, ``"250ms"``, ``"17s"``, ``"6m0s"``,
``"1h2m3s"`` (whole seconds rounded up from one second on). A ``total`` quota
never resets, so it gives no reset header.
"""

from __future__ import annotations

import calendar
import math
import time
from bisect import bisect_left
from collections import deque

MINUTE_S = 60
DAY_S = 86_400
# Bucket widths: one second for the minute window (Retry-After has whole
# seconds anyway), one minute for the day (1441 buckets at most per window).
MINUTE_BUCKET_S = 1
DAY_BUCKET_S = 60


def month_key(now: float) -> str:
    """The UTC calendar month of ``now``, ``"YYYY-MM"``."""
    tm = time.gmtime(now)
    return f"{tm.tm_year:04d}-{tm.tm_mon:02d}"


def month_start(now: float) -> float:
    """Unix seconds of the first instant of ``now``'s UTC month."""
    tm = time.gmtime(now)
    return float(calendar.timegm((tm.tm_year, tm.tm_mon, 1, 0, 0, 0, 0, 0, 0)))


def next_month_start(now: float) -> float:
    """Unix seconds of the first instant of the UTC month after ``now``'s."""
    tm = time.gmtime(now)
    year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)))


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``"0s"``,
    ``"250ms"``, ``"17s"``, ``"6m0s"``, ``"1h2m3s"``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


class Window:
    """A sliding-window sum over ``length_s``, in buckets of ``bucket_s``.

    Time is expected not to go backwards (``UserCounters`` clamps it); an
    ``add`` in an older bucket than the newest lands in the newest.
    """

    __slots__ = ("length_s", "bucket_s", "_n", "_counts", "_order", "_total")

    def __init__(self, length_s: int, bucket_s: int) -> None:
        if length_s % bucket_s:
            raise ValueError("length_s must be a multiple of bucket_s")
        self.length_s = length_s
        self.bucket_s = bucket_s
        self._n = length_s // bucket_s
        self._counts: dict[int, int] = {}
        self._order: deque[int] = deque()  # bucket ids with counts, ascending
        self._total = 0

    def __repr__(self) -> str:
        return f"<Window {self.length_s}s total={self._total} buckets={len(self._order)}>"

    def _bucket(self, t: float) -> int:
        return int(t // self.bucket_s)

    def expire(self, now: float) -> None:
        """Forget the buckets that have left the window ending at ``now``."""
        oldest = self._bucket(now) - self._n  # oldest bucket still counted
        order = self._order
        while order and order[0] < oldest:
            self._total -= self._counts.pop(order.popleft())

    def _bump(self, b: int, delta: int) -> None:
        """Change bucket ``b`` by ``delta`` (never below zero)."""
        counts = self._counts
        if b in counts:
            new = max(0, counts[b] + delta)
            self._total += new - counts[b]
            counts[b] = new
        elif delta > 0:
            order = self._order
            if not order or b > order[-1]:
                order.append(b)
            else:  # rare: a late settle into a bucket that held nothing
                order.insert(bisect_left(order, b), b)
            counts[b] = delta
            self._total += delta

    def used(self, now: float) -> int:
        """Units counted in the window ending at ``now``."""
        self.expire(now)
        return self._total

    def add(self, now: float, amount: int) -> None:
        """Count ``amount`` (>= 0) at ``now``. Inlined: it runs four times a request."""
        b = int(now // self.bucket_s)
        order = self._order
        if order and order[0] < b - self._n:
            self.expire(now)
        if order and b <= order[-1]:  # the newest bucket (or time stood still)
            self._counts[order[-1]] += amount
            self._total += amount
        elif amount > 0:
            order.append(b)
            self._counts[b] = amount
            self._total += amount

    def adjust(self, now: float, delta: int, at: float) -> None:
        """Change what was counted at ``at`` by ``delta`` (nothing once ``at``'s
        bucket has left the window)."""
        b = int(at // self.bucket_s)
        if b >= int(now // self.bucket_s) - self._n:
            self._bump(b, delta)

    def seconds_until(self, now: float, amount: int, limit: int) -> int | None:
        """Whole seconds until ``amount`` more fits under ``limit``: 0 if it fits
        now, otherwise at least 1 (rounded up); ``None`` if it never can."""
        if amount > limit:
            return None
        need = self.used(now) + amount - limit
        if need <= 0:
            return 0
        freed = 0
        for b in self._order:
            freed += self._counts[b]
            if freed >= need:
                return max(1, math.ceil((b + self._n + 1) * self.bucket_s - now))
        return None  # unreachable: everything expires eventually

    def expiry_s(self, now: float) -> float:
        """Seconds until what is added at ``now`` leaves the window."""
        return (self._bucket(now) + self._n + 1) * self.bucket_s - now

    def reset_s(self, now: float) -> float:
        """Seconds until everything counted now has expired."""
        self.expire(now)
        if not self._order:
            return 0.0
        return max(0.0, (self._order[-1] + self._n + 1) * self.bucket_s - now)


class Quota:
    """Tokens used in total and in the current UTC month (resets by itself)."""

    __slots__ = ("total", "month", "month_used", "_start", "_end")

    def __init__(self) -> None:
        self.total = 0
        self.month = ""
        self.month_used = 0
        self._start = self._end = 0.0  # the current month, [start, end)

    def __repr__(self) -> str:
        return f"<Quota total={self.total} {self.month}={self.month_used}>"

    def roll(self, now: float) -> None:
        """Make ``now``'s month the current one (its sum starts at 0 on a change)."""
        if not self._start <= now < self._end:  # (cheap test: gmtime only on a change)
            key = month_key(now)
            if key != self.month:
                self.month = key
                self.month_used = 0
            self._start = month_start(now)
            self._end = next_month_start(now)

    def used(self, now: float, period: str) -> int:
        if period == "total":
            return self.total
        self.roll(now)
        return self.month_used

    def reserve(self, now: float, amount: int) -> None:
        self.roll(now)
        self.total += amount
        self.month_used += amount

    def settle(self, now: float, delta: int, at: float) -> None:
        """Change what was reserved at ``at`` by ``delta``; a reservation from an
        earlier month only changes the total."""
        self.roll(now)
        self.total = max(0, self.total + delta)
        if self._start <= at < self._end:
            self.month_used = max(0, self.month_used + delta)

    def reset_s(self, now: float, period: str) -> float | None:
        if period == "total":
            return None
        self.roll(now)
        return self._end - now
