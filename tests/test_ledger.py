"""The usage ledger: batched inserts, reports by user/model/day/hour, totals, replay."""

from __future__ import annotations

import calendar
import dataclasses
import sqlite3

import pytest

from ollama_proxy import accounts, db, keys, ledger
from ollama_proxy.errors import BadRequest
from ollama_proxy.usage import UsageRecord

T0 = calendar.timegm((2026, 11, 27, 7, 14, 39))  # 2026-11-27T07:14:39Z


def rec(time: float, user: str | None = "alice", model: str | None = "llama3", *,
        status: int = 200, outcome: str = "ok", prompt: int = 10, completion: int = 20,
        prefix: str | None = None) -> UsageRecord:
    return UsageRecord(request_id=f"req-{time}", time=time, endpoint="/api/chat", model=model,
                       backend="gpu1", status=status, outcome=outcome, prompt_tokens=prompt,
                       completion_tokens=completion, estimated=False, stream=True,
                       duration_s=1.5, ttfb_s=0.25, client="10.0.0.7", user=user,
                       key_prefix=prefix)


@pytest.fixture
def conn(tmp_path):
    connection = db.connect(str(tmp_path / "op.db"))
    yield connection
    connection.close()


@pytest.fixture
def filled(conn):
    ledger.insert_records(conn, [
        rec(T0),
        rec(T0 + 60, model="qwen"),
        rec(T0 + 3600, user="bob", status=429, outcome="refused", prompt=0, completion=0),
        rec(T0 + 86400, user="bob", outcome="client_closed", completion=3),
        rec(T0 + 86400 + 1, user=None, model=None, status=401, outcome="refused", prompt=0,
            completion=0),
    ])
    return conn


def test_group_by_user(filled):
    """Per user: requests, tokens, errors (non-ok outcome or status >= 400); no user first."""
    assert ledger.usage(filled) == [
        {"key": None, "requests": 1, "prompt_tokens": 0, "completion_tokens": 0, "errors": 1},
        {"key": "alice", "requests": 2, "prompt_tokens": 20, "completion_tokens": 40, "errors": 0},
        {"key": "bob", "requests": 2, "prompt_tokens": 10, "completion_tokens": 3, "errors": 2},
    ]


def test_group_by_model(filled):
    """Per model, ordered by name."""
    rows = ledger.usage(filled, group_by="model")
    assert [(r["key"], r["requests"]) for r in rows] == [(None, 1), ("llama3", 3), ("qwen", 1)]


def test_group_by_day_and_hour(filled):
    """Days and hours are UTC, as YYYY-MM-DD and YYYY-MM-DDTHH:00Z."""
    days = ledger.usage(filled, group_by="day")
    assert [(r["key"], r["requests"]) for r in days] == [("2026-11-27", 3), ("2026-11-28", 2)]
    hours = ledger.usage(filled, group_by="hour")
    assert [(r["key"], r["requests"]) for r in hours] == [
        ("2026-11-27T07:00Z", 2), ("2026-11-27T08:00Z", 1), ("2026-11-28T07:00Z", 2)]


def test_filters_since_until_user_model(filled):
    """since is inclusive, until exclusive; user and model narrow the rows."""
    assert [r["requests"] for r in ledger.usage(filled, since=T0 + 60, until=T0 + 86400)] == [1, 1]
    assert ledger.usage(filled, user="bob", group_by="day") == [
        {"key": "2026-11-27", "requests": 1, "prompt_tokens": 0, "completion_tokens": 0,
         "errors": 1},
        {"key": "2026-11-28", "requests": 1, "prompt_tokens": 10, "completion_tokens": 3,
         "errors": 1}]
    assert ledger.usage(filled, model="qwen") == [
        {"key": "alice", "requests": 1, "prompt_tokens": 10, "completion_tokens": 20, "errors": 0}]
    assert ledger.usage(filled, since=T0 + 10 * 86400) == []


def test_bad_group_by_is_400(conn):
    """An unknown group_by names the field and the allowed values."""
    with pytest.raises(BadRequest, match='"group_by" must be one of: user, model, day, hour'):
        ledger.usage(conn, group_by="week")


def test_user_totals(filled):
    """All-time totals per user name; rows without a user are left out."""
    assert ledger.user_totals(filled) == {
        "alice": {"requests": 2, "prompt_tokens": 20, "completion_tokens": 40},
        "bob": {"requests": 2, "prompt_tokens": 10, "completion_tokens": 3},
    }


def test_rows_since_round_trips_records(filled):
    """Stored rows come back as the same UsageRecords, oldest first."""
    back = ledger.rows_since(filled, T0 + 3600)
    assert back == [rec(T0 + 3600, user="bob", status=429, outcome="refused", prompt=0,
                        completion=0),
                    rec(T0 + 86400, user="bob", outcome="client_closed", completion=3),
                    rec(T0 + 86400 + 1, user=None, model=None, status=401, outcome="refused",
                        prompt=0, completion=0)]
    assert isinstance(back[0].stream, bool) and isinstance(back[0].estimated, bool)


def test_last_used_at_is_the_latest_time_per_key(conn):
    """One batch sets each key's last_used_at to its latest row; an older batch never rewinds it."""
    secret = keys.load_or_create_secret(":memory:")
    _, key = accounts.create_user(conn, secret, "alice", actor="root")
    prefix = keys.key_prefix(key)
    ledger.insert_records(conn, [rec(T0 + 5, prefix=prefix), rec(T0 + 9, prefix=prefix),
                                 rec(T0 + 7, prefix=prefix), rec(T0 + 8, prefix="op-unknown")])
    assert accounts.list_keys(conn, "alice")[0].last_used_at == T0 + 9
    ledger.insert_records(conn, [rec(T0, prefix=prefix)])
    assert accounts.list_keys(conn, "alice")[0].last_used_at == T0 + 9


def test_empty_batch_and_atomic_batch(conn):
    """An empty batch writes nothing; a batch with a bad row writes none of its rows."""
    ledger.insert_records(conn, [])
    bad = dataclasses.replace(rec(T0), endpoint=None)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        ledger.insert_records(conn, [rec(T0), bad])
    assert not conn.in_transaction
    assert ledger.usage(conn) == []
