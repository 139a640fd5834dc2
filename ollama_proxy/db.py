"""The SQLite file: connection settings, numbered migrations, transactions.

Synchronous on purpose: the server calls it from one worker thread, the
offline CLI calls it directly, and both may have the same file open at once
(WAL lets the CLI write while the server reads).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Conflict, StoreError

__all__ = ["Conflict", "StoreError", "connect", "transaction"]  # the errors live in errors.py


# Migration i brings the schema from version i to i + 1 (kept in PRAGMA
# user_version). Never edit a shipped migration: append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    -- Bumped by every change to users or keys, so a running server sees
    -- changes made by the offline CLI without reloading everything each time.
    INSERT INTO meta (key, value) VALUES ('accounts_seq', '0');

    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        limits TEXT NOT NULL DEFAULT '{}',
        suspended INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        deleted_at REAL
    );
    CREATE UNIQUE INDEX users_live_name ON users (name) WHERE deleted_at IS NULL;

    CREATE TABLE keys (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users (id),
        prefix TEXT NOT NULL UNIQUE,
        hash BLOB NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL,
        expires_at REAL,
        revoked_at REAL
    );
    CREATE INDEX keys_user ON keys (user_id);

    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        user TEXT,
        key_prefix TEXT,
        backend TEXT,
        model TEXT,
        endpoint TEXT NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        estimated INTEGER NOT NULL,
        stream INTEGER NOT NULL,
        duration_s REAL,
        ttfb_s REAL,
        request_id TEXT,
        client TEXT
    );
    CREATE INDEX ledger_time ON ledger (time);
    CREATE INDEX ledger_user_time ON ledger (user, time);

    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    """,
]


SCHEMA_VERSION = len(MIGRATIONS)  # the version this code brings every database to


def connect(path: str) -> sqlite3.Connection:
    """Open (or create) the database at ``path`` and migrate it to the current schema."""
    try:
        # isolation_level=None: no implicit transactions; ``transaction`` says BEGIN.
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    try:
        # A new file only (later it is fixed): a ledger commit writes a page per index,
        # and 1 KiB pages make that commit about a quarter cheaper than 4 KiB ones.
        conn.execute("PRAGMA page_size = 1024")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode syncs at checkpoints, not at each commit: a commit
        # survives kill -9 of the process (it is in the OS's page cache), and
        # only a power loss or OS crash can take the last commits with it.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")  # the CLI and the server share the file
        migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"cannot use database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Apply the missing migrations, each in its own transaction.

    An up-to-date file takes no write lock. Otherwise the version is read again
    under the lock, so two processes opening an old file at once migrate it once.
    """
    known = len(MIGRATIONS)
    _check_not_newer(user_version(conn), known, path)
    while user_version(conn) < known:
        with transaction(conn):
            version = user_version(conn)
            _check_not_newer(version, known, path)
            if version == known:
                return
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1:d}")


def _check_not_newer(version: int, known: int, path: str) -> None:
    if version > known:
        raise StoreError(f"database {path} has schema version {version}, newer than this "
                         f"ollama-proxy knows ({known}): use a newer ollama-proxy")


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements (``executescript`` would COMMIT our BEGIN)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending
            pending = ""


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` if the body raises.

    IMMEDIATE takes the write lock up front, so a read-then-write body never
    fails half-way with "database is locked" (busy_timeout waits for it).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # also when COMMIT itself failed
            conn.execute("ROLLBACK")
        raise
