"""The trio side of the database: the event loop never waits on SQLite.

``Store`` runs account and query calls one at a time in a worker thread, on
its own connection. ``LedgerWriter`` owns a second connection and commits
usage rows in groups: ``record`` returns once the row is committed, and rows
that arrive while a commit is running go into the next one, so under load
one commit covers many responses (group commit).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any, Callable, TypeVar

import trio

from . import db, ledger
from .usage import UsageRecord

log = logging.getLogger("ollama_proxy.storage")

T = TypeVar("T")
# After a failed commit, wait this long before trying the same rows again.
RETRY_DELAY_S = 1.0


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
    """One writer, group commit; a usage sink whose ``record`` means "committed"."""

    def __init__(self, path: str, *, wait: bool = True) -> None:
        self._store = Store(path)
        self._wait = wait  # False: record() returns before the commit (no crash durability)
        self._pending: list[UsageRecord] = []
        self._committed = trio.Event()  # set when the pending batch is in the database
        self._wakeup = trio.Event()
        self.rows_written = 0
        self.commits = 0

    async def record(self, record: UsageRecord) -> None:
        self._pending.append(record)
        committed = self._committed
        self._wakeup.set()
        if self._wait:
            await committed.wait()

    async def flush(self) -> None:
        """Return once every row recorded so far is committed (at shutdown, or without wait)."""
        if self._pending:
            await self._committed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit pending rows until cancelled (after the last waiter was served)."""
        await self._store.open()
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                batch, committed = self._pending, self._committed
                self._pending, self._committed = [], trio.Event()
                await self._commit(batch)
                committed.set()
        finally:
            await self._store.aclose()

    async def _commit(self, batch: list[UsageRecord]) -> None:
        """Write ``batch``; a failing database is retried, never dropped."""
        while True:
            try:
                with trio.CancelScope(shield=True):  # a half-done commit helps nobody
                    await self._store.call(ledger.insert_records, batch)
            except sqlite3.Error as exc:
                log.error("ledger commit of %d rows failed (will retry): %s", len(batch), exc)
                await trio.sleep(RETRY_DELAY_S)
                continue
            self.rows_written += len(batch)
            self.commits += 1
            return
