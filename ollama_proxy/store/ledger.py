"""The usage ledger: one row per proxied request, the source of truth for usage
reports and for the limit counters rebuilt at start.

Rows are made storable first (``storable``: one bad value must never cost a
row), then written in batches by one writer (group commit,
``store.threads.LedgerWriter``), which also folds them into the summaries that
reports read (``reports.py``). Synchronous SQL, in the caller's transaction.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..api.record import Outcome, RequestRecord
from .db import NS_COLUMNS, SUMMARIES, WATERMARK, fold_sql

_COLUMNS = ("time", "user", "key_prefix", "backend", "model", "endpoint", "status", "outcome",
            "prompt_tokens", "completion_tokens", "estimated", "stream", "duration_s", "ttfb_s",
            "request_id", "client", "metered", "alias", "queued_s", *NS_COLUMNS)
_INSERT = (f"INSERT INTO ledger ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")


# --- making a record storable ---------------------------------------------------

# Text is cut to this many characters: more than any real model name, path or
# request id, and a hostile megabyte never reaches SQLite.
MAX_TEXT_CHARS = 256
# A row's token counts are clamped to this: far above any real request, and it
# keeps SUM() over billions of rows inside SQLite's 64-bit integers.
MAX_TOKENS = 10**9
MAX_STATUS = 999
# Times outside [0, year 10000) have no UTC day in SQLite's date functions.
MAX_TIME = 253402300800.0
MAX_SECONDS = 1e9  # durations
# Ollama's timings (ns) are clamped to this (more than a day: far above any real
# request's). Tens of thousands of rows at the bound would pass SQLite's 64-bit
# integers: reports add timings up as floating point (TOTAL), exact below 2**53 ns.
MAX_NS = 10**14
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone one cannot be encoded as UTF-8

_TEXT = ("request_id", "endpoint", "outcome", "client")
_TEXT_FIELDS = (*_TEXT, "model", "backend", "user", "key_prefix", "alias")  # the last five may be None
_COUNTS = ("prompt_tokens", "completion_tokens")
_NUMBER = (float, int)


def _text(value: object) -> str:
    if type(value) is not str:  # e.g. a JSON number sent as the model
        return f"({type(value).__name__})"
    if len(value) > MAX_TEXT_CHARS:
        value = value[:MAX_TEXT_CHARS]
    if not value.isascii():
        value = _SURROGATE.sub("\ufffd", value)
    return value


def _text_ok(value: object) -> bool:
    return (type(value) is str or type(value) is Outcome) and len(value) <= MAX_TEXT_CHARS and (
        value.isascii() or _SURROGATE.search(value) is None)


def _whole(value: object, top: int) -> int:
    try:
        number: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):  # None, NaN, infinity, text
        return 0
    return min(max(number, 0), top)


def _seconds(value: object, top: float, fallback: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return min(max(number, 0.0), top)
    return fallback


def storable(record: RequestRecord, now: float) -> tuple[RequestRecord, tuple[str, ...]]:
    """``record`` as SQLite can always store it, and the fields that had to change.

    Text becomes valid UTF-8 (lone surrogates replaced by U+FFFD), at most
    ``MAX_TEXT_CHARS``; counts become whole numbers in [0, ``MAX_TOKENS``] and
    a changed count marks the row ``estimated``; the status a number in
    [0, 999]; times and durations finite (an unusable time becomes ``now``); Ollama's
    timings whole numbers in [0, ``MAX_NS``] or None (not a number: None).
    An unchanged record comes back as it is.
    """
    r = record
    changes: dict[str, Any] = {}
    for name in _COUNTS:
        count, changed = storable_count(getattr(r, name))
        if changed:
            changes[name] = count
    if changes and r.estimated is not True:  # only counts changed so far
        changes["estimated"] = True
    for name in _TEXT_FIELDS:
        value = getattr(r, name)
        if (value is not None or name in _TEXT) and not _text_ok(value):
            changes[name] = _text(value)
    if type(r.status) is not int or not 0 <= r.status <= MAX_STATUS:
        changes["status"] = _whole(r.status, MAX_STATUS)
    for name in ("estimated", "stream", "metered"):
        if name not in changes and type(getattr(r, name)) is not bool:
            changes[name] = bool(getattr(r, name))
    if not (type(r.time) in _NUMBER and 0 <= r.time < MAX_TIME):  # NaN fails too
        changes["time"] = _seconds(r.time, MAX_TIME - 1, now)
    if not (type(r.duration_s) in _NUMBER and 0 <= r.duration_s <= MAX_SECONDS):
        changes["duration_s"] = _seconds(r.duration_s, MAX_SECONDS, 0.0)
    if not (type(r.queued_s) in _NUMBER and 0 <= r.queued_s <= MAX_SECONDS):
        changes["queued_s"] = _seconds(r.queued_s, MAX_SECONDS, 0.0)
    if r.ttfb_s is not None and not (type(r.ttfb_s) in _NUMBER and 0 <= r.ttfb_s <= MAX_SECONDS):
        changes["ttfb_s"] = _seconds(r.ttfb_s, MAX_SECONDS, 0.0)
    for name in NS_COLUMNS:
        value = getattr(r, name)
        if value is not None and not (type(value) is int and 0 <= value <= MAX_NS):
            changes[name] = _ns(value)
    if not changes:
        return r, ()
    return dataclasses.replace(r, **changes), tuple(changes)


def _ns(value: object) -> int | None:
    """A timing the ledger can store: a number made whole and clamped to [0, ``MAX_NS``];
    anything else (a bool, NaN, text) is no timing (None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return _whole(min(max(value, 0), MAX_NS), MAX_NS)


def storable_count(value: object) -> tuple[int, bool]:
    """A token count as the ledger stores it, and whether it had to change."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value, False
    return _whole(value, MAX_TOKENS), True


def _row(r: RequestRecord) -> tuple[Any, ...]:
    return (r.time, r.user, r.key_prefix, r.backend, r.model, r.endpoint, r.status, r.outcome,
            r.prompt_tokens, r.completion_tokens, int(r.estimated), int(r.stream), r.duration_s,
            r.ttfb_s, r.request_id, r.client, int(r.metered), r.alias, r.queued_s, r.total_ns,
            r.load_ns, r.prompt_eval_ns, r.eval_ns)


# --- writing (inside the caller's transaction) --------------------------------------

_MINIMAL = ("time", "user", "key_prefix", "request_id", "endpoint", "status", "outcome",
            "prompt_tokens", "completion_tokens", "estimated", "stream", "metered")
_INSERT_MINIMAL = (f"INSERT INTO ledger ({', '.join(_MINIMAL)}) "
                   f"VALUES ({', '.join('?' for _ in _MINIMAL)})")
# MAX: batches may commit out of order; last_used_at never goes back.
_TOUCH = "UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE prefix = ?"


def insert_rows(conn: sqlite3.Connection, records: Sequence[RequestRecord]) -> list[int]:
    """Insert ``records``; their row ids, in order."""
    conn.executemany(_INSERT, [_row(r) for r in records])
    last: int = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    # The writer holds the write lock: SQLite numbered the rows one after the other.
    return list(range(last - len(records) + 1, last + 1))


def insert_row(conn: sqlite3.Connection, record: RequestRecord) -> int:
    row_id = conn.execute(_INSERT, _row(record)).lastrowid
    assert row_id is not None
    return row_id


def insert_minimal(conn: sqlite3.Connection, r: RequestRecord) -> int:
    """The row of a record SQLite refused whole: who, when, which request, its status,
    tokens and whether the limits count it, outcome ``unrecorded``; no model, backend,
    client or durations.
    Made storable again: this is the last chance of the row."""
    r = storable(r, 0.0)[0]
    row_id = conn.execute(_INSERT_MINIMAL, (
        r.time, r.user, r.key_prefix, r.request_id, r.endpoint, r.status, Outcome.UNRECORDED,
        r.prompt_tokens, r.completion_tokens, int(r.estimated), int(r.stream),
        int(r.metered))).lastrowid
    assert row_id is not None
    return row_id


def touch_keys(conn: sqlite3.Connection, last_used: dict[str, float]) -> None:
    """Move each key's ``last_used_at`` forward to the time given (never back)."""
    conn.executemany(_TOUCH, [(t, prefix) for prefix, t in last_used.items()])


class RowKey(NamedTuple):
    """Which ledger row a later correction is for. Request ids come from clients and may
    repeat (another user, a later request): the row is the estimated one of that id,
    user and start time."""

    request_id: str
    user: str | None
    time: float


_OF_KEY = "request_id = ? AND user IS ? AND time = ? AND estimated = 1"


def find_row(conn: sqlite3.Connection, key: RowKey, within: int) -> int | None:
    """The id of the newest row ``key`` names among the last ``within`` ids, if any
    (no index on request ids: the scan is bounded)."""
    row = conn.execute("SELECT id FROM ledger WHERE id > (SELECT ifnull(MAX(id), 0) "
                       f"FROM ledger) - ? AND {_OF_KEY} ORDER BY id DESC LIMIT 1",
                       (within, *key)).fetchone()
    return None if row is None else int(row[0])


def amend_row(conn: sqlite3.Connection, row_id: int, key: RowKey, prompt_tokens: int,
              completion_tokens: int, *, estimated: bool = False) -> bool:
    """Replace the token counts of row ``row_id`` (the summaries follow by trigger);
    False when that row is not the one ``key`` names."""
    return conn.execute(
        "UPDATE ledger SET prompt_tokens = ?, completion_tokens = ?, estimated = ? "
        f"WHERE id = ? AND {_OF_KEY}",
        (prompt_tokens, completion_tokens, int(estimated), row_id, *key)).rowcount > 0


# --- folding into the summaries -----------------------------------------------------

_FOLDS = [fold_sql(table) for table in SUMMARIES]


def fold_state(conn: sqlite3.Connection) -> tuple[int, int]:
    """(the watermark: the last row id in the summaries, the highest row id)."""
    folded, top = conn.execute(f"SELECT {WATERMARK}, (SELECT ifnull(MAX(id), 0) FROM ledger)"
                               ).fetchone()
    return folded, top


def fold(conn: sqlite3.Connection, max_rows: int) -> int:
    """Add the rows above the watermark to the summaries, at most ``max_rows`` ids'
    worth (inside the caller's transaction); returns the rows still unfolded."""
    folded, top = fold_state(conn)
    upto = min(top, folded + max_rows)
    if upto <= folded:
        return 0
    for sql in _FOLDS:
        conn.execute(sql, (folded, upto))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'ledger_folded'", (str(upto),))
    return top - upto


def token_sums(conn: sqlite3.Connection, after_id: int, upto_id: int,
               month_start: float) -> dict[str, tuple[int, int]]:
    """Tokens per user of the rows ``after_id < id <= upto_id``: (in all, from
    ``month_start`` on)."""
    rows = conn.execute(
        "SELECT user, SUM(prompt_tokens + completion_tokens), "
        "SUM(CASE WHEN time >= ? THEN prompt_tokens + completion_tokens ELSE 0 END) "
        "FROM ledger WHERE id > ? AND id <= ? AND user IS NOT NULL GROUP BY user",
        (month_start, after_id, upto_id))
    return {r[0]: (r[1], r[2]) for r in rows}


def rows_since(conn: sqlite3.Connection, since: float) -> list[RequestRecord]:
    """Every row from ``since`` on, oldest first (to rebuild limit counters)."""
    rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM ledger WHERE time >= ? "
                        "ORDER BY time, id", (since,))
    return [RequestRecord(request_id=r[14] or "", time=r[0], endpoint=r[5], model=r[4],
                        backend=r[3], status=r[6], outcome=_outcome(r[7]), prompt_tokens=r[8],
                        completion_tokens=r[9], estimated=bool(r[10]), stream=bool(r[11]),
                        duration_s=r[12] if r[12] is not None else 0.0, ttfb_s=r[13],
                        client=r[15] or "", user=r[1], key_prefix=r[2], metered=bool(r[16]),
                        alias=r[17], queued_s=r[18] or 0.0, total_ns=r[19], load_ns=r[20],
                        prompt_eval_ns=r[21], eval_ns=r[22])
            for r in rows]


def _outcome(text: str) -> Outcome:
    """The outcome of a stored row; one the gateway never writes (a row added by hand)
    reads as ``unrecorded``."""
    try:
        return Outcome(text)
    except ValueError:
        return Outcome.UNRECORDED
