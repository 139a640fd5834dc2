"""The trio side of the database: group commit, 'recorded' meaning 'committed', no row
lost to a bad value (row by row, minimal form), amendments, key touches, folding."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading

import pytest
import trio
import trio.testing

from ledger_rows import insert
from ollama_proxy.access import keys
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.store import accounts, db, group_commit, ledger, reports
from ollama_proxy.store.threads import LedgerWriter


def record(request_id: str, **changes) -> RequestRecord:
    base = RequestRecord(request_id=request_id, time=1.0, endpoint="/api/chat", model="m",
                       backend="b", status=200, outcome="ok", prompt_tokens=3,
                       completion_tokens=4, estimated=False, stream=True, duration_s=0.1,
                       ttfb_s=0.01, client="127.0.0.1", user="alice", key_prefix="op-AbCd1234")
    return dataclasses.replace(base, **changes)


def query(path, sql: str) -> list[tuple]:
    conn = db.connect(str(path))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def rows(path) -> list[str]:
    return [r[0] for r in query(path, "SELECT request_id FROM ledger ORDER BY id")]


class Gate:
    """Holds the writer thread while it writes a first row, "gate", so that the rows
    queued meanwhile make up the next batch, whole."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._open = threading.Event()
        self._holding = threading.Event()
        insert_rows = ledger.insert_rows

        def held(conn, records):
            if any(r.request_id == "gate" for r in records):
                self._holding.set()
                self._open.wait(10)
            return insert_rows(conn, records)

        monkeypatch.setattr(ledger, "insert_rows", held)

    async def close(self, writer: LedgerWriter, nursery: trio.Nursery) -> None:
        """Returns once the writer thread is held (else rows queued meanwhile could join
        the gate's own batch)."""
        nursery.start_soon(writer.record, record("gate"))
        await trio.to_thread.run_sync(self._holding.wait, 10)

    def open(self) -> None:
        self._open.set()


async def start(nursery: trio.Nursery, path, **kwargs) -> LedgerWriter:
    writer = LedgerWriter(str(path), **kwargs)
    await nursery.start(writer.run)
    return writer


async def test_record_returns_once_committed(nursery, tmp_path):
    """When record() returns, another connection already sees the row."""
    path = tmp_path / "l.db"
    writer = await start(nursery, path)
    with trio.fail_after(10):
        await writer.record(record("a"))
        assert rows(path) == ["a"]


async def test_concurrent_records_share_commits(nursery, tmp_path):
    """Rows arriving while a commit runs go into the next one: fewer commits than rows."""
    path = tmp_path / "l.db"
    writer = await start(nursery, path)
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            for i in range(200):
                inner.start_soon(writer.record, record(f"r{i}"))
        assert sorted(rows(path)) == sorted(f"r{i}" for i in range(200))
        stats = writer.stats()
        assert stats["rows_written"] == 200 and stats["commits"] < 200
        assert stats["rows_minimal"] == stats["rows_lost"] == 0


async def test_no_wait_mode_returns_before_commit(nursery, tmp_path, monkeypatch):
    """ledger_wait = false: record() returns while the thread is busy; the row still arrives."""
    path = tmp_path / "l.db"
    writer = await start(nursery, path, wait=False)
    gate = Gate(monkeypatch)
    with trio.fail_after(10):
        await gate.close(writer, nursery)
        await writer.record(record("x"))
        gate.open()
        await writer.flush()
    assert rows(path)[-1] == "x"


async def test_a_cancelled_watcher_hands_the_watch_on(nursery, tmp_path, monkeypatch):
    """The waiter watching the wake-up socket gives up (its deadline): another waiter
    takes the watch, and still returns once its own row is committed."""
    path = tmp_path / "l.db"
    writer = await start(nursery, path)
    gate = Gate(monkeypatch)
    await gate.close(writer, nursery)
    outcomes: list[str] = []
    first = trio.CancelScope()

    async def give_up() -> None:
        with first:
            await writer.record(record("a"))
        outcomes.append("a gave up" if first.cancelled_caught else "a")

    async def wait() -> None:
        await writer.record(record("b"))
        outcomes.append("b")

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(give_up)
            await trio.testing.wait_all_tasks_blocked()  # "a" watches the socket
            inner.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()  # "b" waits for the watch to end
            first.cancel()
            await trio.testing.wait_all_tasks_blocked()  # "b" watches now
            gate.open()
    assert outcomes == ["a gave up", "b"] and rows(path) == ["gate", "a", "b"]


# --- no row lost -----------------------------------------------------------------------

def poison(path, when: str, how: str = "ABORT") -> None:
    """A trigger that makes SQLite refuse the rows ``when`` matches."""
    conn = db.connect(str(path))
    conn.execute(f"CREATE TRIGGER poison BEFORE INSERT ON ledger WHEN {when} "
                 f"BEGIN SELECT RAISE({how}, 'poisoned row'); END")
    conn.close()


async def write_batch(nursery, monkeypatch, path, batch: list[RequestRecord]) -> LedgerWriter:
    """Start a writer and have it write ``batch`` in one transaction (then the gate row)."""
    writer = await start(nursery, path)
    gate = Gate(monkeypatch)
    with trio.fail_after(10):
        await gate.close(writer, nursery)
        async with trio.open_nursery() as inner:
            for r in batch:
                inner.start_soon(writer.record, r)
            await trio.testing.wait_all_tasks_blocked()  # all queued behind the gate
            gate.open()
    return writer


@pytest.mark.parametrize("how", ["ABORT", "FAIL", "ROLLBACK"])
async def test_a_poison_row_costs_no_other_row(nursery, tmp_path, how, caplog, monkeypatch):
    """SQLite refuses one row in the middle of a batch (a trigger): the batch is written
    again row by row; the honest rows are all there, the refused one in minimal form."""
    path = tmp_path / "l.db"
    db.connect(str(path)).close()
    poison(path, "new.model = 'poison'", how)
    batch = [record(f"h{i}") for i in range(5)]
    batch.insert(2, record("bad", model="poison", user="mallory", prompt_tokens=7))
    writer = await write_batch(nursery, monkeypatch, path, batch)
    assert sorted(rows(path)) == ["bad", "gate", "h0", "h1", "h2", "h3", "h4"]
    assert query(path, "SELECT user, model, outcome, prompt_tokens, backend FROM ledger "
                       "WHERE request_id = 'bad'") == [("mallory", None, "unrecorded", 7, None)]
    stats = writer.stats()
    assert (stats["rows_written"], stats["rows_minimal"], stats["rows_lost"]) == (7, 1, 0)
    assert "request bad: SQLite refused its ledger row" in caplog.text


async def test_a_row_refused_even_minimal_is_counted_and_logged(nursery, tmp_path, caplog,
                                                              monkeypatch):
    """A row SQLite refuses in every form is counted lost and logged whole; the others stay."""
    path = tmp_path / "l.db"
    db.connect(str(path)).close()
    poison(path, "new.user = 'mallory'")
    writer = await write_batch(nursery, monkeypatch, path, [record("h0"), record("bad", user="mallory"),
                                               record("h1")])
    assert sorted(rows(path)) == ["gate", "h0", "h1"]
    assert writer.stats()["rows_lost"] == 1
    assert "ledger row LOST" in caplog.text and "request_id='bad'" in caplog.text


async def test_a_transient_error_retries_the_rows_never_twice(nursery, tmp_path, monkeypatch):
    """A busy or failing file (OperationalError) makes the rows wait and retry; row by row,
    the rows committed before the failure are not written again."""
    monkeypatch.setattr(group_commit, "RETRY_DELAY_S", 0.0)
    real = ledger.insert_row
    failures = []

    def flaky(conn, r):
        if r.request_id == "h2" and not failures:
            failures.append(r.request_id)
            raise sqlite3.OperationalError("database is locked")
        return real(conn, r)

    monkeypatch.setattr(ledger, "insert_row", flaky)
    path = tmp_path / "l.db"
    db.connect(str(path)).close()
    poison(path, "new.model = 'poison'")
    await write_batch(nursery, monkeypatch, path, [record("h1"), record("bad", model="poison"),
                                      record("h2"), record("h3")])
    assert failures == ["h2"]
    assert sorted(rows(path)) == ["bad", "gate", "h1", "h2", "h3"]


@pytest.mark.parametrize("error, transient", [
    (sqlite3.OperationalError("database is locked"), True),
    (sqlite3.IntegrityError("constraint failed"), False),
    (UnicodeEncodeError("utf-8", "\udc00", 0, 1, "surrogates not allowed"), False),
    (OverflowError("Python int too large to convert to SQLite INTEGER"), False),
])
def test_transient_errors(error, transient):
    """Only errors that pass by themselves are retried as they are."""
    assert db.transient(error) is transient


def test_transient_by_sqlite_error_code(tmp_path):
    """An OperationalError that will fail again (a bad statement) is not transient."""
    conn = db.connect(str(tmp_path / "l.db"))
    with pytest.raises(sqlite3.OperationalError) as info:
        conn.execute("SELECT * FROM no_such_table")
    assert not db.transient(info.value)


async def test_unstorable_values_are_fixed_before_queueing(nursery, tmp_path, caplog):
    """A lone surrogate and a count of 2**63 reach the file fixed, flagged and logged."""
    path = tmp_path / "l.db"
    writer = await start(nursery, path)
    with trio.fail_after(10):
        await writer.record(record("r", model="llama3.2\udc00", completion_tokens=2**63))
    assert query(path, "SELECT model, completion_tokens, estimated FROM ledger") == [
        ("llama3.2\ufffd", ledger.MAX_TOKENS, 1)]
    assert "request r: its ledger row had unstorable values, fixed: completion_tokens, " \
           "estimated, model" \
        in caplog.text


# --- amendments, touches, folding ---------------------------------------------------------

async def test_amend_updates_the_row_and_the_summaries(nursery, tmp_path, caplog):
    """Exact counts replace the estimate of the row recorded (one written before the
    start too); an unknown row is logged; counts are clamped like rows'."""
    caplog.set_level(logging.WARNING)
    path = tmp_path / "l.db"
    db.connect(str(path)).close()
    conn = db.connect(str(path))
    insert(conn, [record("old", time=5.0, estimated=True)], fold=True)  # before this start
    conn.close()
    writer = await start(nursery, path)
    with trio.fail_after(10):
        await writer.record(record("a", estimated=True))
        await writer.record(record("a", estimated=True, time=2.0))
        await writer.amend(record("a", time=2.0), 40, 8)
        await writer.amend(record("old", time=5.0), 1, 1)
        await writer.amend(record("nobody"), 1, 1)
        await writer.record(record("b", estimated=True))
        await writer.amend(record("b"), 2**63, 1)
    assert query(path, "SELECT request_id, time, prompt_tokens, completion_tokens, estimated "
                       "FROM ledger ORDER BY id") == [
        ("old", 5.0, 1, 1, 0), ("a", 1.0, 3, 4, 1), ("a", 2.0, 40, 8, 0),
        ("b", 1.0, ledger.MAX_TOKENS, 1, 1)]
    conn = db.connect(str(path))
    try:  # the summaries followed the amended folded row: reports still add up
        assert reports.user_totals(conn)["alice"]["prompt_tokens"] == 1 + 3 + 40 + 10**9
    finally:
        conn.close()
    assert writer.stats()["amended"] == 3
    assert "request nobody: exact counts came, but its estimated ledger row is unknown" \
        in caplog.text


async def test_amend_sees_a_row_of_the_same_batch(nursery, tmp_path, monkeypatch):
    """An amendment queued right behind its row, in the same batch, finds it."""
    path = tmp_path / "l.db"
    writer = await start(nursery, path)
    gate = Gate(monkeypatch)
    with trio.fail_after(10):
        await gate.close(writer, nursery)
        async with trio.open_nursery() as inner:
            inner.start_soon(writer.record, record("a", estimated=True))
            await trio.testing.wait_all_tasks_blocked()
            inner.start_soon(writer.amend, record("a"), 9, 9)
            await trio.testing.wait_all_tasks_blocked()
            gate.open()
    assert query(path, "SELECT prompt_tokens FROM ledger WHERE request_id = 'a'") == [(9,)]


async def test_touch_is_written_with_a_later_batch(nursery, tmp_path):
    """touch() returns at once; the key's last_used_at is written with the next batch."""
    path = tmp_path / "l.db"
    conn = db.connect(str(path))
    _, key = accounts.create_user(conn, keys.load_or_create_secret(":memory:"), "bob",
                                  actor="root")
    conn.close()
    writer = await start(nursery, path)
    writer.touch(keys.key_prefix(key), 1234.0)
    with trio.fail_after(10):
        await writer.record(record("a", key_prefix=None))
    assert query(path, "SELECT last_used_at FROM keys") == [(1234.0,)]


async def test_flush_covers_a_touch(nursery, tmp_path, monkeypatch):
    """flush() returns only once the touches queued before it are committed too, so a
    key used on /v1/me shows its last_used_at when read next (flush counted rows only)."""
    path = tmp_path / "l.db"
    conn = db.connect(str(path))
    _, key = accounts.create_user(conn, keys.load_or_create_secret(":memory:"), "bob",
                                  actor="root")
    conn.close()
    prefix = keys.key_prefix(key)
    holding, release = threading.Event(), threading.Event()
    touch_keys = ledger.touch_keys

    def held(conn, last_used):
        if prefix in last_used:
            holding.set()
            release.wait(10)
        touch_keys(conn, last_used)

    monkeypatch.setattr(ledger, "touch_keys", held)
    writer = await start(nursery, path)
    flushed: list[bool] = []

    async def flush() -> None:
        await writer.flush()
        flushed.append(True)

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            writer.touch(prefix, 1234.0)
            inner.start_soon(flush)
            await trio.to_thread.run_sync(holding.wait, 10)  # the touch's batch is open
            await trio.testing.wait_all_tasks_blocked()
            assert flushed == []
            release.set()
    assert query(path, "SELECT last_used_at FROM keys") == [(1234.0,)]


async def test_rows_are_folded_mine_and_others(tmp_path):
    """The writer folds what it wrote and what others wrote into the summaries (at the
    latest when it stops)."""
    path = tmp_path / "l.db"
    conn = db.connect(str(path))
    insert(conn, [record("foreign", user="carol", prompt_tokens=100)])
    conn.close()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            writer = await start(nursery, path)
            await writer.record(record("mine"))
            nursery.cancel_scope.cancel()
    assert query(path, "SELECT user, requests, prompt_tokens FROM usage_day ORDER BY user") == [
        ("alice", 1, 3), ("carol", 1, 100)]
    assert writer.stats()["unfolded"] == 0


async def test_amend_corrects_the_newest_estimated_row_of_a_request_id(nursery, tmp_path):
    """amend() is queued behind the rows before it and returns once committed: the
    newest estimated row of that id gets the counts and estimated = 0; an exact row or
    an older row with the same (client-chosen) id is left alone."""
    path = tmp_path / "l.db"
    writer = LedgerWriter(str(path), wait=False)
    await nursery.start(writer.run)
    estimated = dataclasses.replace(record("dup"), estimated=True, prompt_tokens=3,
                                    completion_tokens=10)
    with trio.fail_after(10):
        await writer.record(estimated)
        await writer.record(estimated)
        await writer.record(record("dup"))  # exact, same id, the newest
        await writer.record(dataclasses.replace(estimated, request_id="other"))
        await writer.amend(estimated, 40, 8)  # without waiting for the rows: behind them
    assert query(path, "SELECT request_id, prompt_tokens, completion_tokens, estimated "
                       "FROM ledger ORDER BY id") == [
        ("dup", 3, 10, 1), ("dup", 40, 8, 0), ("dup", 3, 4, 0), ("other", 3, 10, 1)]


async def test_amend_never_corrects_another_users_row_of_the_same_request_id(nursery,
                                                                            tmp_path):
    """Two users sent the same X-Request-Id: the counts of alice's stream go to alice's
    row, whichever row came last (they once went to bob's)."""
    path = tmp_path / "l.db"
    writer = await start(nursery, path)
    alice = record("same", estimated=True, time=1.0)
    with trio.fail_after(10):
        await writer.record(alice)
        await writer.record(record("same", estimated=True, user="bob", time=1.5))
        await writer.amend(alice, 40, 8)
    assert query(path, "SELECT user, prompt_tokens, completion_tokens, estimated "
                       "FROM ledger ORDER BY id") == [("alice", 40, 8, 0), ("bob", 3, 4, 1)]
