"""The trio side of the database: the event loop never waits on SQLite.

``Store`` runs calls one at a time in a worker thread, on its own connection
(the gateway has one for accounts and one for reports, so a long report
never holds up a key revocation). ``LedgerWriter`` owns another connection
and commits usage rows in groups: ``record`` returns once the row is
committed, and rows that arrive while a commit is running go into the next
one, so under load one commit covers many responses (group commit). Between
commits it folds the new rows into the usage summaries.
"""

from __future__ import annotations

import logging
import queue
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, TypeVar, Union

import trio

from ..api.record import Outcome, RequestRecord
from . import db, ledger

log = logging.getLogger("ollama_proxy.storage")

T = TypeVar("T")
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


class Store:
    """Serialises calls on one SQLite connection in a worker thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def open(self) -> None:
        self._conn = await trio.to_thread.run_sync(db.connect, self.path, limiter=self._limiter)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(connection, *args, **kwargs)`` in the store's thread."""
        conn = self._conn
        assert conn is not None, "Store.open() first"
        return await trio.to_thread.run_sync(lambda: fn(conn, *args, **kwargs),
                                             limiter=self._limiter)

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close, limiter=self._limiter)


class _Row(NamedTuple):
    seq: int
    record: RequestRecord


class _Amend(NamedTuple):
    seq: int
    row: ledger.RowKey
    prompt_tokens: int
    completion_tokens: int


class _Touch(NamedTuple):
    prefix: str
    when: float


_Job = Union[_Row, _Amend, _Touch]


@dataclass
class _Written:
    """What one batch wrote, applied to the writer's state once committed."""

    ids: dict[str, int] = field(default_factory=dict)  # request id -> row id
    rows: int = 0
    minimal: int = 0
    lost: int = 0
    amended: int = 0


class LedgerWriter:
    """One writer thread, group commit; ``record`` returns once the row is committed.

    Rows go to the thread through a queue; it commits whatever has queued up
    meanwhile in one transaction (group commit: under load one commit covers
    many responses), publishes the number of the last row it committed, and
    sends one byte on a socket pair. Waiting ``record`` calls watch that socket
    themselves: the first takes the watch, the others wait until it ends. So at
    low load a response resumes one run-loop pass after its commit (a
    ``run_sync_soon`` callback costs a pass of its own, then one more).

    No row is lost to a bad value: ``record`` makes each storable first, and a
    batch that SQLite still refuses for a reason that will not pass is written
    again row by row, each row that fails in a minimal form (``stats()`` counts
    them). Busy, locked, full or failing files are retried: the rows wait.
    """

    MAX_BATCH = 1000  # rows per transaction

    def __init__(self, path: str, *, wait: bool = True) -> None:
        self._path = path
        self._wait = wait  # False: record() returns before the commit (no crash durability)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._queued = 0  # number of the last row or amendment queued (trio thread)
        self._done = 0  # number of the last one committed (or given up); set by the thread
        self._watching = False  # a waiter watches the wake-up socket
        self._watch_ended = trio.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Written by the thread only:
        self._counts = {"rows_written": 0, "rows_minimal": 0, "rows_lost": 0, "commits": 0,
                        "amended": 0, "unfolded": 0}
        self._recent: OrderedDict[str, int] = OrderedDict()  # request id -> row id
        self._touched: dict[str, float] = {}  # key prefix -> when its last_used_at was written
        self._fold_due = 0.0  # time.monotonic() of the next fold: at once, at start
        self._catching_up = False  # a long fold is under way (logged at its start and end)

    def stats(self) -> dict[str, int]:
        """Rows written (minimal ones included), written minimal, lost (never written),
        commits, amendments, ledger rows not yet folded into the summaries."""
        return dict(self._counts)

    async def record(self, record: RequestRecord) -> None:
        """Return once ``record`` is committed (without ``wait``: once it is queued)."""
        record, fixed = ledger.storable(record, time.time())
        if fixed:
            log.warning("request %s: its ledger row had unstorable values, fixed: %s",
                        record.request_id, ", ".join(fixed))
        self._queued += 1
        self._jobs.put(_Row(self._queued, record))
        if self._wait:
            await self._until(self._queued)

    async def amend(self, record: RequestRecord, prompt_tokens: int,
                    completion_tokens: int) -> None:
        """Exact counts found after ``record``'s estimated row was committed: that row
        gets them, and ``estimated`` false; the summaries follow in the same
        transaction. Returns once committed; a row not found is logged."""
        self._queued += 1
        key = ledger.RowKey(record.request_id, record.user, record.time)
        self._jobs.put(_Amend(self._queued, key, prompt_tokens, completion_tokens))
        await self._until(self._queued)

    def touch(self, prefix: str, when: float) -> None:
        """Note a key's use on a path that leaves no ledger row (the admin API,
        /v1/me): written with a later batch, never waited for."""
        self._jobs.put(_Touch(prefix, when))

    async def flush(self) -> None:
        """Return once every row recorded so far is committed (at shutdown, or without wait)."""
        await self._until(self._queued)

    async def _until(self, number: int) -> None:
        while self._done < number:
            if self._watching:
                ended = self._watch_ended
                await ended.wait()
                continue
            self._watching = True
            try:
                await trio.lowlevel.wait_readable(self._wake_r)
                self._take_wakeups()
            finally:  # done, cancelled or failed: the others re-check, one takes the watch
                self._watching = False
                ended, self._watch_ended = self._watch_ended, trio.Event()
                ended.set()

    def _take_wakeups(self) -> None:
        try:
            self._wake_r.recv(4096)  # one byte per commit; any left make the next wait short
        except BlockingIOError:
            pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread until cancelled (after the last waiter was served)."""
        conn = await trio.to_thread.run_sync(db.connect, self._path)
        thread = threading.Thread(target=self._write_loop, args=(conn,),
                                  name="ollama-proxy-ledger", daemon=True)
        thread.start()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._jobs.put(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)
                await trio.to_thread.run_sync(conn.close)
                trio.lowlevel.notify_closing(self._wake_r)  # a late waiter gets an error, not a hang
                self._wake_r.close()
                self._wake_w.close()

    # --- the writer thread ------------------------------------------------------

    def _next_batch(self, timeout_s: float) -> tuple[list[_Job], bool]:
        """The jobs queued now (waiting up to ``timeout_s`` for the first); True when
        told to stop after them."""
        try:
            first = self._jobs.get(timeout=timeout_s) if timeout_s > 0 else self._jobs.get_nowait()
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self.MAX_BATCH:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        """The writer thread: commit each batch, then fold what is due into the summaries."""
        while True:
            batch, stop = self._next_batch(self._fold_due - time.monotonic())
            if batch:
                self._commit(conn, batch)
                self._fold_due = min(self._fold_due, time.monotonic() + FOLD_EVERY_S)
                self._after_commit(batch)
            if stop or time.monotonic() >= self._fold_due:
                self._fold_step(conn)
            if stop:
                return

    def _after_commit(self, batch: list[_Job]) -> None:
        """Tell the waiters."""
        last = max((job.seq for job in batch if not isinstance(job, _Touch)), default=0)
        if last:
            self._done = last  # before the wake-up byte: the waiter reads it after
            try:
                self._wake_w.send(b"\0")
            except BlockingIOError:  # unread wake-ups pending: one more adds nothing
                pass

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
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
            self._counts["commits"] += 1
            self._settle(written)
            return
        for job in batch:
            if not isinstance(job, _Touch):  # those are in ``touches``
                self._commit_alone(conn, job)
        if touches:
            self._commit_alone(conn, touches)

    def _apply(self, conn: sqlite3.Connection, batch: list[_Job], written: _Written) -> None:
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
            if isinstance(job, _Row):
                rows.append(job.record)
            elif isinstance(job, _Amend):
                insert()
                self._amend(conn, job, written)
        insert()

    def _commit_alone(self, conn: sqlite3.Connection,
                      job: _Row | _Amend | dict[str, float]) -> None:
        """One row, amendment or the batch's key touches in its own transaction;
        waits out errors that pass, so no row is written twice or skipped."""
        while True:
            written = _Written()
            try:
                if isinstance(job, _Row):
                    self._write_row(conn, job.record, written)
                else:
                    self._write_other(conn, job, written)
            except Exception as exc:
                if not db.transient(exc):  # a bug: say so loudly, never stall the writer
                    log.exception("ledger: writing %r failed", job)
                    written.lost += isinstance(job, _Row)
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

    def _write_other(self, conn: sqlite3.Connection, job: _Amend | dict[str, float],
                     written: _Written) -> None:
        """An amendment, or keys' last_used_at: logged if refused for good."""
        try:
            with db.transaction(conn):
                if isinstance(job, _Amend):
                    self._amend(conn, job, written)
                else:
                    ledger.touch_keys(conn, job)
        except Exception as exc:
            if db.transient(exc):
                raise
            log.error("ledger: %s refused: %s: %s", "amendment" if isinstance(job, _Amend)
                      else "last_used_at of keys", type(exc).__name__, exc)

    def _amend(self, conn: sqlite3.Connection, job: _Amend, written: _Written) -> None:
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
        counts = self._counts
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

    def _due_touches(self, batch: list[_Job]) -> dict[str, float]:
        """The keys whose last_used_at to write now: each at most every TOUCH_EVERY_S."""
        latest: dict[str, float] = {}
        for job in batch:
            if isinstance(job, _Row):
                prefix, when = job.record.key_prefix, job.record.time
            elif isinstance(job, _Touch):
                prefix, when = job
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

    def _fold_step(self, conn: sqlite3.Connection) -> None:
        """Fold the next rows into the summaries; the next step at once while behind."""
        now = time.monotonic()
        try:
            with db.transaction(conn):
                left = ledger.fold(conn, FOLD_STEP_ROWS)
        except Exception as exc:
            log.error("folding ledger rows into the usage summaries failed (reports stay "
                      "exact, but slower): %s: %s", type(exc).__name__, exc)
            self._fold_due = now + (RETRY_DELAY_S if db.transient(exc) else FOLD_RETRY_S)
            return
        if left >= FOLD_STEP_ROWS and not self._catching_up:
            self._catching_up = True
            log.info("folding %d ledger rows into the usage summaries (reports are slower "
                     "until then)", left)
        elif not left and self._catching_up:
            self._catching_up = False
            log.info("the usage summaries have caught up with the ledger")
        self._counts["unfolded"] = left
        self._fold_due = now if left else now + FOLD_IDLE_S
