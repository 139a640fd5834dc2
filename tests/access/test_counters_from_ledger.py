"""The limits' counters rebuilt from a ledger file at start (access/counters_from_ledger.py):
windows from the last day's rows, quotas from the summaries, and a long backlog summed
after the start."""

from __future__ import annotations

import calendar

import pytest

from counter_counts import counts
from ledger_rows import insert as insert_rows
from ollama_proxy.access import counters_from_ledger
from ollama_proxy.access.counters_from_ledger import load_counters
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.store import db


def utc(*ymdhms: int) -> float:
    return float(calendar.timegm((*ymdhms, 0, 0, 0)))


def row(t: float, endpoint: str = "/api/chat", outcome: str = "ok", prompt: int = 10,
        completion: int = 20, user: str = "ann", metered: bool = True) -> RequestRecord:
    return RequestRecord(request_id=f"r{t}{endpoint}", time=t, endpoint=endpoint, model="m",
                       backend="b", status=200, outcome=outcome, prompt_tokens=prompt,
                       completion_tokens=completion, estimated=False, stream=False,
                       duration_s=0.1, ttfb_s=0.05, client="c", user=user, metered=metered)


def test_load_counters_from_the_ledger(tmp_path):
    """Windows from the last day's metered rows (generations and embeddings: the row says
    so, its path is not matched again), not refusals; the month and all-time quotas from
    sums."""
    now = utc(2025, 3, 1, 0, 10, 0)
    conn = db.connect(str(tmp_path / "op.db"))
    try:
        insert_rows(conn, [
            row(utc(2024, 12, 5, 0, 0, 0), prompt=1000, completion=0),
            row(now - 3600),                                      # February, within the day
            row(now - 30, "/v1/embeddings", prompt=7, completion=0),
            row(now - 20, "/api/tags", prompt=0, completion=0, metered=False),  # counts nothing
            row(now - 15, prompt=0, completion=0, metered=False),  # the row says: not counted
            row(now - 10, outcome="refused", prompt=0, completion=0),
            row(now - 5, user="bob", completion=1),
        ])
        store, backlog = load_counters(conn, now)
    finally:
        conn.close()
    assert counts(store.get("ann"), now) == {
        "requests_minute": 1, "requests_day": 2, "tokens_minute": 7, "tokens_day": 37,
        "tokens_total": 1037, "tokens_month": 7, "in_flight": 0}
    assert counts(store.get("bob"), now)["tokens_minute"] == 11
    assert backlog is None


LEDGER_ROWS_2025 = [
    row(utc(2024, 12, 5, 0, 0, 0), prompt=1000, completion=0),
    row(utc(2025, 2, 28, 23, 0, 0)),
    row(utc(2025, 3, 1, 0, 5, 0), user="bob", completion=1),
]


@pytest.mark.parametrize("folded", [0, 1, 3])
def test_a_long_backlog_is_summed_after_the_start(tmp_path, monkeypatch, folded):
    """Past SYNC_BACKLOG_ROWS unfolded rows, load_counters leaves their quota sums out and
    names them; added later, the counters are those of a start without a backlog."""
    now = utc(2025, 3, 1, 0, 10, 0)
    conn = db.connect(str(tmp_path / "op.db"))
    try:
        insert_rows(conn, LEDGER_ROWS_2025[:folded], fold=True)
        insert_rows(conn, LEDGER_ROWS_2025[folded:])
        whole, none = load_counters(conn, now)
        monkeypatch.setattr(counters_from_ledger, "SYNC_BACKLOG_ROWS", 0)
        store, backlog = load_counters(conn, now)
        assert none is None and (backlog is None) == (folded == 3)
        if backlog is not None:
            assert backlog.upto_id == 3 and backlog.after_id == folded
            backlog.add(store, backlog.sums(conn), now)
    finally:
        conn.close()
    for user in ("ann", "bob"):
        assert counts(store.get(user), now) == counts(whole.get(user), now)
    assert counts(store.get("ann"), now)["tokens_total"] == 1030
