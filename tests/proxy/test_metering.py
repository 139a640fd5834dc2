"""The metering's phases: built (the hooks), durable (the ledger, even for a cancelled
request), after (the access log, the observers), in that order, once per record."""

from __future__ import annotations

import trio
import trio.testing

from ollama_proxy.api.exchange import Exchange
from ollama_proxy.api.record import Outcome, RequestRecord
from ollama_proxy.api.routes import ROUTES
from ollama_proxy.http.messages import Request
from ollama_proxy.observe.access_log import AccessLog
from ollama_proxy.proxy.metering import Metering, RecordDraft


def draft(path: str = "/api/chat") -> RecordDraft:
    route = ROUTES[path]
    return RecordDraft(Exchange(Request("POST", path, path, "", [], b"", "127.0.0.1"), route,
                                b"rid-1"))


class Journal:
    """Notes each phase as it reaches its part; the ledger waits for ``commit``."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.commit = trio.Event()

    async def record(self, record: RequestRecord) -> None:
        self.seen.append("ledger queued")
        await self.commit.wait()
        self.seen.append("ledger committed")

    def built(self, ex: Exchange, record: RequestRecord) -> None:
        self.seen.append(f"built {record.outcome}")

    def observe(self, record: RequestRecord) -> None:
        self.seen.append(f"after {record.request_id}")


class KeptLog(AccessLog):
    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal

    def keep(self, record: RequestRecord) -> None:
        self.journal.seen.append("access log")


async def test_the_phases_run_in_order_and_after_is_told_once_the_record_is_durable():
    """built hooks see the record at once, the ledger next, the access log and the
    observers only in the after phase."""
    journal = Journal()
    metering = Metering(journal, on_built=[journal.built], access_log=KeptLog(journal),
                        observers=[journal.observe])
    d = draft()
    record = metering.built(d, Outcome.CLIENT_CLOSED)
    assert d.recorded and d.record is record and record.outcome == "client_closed"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(metering.durable, record)
        await trio.testing.wait_all_tasks_blocked()
        assert journal.seen == ["built client_closed", "ledger queued"]
        journal.commit.set()
    metering.after(d)
    assert journal.seen == ["built client_closed", "ledger queued", "ledger committed",
                            "access log", "after rid-1"]


async def test_a_cancelled_request_still_reaches_the_ledger():
    """A client leaving cancels its handler: the durable phase is shielded from it."""
    journal = Journal()
    metering = Metering(journal)
    record = metering.built(draft(), Outcome.CLIENT_CLOSED)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(metering.durable, record)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # the client left while the ledger commits
        journal.commit.set()
    assert journal.seen == ["ledger queued", "ledger committed"]


def test_a_request_without_a_record_tells_the_after_phase_nothing():
    """A stranger (401) leaves no record: nobody hears of it."""
    journal = Journal()
    metering = Metering(journal, access_log=KeptLog(journal), observers=[journal.observe])
    d = draft()
    d.recorded = True
    metering.after(d)
    assert journal.seen == []


def test_a_stranger_is_told_to_the_access_log_alone():
    """A 401: a record for the access log's line, no ledger row, no after phase."""
    journal = Journal()
    metering = Metering(journal, on_built=[journal.built], access_log=KeptLog(journal),
                        observers=[journal.observe])
    d = draft()
    d.status = 401
    metering.stranger(d)
    assert d.recorded and d.record is None
    metering.after(d)
    assert journal.seen == ["built refused", "access log"]


def test_a_count_the_backend_never_gave_is_estimated_from_the_request():
    """No exact count: the prompt estimate is asked for, and the record says estimated."""
    metering = Metering(Journal(), estimate_prompt=lambda ex: 42)
    d = draft()
    d.tally.exact = False
    d.tally.frames = 7
    record = metering.built(d, Outcome.OK)
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (42, 7, True)


def test_the_record_carries_the_backends_timings_or_none():
    """The tally's timings (Ollama's final frame) go into the record as they are; a
    tally without them (another dialect, a failure) leaves the record's None."""
    metering = Metering(Journal())
    d = draft()
    d.tally.total_ns, d.tally.load_ns, d.tally.prompt_eval_ns, d.tally.eval_ns = 9, 1, 3, 5
    record = metering.built(d, Outcome.OK)
    assert (record.total_ns, record.load_ns, record.prompt_eval_ns, record.eval_ns) == (9, 1, 3, 5)
    assert (record.gpu_seconds, record.load_seconds) == (8e-9, 1e-9)
    bare = metering.built(draft("/v1/chat/completions"), Outcome.OK)
    assert (bare.total_ns, bare.load_ns, bare.prompt_eval_ns, bare.eval_ns) == (None,) * 4
    assert (bare.gpu_seconds, bare.load_seconds) == (None, None)
