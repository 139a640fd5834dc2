"""The trio side of the database: the event loop never waits on SQLite.

``Store`` runs account and query calls one at a time in a worker thread, on
its own connection. ``LedgerWriter`` owns a second connection and commits
usage rows in groups: ``record`` returns once the row is committed, and rows
that arrive while a commit is running go into the next one, so under load
one commit covers many responses (group commit).
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

from . import db, ledger
from .usage import UsageRecord

log = logging.getLogger("ollama_proxy.storage")

T = TypeVar("T")
Amend = tuple[str, int, int]  # (request_id, prompt_tokens, completion_tokens)
Job = tuple[int, "UsageRecord | Amend", "Callable[[], None] | None"]
# After a failed commit, wait this long before trying the same rows again.
RETRY_DELAY_S = 1.0
# A key's last_used_at is refreshed at most this often (the admin page shows it, nobody needs ms).
TOUCH_EVERY_S = 10.0


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
    """One writer thread, group commit; a usage sink whose ``record`` means "committed".

    Rows go to the thread through a queue; it commits whatever has queued up
    meanwhile in one transaction (group commit: under load one commit covers
    many responses), publishes the number of the last row it committed, and
    sends one byte on a socket pair. Waiting ``record`` calls watch that socket
    themselves: the first takes the watch, the others wait until it ends. So at
    low load a response resumes one run-loop pass after its commit (a
    ``run_sync_soon`` callback costs a pass of its own, then one more).
    """

    MAX_BATCH = 1000  # rows per transaction

    def __init__(self, path: str, *, wait: bool = True) -> None:
        self._path = path
        self._wait = wait  # False: record() returns before the commit (no crash durability)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._queued = 0  # number of the last row queued (trio thread)
        self._done = 0  # number of the last row committed (or dropped); set by the thread
        self._thread_rows = 0
        self._thread_commits = 0
        self._watching = False  # a waiter watches the wake-up socket
        self._watch_ended = trio.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.rows_written = 0  # as of the last wake-up taken (stats, tests)
        self.commits = 0

    async def record(self, record: UsageRecord, then: Callable[[], None] | None = None) -> None:
        """Return once ``record`` is committed. ``then`` runs in the writer thread right
        after that commit (it must not block): the response's last bytes can go there.
        Without waiting for commits, ``then`` is dropped."""
        self._queued += 1
        self._jobs.put((self._queued, record, then if self._wait else None))
        if self._wait:
            await self._until(self._queued)

    async def amend(self, request_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Exact counts for an estimated row, queued behind the rows recorded before;
        returns once committed. (Minimal: the store's own, with summaries, replaces it.)"""
        self._queued += 1
        self._jobs.put((self._queued, (request_id, prompt_tokens, completion_tokens), None))
        await self._until(self._queued)

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
        self.rows_written, self.commits = self._thread_rows, self._thread_commits

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
                self._take_wakeups()
                trio.lowlevel.notify_closing(self._wake_r)  # a late waiter gets an error, not a hang
                self._wake_r.close()
                self._wake_w.close()

    def _next_batch(self) -> tuple[list[Job], bool]:
        """The rows queued now (waiting for the first); True when told to stop after them."""
        first = self._jobs.get()
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
        """The writer thread: commit each batch; a failing database is retried, never dropped."""
        touched: dict[str, float] = {}

        def touch_due(prefix: str, now: float) -> bool:
            """A key's last_used_at is written at most every TOUCH_EVERY_S: one row less per commit."""
            if now - touched.get(prefix, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return False
            touched[prefix] = now
            return True

        while True:
            batch, stop = self._next_batch()
            if batch:
                records = [job for _, job, _then in batch if isinstance(job, UsageRecord)]
                amends = [job for _, job, _then in batch if not isinstance(job, UsageRecord)]
                now = time.monotonic()
                while True:
                    try:
                        if records:
                            ledger.insert_records(conn, records,
                                                  lambda prefix: touch_due(prefix, now))
                            self._thread_rows += len(records)
                            self._thread_commits += 1
                            records = []  # committed: a retry redoes only the amends
                        ledger.amend_rows(conn, amends)
                        break
                    except sqlite3.Error as exc:  # locked, disk full...: the rows wait, never dropped
                        log.error("ledger commit of %d rows failed (will retry): %s", len(batch), exc)
                        time.sleep(RETRY_DELAY_S)
                    except Exception:  # a bug: say so loudly, but never stall every response
                        log.exception("ledger rows could not be written, %d dropped", len(batch))
                        break
                for _seq, _record, then in batch:
                    if then is not None:
                        try:
                            then()
                        except Exception:
                            log.exception("after-commit callback failed")
                self._done = batch[-1][0]  # before the wake-up byte: the waiter reads it after
                try:
                    self._wake_w.send(b"\0")
                except BlockingIOError:  # unread wake-ups pending: one more adds nothing
                    pass
            if stop:
                return
