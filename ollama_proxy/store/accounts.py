"""Users, keys and the audit log in SQLite. The values come checked already: the
admin use-cases (``admin_ops``) validate what the admin API and the offline CLI
are given, then call these.

Every change runs in one transaction that also writes an audit row (never a
secret) and bumps ``meta.accounts_seq``, which a running server polls to
rebuild its in-memory key index when the CLI changed the file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Mapping

from ..access import keys
from ..errors import Conflict, NotFound, StoreError
from ..isotime import iso
from .db import transaction

BOOTSTRAP_ADMIN = "admin"
DEFAULT_ROLE = "user"  # a new user's role when none is given
BOOTSTRAP_ACTOR = "bootstrap"
# Key prefixes carry 48 bits; a clash is all but impossible, a few retries make it so.
PREFIX_ATTEMPTS = 5


# --- what callers get ---------------------------------------------------------

def shown_limits(limits: Mapping[str, Any]) -> dict[str, Any]:
    """A user's stored overrides as the API shows them: ``expires_at`` (kept in Unix
    seconds) in ISO 8601."""
    out = dict(limits)
    if out.get("expires_at") is not None:
        out["expires_at"] = iso(out["expires_at"])
    return out


@dataclass(frozen=True, slots=True)
class User:
    """A live user; ``limits`` holds only its overrides of the ``[limits]`` defaults,
    as stored (``expires_at`` in Unix seconds)."""

    id: int
    name: str
    role: str
    limits: dict[str, Any]
    suspended: bool
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "limits": shown_limits(self.limits),
                "suspended": self.suspended, "created_at": iso(self.created_at)}


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about a key: never the key, never its hash."""

    prefix: str
    user: str
    created_at: float
    last_used_at: float | None
    expires_at: float | None
    revoked: bool

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "created_at": iso(self.created_at),
                "last_used_at": iso(self.last_used_at), "expires_at": iso(self.expires_at),
                "revoked": self.revoked}


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One usable key as the server's in-memory auth index holds it."""

    prefix: str
    hash: bytes
    user: str
    role: str
    suspended: bool
    expires_at: float | None  # the index is cached: check again per request
    user_limits: dict[str, Any]


# --- internals ----------------------------------------------------------------

_USER_COLUMNS = "id, name, role, limits, suspended, created_at"


def _user(row: tuple[Any, ...]) -> User:
    return User(id=row[0], name=row[1], role=row[2], limits=json.loads(row[3]),
                suspended=bool(row[4]), created_at=row[5])


def _find_user(conn: sqlite3.Connection, name: str) -> User | None:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE name = ? AND deleted_at IS NULL",
                       (name,)).fetchone()
    return None if row is None else _user(row)


def _audit(conn: sqlite3.Connection, actor: str, action: str, target: str,
           detail: dict[str, Any]) -> None:
    conn.execute("INSERT INTO audit (time, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                 (time.time(), actor, action, target, json.dumps(detail, sort_keys=True)))


def _changed(conn: sqlite3.Connection, actor: str, action: str, target: str,
             detail: dict[str, Any]) -> None:
    """Audit one change and tell pollers the accounts moved (inside the transaction)."""
    _audit(conn, actor, action, target, detail)
    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'accounts_seq'")


def audit(conn: sqlite3.Connection, actor: str, action: str, target: str,
          detail: dict[str, Any]) -> None:
    """Audit an admin action that changes no account (e.g. a config reload)."""
    with transaction(conn):
        _audit(conn, actor, action, target, detail)


def _add_key(conn: sqlite3.Connection, secret: bytes, user_id: int, key: str,
             expires_at: float | None) -> str:
    prefix = keys.key_prefix(key)
    conn.execute("INSERT INTO keys (user_id, prefix, hash, created_at, expires_at) "
                 "VALUES (?, ?, ?, ?, ?)",
                 (user_id, prefix, keys.hash_key(secret, key), time.time(), expires_at))
    return prefix


def _new_key(conn: sqlite3.Connection, secret: bytes, user_id: int,
             expires_at: float | None) -> tuple[str, str]:
    for _ in range(PREFIX_ATTEMPTS):
        key = keys.new_key()
        if conn.execute("SELECT 1 FROM keys WHERE prefix = ?", (keys.key_prefix(key),)).fetchone():
            continue
        return key, _add_key(conn, secret, user_id, key, expires_at)
    raise StoreError("could not find an unused key prefix")


def _insert_user(conn: sqlite3.Connection, name: str, role: str, limits: dict[str, Any]) -> User:
    if _find_user(conn, name) is not None:
        raise Conflict(f"user '{name}' already exists")
    now = time.time()
    cur = conn.execute("INSERT INTO users (name, role, limits, created_at) VALUES (?, ?, ?, ?)",
                       (name, role, json.dumps(limits), now))
    assert cur.lastrowid is not None
    return User(id=cur.lastrowid, name=name, role=role, limits=limits, suspended=False,
                created_at=now)


# --- users --------------------------------------------------------------------

def create_user(conn: sqlite3.Connection, secret: bytes, name: str, role: str = DEFAULT_ROLE,
                limits: dict[str, Any] | None = None, *, actor: str) -> tuple[User, str]:
    """A new user and its first key, in full (shown this once); 409 if the name is taken."""
    kept = {k: v for k, v in (limits or {}).items() if v is not None}  # null = the default
    with transaction(conn):
        user = _insert_user(conn, name, role, kept)
        key, prefix = _new_key(conn, secret, user.id, None)
        _changed(conn, actor, "user.create", name,
                 {"role": role, "limits": shown_limits(kept), "key": prefix})
    return user, key


def list_users(conn: sqlite3.Connection) -> list[User]:
    rows = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE deleted_at IS NULL ORDER BY name")
    return [_user(row) for row in rows]


def get_user(conn: sqlite3.Connection, name: str) -> User:
    user = _find_user(conn, name)
    if user is None:
        raise NotFound(f"user '{name}' not found")
    return user


def update_user(conn: sqlite3.Connection, name: str, *, limits: dict[str, Any] | None = None,
                suspended: bool | None = None, role: str | None = None, actor: str) -> User:
    """Change a user; limits given are merged, a limit set to null falls back to the default."""
    with transaction(conn):
        user = get_user(conn, name)
        merged = dict(user.limits)
        for limit, value in (limits or {}).items():
            if value is None:
                merged.pop(limit, None)
            else:
                merged[limit] = value
        new_suspended = user.suspended if suspended is None else suspended
        new_role = user.role if role is None else role
        if new_role != "admin" or new_suspended:
            _keep_an_admin(conn, user, "demote or suspend")
        conn.execute("UPDATE users SET limits = ?, suspended = ?, role = ? WHERE id = ?",
                     (json.dumps(merged), int(new_suspended), new_role, user.id))
        detail: dict[str, Any] = {"limits": None if limits is None else shown_limits(limits),
                                  "suspended": suspended, "role": role}
        _changed(conn, actor, "user.update", name,
                 {k: v for k, v in detail.items() if v is not None})
    return User(id=user.id, name=name, role=new_role, limits=merged, suspended=new_suspended,
                created_at=user.created_at)


def _keep_an_admin(conn: sqlite3.Connection, user: User, what: str) -> None:
    """409 when the change would leave no active admin (only the offline CLI could recover)."""
    if user.role != "admin" or user.suspended:
        return
    others = conn.execute("SELECT COUNT(*) FROM users WHERE role = 'admin' AND suspended = 0 "
                          "AND deleted_at IS NULL AND id != ?", (user.id,)).fetchone()[0]
    if not others:
        raise Conflict(f"cannot {what} '{user.name}': it is the last active admin "
                       f"(make another admin first)")


def delete_user(conn: sqlite3.Connection, name: str, *, actor: str) -> None:
    """Soft delete: the user's keys stop working, its ledger rows stay."""
    with transaction(conn):
        user = get_user(conn, name)
        _keep_an_admin(conn, user, "delete")
        now = time.time()
        conn.execute("UPDATE users SET deleted_at = ? WHERE id = ?", (now, user.id))
        revoked = conn.execute("UPDATE keys SET revoked_at = ? "
                               "WHERE user_id = ? AND revoked_at IS NULL", (now, user.id)).rowcount
        _changed(conn, actor, "user.delete", name, {"keys_revoked": revoked})


# --- keys ---------------------------------------------------------------------

def create_key(conn: sqlite3.Connection, secret: bytes, name: str, *,
               expires_at: float | None = None, actor: str) -> tuple[str, str]:
    """A new key for user ``name``: (the key in full, shown this once; its prefix)."""
    with transaction(conn):
        user = get_user(conn, name)
        key, prefix = _new_key(conn, secret, user.id, expires_at)
        _changed(conn, actor, "key.create", prefix,
                 {"user": name, "expires_at": iso(expires_at)})
    return key, prefix


def list_keys(conn: sqlite3.Connection, name: str) -> list[KeyInfo]:
    """All keys of user ``name``, revoked ones included, oldest first."""
    user = get_user(conn, name)
    rows = conn.execute("SELECT prefix, created_at, last_used_at, expires_at, revoked_at "
                        "FROM keys WHERE user_id = ? ORDER BY created_at, id", (user.id,))
    return [KeyInfo(prefix=r[0], user=name, created_at=r[1], last_used_at=r[2], expires_at=r[3],
                    revoked=r[4] is not None) for r in rows]


def revoke_key(conn: sqlite3.Connection, prefix: str, *, actor: str) -> None:
    """Stop a key at once; revoking a revoked key is a no-op, an unknown one 404."""
    with transaction(conn):
        row = conn.execute("SELECT k.id, k.revoked_at, u.name FROM keys k "
                           "JOIN users u ON u.id = k.user_id WHERE k.prefix = ?",
                           (prefix,)).fetchone()
        if row is None:
            raise NotFound(f"key '{prefix}' not found")
        if row[1] is not None:
            return
        conn.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", (time.time(), row[0]))
        _changed(conn, actor, "key.revoke", prefix, {"user": row[2]})


def key_index(conn: sqlite3.Connection, now: float) -> dict[str, KeyEntry]:
    """Every key that may authenticate at ``now``, by prefix (suspended users included: 403)."""
    rows = conn.execute(
        "SELECT k.prefix, k.hash, u.name, u.role, u.suspended, k.expires_at, u.limits "
        "FROM keys k JOIN users u ON u.id = k.user_id "
        "WHERE k.revoked_at IS NULL AND u.deleted_at IS NULL "
        "AND (k.expires_at IS NULL OR k.expires_at > ?)", (now,))
    return {r[0]: KeyEntry(prefix=r[0], hash=r[1], user=r[2], role=r[3], suspended=bool(r[4]),
                           expires_at=r[5], user_limits=json.loads(r[6])) for r in rows}


def accounts_seq(conn: sqlite3.Connection) -> int:
    """A number that grows with every change to users or keys."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'accounts_seq'").fetchone()
    return int(row[0])


def audit_log(conn: sqlite3.Connection, limit: int = 100) -> list[dict[str, Any]]:
    """The latest admin actions, newest first."""
    rows = conn.execute("SELECT time, actor, action, target, detail FROM audit "
                        "ORDER BY id DESC LIMIT ?", (limit,))
    return [{"time": iso(r[0]), "actor": r[1], "action": r[2], "target": r[3],
             "detail": json.loads(r[4])} for r in rows]


# --- bootstrap ----------------------------------------------------------------

def ensure_admin(conn: sqlite3.Connection, secret: bytes, admin_key: str | None) -> str | None:
    """Make sure someone can administer; returns a new admin key to print once, or None.

    With ``admin_key`` (OLLAMA_PROXY_ADMIN_KEY) that key is stored for the user
    ``admin`` unless its prefix is already known (a revoked one stays revoked).
    Without it, an empty database gets an ``admin`` with a fresh key.
    """
    if admin_key is None:
        with transaction(conn):
            if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone():
                return None
            user = _insert_user(conn, BOOTSTRAP_ADMIN, "admin", {})
            key, prefix = _new_key(conn, secret, user.id, None)
            _changed(conn, BOOTSTRAP_ACTOR, "user.create", user.name,
                     {"role": "admin", "limits": {}, "key": prefix})
        return key
    if not keys.looks_like_key(admin_key):
        raise StoreError(f"OLLAMA_PROXY_ADMIN_KEY must be {keys.KEY_FORMAT}, e.g. from: "
                         "python3 -c \"import secrets; print('op-' + secrets.token_urlsafe(32))\"")
    prefix = keys.key_prefix(admin_key)
    with transaction(conn):
        row = conn.execute("SELECT hash FROM keys WHERE prefix = ?", (prefix,)).fetchone()
        if row is not None:
            if not keys.verify(secret, admin_key, row[0]):
                raise StoreError(
                    f"OLLAMA_PROXY_ADMIN_KEY does not match the stored key {prefix}: either the "
                    "server secret beside the database was replaced, or the prefix is taken; "
                    "choose another key")
            return None
        admin = _find_user(conn, BOOTSTRAP_ADMIN)
        if admin is None:
            admin = _insert_user(conn, BOOTSTRAP_ADMIN, "admin", {})
            _changed(conn, BOOTSTRAP_ACTOR, "user.create", admin.name,
                     {"role": "admin", "limits": {}})
        elif admin.role != "admin":
            conn.execute("UPDATE users SET role = 'admin' WHERE id = ?", (admin.id,))
            _changed(conn, BOOTSTRAP_ACTOR, "user.update", admin.name, {"role": "admin"})
        _add_key(conn, secret, admin.id, admin_key, None)
        _changed(conn, BOOTSTRAP_ACTOR, "key.create", prefix,
                 {"user": admin.name, "expires_at": None})
    return None


def server_secret(conn: sqlite3.Connection, database: str) -> bytes:
    """The key-hashing secret beside ``database``; never silently a new one for a
    database that already has keys (every one of them would stop working)."""
    if database != ":memory:" and not os.path.exists(keys.secret_path(database)):
        if conn.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None:
            raise StoreError(
                f"{keys.secret_path(database)} is missing, but {database} has API keys hashed with it: "
                f"restore that file from a backup (with mode 0600), or move the database away to "
                f"start afresh")
    return keys.load_or_create_secret(database)
