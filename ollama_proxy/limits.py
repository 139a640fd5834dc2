"""Per-user limits and quotas: the arithmetic, with ``now`` passed in (sans-IO).

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
import json
import math
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping

from .errors import BadRequest
from .isotime import iso, parse_time

LIMIT_NAMES = (
    "requests_per_minute", "requests_per_day", "tokens_per_minute", "tokens_per_day",
    "token_quota", "quota_period", "max_concurrent", "max_tokens_per_request",
    "allowed_models", "expires_at",
)
QUOTA_PERIODS = ("total", "month")

MINUTE_S = 60
DAY_S = 86_400
# Bucket widths: one second for the minute window (Retry-After has whole
# seconds anyway), one minute for the day (1441 buckets at most per window).
MINUTE_BUCKET_S = 1
DAY_BUCKET_S = 60

_REGISTRY_PREFIX = "registry.ollama.ai/library/"

_INT_LIMITS = ("requests_per_minute", "requests_per_day", "tokens_per_minute", "tokens_per_day",
               "token_quota", "max_concurrent", "max_tokens_per_request")


@dataclass(frozen=True, slots=True)
class Limits:
    """One user's resolved limits. ``None`` = unlimited, ``0`` = none allowed."""

    requests_per_minute: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    token_quota: int | None = None
    quota_period: str = "total"  # "total" or "month" (UTC calendar month)
    max_concurrent: int | None = None
    max_tokens_per_request: int | None = None
    allowed_models: tuple[str, ...] | None = None  # globs; () = no model
    expires_at: float | None = None  # Unix seconds
    # No count applies (the fast path of ``check``); derived, not a limit.
    unbounded: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unbounded",
                           all(getattr(self, name) is None for name in _INT_LIMITS))
        for name in _INT_LIMITS:
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"{name} must be a whole number >= 0 or null, not {value!r}")
        if self.quota_period not in QUOTA_PERIODS:
            raise ValueError(f"quota_period must be 'total' or 'month', not {self.quota_period!r}")
        models = self.allowed_models
        if models is not None:
            if isinstance(models, str) or not all(isinstance(g, str) for g in models):
                raise ValueError("allowed_models must be a list of glob strings or null")
            if not isinstance(models, tuple):
                object.__setattr__(self, "allowed_models", tuple(models))
        exp = self.expires_at
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, (int, float))):
            raise ValueError(f"expires_at must be Unix seconds or null, not {exp!r}")

    @staticmethod
    def merged(defaults: Limits, overrides: Mapping[str, Any] | None) -> Limits:
        """``defaults`` with the non-null ``overrides`` applied (a null falls back
        to the default); ``overrides`` as the API stores them (``expires_at``
        may be ISO 8601). Unknown names and bad values raise ``ValueError``."""
        if not overrides:
            return defaults
        unknown = sorted(set(overrides) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"unknown limit: {', '.join(unknown)}")
        values = {f.name: getattr(defaults, f.name) for f in fields(Limits) if f.init}
        for name, value in overrides.items():
            if value is None:
                continue
            if name == "allowed_models" and isinstance(value, list):
                value = tuple(value)
            elif name == "expires_at" and isinstance(value, str):
                try:
                    value = parse_time(value, name)
                except BadRequest as exc:
                    raise ValueError(exc.message) from None
            values[name] = value
        return Limits(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, names and shapes as in PRODUCT §8."""
        out: dict[str, Any] = {name: getattr(self, name) for name in LIMIT_NAMES}
        if self.allowed_models is not None:
            out["allowed_models"] = list(self.allowed_models)
        out["expires_at"] = iso(self.expires_at)
        return out


# -- models ------------------------------------------------------------------


def _model_names(model: str) -> tuple[str, ...]:
    """The spellings a model name matches a glob under: ``name:tag`` always,
    plus the bare ``name`` when the tag is ``latest``."""
    name = model.strip().lower()
    if name.startswith(_REGISTRY_PREFIX):
        name = name[len(_REGISTRY_PREFIX):]
    base, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:  # no tag ("host:port/x" has a '/' after the colon)
        return (name + ":latest", name)
    if tag == "latest":
        return (name, base)
    return (name,)


def canonical_model(model: str) -> str:
    """One spelling per model: lower case, ``name:tag``, no default registry."""
    return _model_names(model)[0]


def _normal_glob(glob: str) -> str:
    g = glob.strip().lower()
    return g[len(_REGISTRY_PREFIX):] if g.startswith(_REGISTRY_PREFIX) else g


def model_allowed(globs: Iterable[str] | None, model: str) -> bool:
    """Whether ``model`` matches one of ``globs`` (``None``: every model).

    Case-insensitive; ``registry.ollama.ai/library/`` is stripped; ``llama3.2``
    and ``llama3.2:latest`` are the same model for both globs and names.
    """
    if globs is None:
        return True
    names = _model_names(model)
    return any(fnmatchcase(n, _normal_glob(g)) for g in globs for n in names)


def filter_models(globs: Iterable[str] | None, models: Iterable[str]) -> list[str]:
    """The models a key may use, in their order (for ``/api/tags``, ``/v1/models``)."""
    if globs is None:
        return list(models)
    pats = tuple(globs)
    return [m for m in models if model_allowed(pats, m)]


# A model list reply: where its entries are, and which of their fields name the model.
_LISTS = (("models", ("name", "model")), ("data", ("id",)))  # /api/tags, /api/ps; /v1/models


def filter_listing(globs: Iterable[str], body: bytes) -> bytes:
    """A model list reply (``/api/tags``, ``/api/ps``, ``/v1/models``) without the
    models ``globs`` do not allow; anything else comes back unchanged."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict):
        return body
    pats = tuple(globs)
    changed = False
    for key, name_fields in _LISTS:
        entries = doc.get(key)
        if not isinstance(entries, list):
            continue
        kept = []
        for entry in entries:
            name = next((entry[f] for f in name_fields if isinstance(entry, dict)
                         and isinstance(entry.get(f), str)), None)
            if name is not None and model_allowed(pats, name):
                kept.append(entry)
        changed = changed or len(kept) != len(entries)
        doc[key] = kept
    if not changed:
        return body
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


# -- time helpers --------------------------------------------------------------


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


# -- counters ------------------------------------------------------------------


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

    def _expire(self, now: float) -> None:
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
        self._expire(now)
        return self._total

    def add(self, now: float, amount: int) -> None:
        """Count ``amount`` (>= 0) at ``now``. Inlined: it runs four times a request."""
        b = int(now // self.bucket_s)
        order = self._order
        if order and order[0] < b - self._n:
            self._expire(now)
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

    def remove(self, now: float, amount: int, at: float) -> None:
        """Take back ``amount`` counted at ``at`` (e.g. the unused part of a reservation)."""
        self.adjust(now, -amount, at)

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
        self._expire(now)
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

    def _roll(self, now: float) -> None:
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
        self._roll(now)
        return self.month_used

    def reserve(self, now: float, amount: int) -> None:
        self._roll(now)
        self.total += amount
        self.month_used += amount

    def settle(self, now: float, delta: int, at: float) -> None:
        """Change what was reserved at ``at`` by ``delta``; a reservation from an
        earlier month only changes the total."""
        self._roll(now)
        self.total = max(0, self.total + delta)
        if self._start <= at < self._end:
            self.month_used = max(0, self.month_used + delta)

    def reset_s(self, now: float, period: str) -> float | None:
        if period == "total":
            return None
        self._roll(now)
        return self._end - now
