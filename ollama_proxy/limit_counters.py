"""Per-user counters and the admit decision, built on the limits arithmetic.

``UserCounters.admit`` checks a request against every limit that applies and
reserves what it may use; ``settle`` replaces the reservation by the real
usage; ``rebuild`` recreates the counters from ledger rows at start, so a
restart neither resets a window nor forgets a quota. See ``limits.py`` for
the theory of operation (windows, reserve-then-settle, caps, headers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from .limits import (
    DAY_BUCKET_S,
    DAY_S,
    Limits,
    MINUTE_BUCKET_S,
    MINUTE_S,
    Quota,
    Window,
    format_reset,
    model_allowed,
)


# -- decisions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one request.

    ``status``/``code``/``message`` describe a refusal (``allowed`` False).
    ``retry_after_s``: whole seconds for ``Retry-After``; on a refused 429,
    ``None`` means retrying will not help (send ``x-should-retry: false``).
    ``cap``: the completion-token cap to send (inject when the client sent none
    or a larger one); ``None`` = no cap applies. ``headers``: the
    ``x-ratelimit-*`` pairs for the response.
    """

    allowed: bool
    status: int = 200
    code: str | None = None
    message: str = ""
    retry_after_s: int | None = None
    cap: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    reserve_tokens: int = 0  # prompt estimate + cap, what ``reserve`` will hold


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds until it is settled."""

    time: float  # when it was reserved (the bucket it lives in)
    tokens: int  # reserved tokens (prompt estimate + cap)
    cap: int | None
    settled: bool = False


class LedgerRow(Protocol):
    time: float
    user: str | None
    prompt_tokens: int
    completion_tokens: int


def _refuse(status: int, code: str, message: str, retry: int | None = None,
            headers: tuple[tuple[str, str], ...] = ()) -> Decision:
    return Decision(False, status, code, message, retry, None, headers)


class UserCounters:
    """Everything counted for one user: request and token windows, the quota,
    requests in flight."""

    __slots__ = ("rpm", "rpd", "tpm", "tpd", "quota", "in_flight", "_latest")

    def __init__(self) -> None:
        self.rpm = Window(MINUTE_S, MINUTE_BUCKET_S)
        self.rpd = Window(DAY_S, DAY_BUCKET_S)
        self.tpm = Window(MINUTE_S, MINUTE_BUCKET_S)
        self.tpd = Window(DAY_S, DAY_BUCKET_S)
        self.quota = Quota()
        self.in_flight = 0
        self._latest = float("-inf")

    def __repr__(self) -> str:
        return (f"<UserCounters in_flight={self.in_flight} rpm={self.rpm._total} "
                f"rpd={self.rpd._total} tpm={self.tpm._total} tpd={self.tpd._total} "
                f"{self.quota!r}>")

    def _now(self, now: float) -> float:
        """Time never goes backwards here (a wall clock can)."""
        if now > self._latest:
            self._latest = now
        return self._latest

    # The limits of each family that apply, as (name, limit, used, counter).
    def _request_limits(self, limits: Limits, now: float) -> list[tuple[str, int, int, Any]]:
        out = []
        if limits.requests_per_minute is not None:
            out.append(("requests_per_minute", limits.requests_per_minute, self.rpm.used(now),
                        self.rpm))
        if limits.requests_per_day is not None:
            out.append(("requests_per_day", limits.requests_per_day, self.rpd.used(now),
                        self.rpd))
        return out

    def _token_limits(self, limits: Limits, now: float) -> list[tuple[str, int, int, Any]]:
        out: list[tuple[str, int, int, Any]] = []
        if limits.tokens_per_minute is not None:
            out.append(("tokens_per_minute", limits.tokens_per_minute, self.tpm.used(now),
                        self.tpm))
        if limits.tokens_per_day is not None:
            out.append(("tokens_per_day", limits.tokens_per_day, self.tpd.used(now), self.tpd))
        if limits.token_quota is not None:
            out.append(("token_quota", limits.token_quota,
                        self.quota.used(now, limits.quota_period), self.quota))
        return out

    def headers(self, limits: Limits, now: float, *, extra_requests: int = 0,
                extra_tokens: int = 0) -> tuple[tuple[str, str], ...]:
        """``x-ratelimit-*`` for the tightest request and token limits, as if
        ``extra_*`` more were counted at ``now``."""
        now = self._now(now)
        out: list[tuple[str, str]] = []
        for family, items, extra in (
                ("requests", self._request_limits(limits, now), extra_requests),
                ("tokens", self._token_limits(limits, now), extra_tokens)):
            if not items:
                continue
            resets: list[float | None] = []
            for _name, _limit, _used, counter in items:
                if isinstance(counter, Quota):
                    resets.append(counter.reset_s(now, limits.quota_period))
                else:
                    reset = counter.reset_s(now)
                    if extra > 0:  # what is added now expires last
                        reset = max(reset, counter.expiry_s(now))
                    resets.append(reset)
            # Tightest: least remaining; on a tie, the one that resets last.
            never = [math.inf if r is None else r for r in resets]
            i = min(range(len(items)), key=lambda k: (items[k][1] - items[k][2], -never[k]))
            _name, limit, used, _counter = items[i]
            out.append((f"x-ratelimit-limit-{family}", str(limit)))
            out.append((f"x-ratelimit-remaining-{family}", str(max(0, limit - used - extra))))
            reset_i = resets[i]
            if reset_i is not None:
                out.append((f"x-ratelimit-reset-{family}", format_reset(reset_i)))
        return tuple(out)

    def check(self, limits: Limits, now: float, model: str | None,
              requested_cap: int | None = None, *, prompt_estimate: int = 0,
              completion: bool = True) -> Decision:
        """Whether a request may go now, and with which completion cap.

        ``model`` None skips the model check (routes without a model).
        ``requested_cap``: the client's ``max_tokens`` / ``num_predict`` (a
        negative one, Ollama's "no limit", counts as none). ``completion``
        False for embeddings: no cap, charged ``prompt_estimate``.
        """
        now = self._now(now)
        if limits.expires_at is not None and now >= limits.expires_at:
            return _refuse(403, "user_expired", "this user expired (expires_at)")
        if model is not None and not model_allowed(limits.allowed_models, model):
            return _refuse(403, "model_not_allowed",
                           f"model {model!r} is not in allowed_models for this user")
        mc = limits.max_concurrent
        if mc is not None and self.in_flight >= mc:
            if mc == 0:
                return _refuse(429, "insufficient_quota", "max_concurrent is 0", None,
                               self.headers(limits, now))
            return _refuse(429, "too_many_concurrent",
                           f"max_concurrent ({mc}) requests already in flight", 1,
                           self.headers(limits, now))
        if completion and limits.max_tokens_per_request == 0:
            return _refuse(429, "insufficient_quota", "max_tokens_per_request is 0", None,
                           self.headers(limits, now))

        # Every request and token limit that refuses: (retry or None, name, limit).
        blocked: list[tuple[int | None, str, int]] = []
        for name, limit, _used, window in self._request_limits(limits, now):
            wait = window.seconds_until(now, 1, limit)
            if wait:
                blocked.append((wait, name, limit))
            elif wait is None:
                blocked.append((None, name, limit))
        need = max(1, prompt_estimate + 1 if completion else prompt_estimate)
        budget: int | None = None
        for name, limit, used, window in self._token_limits(limits, now):
            left = limit - used
            budget = left if budget is None else min(budget, left)
            if name == "token_quota":
                if left < need:
                    blocked.append((None, name, limit))
                continue
            wait = window.seconds_until(now, need, limit)
            if wait:
                blocked.append((wait, name, limit))
            elif wait is None:
                blocked.append((None, name, limit))
        if blocked:
            hdrs = self.headers(limits, now)
            # A permanent refusal wins; otherwise the longest wait.
            forever = [b for b in blocked if b[0] is None]
            retry, name, limit = forever[0] if forever else max(blocked, key=lambda b: b[0] or 0)
            if retry is None:
                code = "insufficient_quota"
                if limit == 0:
                    why = f"{name} is 0"
                elif name == "token_quota":
                    period = "" if limits.quota_period == "total" else " for this month"
                    why = f"token_quota ({limit}){period} is used up"
                else:
                    why = f"this request needs {need} tokens, more than {name} ({limit})"
                    code = "rate_limited"
                return _refuse(429, code, why, None, hdrs)
            return _refuse(429, "rate_limited",
                           f"{name} limit ({limit}) reached; retry in {retry}s", retry, hdrs)

        cap: int | None = None
        if completion:
            if requested_cap is not None and requested_cap >= 0:
                cap = requested_cap
            for bound in (limits.max_tokens_per_request,
                          None if budget is None else budget - prompt_estimate):
                if bound is not None:
                    cap = bound if cap is None else min(cap, bound)
        reserve = max(0, prompt_estimate) + (cap or 0)
        return Decision(True, 200, None, "", None, cap,
                        self.headers(limits, now, extra_requests=1, extra_tokens=reserve),
                        reserve)

    def reserve(self, limits: Limits, now: float, cap: int | None,
                prompt_estimate: int = 0) -> Reservation:
        """Count one request and hold ``prompt_estimate + cap`` tokens against
        every token window and the quota (whatever the limits, so a later edit
        sees the history); one more in flight."""
        now = self._now(now)
        tokens = max(0, prompt_estimate) + (cap or 0)
        self.rpm.add(now, 1)
        self.rpd.add(now, 1)
        self.tpm.add(now, tokens)
        self.tpd.add(now, tokens)
        self.quota.reserve(now, tokens)
        self.in_flight += 1
        return Reservation(now, tokens, cap)

    def admit(self, limits: Limits, now: float, model: str | None,
              requested_cap: int | None = None, *, prompt_estimate: int = 0,
              completion: bool = True) -> tuple[Decision, Reservation | None]:
        """``check``, then ``reserve`` if allowed: one atomic step."""
        d = self.check(limits, now, model, requested_cap, prompt_estimate=prompt_estimate,
                       completion=completion)
        if not d.allowed:
            return d, None
        return d, self.reserve(limits, now, d.cap, prompt_estimate)

    def settle(self, reservation: Reservation, now: float, prompt_tokens: int,
               completion_tokens: int) -> None:
        """Replace the reservation by the real usage, in the bucket it was
        reserved in; one less in flight. A second call does nothing."""
        if reservation.settled:
            return
        reservation.settled = True
        now = self._now(now)
        delta = max(0, prompt_tokens) + max(0, completion_tokens) - reservation.tokens
        at = reservation.time
        if delta:
            self.tpm.adjust(now, delta, at)
            self.tpd.adjust(now, delta, at)
            self.quota.settle(now, delta, at)
        self.in_flight = max(0, self.in_flight - 1)

    def record(self, at: float, tokens: int, now: float) -> None:
        """Count a finished request from the ledger (``rebuild``)."""
        self._now(at)
        self.rpm.add(at, 1)
        self.rpd.add(at, 1)
        self.tpm.add(at, tokens)
        self.tpd.add(at, tokens)
        self.quota.reserve(at, tokens)
        self._now(now)

    def remaining(self, limits: Limits, now: float) -> dict[str, int | None]:
        """What is left of each counted limit (``None``: unlimited), for ``/v1/me``."""
        now = self._now(now)
        left: dict[str, int | None] = {
            "requests_per_minute": None, "requests_per_day": None, "tokens_per_minute": None,
            "tokens_per_day": None, "token_quota": None, "max_concurrent": None}
        for name, limit, used, _counter in (self._request_limits(limits, now)
                                     + self._token_limits(limits, now)):
            left[name] = max(0, limit - used)
        if limits.max_concurrent is not None:
            left["max_concurrent"] = max(0, limits.max_concurrent - self.in_flight)
        return left

    def snapshot(self, now: float) -> dict[str, int]:
        """Raw counts (tests, ``stats()``)."""
        now = self._now(now)
        return {"requests_minute": self.rpm.used(now), "requests_day": self.rpd.used(now),
                "tokens_minute": self.tpm.used(now), "tokens_day": self.tpd.used(now),
                "tokens_total": self.quota.used(now, "total"),
                "tokens_month": self.quota.used(now, "month"), "in_flight": self.in_flight}


def _counted(row: Any) -> bool:
    # Rows the gateway itself refused never reserved anything live.
    return getattr(row, "outcome", "ok") != "refused"


def rebuild(rows: Iterable[LedgerRow], now: float, *,
            totals: Mapping[str, int] | None = None,
            counts: Callable[[Any], bool] = _counted) -> dict[str, UserCounters]:
    """Counters per user from ledger rows, so a restart neither resets a window
    nor forgets a quota.

    ``rows`` must reach back a day for the windows, to the month's start for a
    month quota, and to the beginning for a total quota, unless ``totals``
    (all-time tokens per user, e.g. from ``ledger.user_totals``) is given; then
    the rows only feed windows and the month. Rows without a user and rows
    ``counts`` rejects (default: outcome ``refused``) are skipped.
    """
    out: dict[str, UserCounters] = {}
    for row in sorted(rows, key=lambda r: r.time):
        if row.user is None or row.time > now or not counts(row):
            continue
        uc = out.get(row.user)
        if uc is None:
            uc = out[row.user] = UserCounters()
        uc.record(row.time, (row.prompt_tokens or 0) + (row.completion_tokens or 0), now)
    if totals is not None:
        for user, total in totals.items():
            uc = out.get(user)
            if uc is None:
                uc = out[user] = UserCounters()
                uc._now(now)
            uc.quota.total = total
    for uc in out.values():
        uc.snapshot(now)  # expire what is already out of the windows, roll the month
    return out


@dataclass(slots=True)
class LimitStore:
    """The counters of every user, behind the small interface PRODUCT §4 asks
    for (today in memory, rebuilt from the ledger; later maybe Redis)."""

    users: dict[str, UserCounters] = field(default_factory=dict)

    def get(self, user: str) -> UserCounters:
        uc = self.users.get(user)
        if uc is None:
            uc = self.users[user] = UserCounters()
        return uc

    def stats(self) -> dict[str, int]:
        return {"users": len(self.users),
                "in_flight": sum(u.in_flight for u in self.users.values())}
