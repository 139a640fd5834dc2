"""The usage ledger: one row per proxied request, the source of truth for usage
reports and for the limit counters rebuilt at start.

Writes come in batches from one writer (group commit, ``storage.LedgerWriter``);
reads are plain aggregate queries for the admin API and the CLI.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Callable

from .db import transaction
from .errors import BadRequest
from .usage import UsageRecord

# group_by value -> the SQL expression of a row's key (times are unix seconds, UTC).
GROUP_KEYS = {
    "user": "user",
    "model": "model",
    "day": "strftime('%Y-%m-%d', time, 'unixepoch')",
    "hour": "strftime('%Y-%m-%dT%H:00Z', time, 'unixepoch')",
}

_COLUMNS = ("time", "user", "key_prefix", "backend", "model", "endpoint", "status", "outcome",
            "prompt_tokens", "completion_tokens", "estimated", "stream", "duration_s", "ttfb_s",
            "request_id", "client")
_INSERT = (f"INSERT INTO ledger ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")


def _row(r: UsageRecord) -> tuple[Any, ...]:
    return (r.time, r.user, r.key_prefix, r.backend, r.model, r.endpoint, r.status, r.outcome,
            r.prompt_tokens, r.completion_tokens, int(r.estimated), int(r.stream), r.duration_s,
            r.ttfb_s, r.request_id, r.client)


# The newest estimated row of a request id (ids may come from clients, so not unique);
# scanning ids backwards finds a fresh row at once without an index on request_id.
_AMEND = ("UPDATE ledger SET prompt_tokens = ?, completion_tokens = ?, estimated = 0 "
          "WHERE id = (SELECT id FROM ledger WHERE request_id = ? AND estimated = 1 "
          "ORDER BY id DESC LIMIT 1)")


# MAX: batches may commit out of order; last_used_at never goes back.
_TOUCH = "UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE prefix = ?"


def insert_records(conn: sqlite3.Connection, records: Sequence[UsageRecord],
                   touch: Callable[[str], bool] = lambda prefix: True) -> None:
    """Commit a batch of rows, and ``last_used_at`` of the keys ``touch`` picks, in one transaction."""
    if not records:
        return
    last_used: dict[str, float] = {}
    for r in records:
        if r.key_prefix is not None and r.time > last_used.get(r.key_prefix, float("-inf")):
            last_used[r.key_prefix] = r.time
    last_used = {prefix: t for prefix, t in last_used.items() if touch(prefix)}
    with transaction(conn):
        conn.executemany(_INSERT, [_row(r) for r in records])
        conn.executemany(_TOUCH, [(t, p) for p, t in last_used.items()])


def amend_rows(conn: sqlite3.Connection, amends: Sequence[tuple[str, int, int]]) -> None:
    """Exact ``(request_id, prompt_tokens, completion_tokens)`` for rows that were
    estimated, in one transaction. Minimal, until the store's own amend replaces it."""
    if amends:
        with transaction(conn):
            conn.executemany(_AMEND, [(p, c, rid) for rid, p, c in amends])


def touch_key(conn: sqlite3.Connection, prefix: str, when: float) -> None:
    """Note a key's use on a path that leaves no ledger row (the admin API, /v1/me)."""
    with transaction(conn):
        conn.execute(_TOUCH, (when, prefix))


def usage(conn: sqlite3.Connection, *, user: str | None = None, model: str | None = None,
          since: float | None = None, until: float | None = None,
          group_by: str = "user") -> list[dict[str, Any]]:
    """Totals per user, model, UTC day or UTC hour, ordered by key.

    ``since`` is inclusive, ``until`` exclusive (unix seconds). A row is an
    error when its outcome is not ``ok`` or its status is 400 or more.
    """
    expr = GROUP_KEYS.get(group_by)
    if expr is None:
        raise BadRequest(f'"group_by" must be one of: {", ".join(GROUP_KEYS)}')
    where: list[str] = []
    params: list[Any] = []
    for clause, value in (("user = ?", user), ("model = ?", model),
                          ("time >= ?", since), ("time < ?", until)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = (f"SELECT {expr} AS k, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
           "COALESCE(SUM(completion_tokens), 0), "
           "SUM(CASE WHEN outcome != 'ok' OR status >= 400 THEN 1 ELSE 0 END) FROM ledger"
           + (" WHERE " + " AND ".join(where) if where else "")
           + " GROUP BY k ORDER BY k")
    return [{"key": r[0], "requests": r[1], "prompt_tokens": r[2], "completion_tokens": r[3],
             "errors": r[4]} for r in conn.execute(sql, params)]


def user_totals(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """All-time requests and tokens per user name (rows without a user left out)."""
    rows = conn.execute("SELECT user, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) "
                        "FROM ledger WHERE user IS NOT NULL GROUP BY user")
    return {r[0]: {"requests": r[1], "prompt_tokens": r[2], "completion_tokens": r[3]}
            for r in rows}


def rows_since(conn: sqlite3.Connection, since: float) -> list[UsageRecord]:
    """Every row from ``since`` on, oldest first (to rebuild limit counters)."""
    rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM ledger WHERE time >= ? "
                        "ORDER BY time, id", (since,))
    return [UsageRecord(request_id=r[14] or "", time=r[0], endpoint=r[5], model=r[4],
                        backend=r[3], status=r[6], outcome=r[7], prompt_tokens=r[8],
                        completion_tokens=r[9], estimated=bool(r[10]), stream=bool(r[11]),
                        duration_s=r[12] if r[12] is not None else 0.0, ttfb_s=r[13],
                        client=r[15] or "", user=r[1], key_prefix=r[2])
            for r in rows]
