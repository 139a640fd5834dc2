"""Usage reports: by user, model, UTC day and hour, filtered, from the summaries and the
ledger; always equal to summing the ledger rows themselves (a property over random
rows, folds and time spans)."""

from __future__ import annotations

import calendar
import sqlite3
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger_rows import insert
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.store import db, ledger, reports
from ollama_proxy.store.reports import LEDGER, UNFOLDED, Part

T0 = calendar.timegm((2026, 11, 27, 7, 14, 39))  # 2026-11-27T07:14:39Z
H = 3600
D = 86400
DAY0 = T0 - T0 % D  # 2026-11-27T00:00Z


def rec(time: float, user: str | None = "alice", model: str | None = "llama3", *,
        status: int = 200, outcome: str = "ok", prompt: int = 10,
        completion: int = 20, ns: tuple[int | None, int | None, int | None] = (None,) * 3
        ) -> RequestRecord:
    """``ns``: Ollama's load, prompt eval and eval timings (the total: their sum, if any)."""
    load, prompt_eval, evaluation = ns
    total = None if ns == (None,) * 3 else sum(n or 0 for n in ns)
    return RequestRecord(request_id=f"req-{time}", time=time, endpoint="/api/chat", model=model,
                       backend="gpu1", status=status, outcome=outcome, prompt_tokens=prompt,
                       completion_tokens=completion, estimated=False, stream=True,
                       duration_s=1.5, ttfb_s=0.25, client="10.0.0.7", user=user,
                       total_ns=total, load_ns=load, prompt_eval_ns=prompt_eval,
                       eval_ns=evaluation)


def raw_usage(conn: sqlite3.Connection, *, user: str | None = None, model: str | None = None,
              since: float | None = None, until: float | None = None,
              group_by: str = "user") -> list[dict[str, Any]]:
    """The oracle: the report summed from every ledger row (the query before summaries)."""
    expr = {"user": "user", "model": "model",
            "day": "strftime('%Y-%m-%d', time, 'unixepoch')",
            "hour": "strftime('%Y-%m-%dT%H:00Z', time, 'unixepoch')"}[group_by]
    where, params = [], []
    for clause, value in (("user = ?", user), ("model = ?", model),
                          ("time >= ?", since), ("time < ?", until)):
        if value is not None:
            where.append(clause)
            params.append(value)
    condition = " WHERE " + " AND ".join(where) if where else ""
    sql = (f"SELECT {expr} AS k, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
           "COALESCE(SUM(completion_tokens), 0), "
           "SUM(CASE WHEN outcome != 'ok' OR status >= 400 THEN 1 ELSE 0 END) FROM ledger"
           + condition + " GROUP BY k ORDER BY k")
    # GPU time, summed here in Python: over the rows that have it, None when none has.
    gpu: dict[Any, list[int]] = {}
    load: dict[Any, list[int]] = {}
    for k, load_ns, prompt_eval_ns, eval_ns in conn.execute(
            f"SELECT {expr}, load_ns, prompt_eval_ns, eval_ns FROM ledger{condition}", params):
        if prompt_eval_ns is not None or eval_ns is not None:
            gpu.setdefault(k, []).append((prompt_eval_ns or 0) + (eval_ns or 0))
        if load_ns is not None:
            load.setdefault(k, []).append(load_ns)

    def secs(found: dict[Any, list[int]], k: Any) -> float | None:
        return round(sum(found[k]) / 1e9, 6) if k in found else None

    return [{"key": r[0], "requests": r[1], "prompt_tokens": r[2], "completion_tokens": r[3],
             "errors": r[4], "gpu_seconds": secs(gpu, r[0]), "load_seconds": secs(load, r[0])}
            for r in conn.execute(sql, params)]


@pytest.fixture
def conn(tmp_path):
    connection = db.connect(str(tmp_path / "op.db"))
    yield connection
    connection.close()


# alice's rows have GPU time (one with a load), bob's do not (older rows, another backend)
ROWS = [
    rec(T0, ns=(3_000_000_000, 250_000_000, 1_500_000_000)),
    rec(T0 + 60, model="qwen", ns=(None, 40_000_000, 500_000_000)),
    rec(T0 + 3600, user="bob", status=429, outcome="refused", prompt=0, completion=0),
    rec(T0 + 86400, user="bob", outcome="client_closed", completion=3),
    rec(T0 + 86400 + 1, user=None, model=None, status=401, outcome="refused", prompt=0,
        completion=0),
]


@pytest.fixture(params=["unfolded", "folded", "half"])
def filled(request, conn):
    """The same rows in the ledger only, in the summaries, or partly in each."""
    if request.param == "half":
        insert(conn, ROWS[:3], fold=True)
        insert(conn, ROWS[3:])
    else:
        insert(conn, ROWS, fold=request.param == "folded")
    return conn


def test_group_by_user(filled):
    """Per user: requests, tokens, errors (non-ok outcome or status >= 400); no user first."""
    assert reports.usage(filled) == [
        {"key": None, "requests": 1, "prompt_tokens": 0, "completion_tokens": 0, "errors": 1,
         "gpu_seconds": None, "load_seconds": None},
        {"key": "alice", "requests": 2, "prompt_tokens": 20, "completion_tokens": 40, "errors": 0,
         "gpu_seconds": 2.29, "load_seconds": 3.0},
        {"key": "bob", "requests": 2, "prompt_tokens": 10, "completion_tokens": 3, "errors": 2,
         "gpu_seconds": None, "load_seconds": None},
    ]


def test_group_by_model(filled):
    """Per model, ordered by name."""
    rows = reports.usage(filled, group_by="model")
    assert [(r["key"], r["requests"]) for r in rows] == [(None, 1), ("llama3", 3), ("qwen", 1)]


def test_group_by_day_and_hour(filled):
    """Days and hours are UTC, as YYYY-MM-DD and YYYY-MM-DDTHH:00Z."""
    days = reports.usage(filled, group_by="day")
    assert [(r["key"], r["requests"]) for r in days] == [("2026-11-27", 3), ("2026-11-28", 2)]
    hours = reports.usage(filled, group_by="hour")
    assert [(r["key"], r["requests"]) for r in hours] == [
        ("2026-11-27T07:00Z", 2), ("2026-11-27T08:00Z", 1), ("2026-11-28T07:00Z", 2)]


def test_filters_since_until_user_model(filled):
    """since is inclusive, until exclusive; user and model narrow the rows."""
    assert [r["requests"] for r in reports.usage(filled, since=T0 + 60, until=T0 + 86400)] == [1, 1]
    assert reports.usage(filled, user="bob", group_by="day") == [
        {"key": "2026-11-27", "requests": 1, "prompt_tokens": 0, "completion_tokens": 0,
         "errors": 1, "gpu_seconds": None, "load_seconds": None},
        {"key": "2026-11-28", "requests": 1, "prompt_tokens": 10, "completion_tokens": 3,
         "errors": 1, "gpu_seconds": None, "load_seconds": None}]
    assert reports.usage(filled, model="qwen") == [
        {"key": "alice", "requests": 1, "prompt_tokens": 10, "completion_tokens": 20, "errors": 0,
         "gpu_seconds": 0.54, "load_seconds": None}]
    assert reports.usage(filled, since=T0 + 10 * 86400) == []


def test_user_totals(filled):
    """All-time totals per user name, rows without a user left out; or one user's."""
    assert reports.user_totals(filled) == {
        "alice": {"requests": 2, "prompt_tokens": 20, "completion_tokens": 40},
        "bob": {"requests": 2, "prompt_tokens": 10, "completion_tokens": 3},
    }
    assert reports.user_totals(filled, "bob") == {
        "bob": {"requests": 2, "prompt_tokens": 10, "completion_tokens": 3}}


@pytest.mark.parametrize("group_by, user, since, until, parts", [
    # everything: whole days, and the rows not folded yet
    ("user", False, None, None, [Part("usage_day", None, None), Part(UNFOLDED, None, None)]),
    # hours read hourly sums, of every user (no user dimension) or of one
    ("hour", False, None, None, [Part("usage_hour_model", None, None),
                                 Part(UNFOLDED, None, None)]),
    ("hour", True, None, None, [Part("usage_hour", None, None), Part(UNFOLDED, None, None)]),
    # ragged edges: partial hours from the ledger, whole hours, whole days
    ("model", False, DAY0 - H - 5, DAY0 + D + H + 5, [
        Part("usage_day", DAY0, DAY0 + D),
        Part("usage_hour_model", DAY0 - H, DAY0),
        Part("usage_hour_model", DAY0 + D, DAY0 + D + H),
        Part(LEDGER, DAY0 - H - 5, DAY0 - H), Part(LEDGER, DAY0 + D + H, DAY0 + D + H + 5),
        Part(UNFOLDED, DAY0 - H - 5, DAY0 + D + H + 5)]),
    # grouped by user: the hours need the user dimension
    ("user", False, DAY0 + H, None, [
        Part("usage_day", DAY0 + D, None), Part("usage_hour", DAY0 + H, DAY0 + D),
        Part(UNFOLDED, DAY0 + H, None)]),
    # less than a day: whole hours only
    ("day", False, DAY0 + H, DAY0 + 3 * H, [
        Part("usage_hour_model", DAY0 + H, DAY0 + 3 * H), Part(UNFOLDED, DAY0 + H, DAY0 + 3 * H)]),
    # within one hour: the ledger alone
    ("day", True, T0, T0 + 10, [Part(LEDGER, T0, T0 + 10), Part(UNFOLDED, T0, T0 + 10)]),
])
def test_plan(group_by, user, since, until, parts):
    """A span is read as whole days, whole hours, and ledger rows for the rest."""
    assert reports.plan(group_by, user=user, since=since, until=until) == parts


USERS = st.sampled_from([None, "", "alice", "bob"])
MODELS = st.sampled_from([None, "llama3", "qwen"])
# Times in a few hours around two midnights, on hour edges, just after, mid-hour and
# just before the next, so rows and report edges often share an hour.
HOURS = st.sampled_from([-25, -24, -1, 0, 1, 23, 24])
SECONDS = st.sampled_from([0.0, 0.5, 1.0, 1800.0, 3599.0, 3599.5]) | st.floats(0, 3599.9)
TIME = st.builds(lambda h, s: DAY0 + h * H + s, HOURS, SECONDS)
NS = st.none() | st.sampled_from([0, 1, 10**9]) | st.integers(0, ledger.MAX_NS)
ROW = st.builds(rec, time=TIME, user=USERS, model=MODELS, status=st.sampled_from([200, 404, 500]),
                outcome=st.sampled_from(["ok", "client_closed"]),
                prompt=st.integers(0, 10**9), completion=st.integers(0, 10**9),
                ns=st.tuples(NS, NS, NS))
EDGE = st.none() | TIME


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=4, max_size=40), folded=st.integers(0, 40),
       group_by=st.sampled_from(reports.GROUPS), user=USERS, model=MODELS, since=EDGE, until=EDGE)
def test_reports_equal_the_sums_of_the_ledger_rows(conn, rows, folded, group_by, user, model,
                                                   since, until):
    """Whatever the rows, how many are folded, the span and the filters: the report is
    what summing the ledger rows gives."""
    with db.transaction(conn):
        conn.execute("DELETE FROM ledger")  # the triggers empty the summaries
    insert(conn, rows[:folded], fold=True)
    insert(conn, rows[folded:])
    assert reports.usage(conn, user=user, model=model, since=since, until=until,
                         group_by=group_by) == raw_usage(conn, user=user, model=model,
                                                         since=since, until=until,
                                                         group_by=group_by)
    for table in db.SUMMARIES:  # and no emptied bucket is left over from earlier examples
        assert conn.execute(f"SELECT 1 FROM {table} WHERE requests <= 0").fetchall() == []
    assert ledger.fold_state(conn)[0] <= ledger.fold_state(conn)[1]
