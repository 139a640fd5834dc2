"""The database file: settings, numbered migrations, refusal of newer files, transactions."""

from __future__ import annotations

import calendar
import hashlib
import json
import sqlite3

import pytest

from ollama_proxy.api.routes import PREFIX_ROUTES, ROUTES
from ollama_proxy.errors import StoreError
from ollama_proxy.store import db, ledger, reports

METERED_MIGRATION = next(m for m in db.MIGRATIONS if "ADD COLUMN metered" in m)
GPU_TIME_MIGRATION = next(m for m in db.MIGRATIONS if "ADD COLUMN eval_ns" in m)


def fold_old_file(conn: sqlite3.Connection) -> None:
    """Fold every row of a file from before migration 7 (the folds of the day: no GPU time)."""
    with db.transaction(conn):
        for table in db.SUMMARIES:
            conn.execute(db.fold_sql(table, timed=False), (0, 10**9))
        conn.execute("UPDATE meta SET value = (SELECT MAX(id) FROM ledger) "
                     "WHERE key = 'ledger_folded'")


def test_fresh_file_reaches_current_version_in_wal_mode(tmp_path):
    """A new file gets every migration, WAL, foreign keys and the accounts counter."""
    conn = db.connect(str(tmp_path / "op.db"))
    assert db.user_version(conn) == db.SCHEMA_VERSION == len(db.MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "users", "keys", "ledger", "audit"} <= tables
    assert conn.execute("SELECT value FROM meta WHERE key = 'accounts_seq'").fetchone() == ("0",)


def test_reopening_is_a_no_op(tmp_path):
    """Opening a current file twice changes nothing."""
    path = str(tmp_path / "op.db")
    db.connect(path).close()
    conn = db.connect(path)
    assert db.user_version(conn) == db.SCHEMA_VERSION


def test_v0_file_with_data_migrates(tmp_path):
    """A version-0 file that already holds data is brought up to date, data kept."""
    path = str(tmp_path / "op.db")
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE notes (text TEXT)")
    raw.execute("INSERT INTO notes VALUES ('keep me')")
    raw.commit()
    raw.close()
    conn = db.connect(path)
    assert db.user_version(conn) == db.SCHEMA_VERSION
    assert conn.execute("SELECT text FROM notes").fetchall() == [("keep me",)]


def test_old_version_gets_new_migrations(tmp_path, monkeypatch):
    """A file at version 1 gets a later migration appended to MIGRATIONS, rows kept."""
    path = str(tmp_path / "op.db")
    conn = db.connect(path)
    conn.execute("INSERT INTO audit (time, actor, action, target) VALUES (1, 'a', 'b', 'c')")
    conn.close()
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS,
                                           "ALTER TABLE audit ADD COLUMN note TEXT; "
                                           "UPDATE audit SET note = 'migrated';"])
    conn = db.connect(path)
    assert db.user_version(conn) == len(db.MIGRATIONS) == db.SCHEMA_VERSION + 1
    assert conn.execute("SELECT actor, note FROM audit").fetchall() == [("a", "migrated")]


def test_failed_migration_leaves_the_file_at_its_version(tmp_path, monkeypatch):
    """A migration that fails half-way is rolled back as a whole."""
    path = str(tmp_path / "op.db")
    db.connect(path).close()
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS,
                                           "CREATE TABLE extra (x); SELECT * FROM missing;"])
    with pytest.raises(StoreError, match="missing"):
        db.connect(path)
    monkeypatch.undo()
    conn = db.connect(path)
    assert db.user_version(conn) == db.SCHEMA_VERSION
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None


def test_newer_file_is_refused_with_a_clear_message(tmp_path):
    """A file from a newer ollama-proxy is refused, saying what to do."""
    path = str(tmp_path / "op.db")
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError) as info:
        db.connect(path)
    assert str(info.value) == (
        f"database {path} has schema version {db.SCHEMA_VERSION + 1}, newer than this "
        f"ollama-proxy knows ({db.SCHEMA_VERSION}): use a newer ollama-proxy")


def test_not_a_database_is_a_store_error(tmp_path):
    """A file that is not SQLite gives a StoreError naming the path."""
    path = tmp_path / "op.db"
    path.write_bytes(b"this is not a database at all, just some text" * 40)
    with pytest.raises(StoreError, match="op.db"):
        db.connect(str(path))


def test_transaction_commits_or_rolls_back(tmp_path):
    """The body's writes are all kept, or none when it raises."""
    conn = db.connect(str(tmp_path / "op.db"))
    with db.transaction(conn):
        conn.execute("INSERT INTO meta VALUES ('a', '1')")
    with pytest.raises(RuntimeError), db.transaction(conn):
        conn.execute("INSERT INTO meta VALUES ('b', '2')")
        raise RuntimeError("boom")
    assert not conn.in_transaction
    assert conn.execute("SELECT key FROM meta WHERE key IN ('a', 'b')").fetchall() == [("a",)]


def test_second_connection_sees_commits(tmp_path):
    """Two connections on one file (server and CLI) see each other's commits."""
    path = str(tmp_path / "op.db")
    first, second = db.connect(path), db.connect(path)
    with db.transaction(first):
        first.execute("INSERT INTO meta VALUES ('from', 'first')")
    assert second.execute("SELECT value FROM meta WHERE key = 'from'").fetchone() == ("first",)


def test_opening_a_current_file_needs_no_write_lock(tmp_path):
    """The CLI can open the file while the server holds the write lock (no busy wait)."""
    path = str(tmp_path / "op.db")
    writer = db.connect(path)
    writer.execute("BEGIN IMMEDIATE")
    reader = db.connect(path)  # a write would wait out busy_timeout, then fail
    assert db.user_version(reader) == db.SCHEMA_VERSION
    writer.execute("ROLLBACK")


def test_an_older_file_gets_empty_summaries_and_its_rows_are_reported(tmp_path, monkeypatch):
    """A file from before the summaries (version 1) with ledger rows: migrated, the sums
    start empty below watermark 0, and reports count its rows all the same."""
    path = str(tmp_path / "op.db")
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:1])
    old = db.connect(path)
    old.execute("INSERT INTO ledger (time, user, endpoint, status, outcome, prompt_tokens, "
                "completion_tokens, estimated, stream) VALUES (0, 'ann', '/api/chat', 200, 'ok', "
                "5, 6, 0, 0)")
    old.close()
    monkeypatch.undo()
    conn = db.connect(path)
    assert db.user_version(conn) == db.SCHEMA_VERSION
    assert ledger.fold_state(conn) == (0, 1)
    assert conn.execute("SELECT COUNT(*) FROM usage_day").fetchone() == (0,)
    assert reports.user_totals(conn) == {
        "ann": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 6}}


def test_an_older_file_gets_its_expiry_limits_in_seconds(tmp_path, monkeypatch):
    """A file from before migration 3 keeps a user's expires_at as ISO text: migrated, it
    holds the same moment in Unix seconds, and every other limit and user is as it was."""
    path = str(tmp_path / "op.db")
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:2])
    old = db.connect(path)
    for name, limits in (("ann", '{"expires_at": "2026-11-27T07:14:39Z", "token_quota": 5}'),
                         ("bob", '{"expires_at": null, "allowed_models": ["a*"]}'),
                         ("cy", "{}")):
        old.execute("INSERT INTO users (name, role, limits, created_at) VALUES (?, 'user', ?, 0)",
                    (name, limits))
    old.close()
    monkeypatch.undo()
    conn = db.connect(path)
    stored = {name: json.loads(limits)
              for name, limits in conn.execute("SELECT name, limits FROM users")}
    assert stored == {"ann": {"expires_at": calendar.timegm((2026, 11, 27, 7, 14, 39)),
                              "token_quota": 5},
                      "bob": {"expires_at": None, "allowed_models": ["a*"]},
                      "cy": {}}


def test_shipped_migrations_never_change():
    """Migration 2 is generated by helpers that the summaries' folding also uses: a change
    to them (error_sql, bucket_sql...) would leave databases migrated before with other
    triggers than the code folds with. Change nothing shipped: add a migration."""
    shipped = ["f14d5f488daa9a381c8c22d67fc9eb13438ee416997b44b54c76a6654150918e",
               "9ef928b35b3d13d0731ae8f5074c1520ec0e4ce353ba87dc1e2e71fabceae3d4",
               "4088b51eb12c233caa6c4eb01caf5abd4a70648c60b50aa3c4853d39306804ae",  # expires_at
               "f5736803827aad45dc1d1b97f057b54ccca8431e88f251495ce5dbf91a82f53b",  # metered
               "ef78fc91886509043c25228815a801a0594bf4d9f53c6d5db9baabcb7273ad44",  # alias
               "3fed73fefe58d3b21abf1f9e8cfc2f233a37d6fdb03817fffeee5731987e301e",  # queued_s
               # GPU time: made by the summaries' helpers too (their timed=True output)
               "a4fd260467f54b110c6b249915cec9ad1d191c24be77a986630b1aac98a6e76c"]
    assert [hashlib.sha256(m.encode()).hexdigest()
            for m in db.MIGRATIONS[:len(shipped)]] == shipped


def test_rows_from_before_the_metered_column_get_it_from_their_path(tmp_path, monkeypatch):
    """The migration that adds ``metered`` fills it for the rows already there by the
    rule a start used before it (the route table): generations and embeddings count,
    listings, management and unknown paths do not. The summaries do not change."""
    path = str(tmp_path / "op.db")
    migration = db.MIGRATIONS.index(METERED_MIGRATION)
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:migration])
    old = db.connect(path)
    endpoints = [*ROUTES, *(prefix + "x" for prefix, _route in PREFIX_ROUTES), "/api/chat/",
                 "/nowhere", "/API/CHAT"]
    old.executemany("INSERT INTO ledger (time, user, endpoint, status, outcome, prompt_tokens, "
                    "completion_tokens, estimated, stream) VALUES (0, 'ann', ?, 200, 'ok', 1, 2, "
                    "0, 0)", [(e,) for e in endpoints])
    fold_old_file(old)
    summed = "SELECT start, user, model, requests, prompt_tokens, completion_tokens, errors " \
             "FROM usage_day"
    before = old.execute(summed).fetchall()
    old.close()
    monkeypatch.undo()
    conn = db.connect(path)
    got = dict(conn.execute("SELECT endpoint, metered FROM ledger"))
    # Only exact paths are metered (a prefix path is a listing or a blob).
    assert got == {e: int(e in ROUTES and ROUTES[e].metered) for e in endpoints}
    assert sum(got.values()) == 7
    assert conn.execute(summed).fetchall() == before


def test_rows_from_before_gpu_time_keep_null_and_read_as_unknown(tmp_path, monkeypatch):
    """The migration adding Ollama's timings leaves them NULL on the rows already there and
    their buckets with no timed row: reports say null (unknown), not 0 s. A new timed row
    in the same bucket counts alone; deleting an old row still takes it out (the triggers
    were replaced, not lost)."""
    path = str(tmp_path / "op.db")
    migration = db.MIGRATIONS.index(GPU_TIME_MIGRATION)
    assert migration == 6  # the 7th: from version 6 to 7
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:migration])
    old = db.connect(path)
    old.executemany("INSERT INTO ledger (time, user, endpoint, status, outcome, prompt_tokens, "
                    "completion_tokens, estimated, stream) VALUES (?, 'ann', '/api/chat', 200, "
                    "'ok', 1, 2, 0, 0)", [(0,), (1,), (2,)])
    fold_old_file(old)
    old.close()
    monkeypatch.undo()
    conn = db.connect(path)
    assert db.user_version(conn) == db.SCHEMA_VERSION
    assert conn.execute("SELECT total_ns, load_ns, prompt_eval_ns, eval_ns FROM ledger"
                        ).fetchall() == [(None,) * 4] * 3
    for table in db.SUMMARIES:
        assert conn.execute(f"SELECT {', '.join(db.TIME_SUMS)} FROM {table}").fetchall() == [
            (0, 0, 0, 0)], table
    for group_by in reports.GROUPS:
        row, = reports.usage(conn, group_by=group_by)
        assert (row["requests"], row["gpu_seconds"], row["load_seconds"]) == (3, None, None)
    conn.execute("INSERT INTO ledger (time, user, endpoint, status, outcome, prompt_tokens, "
                 "completion_tokens, estimated, stream, prompt_eval_ns, eval_ns, load_ns) "
                 "VALUES (3, 'ann', '/api/chat', 200, 'ok', 1, 2, 0, 0, 250000000, 500000000, 0)")
    conn.execute("DELETE FROM ledger WHERE id = 1")
    row, = reports.usage(conn, group_by="day")
    assert (row["requests"], row["gpu_seconds"], row["load_seconds"]) == (3, 0.75, 0.0)
    with db.transaction(conn):
        ledger.fold(conn, 100)
    assert reports.usage(conn, group_by="day", unfolded=False) == [row]
    assert conn.execute("SELECT requests, gpu_requests, gpu_ns FROM usage_day").fetchall() == [
        (3, 1, 750000000)]
