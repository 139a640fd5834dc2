"""What a batch of ledger jobs does to the database, in the writer thread.

``threads.LedgerWriter`` carries the jobs across from the event loop and wakes the
waiters; ``GroupCommit`` is the rest, synchronous: one transaction per batch (rows,
amendments, key touches), its retries, the row-by-row fallback, and folding the
committed rows into the usage summaries between batches.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Union

from ..api.record import Outcome, RequestRecord
from . import db, ledger

log = logging.getLogger("ollama_proxy.storage")

# After a failed commit, wait this long before trying the same rows again.
RETRY_DELAY_S = 1.0
# A key's last_used_at is refreshed at most this often (the admin page shows it, nobody needs ms).
TOUCH_EVERY_S = 10.0
# New rows are folded into the summaries at most this often, after the commit that
# wrote them (reports read the rows not folded yet from the ledger: exact either way).
# Folding within each commit would add ~45 µs to every response's wait at low load.
FOLD_EVERY_S = 1.0
# With nothing written, look this often for rows others wrote (the CLI, straight SQL).
FOLD_IDLE_S = 10.0
# Row ids folded per transaction: a long catch-up (an older file, a restored ledger)
# holds up the next commit by one such step at most (~20 ms, 60 at worst, measured).
FOLD_STEP_ROWS = 2000
# After a fold failed for a reason that will not pass by itself, try again this late.
FOLD_RETRY_S = 60.0
# Request ids whose row ids are remembered for ``amend`` (a few MB; seconds of peak
# load); older rows, or rows written before the start, are looked for among as many
# of the newest ledger rows.
RECENT_ROWS = 20_000


class Row(NamedTuple):
    seq: int
    record: RequestRecord


class Amend(NamedTuple):
    seq: int
    row: ledger.RowKey
    prompt_tokens: int
    completion_tokens: int


class Touch(NamedTuple):
    seq: int
    prefix: str
    when: float


Job = Union[Row, Amend, Touch]


@dataclass
class _Written:
    """What one batch wrote, applied to the writer's state once committed."""

    ids: dict[str, int] = field(default_factory=dict)  # request id -> row id
    rows: int = 0
    minimal: int = 0
    lost: int = 0
    amended: int = 0


class GroupCommit:
    """The writer thread's side of the ledger; used by that thread alone.

    No row is lost to a bad value: a batch that SQLite refuses for a reason that
    will not pass is written again row by row, each row that fails in a minimal
    form (``counts`` says how many). Busy, locked, full or failing files are
    retried: the rows wait.
    """

    def __init__(self) -> None:
        # Rows written (minimal ones included), written minimal, lost (never written),
        # commits, amendments, ledger rows not yet folded into the summaries.
        self.counts = {"rows_written": 0, "rows_minimal": 0, "rows_lost": 0, "commits": 0,
                       "amended": 0, "unfolded": 0}
        self.fold_due = 0.0  # time.monotonic() of the next fold: at once, at start
        self._recent: OrderedDict[str, int] = OrderedDict()  # request id -> row id
        self._touched: dict[str, float] = {}  # key prefix -> when its last_used_at was written
        self._catching_up = False  # a long fold is under way (logged at its start and end)

    def commit(self, conn: sqlite3.Connection, batch: list[Job]) -> None:
        """Write ``batch`` for good, then have its rows folded within FOLD_EVERY_S."""
        self._commit(conn, batch)
        self.fold_due = min(self.fold_due, time.monotonic() + FOLD_EVERY_S)

    def _commit(self, conn: sqlite3.Connection, batch: list[Job]) -> None:
        """One transaction for the batch; if SQLite refuses it for good, row by row."""
        touches = self._due_touches(batch)
        while True:
            written = _Written()
            try:
                with db.transaction(conn):
                    self._apply(conn, batch, written)
                    ledger.touch_keys(conn, touches)
            except Exception as exc:
                if not db.transient(exc):
                    log.warning("a ledger batch of %d rows was refused (%s: %s): writing it "
                                "row by row", len(batch), type(exc).__name__, exc)
                    break
                log.error("ledger commit of %d rows failed (will retry): %s", len(batch), exc)
                time.sleep(RETRY_DELAY_S)
                continue
            self.counts["commits"] += 1
            self._settle(written)
            return
        for job in batch:
            if not isinstance(job, Touch):  # those are in ``touches``
                self._commit_alone(conn, job)
        if touches:
            self._commit_alone(conn, touches)

    def _apply(self, conn: sqlite3.Connection, batch: list[Job], written: _Written) -> None:
        """The batch's rows and amendments in queue order (an amendment sees the
        rows queued before it)."""
        rows: list[RequestRecord] = []

        def insert() -> None:
            if rows:
                ids = ledger.insert_rows(conn, rows)
                written.ids.update(zip((r.request_id for r in rows), ids))
                written.rows += len(rows)
                rows.clear()

        for job in batch:
            if isinstance(job, Row):
                rows.append(job.record)
            elif isinstance(job, Amend):
                insert()
                self._amend(conn, job, written)
        insert()

    def _commit_alone(self, conn: sqlite3.Connection,
                      job: Row | Amend | dict[str, float]) -> None:
        """One row, amendment or the batch's key touches in its own transaction;
        waits out errors that pass, so no row is written twice or skipped."""
        while True:
            written = _Written()
            try:
                if isinstance(job, Row):
                    self._write_row(conn, job.record, written)
                else:
                    self._write_other(conn, job, written)
            except Exception as exc:
                if not db.transient(exc):  # a bug: say so loudly, never stall the writer
                    log.exception("ledger: writing %r failed", job)
                    written.lost += isinstance(job, Row)
                else:
                    log.error("ledger commit failed (will retry): %s", exc)
                    time.sleep(RETRY_DELAY_S)
                    continue
            self._settle(written)
            return

    def _write_row(self, conn: sqlite3.Connection, record: RequestRecord,
                   written: _Written) -> None:
        """The row, else its minimal form, else count it lost; loudly in both cases."""
        try:
            with db.transaction(conn):
                written.ids[record.request_id] = ledger.insert_row(conn, record)
            written.rows += 1
            return
        except Exception as exc:
            if db.transient(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"
        try:
            with db.transaction(conn):
                written.ids[record.request_id] = ledger.insert_minimal(conn, record)
            written.rows += 1
        except Exception as exc:
            if db.transient(exc):
                raise
            written.lost += 1
            log.error("ledger row LOST: SQLite refused it (%s), and its minimal form too "
                      "(%s: %s): %r", reason, type(exc).__name__, exc, record)
            return
        written.minimal += 1
        log.error("request %s: SQLite refused its ledger row (%s); written in minimal form "
                  "(outcome %s)", record.request_id, reason, Outcome.UNRECORDED)

    def _write_other(self, conn: sqlite3.Connection, job: Amend | dict[str, float],
                     written: _Written) -> None:
        """An amendment, or keys' last_used_at: logged if refused for good."""
        try:
            with db.transaction(conn):
                if isinstance(job, Amend):
                    self._amend(conn, job, written)
                else:
                    ledger.touch_keys(conn, job)
        except Exception as exc:
            if db.transient(exc):
                raise
            log.error("ledger: %s refused: %s: %s", "amendment" if isinstance(job, Amend)
                      else "last_used_at of keys", type(exc).__name__, exc)

    def _amend(self, conn: sqlite3.Connection, job: Amend, written: _Written) -> None:
        prompt, prompt_changed = ledger.storable_count(job.prompt_tokens)
        completion, completion_changed = ledger.storable_count(job.completion_tokens)
        clamped = prompt_changed or completion_changed
        request_id = job.row.request_id
        if clamped:
            log.warning("request %s: exact counts out of range (%r, %r), clamped", request_id,
                        job.prompt_tokens, job.completion_tokens)
        remembered = written.ids.get(request_id) or self._recent.get(request_id)
        for row_id in (remembered, -1):
            if row_id == -1:  # not the remembered row (an id used again): look for it
                row_id = ledger.find_row(conn, job.row, RECENT_ROWS)
            if row_id is not None and ledger.amend_row(conn, row_id, job.row, prompt,
                                                       completion, estimated=clamped):
                written.amended += 1
                return
        log.warning("request %s: exact counts came, but its estimated ledger row is unknown "
                    "(never written, or too long ago): not recorded", request_id)

    def _settle(self, written: _Written) -> None:
        """A batch (or one job) committed: count it, remember its row ids."""
        counts = self.counts
        counts["rows_written"] += written.rows
        counts["rows_minimal"] += written.minimal
        counts["rows_lost"] += written.lost
        counts["amended"] += written.amended
        recent = self._recent
        for request_id, row_id in written.ids.items():
            recent[request_id] = row_id
            recent.move_to_end(request_id)
        while len(recent) > RECENT_ROWS:
            recent.popitem(last=False)

    def _due_touches(self, batch: list[Job]) -> dict[str, float]:
        """The keys whose last_used_at to write now: each at most every TOUCH_EVERY_S."""
        latest: dict[str, float] = {}
        for job in batch:
            if isinstance(job, Row):
                prefix, when = job.record.key_prefix, job.record.time
            elif isinstance(job, Touch):
                prefix, when = job.prefix, job.when
            else:
                continue
            if prefix is not None and when > latest.get(prefix, float("-inf")):
                latest[prefix] = when
        now = time.monotonic()
        due = {}
        for prefix, when in latest.items():
            if now - self._touched.get(prefix, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
                self._touched[prefix] = now
                due[prefix] = when
        return due

    def fold_step(self, conn: sqlite3.Connection) -> None:
        """Fold the next rows into the summaries; the next step at once while behind."""
        now = time.monotonic()
        try:
            with db.transaction(conn):
                left = ledger.fold(conn, FOLD_STEP_ROWS)
        except Exception as exc:
            log.error("folding ledger rows into the usage summaries failed (reports stay "
                      "exact, but slower): %s: %s", type(exc).__name__, exc)
            self.fold_due = now + (RETRY_DELAY_S if db.transient(exc) else FOLD_RETRY_S)
            return
        if left >= FOLD_STEP_ROWS and not self._catching_up:
            self._catching_up = True
            log.info("folding %d ledger rows into the usage summaries (reports are slower "
                     "until then)", left)
        elif not left and self._catching_up:
            self._catching_up = False
            log.info("the usage summaries have caught up with the ledger")
        self.counts["unfolded"] = left
        self.fold_due = now if left else now + FOLD_IDLE_S
