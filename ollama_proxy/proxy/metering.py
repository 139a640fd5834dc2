"""What becomes of a proxied request's record, in three phases, always in this order:

``built``    the record is made, once per request (failed and cancelled ones too):
             the limits settle their reservation and the prompt overheads learn at
             once, so the next request sees the real usage. Must not block.
``durable``  the ledger has it: committed (``ledger_wait``) or queued. Awaited
             before a response's last bytes leave.
``after``    the response is over: the access log keeps the line, the recount looks
             at the stream, observers (tests) hear of it. Off the latency path.

The access log's lines are written ``while_waiting``: when a request has gone
out to its backend, time the gateway would spend idle.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol, Sequence

import trio

from ..api.exchange import Exchange
from ..api.record import Outcome, RequestRecord
from ..api.usage import StreamScanner, UsageTally, estimate_prompt_tokens
from ..backends.registry import Backend
from ..backends.router import Lease
from ..observe.access_log import AccessLog
from .recount import Recounter

log = logging.getLogger("ollama_proxy.relay")

# A bounded, shielded wait for the ledger when the request is being cancelled.
DURABLE_TIMEOUT_S = 5.0


class Ledger(Protocol):
    """Where records go durably (``store.threads.LedgerWriter``)."""

    async def record(self, record: RequestRecord) -> None: ...


# Told of a record the moment it is built (``built`` phase); must not block.
BuiltHook = Callable[[Exchange, RequestRecord], None]
# Told of each request once its response is over (``after``): its record (None: a caller
# without a valid key, who leaves none), why the gateway refused it (the error's
# ``reason``) and a stream's seconds to its first content frame (``GatewayMetrics.observe``).
MetricsHook = Callable[[RequestRecord | None, str | None, float | None], None]


class RecordDraft:
    """What is known of one request's record while the request runs."""

    __slots__ = ("exchange", "backend", "lease", "queued_s", "status", "tally", "ttfb_s", "scanner", "record",
                 "recorded", "started", "reason", "first_token_s")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.backend: Backend | None = None
        self.lease: Lease | None = None  # the backend's slot it holds, given back at its end
        self.queued_s = 0.0  # waited for a slot (summed over the backends tried)
        self.status = 0
        self.tally = UsageTally(exact=True)  # nothing used until a backend is asked
        self.ttfb_s: float | None = None
        self.scanner: StreamScanner | None = None  # a streamed response's
        self.record: RequestRecord | None = None
        self.recorded = False  # built, or none to build (a stranger leaves no row)
        self.started = time.perf_counter()
        self.reason: str | None = None  # the refusal's reason (``ProxyError.reason``)
        self.first_token_s: float | None = None  # a stream's first content frame, from started


class Metering:
    """The three phases, each with what runs in it; ``app`` builds one for the gateway.

    ``estimate_prompt``: the prompt count of a record the backend did not count.
    """

    def __init__(self, ledger: Ledger, *, on_built: Sequence[BuiltHook] = (),
                 estimate_prompt: Callable[[Exchange], int] = lambda ex: estimate_prompt_tokens(
                     ex.body_obj),
                 access_log: AccessLog | None = None, recounter: Recounter | None = None,
                 observers: Sequence[Callable[[RequestRecord], None]] = (),
                 metrics: MetricsHook | None = None) -> None:
        self._ledger = ledger
        self._on_built = tuple(on_built)
        self._estimate_prompt = estimate_prompt
        self._access_log = access_log
        self._recounter = recounter
        self._observers = tuple(observers)
        self._metrics = metrics

    def capture_bytes(self, backend: Backend, ex: Exchange) -> int:
        """How many bytes of a stream starting now to keep for the recount (0: none)."""
        return self._recounter.capture_bytes(backend, ex) if self._recounter else 0

    def built(self, draft: RecordDraft, outcome: Outcome) -> RequestRecord:
        """Phase one: the record, made from the draft (walking the request body for a
        prompt estimate only when the backend gave no count)."""
        ex, tally = draft.exchange, draft.tally
        if not tally.exact:
            tally.estimate(self._estimate_prompt(ex))
        record = draft.record = RequestRecord(
            request_id=ex.request_id.decode(),
            time=ex.started_at,
            endpoint=ex.request.path,
            model=ex.model,
            backend=draft.backend.name if draft.backend else None,
            status=draft.status,
            outcome=outcome,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            estimated=not tally.exact or tally.clamped,
            stream=ex.stream,
            duration_s=round(time.perf_counter() - draft.started, 6),
            ttfb_s=draft.ttfb_s,
            client=ex.request.client,
            user=ex.principal.user if ex.principal else None,
            key_prefix=ex.principal.prefix if ex.principal else None,
            metered=ex.route.metered,
            alias=ex.alias,
            queued_s=round(draft.queued_s, 6),
            method=ex.request.method,
            total_ns=tally.total_ns,
            load_ns=tally.load_ns,
            prompt_eval_ns=tally.prompt_eval_ns,
            eval_ns=tally.eval_ns,
        )
        draft.recorded = True
        for hook in self._on_built:
            hook(ex, record)
        return record

    def stranger(self, draft: RecordDraft) -> None:
        """A request no key let in (401): its record goes to the access log alone (a
        line without a user), never to the ledger or the after phase's observers, so
        unknown keys fill neither the ledger nor anyone's counts."""
        record = self.built(draft, Outcome.REFUSED)
        draft.record = None
        if self._access_log is not None:
            self._access_log.keep(record)

    async def durable(self, record: RequestRecord) -> None:
        """Phase two: the ledger has the record. A client leaving (a cancel) cannot stop
        it; a ledger that does not take it in ``DURABLE_TIMEOUT_S`` is logged."""
        # A bare scope: move_on_after's generator costs more, once per request.
        with trio.CancelScope(deadline=trio.current_time() + DURABLE_TIMEOUT_S,
                              shield=True) as scope:
            await self._ledger.record(record)
        if scope.cancelled_caught:
            log.error("%s: the ledger did not take the record within %g s",
                      record.request_id, DURABLE_TIMEOUT_S)

    def after(self, draft: RecordDraft) -> None:
        """Phase three, once the response is over (nothing for a request without a record)."""
        record = draft.record
        if self._metrics is not None:
            self._metrics(record, draft.reason, draft.first_token_s)
        if record is None:
            return
        if self._access_log is not None:
            self._access_log.keep(record)
        if self._recounter is not None:
            self._recounter.ended(draft.exchange, draft.backend, record, draft.scanner)
        for observer in self._observers:
            observer(record)

    def while_waiting(self) -> None:
        """A request went out to its backend: do the deferred work (the access log's
        lines) now; it never fails the request it rides on."""
        if self._access_log is None:
            return
        try:
            self._access_log.flush()
        except Exception:
            log.exception("writing the access log failed")
