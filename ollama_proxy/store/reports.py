"""Usage reports: totals per user, model, UTC day or hour, read from the
summaries for whole buckets and from the ledger for the rest.

A report over ``[since, until)`` splits that span (``plan``): whole days
from ``usage_day`` (unless grouped by hour), whole hours from an hourly
summary, and the partial hours at the edges from the ledger itself (its
time index); ledger rows above the watermark, not folded yet, are read from
the ledger too. One SQL statement reads every part, so all see the same
snapshot of the file, and the result equals what summing the ledger rows
would give.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from typing import Any

from .db import DAY_S, HOUR_S, TIME_SUMS, WATERMARK, bucket_sql, error_sql, time_values

GROUPS = ("user", "model", "day", "hour")
# group_by -> how its key is shown, from the bucket's start (unix seconds, UTC)
_SHOWN = {"day": "strftime('%Y-%m-%d', b, 'unixepoch')",
          "hour": "strftime('%Y-%m-%dT%H:00Z', b, 'unixepoch')"}

LEDGER = "ledger"  # folded ledger rows, by time (the edges)
UNFOLDED = "unfolded"  # ledger rows above the watermark


@dataclass(frozen=True, slots=True)
class Part:
    """One source of a report: a table over ``[start, end)`` (None: unbounded)."""

    source: str  # a summary table, LEDGER or UNFOLDED
    start: float | None
    end: float | None


def _ceil(t: float | None, step: int) -> float | None:
    return None if t is None else math.ceil(t / step) * step


def _floor(t: float | None, step: int) -> float | None:
    return None if t is None else math.floor(t / step) * step


def _nonempty(start: float | None, end: float | None) -> bool:
    return start is None or end is None or start < end


def plan(group_by: str, *, user: bool, since: float | None, until: float | None,
         unfolded: bool = True) -> list[Part]:
    """The parts a report reads (``user``: it filters or groups by user;
    ``unfolded``: with the rows not in the summaries yet)."""
    hours_from = "usage_hour" if user or group_by == "user" else "usage_hour_model"
    h1, h2 = _ceil(since, HOUR_S), _floor(until, HOUR_S)
    last = [Part(UNFOLDED, since, until)] if unfolded else []
    if not _nonempty(h1, h2):  # within one hour: the ledger alone
        return [Part(LEDGER, since, until), *last]
    parts = []
    if group_by == "hour":
        parts.append(Part(hours_from, h1, h2))
    else:
        d1, d2 = _ceil(h1, DAY_S), _floor(h2, DAY_S)
        if _nonempty(d1, d2):
            parts.append(Part("usage_day", d1, d2))
            parts += [Part(hours_from, a, b) for a, b in ((h1, d1), (d2, h2))
                      if a is not None and b is not None and a < b]
        else:
            parts.append(Part(hours_from, h1, h2))
    parts += [Part(LEDGER, a, b) for a, b in ((since, h1), (h2, until))
              if a is not None and b is not None and a < b]
    return parts + last


# GPU time: how many rows have it (gr, lr) and the sum of theirs (g, l, in ns). Sums of
# timings are floating point (TOTAL): exact to 2**53 ns (104 days), and never an
# integer overflow, whatever a backend reported.
_TIME_ALIASES = (("SUM", "gr"), ("TOTAL", "g"), ("SUM", "lr"), ("TOTAL", "l"))


def _time_sums(values: tuple[str, ...]) -> str:
    return ", ".join(f"{fn}({v}) AS {alias}" for (fn, alias), v in zip(_TIME_ALIASES, values))


def seconds(rows: int | None, ns: float | None) -> float | None:
    """Summed timings as seconds (to the µs); None when no row had them."""
    return round(ns / 1e9, 6) if rows and ns is not None else None


def _part_sql(part: Part, group_by: str, filters: dict[str, str]) -> tuple[str, list[Any]]:
    """One part as a grouped SELECT of (bucket key, requests, prompt, completion, errors,
    GPU time)."""
    where: list[str] = []
    params: list[Any] = []
    if part.source in (LEDGER, UNFOLDED):
        # Unfolded rows are found by id (few; NOT INDEXED still lets SQLite use the row
        # id, and keeps it from walking a whole index to save sorting a few rows);
        # folded edges by time (unary + keeps the id off: that range is the whole ledger).
        unfolded = part.source == UNFOLDED
        time_col = "time"
        where.append(f"id > {WATERMARK}" if unfolded else f"+id <= {WATERMARK}")
        key = {"user": "user", "model": "model", "day": bucket_sql("time", DAY_S),
               "hour": bucket_sql("time", HOUR_S)}[group_by]
        sums = (f"COUNT(*) AS n, SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c, "
                f"SUM({error_sql()}) AS e, " + _time_sums(time_values()))
        table = "ledger NOT INDEXED" if unfolded else "ledger"
    else:
        time_col, table = "start", part.source
        key = {"user": "user", "model": "model", "day": bucket_sql("start", DAY_S),
               "hour": "start"}[group_by]
        sums = ("SUM(requests) AS n, SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c, "
                "SUM(errors) AS e, " + _time_sums(TIME_SUMS))
    if part.start is not None:
        where.append(f"{time_col} >= ?")
        params.append(part.start)
    if part.end is not None:
        where.append(f"{time_col} < ?")
        params.append(part.end)
    for column, value in filters.items():
        where.append(f"{column} = ?")
        params.append(value)
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {key} AS b, {sums} FROM {table}{condition} GROUP BY b", params



def usage(conn: sqlite3.Connection, *, user: str | None = None, model: str | None = None,
          since: float | None = None, until: float | None = None,
          group_by: str = "user", unfolded: bool = True) -> list[dict[str, Any]]:
    """Totals per user, model, UTC day or UTC hour, ordered by key.

    ``since`` is inclusive, ``until`` exclusive (unix seconds). A row is an
    error when its outcome is not ``ok`` or its status is 400 or more.
    ``gpu_seconds`` (prompt evaluation + generation) and ``load_seconds`` sum the
    rows whose backend reported them; None when none of the group's did.
    ``unfolded=False`` leaves out the rows above the watermark (``ledger.fold_state``).
    ``group_by`` is one of ``GROUPS`` (``admin_ops`` checks what an admin asks for); it
    picks SQL from fixed tables, so no other value can reach the query (a KeyError).
    """
    filters = {k: v for k, v in (("user", user), ("model", model)) if v is not None}
    selects, params = [], []
    for part in plan(group_by, user=user is not None, since=since, until=until,
                     unfolded=unfolded):
        sql, part_params = _part_sql(part, group_by, filters)
        selects.append(sql)
        params += part_params
    shown = _SHOWN.get(group_by, "b")
    # Each part is grouped already: the outer GROUP BY merges a few rows per key.
    sql = (f"SELECT {shown}, SUM(n), SUM(p), SUM(c), SUM(e), SUM(gr), TOTAL(g), SUM(lr), "
           "TOTAL(l) FROM ("
           + " UNION ALL ".join(f"SELECT * FROM ({s})" for s in selects)
           + ") GROUP BY b ORDER BY b")
    return [{"key": r[0], "requests": r[1], "prompt_tokens": r[2], "completion_tokens": r[3],
             "errors": r[4], "gpu_seconds": seconds(r[5], r[6]), "load_seconds": seconds(r[7], r[8])}
            for r in conn.execute(sql, params)]


def user_totals(conn: sqlite3.Connection, user: str | None = None, *,
                unfolded: bool = True) -> dict[str, dict[str, int]]:
    """All-time requests and tokens per user name (rows without a user left out);
    ``user``: that user's only."""
    return {r["key"]: {"requests": r["requests"], "prompt_tokens": r["prompt_tokens"],
                       "completion_tokens": r["completion_tokens"]}
            for r in usage(conn, user=user, group_by="user", unfolded=unfolded)
            if r["key"] is not None}
