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
import sqlite3
import threading
import time
from typing import Any, Callable, TypeVar

import trio

from . import db, ledger
from .usage import UsageRecord

log = logging.getLogger("ollama_proxy.storage")

T = TypeVar("T")
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

    The thread is our own (a ``to_thread`` call costs ~100 us, three times
    an SQLite commit): batches go to it through a queue, and it reports each
    commit back with ``run_sync_soon``. While one batch commits, the next
    one fills up.
    """

    def __init__(self, path: str, *, wait: bool = True) -> None:
        self._path = path
        self._wait = wait  # False: record() returns before the commit (no crash durability)
        self._pending: list[UsageRecord] = []
        self._committed = trio.Event()  # set when the pending batch is in the database
        self._inflight: trio.Event | None = None  # the batch the thread is writing
        self._jobs: queue.SimpleQueue[tuple[list[UsageRecord], trio.Event] | None] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None
        self.rows_written = 0
        self.commits = 0

    async def record(self, record: UsageRecord) -> None:
        self._pending.append(record)
        committed = self._committed
        if self._inflight is None:
            self._send_batch()
        if self._wait:
            await committed.wait()

    async def flush(self) -> None:
        """Return once every row recorded so far is committed (at shutdown, or without wait)."""
        if self._pending:
            await self._committed.wait()
        elif self._inflight is not None:
            await self._inflight.wait()

    def _send_batch(self) -> None:
        batch, committed = self._pending, self._committed
        self._pending, self._committed = [], trio.Event()
        self._inflight = committed
        self._jobs.put((batch, committed))

    def _batch_done(self, rows: int, committed: trio.Event) -> None:
        """In the trio thread: wake the batch's waiters, send the next batch."""
        self.rows_written += rows
        self.commits += 1
        self._inflight = None
        committed.set()
        if self._pending:
            self._send_batch()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread until cancelled (after the last waiter was served)."""
        conn = await trio.to_thread.run_sync(db.connect, self._path)
        token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(target=self._write_loop, args=(conn, token),
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

    def _write_loop(self, conn: sqlite3.Connection, token: trio.lowlevel.TrioToken) -> None:
        """The writer thread: commit each batch; a failing database is retried, never dropped."""
        touched: dict[str, float] = {}

        def touch_due(prefix: str, now: float) -> bool:
            """A key's last_used_at is written at most every TOUCH_EVERY_S: one row less per commit."""
            if now - touched.get(prefix, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return False
            touched[prefix] = now
            return True

        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch, committed = job
            now = time.monotonic()
            while True:
                try:
                    ledger.insert_records(conn, batch, lambda prefix: touch_due(prefix, now))
                    break
                except sqlite3.Error as exc:  # locked, disk full...: the rows wait, never dropped
                    log.error("ledger commit of %d rows failed (will retry): %s", len(batch), exc)
                    time.sleep(RETRY_DELAY_S)
                except Exception:  # a bug: say so loudly, but never stall every response
                    log.exception("ledger rows could not be written, %d dropped", len(batch))
                    break
            try:
                token.run_sync_soon(self._batch_done, len(batch), committed)
            except trio.RunFinishedError:
                return
