"""The SQLite file: connection settings, numbered migrations (with the usage
summaries' schema), transactions.

Synchronous on purpose: the server calls it from its worker threads (accounts,
reports, the ledger writer: a connection each), the offline CLI calls it
directly, and both may have the same file open at once (WAL lets the CLI
write while the server reads).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import StoreError

# --- the usage summaries (migration 2) ------------------------------------------
#
# Sums of ledger rows per bucket of time, derived from the ledger and never
# written elsewhere: the ledger writer folds rows with ``id`` above the
# watermark ``meta.ledger_folded`` into them (in SQL, so rows written by
# another process or restored from a backup count too); triggers keep folded
# rows that are later changed or deleted in step. Reports read whole buckets
# from here and the rest from the ledger (``reports.usage``).
#
# The output of these helpers is part of migration 2: never change it, add a
# migration instead.

HOUR_S = 3600
DAY_S = 86400
# table -> (bucket length in seconds, the ledger columns it keeps apart)
SUMMARIES: dict[str, tuple[int, tuple[str, ...]]] = {
    "usage_hour": (HOUR_S, ("user", "model")),  # hourly reports of one user; edges of days
    "usage_day": (DAY_S, ("user", "model")),  # everything by user, model or day
    "usage_hour_model": (HOUR_S, ("model",)),  # hourly reports of all users
}
SUMS = ("requests", "prompt_tokens", "completion_tokens", "errors")
WATERMARK = "(SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'ledger_folded')"


def bucket_sql(expr: str, length_s: int) -> str:
    """SQL for the start of the ``length_s`` bucket holding unix time ``expr``
    (floor division: SQLite's CAST truncates towards zero, and ``floor()`` is optional)."""
    whole = f"CAST(({expr}) / {length_s} AS INTEGER)"
    return f"(({whole} - (({expr}) < {whole} * {length_s})) * {length_s})"


def error_sql(row: str = "") -> str:
    """1 when a ledger row counts as an error (not ``ok``, or a status >= 400), else 0."""
    return f"CASE WHEN {row}outcome != 'ok' OR {row}status >= 400 THEN 1 ELSE 0 END"


def _key(dims: tuple[str, ...], row: str = "") -> str:
    """A summary's unique key; the empty blob stands for NULL (a unique index keeps
    NULLs apart) and equals no text, so a NULL user and a user named '' stay apart."""
    return ", ".join(f"ifnull({row}{d}, x'')" for d in dims)


def _upsert_tail(dims: tuple[str, ...], sums: tuple[str, ...] = SUMS) -> str:
    adds = ", ".join(f"{c} = {c} + excluded.{c}" for c in sums)
    return f"ON CONFLICT (start, {_key(dims)}) DO UPDATE SET {adds}"


# --- GPU time in the summaries (migration 7) ------------------------------------
#
# The ledger keeps Ollama's timings of each request in ns (NULL: the backend did
# not report them, and on every row from before migration 7). A summary keeps,
# per bucket, the sums over the rows that have them and how many rows those are:
# a bucket with none reads as unknown (null), not as 0 s, also after deletions.
# GPU time is prompt evaluation + generation (a row has it when it has either).

NS_COLUMNS = ("total_ns", "load_ns", "prompt_eval_ns", "eval_ns")  # the ledger's
TIME_SUMS = ("gpu_requests", "gpu_ns", "load_requests", "load_ns")  # the summaries'


def time_values(row: str = "") -> tuple[str, ...]:
    """SQL for what one ledger row adds to each of ``TIME_SUMS``."""
    return (f"({row}prompt_eval_ns IS NOT NULL OR {row}eval_ns IS NOT NULL)",
            f"(ifnull({row}prompt_eval_ns, 0) + ifnull({row}eval_ns, 0))",
            f"({row}load_ns IS NOT NULL)", f"ifnull({row}load_ns, 0)")


def fold_sql(table: str, timed: bool = True) -> str:
    """Add the ledger rows with ``?1 < id <= ?2`` to ``table`` (``timed``: their GPU
    time too; without, the fold of a file from before migration 7)."""
    length_s, dims = SUMMARIES[table]
    cols = ", ".join(dims)
    sums = SUMS + TIME_SUMS if timed else SUMS
    times = "".join(f", SUM({v})" for v in time_values()) if timed else ""
    return (f"INSERT INTO {table} (start, {cols}, {', '.join(sums)}) "
            f"SELECT {bucket_sql('time', length_s)}, {cols}, COUNT(*), SUM(prompt_tokens), "
            f"SUM(completion_tokens), SUM({error_sql()}){times} FROM ledger "
            f"WHERE id > ?1 AND id <= ?2 GROUP BY 1, {cols} {_upsert_tail(dims, sums)}")


def _take_out(table: str, extra: str = "", timed: bool = False) -> str:
    """Trigger statements: subtract the ``old`` row from ``table``, drop an emptied bucket
    (``timed``: its GPU time too)."""
    length_s, dims = SUMMARIES[table]
    where = (f"start = {bucket_sql('old.time', length_s)} "
             f"AND ({_key(dims)}) = ({_key(dims, 'old.')}){extra}")
    times = "".join(f", {c} = {c} - {v}" for c, v in zip(TIME_SUMS, time_values("old."))
                    ) if timed else ""
    return (f"UPDATE {table} SET requests = requests - 1, "
            f"prompt_tokens = prompt_tokens - old.prompt_tokens, "
            f"completion_tokens = completion_tokens - old.completion_tokens, "
            f"errors = errors - ({error_sql('old.')}){times} WHERE {where};\n"
            f"DELETE FROM {table} WHERE {where} AND requests <= 0;\n")


def _put_in(table: str, timed: bool = False) -> str:
    """Trigger statement: add the ``new`` row to ``table`` (``timed``: its GPU time too)."""
    length_s, dims = SUMMARIES[table]
    sums = SUMS + TIME_SUMS if timed else SUMS
    times = "".join(f", {v}" for v in time_values("new.")) if timed else ""
    return (f"INSERT INTO {table} (start, {', '.join(dims)}, {', '.join(sums)}) VALUES "
            f"({bucket_sql('new.time', length_s)}, {', '.join('new.' + d for d in dims)}, 1, "
            f"new.prompt_tokens, new.completion_tokens, {error_sql('new.')}{times}) "
            f"{_upsert_tail(dims, sums)};\n")


def _triggers(timed: bool) -> str:
    """The summaries follow a folded row that is changed (e.g. exact counts found later)
    or deleted (pruning). A deletion also keeps the watermark at or below the highest
    id, so that the next row SQLite numbers is never taken as folded."""
    folded = f" AND old.id <= {WATERMARK}"
    watched = ", load_ns, prompt_eval_ns, eval_ns" if timed else ""
    return ("CREATE TRIGGER ledger_delete_unfold AFTER DELETE ON ledger BEGIN\n"
            + "".join(_take_out(t, folded, timed) for t in SUMMARIES)
            + "UPDATE meta SET value = (SELECT ifnull(MAX(id), 0) FROM ledger) "
            "WHERE key = 'ledger_folded' AND CAST(value AS INTEGER) > "
            "(SELECT ifnull(MAX(id), 0) FROM ledger);\nEND;\n"
            "CREATE TRIGGER ledger_update_refold AFTER UPDATE OF time, user, model, status, "
            f"outcome, prompt_tokens, completion_tokens{watched} ON ledger "
            f"WHEN old.id <= {WATERMARK} BEGIN\n"
            + "".join(_take_out(t, timed=timed) + _put_in(t, timed) for t in SUMMARIES)
            + "END;\n")


def _summaries_migration() -> str:
    out = []
    for table, (_length, dims) in SUMMARIES.items():
        out.append(f"CREATE TABLE {table} (start INTEGER NOT NULL, "
                   + "".join(f"{d} TEXT, " for d in dims)
                   + ", ".join(f"{c} INTEGER NOT NULL" for c in SUMS) + ");\n"
                   f"CREATE UNIQUE INDEX {table}_key ON {table} (start, {_key(dims)});\n")
    out.append("CREATE INDEX usage_hour_user ON usage_hour (user, start);\n"
               # Every ledger row with an id up to this is in the summaries.
               "INSERT INTO meta (key, value) VALUES ('ledger_folded', '0');\n")
    out.append(_triggers(timed=False))
    return "".join(out)


def _gpu_time_migration() -> str:
    """Migration 7: the ledger's timings (NULL on the rows already there) and their sums
    in the summaries (zero rows with them in the buckets already there: unknown)."""
    out = [f"ALTER TABLE ledger ADD COLUMN {c} INTEGER;\n" for c in NS_COLUMNS]
    out += [f"ALTER TABLE {t} ADD COLUMN {c} INTEGER NOT NULL DEFAULT 0;\n"
            for t in SUMMARIES for c in TIME_SUMS]
    out.append("DROP TRIGGER ledger_delete_unfold;\nDROP TRIGGER ledger_update_refold;\n")
    out.append(_triggers(timed=True))
    return "".join(out)


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
    _summaries_migration(),
    # 3: a user's expires_at limit is kept in Unix seconds, as every other time is (it was
    # ISO 8601 text, always as isotime.iso writes it, which SQLite's strftime reads).
    """
    UPDATE users SET limits = json_set(limits, '$.expires_at',
        CAST(strftime('%s', json_extract(limits, '$.expires_at')) AS INTEGER))
    WHERE json_type(limits, '$.expires_at') = 'text'
        AND strftime('%s', json_extract(limits, '$.expires_at')) IS NOT NULL;
    """,
    # Migration 4: whether a request counts for the limits (a generation or an
    # embedding), known when it is relayed and stored with it, so that a start
    # rebuilds the counters from the rows without matching their paths again.
    # Older rows get it from their path, by the route table of the day.
    """
    ALTER TABLE ledger ADD COLUMN metered INTEGER NOT NULL DEFAULT 0;
    UPDATE ledger SET metered = 1 WHERE endpoint IN (
        '/api/generate', '/api/chat', '/api/embed', '/api/embeddings',
        '/v1/chat/completions', '/v1/completions', '/v1/embeddings');
    """,
    # Migration 5: the [aliases] name a request used; its model column holds the target.
    """
    ALTER TABLE ledger ADD COLUMN alias TEXT;
    """,
    # Migration 6: the seconds a request waited in the fair queue for a GPU slot.
    """
    ALTER TABLE ledger ADD COLUMN queued_s REAL NOT NULL DEFAULT 0;
    """,
    # Migration 7: Ollama's timings of each request, and GPU time in the summaries.
    _gpu_time_migration(),
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


# SQLite's primary result codes of errors that pass by themselves (or once an
# operator acts): the file is busy or locked by another process, memory or the
# disk is short, the disk or file failed. Anything else would fail again.
_TRANSIENT_CODES = frozenset({
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    7,  # SQLITE_NOMEM
    8,  # SQLITE_READONLY
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    15,  # SQLITE_PROTOCOL
})


def transient(exc: BaseException) -> bool:
    """Whether a failed write is worth retrying as it is."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; before, assume it passes
    return code is None or code & 0xFF in _TRANSIENT_CODES


@contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction: every query in the body sees the file as it was at its first."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


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
