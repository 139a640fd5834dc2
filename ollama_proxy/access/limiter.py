"""The per-request limits step: each user's limits applied to each proxied
request, a thin shell over the value in ``limits``, the arithmetic of ``windows``
and the per-user counters of ``counters``.

In the relay it runs after auth, the body checks and the OpenAI rules (so it
sees ``max_tokens`` only, never ``max_completion_tokens``) and before any
backend is asked. Generations and embeddings reserve: they count one request,
hold ``prompt estimate + cap`` tokens and send that cap upstream; the prompt
estimate is the text's (4 characters a token) plus what exact counts of that
model on that route had beyond it (the chat template, ``prompt_overhead``), so
reservations cover real prompts. Every other route is only checked for the user's expiry and its
model, and gets the headers. ``settle`` runs the moment the usage record is
built (before the response's last bytes; also for failed and cancelled
requests), so the next request sees the real usage and ``max_concurrent``
always comes back down. ``amend`` corrects a settled request whose exact counts
came later (a stream counted with the backend's tokenizer).

No I/O per request: the counters are in memory, rebuilt from the ledger at start
(``counters_from_ledger``).
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from ..api.body_rules import requested_cap, set_cap
from ..api.exchange import Exchange
from ..api.models import model_allowed
from ..api.prompt_overhead import PromptOverheads
from ..api.record import RequestRecord
from ..api.routes import Route, RouteKind
from ..errors import LimitError, ProxyError
from ..store.accounts import KeyEntry
from .counters import CounterStore, Decision, UserCounters
from .limits import Limits

TOKEN_LIMITS = frozenset({"tokens_per_minute", "tokens_per_day", "token_quota"})
# Merged limits are cached per key; a process sees few keys, but never let it grow unbounded.
CACHE_MAX = 10_000

Clock = Callable[[], float]


def refusal(decision: Decision, route: Route, model: str | None,
            headers: tuple[tuple[str, str], ...] = ()) -> LimitError:
    """The error a refused ``decision`` is answered with, in OpenAI's terms
    (``type`` ``requests``/``tokens``/``insufficient_quota``, as api.openai.com);
    ``headers``: the ``x-ratelimit-*`` pairs when the decision has none."""
    extra = _encode(decision.headers or headers)
    if decision.code == "model_not_allowed" and route.model_in_path is not None:
        # hidden, as in the listing (an expired user still hears that it expired)
        return LimitError(f"The model '{model}' does not exist or you do not have access to it.",
                          status=404, code="model_not_found", openai_type="invalid_request_error",
                          extra_headers=extra, reason="forbidden")
    kind: str | None = None
    reason = "forbidden"
    if decision.status == 429:
        kind = ("insufficient_quota" if decision.code == "insufficient_quota"
                else "tokens" if decision.limit in TOKEN_LIMITS else "requests")
        reason = ("concurrency" if decision.limit == "max_concurrent"
                  else "quota" if decision.code == "insufficient_quota" else "rate_limit")
    assert decision.code is not None
    return LimitError(decision.message, status=decision.status, code=decision.code,
                      openai_type=kind, retry_after_s=decision.retry_after_s,
                      extra_headers=extra, reason=reason)


def _judged_model(ex: Exchange, limits: Limits) -> str | None:
    """The name ``allowed_models`` judges: the target, or for an alias whose target is
    not allowed the alias's own name (allowed explicitly, or named in the refusal)."""
    if ex.alias is not None and not model_allowed(limits.allowed_models, ex.model or ""):
        return ex.alias
    return ex.model


def _encode(headers: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers]


class Limiter:
    """The limits step (``await limiter(ex)``) and its settle hook (``settle``).

    ``clock`` gives Unix seconds (tests inject one driven by trio's clock).
    ``overheads``: the learned prompt overheads (shared with the usage records'
    estimates; something else feeds them, e.g. ``PromptOverheads.observe``), added
    to the text estimate so a reservation covers the real prompt and concurrent
    requests cannot push a limit past its value with the template's tokens.
    """

    def __init__(self, defaults: Limits, *, store: CounterStore | None = None,
                 clock: Clock = time.time, overheads: PromptOverheads | None = None) -> None:
        self.defaults = defaults
        self.store = store if store is not None else CounterStore()
        self.clock = clock
        self.overheads = overheads if overheads is not None else PromptOverheads()
        # key prefix -> (the entry's stored overrides, merged limits, any token limit set)
        self._merged: dict[str, tuple[dict[str, Any], Limits, bool]] = {}
        # Set while a start's ledger backlog is summed (``counters_from_ledger.Backlog``):
        # requests that a token quota counts await it first.
        self.quota_pending: Callable[[], Awaitable[None]] | None = None

    def set_defaults(self, defaults: Limits) -> None:
        """New ``[limits]`` defaults (config reload): they hold from the next request."""
        self.defaults = defaults
        self._merged = {}

    def _resolve(self, entry: KeyEntry) -> tuple[Limits, bool]:
        """The user's effective limits. The key index builds a new overrides dict
        on every reload, so an identity test is enough to see an edit."""
        hit = self._merged.get(entry.prefix)
        if hit is not None and hit[0] is entry.user_limits:
            return hit[1], hit[2]
        try:
            limits = Limits.merged(self.defaults, entry.user_limits)
        except ValueError as exc:
            raise ProxyError(f"the stored limits of user '{entry.user}' cannot be used: {exc}",
                             code="invalid_limits") from None
        tokens = any(getattr(limits, name) is not None for name in TOKEN_LIMITS)
        if len(self._merged) >= CACHE_MAX:
            self._merged = {}
        self._merged[entry.prefix] = (entry.user_limits, limits, tokens)
        return limits, tokens

    def limits_for(self, entry: KeyEntry) -> Limits:
        return self._resolve(entry)[0]

    def remaining(self, entry: KeyEntry) -> dict[str, int | None]:
        """What is left of each counted limit, for ``/v1/me``."""
        return self.store.get(entry.user).remaining(self.limits_for(entry), self.clock())

    async def __call__(self, ex: Exchange) -> None:
        """Refuse the exchange (``LimitError``), or let it go: reserved and capped if it
        is a generation or an embedding, with the ``x-ratelimit-*`` headers to send."""
        entry = ex.principal
        assert entry is not None  # the gateway identifies the caller before this step
        limits, tokens = self._resolve(entry)
        ex.weight = limits.weight
        route = ex.route
        if self.quota_pending is not None and route.metered:
            await self.quota_known(limits)
        counters = self.store.get(entry.user)
        now = self.clock()
        if route.metered:
            obj = ex.body_obj
            assert obj is not None  # metered routes take a JSON body
            completion = route.kind is RouteKind.GENERATION
            text, overhead = (self.overheads.text_estimate(route.name, ex.model, obj)
                              if tokens else (0, 0))
            # The client's own cap matters only where a count applies; elsewhere the
            # backend judges it, as without the gateway.
            requested = requested_cap(route, obj) if completion and not limits.unbounded else None
            model = _judged_model(ex, limits)
            decision, reservation = counters.admit(
                limits, now, model, requested, prompt_estimate=text + overhead,
                completion=completion)
            if reservation is None:
                raise refusal(decision, route, model, self._headers(counters, limits, now))
            if tokens:
                reservation.text_estimate = text
            ex.reservation = reservation
            if decision.cap is not None and set_cap(route, obj, decision.cap):
                ex.body_dirty = True
            headers = decision.headers
        else:
            # Model management (admins) names models to fetch or delete, not to use.
            model = None if route.kind is RouteKind.MANAGEMENT else _judged_model(ex, limits)
            refused = counters.access(limits, now, model)
            if refused is not None:
                raise refusal(refused, route, model, self._headers(counters, limits, now))
            if limits.allowed_models is not None and route.lists_models:
                ex.visible_models = limits.allowed_models
            headers = self._headers(counters, limits, now)
        if headers:
            ex.extra_headers = _encode(headers)

    @staticmethod
    def _headers(counters: UserCounters, limits: Limits,
                 now: float) -> tuple[tuple[str, str], ...]:
        """The ``x-ratelimit-*`` pairs of a user's counted limits, nothing counted now."""
        return () if limits.unbounded else counters.headers(limits, now)

    async def quota_known(self, limits: Limits) -> None:
        """Wait, if these limits count a token quota, until the start's backlog is summed."""
        pending = self.quota_pending
        if pending is not None and limits.token_quota is not None:
            await pending()

    def settle(self, ex: Exchange, record: RequestRecord) -> None:
        """Replace the exchange's reservation by the usage its record reports."""
        reservation = ex.reservation
        if reservation is not None and ex.principal is not None:
            self.store.get(ex.principal.user).settle(
                reservation, self.clock(), record.prompt_tokens, record.completion_tokens)

    def amend(self, ex: Exchange, record: RequestRecord, prompt_tokens: int,
              completion_tokens: int) -> None:
        """Exact counts of a settled request that its ``record`` had estimated: the
        difference goes where the reservation was counted."""
        reservation = ex.reservation
        if reservation is not None and ex.principal is not None:
            delta = (prompt_tokens + completion_tokens
                     - record.prompt_tokens - record.completion_tokens)
            self.store.get(ex.principal.user).correct(reservation, self.clock(), delta)
