"""The trio side of the database: the event loop never waits on SQLite.

``Store`` runs calls one at a time in a worker thread, on its own connection
(the gateway has one for accounts and one for reports, so a long report
never holds up a key revocation). ``LedgerWriter`` owns another connection
and commits usage rows in groups: ``record`` returns once the row is
committed, and rows that arrive while a commit is running go into the next
one, so under load one commit covers many responses (group commit). This
module carries the jobs across threads and wakes the waiters; what a batch
does to the file (retries, row by row, folding) is ``group_commit``'s.
"""

from __future__ import annotations

import logging
import queue
import socket
import sqlite3
import threading
import time
from typing import Any, Callable, TypeVar

import trio

from ..api.record import RequestRecord
from . import db, ledger
from .group_commit import Amend, GroupCommit, Job, Row, Touch

log = logging.getLogger("ollama_proxy.storage")

T = TypeVar("T")


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


class LedgerWriter:
    """One writer thread, group commit; ``record`` returns once the row is committed.

    Rows go to the thread through a queue; it commits whatever has queued up
    meanwhile in one transaction (group commit: under load one commit covers
    many responses), publishes the number of the last job it committed, and
    sends one byte on a socket pair. Waiting ``record`` calls watch that socket
    themselves: the first takes the watch, the others wait until it ends. So at
    low load a response resumes one run-loop pass after its commit (a
    ``run_sync_soon`` callback costs a pass of its own, then one more).

    No row is lost to a bad value: ``record`` makes each storable first, and
    ``GroupCommit`` writes a batch SQLite still refuses row by row.
    """

    MAX_BATCH = 1000  # rows per transaction

    def __init__(self, path: str, *, wait: bool = True,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self._path = path
        # told each batch's seconds, in the writer thread (the metrics' ledger_commit_seconds)
        self.on_commit = on_commit
        self._wait = wait  # False: record() returns before the commit (no crash durability)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._queued = 0  # number of the last job queued (trio thread)
        self._done = 0  # number of the last one committed (or given up); set by the thread
        self._watching = False  # a waiter watches the wake-up socket
        self._watch_ended = trio.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._group = GroupCommit()  # the writer thread's (stats() copies its counts)

    def stats(self) -> dict[str, int]:
        """Rows written (minimal ones included), written minimal, lost (never written),
        commits, amendments, ledger rows not yet folded into the summaries."""
        return dict(self._group.counts)

    async def record(self, record: RequestRecord) -> None:
        """Return once ``record`` is committed (without ``wait``: once it is queued)."""
        record, fixed = ledger.storable(record, time.time())
        if fixed:
            log.warning("request %s: its ledger row had unstorable values, fixed: %s",
                        record.request_id, ", ".join(fixed))
        self._queued += 1
        self._jobs.put(Row(self._queued, record))
        if self._wait:
            await self._until(self._queued)

    async def amend(self, record: RequestRecord, prompt_tokens: int,
                    completion_tokens: int) -> None:
        """Exact counts found after ``record``'s estimated row was committed: that row
        gets them, and ``estimated`` false; the summaries follow in the same
        transaction. Returns once committed; a row not found is logged."""
        self._queued += 1
        key = ledger.RowKey(record.request_id, record.user, record.time)
        self._jobs.put(Amend(self._queued, key, prompt_tokens, completion_tokens))
        await self._until(self._queued)

    def touch(self, prefix: str, when: float) -> None:
        """Note a key's use on a path that leaves no ledger row (the admin API,
        /v1/me): written with a later batch, never waited for (``flush`` does)."""
        self._queued += 1
        self._jobs.put(Touch(self._queued, prefix, when))

    async def flush(self) -> None:
        """Return once every job queued so far is committed, key touches too (at
        shutdown, without wait, or before reading a key's last_used_at)."""
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

    def _next_batch(self, timeout_s: float) -> tuple[list[Job], bool]:
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
        group = self._group
        while True:
            batch, stop = self._next_batch(group.fold_due - time.monotonic())
            if batch:
                started = time.perf_counter()
                group.commit(conn, batch)
                elapsed = time.perf_counter() - started
                self._after_commit(batch)  # the waiters first
                if self.on_commit is not None:
                    self.on_commit(elapsed)
            if stop or time.monotonic() >= group.fold_due:
                group.fold_step(conn)
            if stop:
                return

    def _after_commit(self, batch: list[Job]) -> None:
        """Tell the waiters: jobs are numbered in queue order, the last is the highest."""
        self._done = batch[-1].seq  # before the wake-up byte: the waiter reads it after
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:  # unread wake-ups pending: one more adds nothing
            pass
