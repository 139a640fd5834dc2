"""The usage ledger's rows: made storable, written (whole, one by one, minimal), amended,
folded into the summaries (and kept in step by triggers), read back."""

from __future__ import annotations

import calendar
import dataclasses
import math
import sqlite3

import pytest

from ledger_rows import insert
from ollama_proxy.access import keys
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.store import accounts, db, ledger, reports

T0 = calendar.timegm((2026, 11, 27, 7, 14, 39))  # 2026-11-27T07:14:39Z
NOW = float(T0 + 1000)
TEXT_FIELDS = ("request_id", "endpoint", "outcome", "client", "model", "backend", "user",
               "key_prefix", "alias")


def rec(time: float = T0, user: str | None = "alice", model: str | None = "llama3", *,
        status: int = 200, outcome: str = "ok", prompt: int = 10, completion: int = 20,
        prefix: str | None = None, request_id: str | None = None) -> RequestRecord:
    return RequestRecord(request_id=request_id or f"req-{time}", time=time, endpoint="/api/chat",
                       model=model, backend="gpu1", status=status, outcome=outcome,
                       prompt_tokens=prompt, completion_tokens=completion, estimated=False,
                       stream=True, duration_s=1.5, ttfb_s=0.25, client="10.0.0.7", user=user,
                       key_prefix=prefix, metered=True)


@pytest.fixture
def conn(tmp_path):
    connection = db.connect(str(tmp_path / "op.db"))
    yield connection
    connection.close()


def summary(conn: sqlite3.Connection, table: str, sums: tuple[str, ...] = db.SUMS) -> list[tuple]:
    """A summary's rows: bucket start, its key (user, model), and ``sums``."""
    columns = ("start", *db.SUMMARIES[table][1], *sums)
    return conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY 1, 2, 3").fetchall()


def timed(record: RequestRecord, total: int | None, load: int | None, prompt_eval: int | None,
          evaluation: int | None) -> RequestRecord:
    """``record`` with Ollama's timings (ns)."""
    return dataclasses.replace(record, total_ns=total, load_ns=load, prompt_eval_ns=prompt_eval,
                               eval_ns=evaluation)


def watermark(conn: sqlite3.Connection) -> int:
    return ledger.fold_state(conn)[0]


# --- storable -------------------------------------------------------------------------

@pytest.mark.parametrize("changes, fixed, expected", [
    ({"model": "llama3.2\udc00"}, {"model": "llama3.2\ufffd"}, ("model",)),
    ({"user": "\ud800x\udfff"}, {"user": "\ufffdx\ufffd"}, ("user",)),
    ({"model": "é" * 1_000_000}, {"model": "é" * ledger.MAX_TEXT_CHARS}, ("model",)),
    ({"request_id": "r" * 300}, {"request_id": "r" * ledger.MAX_TEXT_CHARS}, ("request_id",)),
    ({"model": 5}, {"model": "(int)"}, ("model",)),
    ({"model": ["a"]}, {"model": "(list)"}, ("model",)),
    ({"alias": "g\udc00" * 300}, {"alias": "g\ufffd" * 128}, ("alias",)),
    ({"endpoint": None}, {"endpoint": "(NoneType)"}, ("endpoint",)),
    ({"prompt_tokens": 2**63}, {"prompt_tokens": ledger.MAX_TOKENS, "estimated": True},
     ("prompt_tokens", "estimated")),
    ({"completion_tokens": -5}, {"completion_tokens": 0, "estimated": True},
     ("completion_tokens", "estimated")),
    ({"completion_tokens": math.nan}, {"completion_tokens": 0, "estimated": True},
     ("completion_tokens", "estimated")),
    ({"prompt_tokens": None, "estimated": True}, {"prompt_tokens": 0}, ("prompt_tokens",)),
    ({"prompt_tokens": 7.0}, {"prompt_tokens": 7, "estimated": True},
     ("prompt_tokens", "estimated")),
    ({"status": 10**20}, {"status": ledger.MAX_STATUS}, ("status",)),
    ({"status": "200"}, {"status": 200}, ("status",)),
    ({"stream": 1}, {"stream": True}, ("stream",)),
    ({"metered": 0}, {"metered": False}, ("metered",)),
    ({"time": math.nan}, {"time": NOW}, ("time",)),
    ({"time": math.inf}, {"time": NOW}, ("time",)),
    ({"time": -1.0}, {"time": 0.0}, ("time",)),
    ({"time": 1e300}, {"time": ledger.MAX_TIME - 1}, ("time",)),
    ({"duration_s": -math.inf}, {"duration_s": 0.0}, ("duration_s",)),
    ({"ttfb_s": math.nan}, {"ttfb_s": 0.0}, ("ttfb_s",)),
    # Ollama's timings: whole ns in [0, MAX_NS]; not a number is no timing (None)
    ({"eval_ns": 2**63}, {"eval_ns": ledger.MAX_NS}, ("eval_ns",)),
    ({"total_ns": math.inf}, {"total_ns": ledger.MAX_NS}, ("total_ns",)),
    ({"load_ns": -5}, {"load_ns": 0}, ("load_ns",)),
    ({"prompt_eval_ns": 1.5e9}, {"prompt_eval_ns": 1_500_000_000}, ("prompt_eval_ns",)),
    ({"total_ns": math.nan}, {"total_ns": None}, ("total_ns",)),
    ({"prompt_eval_ns": True}, {"prompt_eval_ns": None}, ("prompt_eval_ns",)),
    ({"eval_ns": "5"}, {"eval_ns": None}, ("eval_ns",)),
])
def test_storable_fixes_what_sqlite_cannot_take(changes, fixed, expected):
    """Text becomes UTF-8-encodable and capped, counts whole and in range (flagged
    estimated), the status a number, times finite; the fields changed are named."""
    record, names = ledger.storable(dataclasses.replace(rec(), **changes), NOW)
    assert record == dataclasses.replace(rec(), **{**changes, **fixed})
    assert names == expected
    for name in TEXT_FIELDS:
        value = getattr(record, name)
        assert value is None or len(value.encode()) <= 4 * ledger.MAX_TEXT_CHARS


@pytest.mark.parametrize("record", [rec(time=T0 + 0.5, model="llamé:3b", prefix="op-k"),
                                    rec(user=None, model=None), rec(),  # an int time is fine
                                    dataclasses.replace(rec(), total_ns=ledger.MAX_NS, load_ns=0,
                                                        prompt_eval_ns=1, eval_ns=None)])
def test_storable_leaves_a_clean_record_alone(record):
    """A record with nothing to fix comes back as the same object (no copy per row)."""
    stored, names = ledger.storable(record, NOW)
    assert stored is record and names == ()


@pytest.mark.parametrize("value, expected", [
    (5, (5, False)), (0, (0, False)), (ledger.MAX_TOKENS, (ledger.MAX_TOKENS, False)),
    (ledger.MAX_TOKENS + 1, (ledger.MAX_TOKENS, True)), (2**63, (ledger.MAX_TOKENS, True)),
    (-1, (0, True)), (True, (1, True)), (3.9, (3, True)), (math.inf, (0, True)),
    ("7", (7, True)), ("x", (0, True)), (None, (0, True)),
])
def test_storable_count(value, expected):
    """A token count as stored, and whether it changed."""
    assert ledger.storable_count(value) == expected


def test_the_reproductions_fail_raw_and_store_once_fixed(conn):
    """A lone surrogate and a count of 2**63 make SQLite's binding fail; fixed, they store."""
    surrogate = rec(model="llama3.2\udc00", request_id="a")
    huge = rec(completion=2**63, request_id="b")
    with pytest.raises(UnicodeEncodeError):
        insert(conn, [surrogate])
    with pytest.raises(OverflowError):
        insert(conn, [huge])
    insert(conn, [ledger.storable(r, NOW)[0] for r in (surrogate, huge)])
    assert conn.execute("SELECT model, completion_tokens, estimated FROM ledger ORDER BY id"
                        ).fetchall() == [("llama3.2\ufffd", 20, 0), ("llama3", 10**9, 1)]


# --- writing ----------------------------------------------------------------------------

def test_rows_come_back_as_the_records_written(conn):
    """Stored rows come back as the same RequestRecords, oldest first, with their ids in order."""
    written = [rec(T0 + 3600, user="bob", status=429, outcome="refused", prompt=0, completion=0),
               dataclasses.replace(rec(T0 + 7200), alias="gpt-4o-mini"),
               dataclasses.replace(rec(T0 + 86400, user=None, model=None),
                                   endpoint="/api/tags", metered=False),
               timed(rec(T0 + 86401, request_id="timed"), 9_000, 0, 2_000, 5_000),
               timed(rec(T0 + 86402, request_id="embed"), 9_000, 1_000, None, None)]
    ids = insert(conn, [rec(T0), *written])
    assert ids == [1, 2, 3, 4, 5, 6]
    back = ledger.rows_since(conn, T0 + 1)
    assert back == written
    assert all(isinstance(getattr(back[0], name), bool)
               for name in ("stream", "estimated", "metered"))


def test_minimal_row(conn):
    """The minimal form keeps who, when, which request, status, tokens and whether the
    limits count it; outcome 'unrecorded'; no model, backend, client or durations."""
    with db.transaction(conn):
        row_id = ledger.insert_minimal(conn, rec(prefix="op-k", request_id="r1"))
    assert conn.execute("SELECT id, time, user, key_prefix, request_id, endpoint, status, outcome, "
                        "prompt_tokens, completion_tokens, metered, model, backend, client, "
                        "duration_s FROM ledger").fetchall() == [
        (row_id, T0, "alice", "op-k", "r1", "/api/chat", 200, "unrecorded", 10, 20, 1,
         None, None, None, None)]


def test_last_used_at_moves_forward_only(conn):
    """touch_keys sets each key's last_used_at to the time given, never back."""
    secret = keys.load_or_create_secret(":memory:")
    _, key = accounts.create_user(conn, secret, "alice", actor="root")
    prefix = keys.key_prefix(key)
    with db.transaction(conn):
        ledger.touch_keys(conn, {prefix: T0 + 9, "op-unknown": T0})
    with db.transaction(conn):
        ledger.touch_keys(conn, {prefix: T0})
    assert accounts.list_keys(conn, "alice")[0].last_used_at == T0 + 9


# --- folding and amending -----------------------------------------------------------------

def test_fold_moves_the_watermark_in_steps(conn):
    """Rows above the watermark are folded, at most max_rows ids per step."""
    insert(conn, [rec(T0 + i, request_id=f"r{i}") for i in range(5)])
    with db.transaction(conn):
        assert ledger.fold(conn, 3) == 2
    assert watermark(conn) == 3
    assert summary(conn, "usage_hour") == [(T0 - T0 % 3600, "alice", "llama3", 3, 30, 60, 0)]
    with db.transaction(conn):
        assert ledger.fold(conn, 3) == 0
        assert ledger.fold(conn, 3) == 0  # nothing left: nothing done
    assert summary(conn, "usage_day") == [(T0 - T0 % 86400, "alice", "llama3", 5, 50, 100, 0)]
    assert summary(conn, "usage_hour_model") == [(T0 - T0 % 3600, "llama3", 5, 50, 100, 0)]


def test_rows_written_by_straight_sql_are_folded(conn):
    """The summaries come from the ledger itself: rows another program inserted count."""
    conn.execute("INSERT INTO ledger (time, user, model, endpoint, status, outcome, "
                 "prompt_tokens, completion_tokens, estimated, stream) "
                 "VALUES (?, NULL, NULL, '/x', 500, 'ok', 1, 2, 0, 0)", (T0,))
    with db.transaction(conn):
        ledger.fold(conn, 100)
    assert summary(conn, "usage_day") == [(T0 - T0 % 86400, None, None, 1, 1, 2, 1)]


def test_null_and_empty_names_stay_apart(conn):
    """A row without a user and a user named '' are different keys in the summaries."""
    insert(conn, [rec(user=None, request_id="a"), rec(user="", request_id="b"),
                  rec(user=None, request_id="c")], fold=True)
    assert [r[1:4] for r in summary(conn, "usage_day")] == [(None, "llama3", 2), ("", "llama3", 1)]


def test_amend_updates_a_folded_row_and_its_summaries(conn):
    """Exact counts replace a row's estimate; a folded row's summaries follow by trigger."""
    row = dataclasses.replace(rec(request_id="r1"), estimated=True)
    row_id, = insert(conn, [row], fold=True)
    key = ledger.RowKey(row.request_id, row.user, row.time)
    with db.transaction(conn):
        assert not ledger.amend_row(conn, row_id, key._replace(user="bob"), 1, 1)  # not its row
        assert ledger.amend_row(conn, row_id, key, 40, 8)
        assert not ledger.amend_row(conn, row_id, key, 1, 1)  # exact now: nothing to correct
    assert conn.execute("SELECT prompt_tokens, completion_tokens, estimated FROM ledger"
                        ).fetchall() == [(40, 8, 0)]
    for table in db.SUMMARIES:
        assert summary(conn, table)[0][-4:] == (1, 40, 8, 0)


def test_an_update_moving_a_folded_row_moves_its_sums(conn):
    """A folded row changed to another hour, user and error state: old bucket emptied and
    dropped, new one made."""
    insert(conn, [rec(request_id="r1")], fold=True)
    conn.execute("UPDATE ledger SET time = time + 7200, user = 'bob', status = 500")
    assert summary(conn, "usage_hour") == [
        (T0 - T0 % 3600 + 7200, "bob", "llama3", 1, 10, 20, 1)]


def test_deleting_folded_rows_takes_them_out(conn):
    """Pruning folded rows subtracts them; a bucket left empty is dropped."""
    insert(conn, [rec(T0, request_id="a"), rec(T0 + 1, request_id="b", prompt=5)], fold=True)
    conn.execute("DELETE FROM ledger WHERE request_id = 'a'")
    assert summary(conn, "usage_day") == [(T0 - T0 % 86400, "alice", "llama3", 1, 5, 20, 0)]
    conn.execute("DELETE FROM ledger")
    for table in db.SUMMARIES:
        assert summary(conn, table) == []


def test_deleting_the_newest_rows_lowers_the_watermark(conn):
    """After the newest folded rows are deleted, the next row SQLite numbers (their id
    again) is still seen as new and folded."""
    insert(conn, [rec(T0, request_id="a"), rec(T0 + 1, request_id="b")], fold=True)
    conn.execute("DELETE FROM ledger WHERE request_id = 'b'")
    assert watermark(conn) == 1
    assert insert(conn, [rec(T0 + 2, request_id="c")], fold=True) == [2]
    assert summary(conn, "usage_day")[0][3] == 2


def test_deleting_an_unfolded_row_changes_no_sum(conn):
    """Rows above the watermark are not in the summaries: deleting one subtracts nothing."""
    insert(conn, [rec(T0, request_id="a")], fold=True)
    insert(conn, [rec(T0, request_id="b"), rec(T0, request_id="c")])
    conn.execute("DELETE FROM ledger WHERE request_id = 'b'")
    assert summary(conn, "usage_day")[0][3] == 1 and watermark(conn) == 1
    with db.transaction(conn):
        ledger.fold(conn, 100)
    assert summary(conn, "usage_day")[0][3] == 2


def test_token_sums(conn):
    """Tokens per user in an id range: all of them, and those from a month's start on."""
    insert(conn, [rec(T0 - 86400, prompt=1, completion=0, request_id="a"),
                  rec(T0, prompt=10, completion=5, request_id="b"),
                  rec(T0, user=None, request_id="c"),
                  rec(T0, user="bob", request_id="d")])
    assert ledger.token_sums(conn, 0, 3, T0) == {"alice": (16, 15)}
    assert ledger.token_sums(conn, 1, 4, 0.0) == {"alice": (15, 15), "bob": (30, 30)}


def test_summaries_answer_with_their_sums(conn):
    """All-time totals per user come from the folded sums plus the rows not folded yet."""
    insert(conn, [rec(T0, request_id="a")], fold=True)
    insert(conn, [rec(T0 + 1, request_id="b", prompt=1)])
    assert reports.user_totals(conn) == {
        "alice": {"requests": 2, "prompt_tokens": 11, "completion_tokens": 40}}
    assert reports.user_totals(conn, unfolded=False)["alice"]["requests"] == 1


# --- GPU time in the summaries --------------------------------------------------------------

def gpu(conn: sqlite3.Connection, table: str) -> list[tuple]:
    """A summary's buckets with their GPU time sums (rows with it, ns; rows with a load, ns)."""
    return summary(conn, table, ("requests", *db.TIME_SUMS))


HOUR0 = T0 - T0 % 3600


def test_gpu_time_is_folded_over_the_rows_that_have_it(conn):
    """A bucket sums the timings of the rows that report them and counts those rows; rows
    without (another backend) add nothing, not even a zero that would read as known."""
    ms = 1_000_000
    insert(conn, [timed(rec(T0, request_id="a"), 9 * ms, 4 * ms, 2 * ms, 3 * ms),
                  timed(rec(T0 + 1, request_id="b"), 9 * ms, None, None, 7 * ms),  # no load
                  rec(T0 + 2, request_id="c"),  # nothing reported
                  rec(T0 + 3, user="bob", request_id="d")], fold=True)
    assert gpu(conn, "usage_hour") == [(HOUR0, "alice", "llama3", 3, 2, 12 * ms, 1, 4 * ms),
                                       (HOUR0, "bob", "llama3", 1, 0, 0, 0, 0)]
    assert gpu(conn, "usage_hour_model") == [(HOUR0, "llama3", 4, 2, 12 * ms, 1, 4 * ms)]
    assert reports.usage(conn, unfolded=False) == [
        {"key": "alice", "requests": 3, "prompt_tokens": 30, "completion_tokens": 60,
         "errors": 0, "gpu_seconds": 0.012, "load_seconds": 0.004},
        {"key": "bob", "requests": 1, "prompt_tokens": 10, "completion_tokens": 20,
         "errors": 0, "gpu_seconds": None, "load_seconds": None}]


def test_deleting_or_moving_timed_rows_keeps_the_gpu_sums_in_step(conn):
    """The triggers take a row's timings out with it: a bucket left with no timed row
    reads as unknown again, not as 0 s; a moved row takes its timings along."""
    insert(conn, [timed(rec(T0, request_id="a"), 9, 4, 2, 3), rec(T0 + 1, request_id="b")],
           fold=True)
    conn.execute("UPDATE ledger SET time = time + 7200 WHERE request_id = 'a'")
    assert gpu(conn, "usage_hour") == [(HOUR0, "alice", "llama3", 1, 0, 0, 0, 0),
                                       (HOUR0 + 7200, "alice", "llama3", 1, 1, 5, 1, 4)]
    conn.execute("UPDATE ledger SET eval_ns = 10, load_ns = NULL WHERE request_id = 'a'")
    assert gpu(conn, "usage_hour")[1] == (HOUR0 + 7200, "alice", "llama3", 1, 1, 12, 0, 0)
    conn.execute("UPDATE ledger SET time = time - 7200 WHERE request_id = 'a'")
    assert gpu(conn, "usage_day") == [(T0 - T0 % 86400, "alice", "llama3", 2, 1, 12, 0, 0)]
    conn.execute("DELETE FROM ledger WHERE request_id = 'a'")
    assert gpu(conn, "usage_day") == [(T0 - T0 % 86400, "alice", "llama3", 1, 0, 0, 0, 0)]
    assert reports.usage(conn)[0]["gpu_seconds"] is None
