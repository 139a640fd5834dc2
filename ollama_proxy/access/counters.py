"""Per-user counters and the admit decision, built on the arithmetic of ``windows``.

``UserCounters.admit`` checks a request against every limit that applies and
reserves what it may use; ``settle`` replaces the reservation by the real
usage (``correct`` changes that when exact counts come later); ``rebuild``
recreates the counters from ledger rows at start, so a restart neither resets
a window nor forgets a quota. See ``windows.py`` for the theory of operation
(windows, reserve-then-settle, caps, headers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

from ..api.models import model_allowed
from ..api.record import Outcome
from .limits import Limits
from .windows import DAY_BUCKET_S, DAY_S, MINUTE_BUCKET_S, MINUTE_S, Quota, Window, format_reset

# -- decisions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one request.

    ``status``/``code``/``message`` describe a refusal (``allowed`` False).
    ``retry_after_s``: whole seconds for ``Retry-After``; on a refused 429,
    ``None`` means retrying will not help (send ``x-should-retry: false``).
    ``limit``: the name of the limit that refused.
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
    limit: str | None = None


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds until it is settled."""

    time: float  # when it was reserved (the bucket it lives in)
    tokens: int  # reserved tokens (prompt estimate + cap)
    cap: int | None
    settled: bool = False
    text_estimate: int | None = None  # the prompt's text estimate (4 characters a token)


class LedgerRow(Protocol):
    """What ``rebuild`` reads of a ledger row (read-only: rows are frozen)."""

    @property
    def time(self) -> float: ...
    @property
    def user(self) -> str | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def outcome(self) -> Outcome: ...
    @property
    def metered(self) -> bool: ...


_OPEN = Decision(True)  # no limit counts, nothing asked for: the common case, built once


def _refuse(status: int, code: str, limit: str, message: str, retry: int | None = None,
            headers: tuple[tuple[str, str], ...] = ()) -> Decision:
    return Decision(False, status, code, message, retry, None, headers, limit)


class UserCounters:
    """Everything counted for one user: request and token windows, the quota,
    requests in flight."""

    __slots__ = ("rpm", "rpd", "tpm", "tpd", "quota", "in_flight", "held", "_latest")

    def __init__(self) -> None:
        self.rpm = Window(MINUTE_S, MINUTE_BUCKET_S)
        self.rpd = Window(DAY_S, DAY_BUCKET_S)
        self.tpm = Window(MINUTE_S, MINUTE_BUCKET_S)
        self.tpd = Window(DAY_S, DAY_BUCKET_S)
        self.quota = Quota()
        self.in_flight = 0
        self.held = 0  # tokens reserved by requests in flight
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
        return self._headers(limits, now, self._request_limits(limits, now), extra_requests,
                             self._token_limits(limits, now), extra_tokens)

    @staticmethod
    def _reset_s(counter: Window | Quota, limits: Limits, now: float, extra: int) -> float | None:
        if isinstance(counter, Quota):
            return counter.reset_s(now, limits.quota_period)
        # What is added now leaves the window last: it alone decides.
        return counter.expiry_s(now) if extra > 0 else counter.reset_s(now)

    def _headers(self, limits: Limits, now: float, requests: list[tuple[str, int, int, Any]],
                 extra_requests: int, tokens: list[tuple[str, int, int, Any]],
                 extra_tokens: int) -> tuple[tuple[str, str], ...]:
        """``headers`` from the limits ``check`` already looked up (it runs per request)."""
        out: list[tuple[str, str]] = []
        for family, items, extra in (("requests", requests, extra_requests),
                                     ("tokens", tokens, extra_tokens)):
            if not items:
                continue
            # Tightest: least remaining; on a tie, the one that resets last (a reset is
            # worked out only for the tied ones: this runs per request).
            least = min(limit - used for _name, limit, used, _counter in items)
            best: tuple[float, int, int, float | None] | None = None
            for _name, limit, used, counter in items:
                if limit - used != least:
                    continue
                reset = self._reset_s(counter, limits, now, extra)
                key = -math.inf if reset is None else -reset
                if best is None or key < best[0]:
                    best = (key, limit, used, reset)
            assert best is not None
            _key, limit, used, reset = best
            out.append((f"x-ratelimit-limit-{family}", str(limit)))
            out.append((f"x-ratelimit-remaining-{family}", str(max(0, limit - used - extra))))
            if reset is not None:
                out.append((f"x-ratelimit-reset-{family}", format_reset(reset)))
        return tuple(out)

    def access(self, limits: Limits, now: float, model: str | None) -> Decision | None:
        """The refusal of a user who may not call at all (expired) or not this
        ``model`` (None: no model to check), else None. Counts nothing."""
        expired = limits.expired(self._now(now))
        if expired is not None:
            return _refuse(expired.status, expired.code, "expires_at", expired.message)
        if model is not None and not model_allowed(limits.allowed_models, model):
            return _refuse(403, "model_not_allowed", "allowed_models",
                           f"model {model!r} is not in allowed_models for this user")
        return None

    def check(self, limits: Limits, now: float, model: str | None,
              requested_cap: int | None = None, *, prompt_estimate: int = 0,
              completion: bool = True) -> Decision:
        """Whether a request may go now, and with which completion cap.

        ``model`` None skips the model check (routes without a model).
        ``requested_cap``: the client's ``max_tokens`` / ``num_predict`` (0 or
        negative, Ollama's "no limit", counts as none). ``completion`` False
        for embeddings: no cap, charged ``prompt_estimate``.
        """
        now = self._now(now)
        refused = self.access(limits, now, model)
        if refused is not None:
            return refused
        requested = requested_cap if completion and requested_cap and requested_cap > 0 else None
        if limits.unbounded:
            if requested is None and prompt_estimate <= 0:
                return _OPEN
            return Decision(True, cap=requested)
        mc = limits.max_concurrent
        if mc is not None and self.in_flight >= mc:
            if mc == 0:
                return _refuse(429, "insufficient_quota", "max_concurrent", "max_concurrent is 0",
                               None, self.headers(limits, now))
            return _refuse(429, "rate_limit_exceeded", "max_concurrent",
                           f"max_concurrent ({mc}) requests already in flight", 1,
                           self.headers(limits, now))
        if completion and limits.max_tokens_per_request == 0:
            return _refuse(429, "insufficient_quota", "max_tokens_per_request",
                           "max_tokens_per_request is 0", None, self.headers(limits, now))

        # Every request and token limit that refuses: (retry or None, name, limit,
        # whether requests in flight hold what it needs).
        blocked: list[tuple[int | None, str, int, bool]] = []
        requests = self._request_limits(limits, now)
        tokens = self._token_limits(limits, now)
        for name, limit, used, window in requests:
            if used >= limit:
                blocked.append((window.seconds_until(now, 1, limit), name, limit, False))
        need = max(1, prompt_estimate + 1 if completion else prompt_estimate)
        budget: int | None = None
        for name, limit, used, window in tokens:
            left = limit - used
            budget = left if budget is None else min(budget, left)
            if left >= need:
                continue
            # What requests in flight hold comes back when they settle (in seconds, not
            # when the window slides: one request holds a whole day's budget when no
            # max_tokens_per_request bounds its cap); a total quota has nothing else.
            wait = None if name == "token_quota" else window.seconds_until(now, need, limit)
            if left + self.held >= need and (wait is not None or name == "token_quota"):
                blocked.append((1, name, limit, True))
            else:
                blocked.append((wait, name, limit, False))
        if blocked:
            hdrs = self._headers(limits, now, requests, 0, tokens, 0)
            # A permanent refusal wins; otherwise the longest wait.
            forever = [b for b in blocked if b[0] is None]
            retry, name, limit, in_flight = (forever[0] if forever
                                             else max(blocked, key=lambda b: b[0] or 0))
            if retry is None:
                code = "insufficient_quota"
                if limit == 0:
                    why = f"{name} is 0"
                elif name == "token_quota":
                    period = "" if limits.quota_period == "total" else " for this month"
                    why = f"token_quota ({limit}){period} is used up"
                else:
                    why = f"this request needs {need} tokens, more than {name} ({limit})"
                    code = "rate_limit_exceeded"
                return _refuse(429, code, name, why, None, hdrs)
            held = " (held by requests in flight)" if in_flight else ""
            return _refuse(429, "rate_limit_exceeded", name,
                           f"{name} limit ({limit}) reached{held}; retry in {retry}s", retry, hdrs)

        cap = requested
        if completion:
            for bound in (limits.max_tokens_per_request,
                          None if budget is None else budget - prompt_estimate):
                if bound is not None:
                    cap = bound if cap is None else min(cap, bound)
        reserve = max(0, prompt_estimate) + (cap or 0)
        return Decision(True, 200, None, "", None, cap,
                        self._headers(limits, now, requests, 1, tokens, reserve))

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
        self.held += tokens
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
        self.correct(reservation, now,
                     max(0, prompt_tokens) + max(0, completion_tokens) - reservation.tokens)
        self.in_flight = max(0, self.in_flight - 1)
        self.held = max(0, self.held - reservation.tokens)

    def correct(self, reservation: Reservation, now: float, delta: int) -> None:
        """Change a settled request's tokens by ``delta`` (its exact counts came after
        ``settle``), in the bucket it was reserved in, as ``settle`` did."""
        now = self._now(now)
        if delta:
            self.tpm.adjust(now, delta, reservation.time)
            self.tpd.adjust(now, delta, reservation.time)
            self.quota.settle(now, delta, reservation.time)

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

    def expire(self, now: float) -> None:
        """Forget what has left the windows and roll the quota to ``now``'s month
        (the counters then hold only what counts at ``now``)."""
        now = self._now(now)
        for window in (self.rpm, self.rpd, self.tpm, self.tpd):
            window.expire(now)
        self.quota.roll(now)


def rebuild(rows: Iterable[LedgerRow], now: float, *,
            totals: Mapping[str, int] | None = None,
            months: Mapping[str, int] | None = None) -> dict[str, UserCounters]:
    """Counters per user from ledger rows, so a restart neither resets a window
    nor forgets a quota.

    ``rows`` must reach back a day (and a bucket) for the windows, to the
    month's start for a month quota, and to the beginning for a total quota,
    unless ``totals`` (all-time tokens per user, e.g. from
    ``reports.user_totals``) and ``months`` (tokens per user since the start of
    ``now``'s month) are given; then the rows only feed the windows. Only
    metered rows count, and of those not the refused ones (a refusal reserved
    nothing live); rows without a user are skipped.
    """
    out: dict[str, UserCounters] = {}

    def user(name: str) -> UserCounters:
        uc = out.get(name)
        if uc is None:
            uc = out[name] = UserCounters()
        return uc

    for row in sorted(rows, key=lambda r: r.time):
        if (row.user is None or row.time > now or not row.metered
                or row.outcome == Outcome.REFUSED):
            continue
        user(row.user).record(row.time, (row.prompt_tokens or 0) + (row.completion_tokens or 0),
                              now)
    for name, total in (totals or {}).items():
        user(name).quota.total = total
    for name, used in (months or {}).items():
        quota = user(name).quota
        quota.roll(now)  # the rows may have left it in an earlier month
        quota.month_used = used
    for uc in out.values():
        uc.expire(now)
    return out


@dataclass(slots=True)
class CounterStore:
    """The counters of every user, behind an interface small enough for a store
    shared by several processes (today in memory, rebuilt from the ledger; later
    maybe Redis)."""

    users: dict[str, UserCounters] = field(default_factory=dict)

    def get(self, user: str) -> UserCounters:
        uc = self.users.get(user)
        if uc is None:
            uc = self.users[user] = UserCounters()
        return uc
