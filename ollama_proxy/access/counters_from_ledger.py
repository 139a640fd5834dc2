"""The limits' counters rebuilt from the ledger at start, so that a restart neither
resets a window nor forgets a quota: SQLite reads, run in the reports store's thread
before the first request, apart from the per-request step (``limiter``), which does
no I/O.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..store import ledger, reports
from ..store.db import snapshot
from .counters import CounterStore, rebuild
from .windows import DAY_BUCKET_S, DAY_S, month_start

# Above this many ledger rows not yet in the summaries (the first start on an older
# file, rows added by hand), their quota sums are read after the start, not before:
# the gateway answers at once, and only requests that a token quota counts wait.
SYNC_BACKLOG_ROWS = 50_000


@dataclass(frozen=True, slots=True)
class Backlog:
    """Ledger rows ``after_id < id <= upto_id`` whose tokens the quotas miss yet."""

    after_id: int
    upto_id: int
    month_start: float  # the month the counters were loaded in

    def sums(self, conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
        """(all tokens, this month's) per user (in the reports store's thread)."""
        return ledger.token_sums(conn, self.after_id, self.upto_id, self.month_start)

    def add(self, store: CounterStore, sums: dict[str, tuple[int, int]], now: float) -> None:
        """Add the backlog's ``sums`` (``Backlog.sums``) to the quotas of ``store``."""
        for user, (total, month) in sums.items():
            quota = store.get(user).quota
            quota.total += total
            quota.roll(now)  # to now's month first
            if month_start(now) == self.month_start:
                quota.month_used += month


def load_counters(conn: sqlite3.Connection, now: float) -> tuple[CounterStore, Backlog | None]:
    """Every user's counters from the ledger (in the reports store's thread, at
    start): the last day's rows for the windows, this month's and all-time token
    sums for the quotas, from the summaries; and the rows not in them yet, unless
    there are many (then returned as a ``Backlog``, summed and added after the start)."""
    month = month_start(now)
    with snapshot(conn):
        folded, top = ledger.fold_state(conn)
        unfolded = top - folded <= SYNC_BACKLOG_ROWS
        rows = ledger.rows_since(conn, now - DAY_S - DAY_BUCKET_S)
        totals = {user: t["prompt_tokens"] + t["completion_tokens"]
                  for user, t in reports.user_totals(conn, unfolded=unfolded).items()}
        months = {r["key"]: r["prompt_tokens"] + r["completion_tokens"]
                  for r in reports.usage(conn, since=month, group_by="user", unfolded=unfolded)
                  if r["key"] is not None}
    if not unfolded:  # the quotas count the summaries only, not the day's rows, until then
        for name in {r.user for r in rows if r.user is not None}:
            totals.setdefault(name, 0)
            months.setdefault(name, 0)
    store = CounterStore(rebuild(rows, now, totals=totals, months=months))
    return store, None if unfolded else Backlog(folded, top, month)
