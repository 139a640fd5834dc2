"""The trio side of the database: group commit, and 'recorded' meaning 'committed'."""

from __future__ import annotations

import dataclasses
import threading

import trio
import trio.testing

from ollama_proxy import db
from ollama_proxy.storage import LedgerWriter
from ollama_proxy.usage import UsageRecord


def record(request_id: str) -> UsageRecord:
    return UsageRecord(request_id=request_id, time=1.0, endpoint="/api/chat", model="m",
                       backend="b", status=200, outcome="ok", prompt_tokens=3,
                       completion_tokens=4, estimated=False, stream=True, duration_s=0.1,
                       ttfb_s=0.01, client="127.0.0.1", user="alice", key_prefix="op-AbCd1234")


def rows(path) -> list[str]:
    conn = db.connect(str(path))
    try:
        return [r[0] for r in conn.execute("SELECT request_id FROM ledger ORDER BY id")]
    finally:
        conn.close()


async def test_record_returns_once_committed(nursery, tmp_path):
    """When record() returns, another connection already sees the row."""
    path = tmp_path / "l.db"
    writer = LedgerWriter(str(path))
    await nursery.start(writer.run)
    with trio.fail_after(10):
        await writer.record(record("a"))
        assert rows(path) == ["a"]


async def test_concurrent_records_share_commits(nursery, tmp_path):
    """Rows arriving while a commit runs go into the next one: fewer commits than rows."""
    path = tmp_path / "l.db"
    writer = LedgerWriter(str(path))
    await nursery.start(writer.run)
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            for i in range(200):
                inner.start_soon(writer.record, record(f"r{i}"))
        assert sorted(rows(path)) == sorted(f"r{i}" for i in range(200))
        assert writer.rows_written == 200 and writer.commits < 200


async def test_no_wait_mode_returns_before_commit(nursery, tmp_path):
    """ledger_wait = false: record() does not wait; the row still arrives."""
    path = tmp_path / "l.db"
    writer = LedgerWriter(str(path), wait=False)
    await nursery.start(writer.run)
    with trio.fail_after(10):
        await writer.record(record("x"))
        assert writer.rows_written == 0  # not committed yet: nothing ran in between
        await writer.flush()
        assert rows(path) == ["x"]


async def test_a_bug_in_one_batch_does_not_stall_the_writer(nursery, tmp_path, monkeypatch):
    """A non-SQLite error drops that batch (logged); the writer keeps serving the next ones."""
    from ollama_proxy import ledger

    real = ledger.insert_records
    calls = []

    def flaky(conn, records, touch=lambda prefix: True):
        calls.append(len(records))
        if len(calls) == 1:
            raise ValueError("boom")
        real(conn, records, touch)

    monkeypatch.setattr(ledger, "insert_records", flaky)
    path = tmp_path / "l.db"
    writer = LedgerWriter(str(path))
    await nursery.start(writer.run)
    with trio.fail_after(10):
        await writer.record(record("lost"))
        await writer.record(record("kept"))
        assert rows(path) == ["kept"]


async def test_then_runs_in_the_writer_thread_right_after_the_commit(nursery, tmp_path):
    """``then`` (the response's last bytes) runs once its row is visible to others."""
    path = tmp_path / "l.db"
    writer = LedgerWriter(str(path))
    await nursery.start(writer.run)
    seen: list[tuple[list[str], bool]] = []

    def then() -> None:
        seen.append((rows(path), threading.current_thread() is not threading.main_thread()))

    with trio.fail_after(10):
        await writer.record(record("a"), then)
    assert seen == [(["a"], True)]


async def test_then_is_dropped_when_records_are_not_waited_for(nursery, tmp_path):
    """ledger_wait = false: nobody waits, so the caller sends its bytes itself."""
    path = tmp_path / "l.db"
    writer = LedgerWriter(str(path), wait=False)
    await nursery.start(writer.run)
    called = []
    with trio.fail_after(10):
        await writer.record(record("x"), lambda: called.append(1))
        await writer.flush()
    assert rows(path) == ["x"] and called == []


async def test_a_cancelled_watcher_hands_the_watch_on(nursery, tmp_path, monkeypatch):
    """The waiter watching the wake-up socket gives up (its deadline): another waiter
    takes the watch, and still returns once its own row is committed."""
    from ollama_proxy import ledger

    real = ledger.insert_records
    go = threading.Event()

    def held(conn, records, touch=lambda prefix: True):
        go.wait(10)
        real(conn, records, touch)

    monkeypatch.setattr(ledger, "insert_records", held)
    path = tmp_path / "l.db"
    writer = LedgerWriter(str(path))
    await nursery.start(writer.run)
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
            go.set()
    assert outcomes == ["a gave up", "b"] and rows(path) == ["a", "b"]


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
        await writer.record(record("dup"))  # exact, same id
        await writer.record(estimated)
        await writer.record(dataclasses.replace(estimated, request_id="other"))
        await writer.amend("dup", 40, 8)  # without waiting for the rows: behind them
        conn = db.connect(str(path))
        try:
            got = conn.execute("SELECT request_id, prompt_tokens, completion_tokens, estimated "
                               "FROM ledger ORDER BY id").fetchall()
        finally:
            conn.close()
    assert got == [("dup", 3, 10, 1), ("dup", 3, 4, 0), ("dup", 40, 8, 0), ("other", 3, 10, 1)]
