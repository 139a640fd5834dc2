"""Users, keys, audit and bootstrap on a real file (their validation: test_admin_ops)."""

from __future__ import annotations

import json
import os
import time

import pytest

from ledger_rows import insert as insert_rows
from ollama_proxy.access import keys
from ollama_proxy.access.identity import KeyIndex
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.errors import Conflict, NotFound, StoreError, Unauthorized
from ollama_proxy.http.messages import Request
from ollama_proxy.isotime import iso
from ollama_proxy.store import accounts, db, reports
from ollama_proxy.store.accounts import KeyEntry
from ollama_proxy.store.threads import Store


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "op.db")


@pytest.fixture
def conn(path):
    connection = db.connect(path)
    yield connection
    connection.close()


@pytest.fixture
def secret(path):
    return keys.load_or_create_secret(path)


async def identified(path: str, secret: bytes, key: str) -> KeyEntry:
    """The key's entry as the server finds it: from a key index loaded from the file,
    for a request that carries the key (Unauthorized when it does not work)."""
    store = Store(path)
    await store.open()
    try:
        index = KeyIndex(store, secret)
        await index.reload()
        return index.identify(Request(method="GET", target="/api/tags", path="/api/tags",
                                      query="", body=b"", client="127.0.0.1",
                                      headers=[(b"authorization", f"Bearer {key}".encode())]))
    finally:
        await store.aclose()


def record(user: str, prefix: str, when: float) -> RequestRecord:
    return RequestRecord(request_id="r", time=when, endpoint="/api/chat", model="m", backend="b",
                       status=200, outcome="ok", prompt_tokens=1, completion_tokens=2,
                       estimated=False, stream=True, duration_s=0.1, ttfb_s=0.01,
                       client="127.0.0.1", user=user, key_prefix=prefix)


async def test_create_user_returns_a_working_key(path, conn, secret):
    """A new user gets a first key that the server's key index identifies."""
    user, key = accounts.create_user(conn, secret, "alice", limits={"requests_per_day": 5},
                                     actor="root")
    assert user.to_json() == {"name": "alice", "role": "user", "limits": {"requests_per_day": 5},
                              "suspended": False, "created_at": iso(user.created_at)}
    entry = await identified(path, secret, key)
    assert (entry.prefix, entry.user, entry.role, entry.suspended) == (
        keys.key_prefix(key), "alice", "user", False)
    assert entry.user_limits == {"requests_per_day": 5}
    with pytest.raises(Unauthorized):
        await identified(path, secret, keys.new_key())


def test_duplicate_name_is_409(conn, secret):
    """A name already used by a live user is a Conflict."""
    accounts.create_user(conn, secret, "alice", actor="root")
    with pytest.raises(Conflict, match="alice"):
        accounts.create_user(conn, secret, "alice", role="admin", actor="root")
    assert [u.name for u in accounts.list_users(conn)] == ["alice"]


def test_list_and_get(conn, secret):
    """Users list by name; an unknown one is 404 with its name."""
    for name in ("zed", "amy@example.org"):
        accounts.create_user(conn, secret, name, actor="root")
    assert [u.name for u in accounts.list_users(conn)] == ["amy@example.org", "zed"]
    assert accounts.get_user(conn, "zed").role == "user"
    with pytest.raises(NotFound, match="user 'nobody' not found"):
        accounts.get_user(conn, "nobody")


def test_update_merges_and_null_falls_back(conn, secret):
    """Limits merge; a limit set to null is removed; suspended and role change."""
    accounts.create_user(conn, secret, "alice", limits={"requests_per_day": 5,
                                                        "max_concurrent": 2}, actor="root")
    user = accounts.update_user(conn, "alice", limits={"max_concurrent": None,
                                                       "allowed_models": ["llama3*"]},
                                suspended=True, role="admin", actor="root")
    expected = {"requests_per_day": 5, "allowed_models": ["llama3*"]}
    assert (user.limits, user.suspended, user.role) == (expected, True, "admin")
    assert accounts.get_user(conn, "alice") == user
    assert accounts.update_user(conn, "alice", suspended=False, actor="root").limits == expected
    with pytest.raises(NotFound):
        accounts.update_user(conn, "bob", suspended=True, actor="root")


def test_suspended_user_keys_stay_indexed_as_suspended(conn, secret):
    """Suspension keeps the key in the index, flagged, so the server can answer 403."""
    _, key = accounts.create_user(conn, secret, "alice", actor="root")
    accounts.update_user(conn, "alice", suspended=True, actor="root")
    assert accounts.key_index(conn, time.time())[keys.key_prefix(key)].suspended


def test_delete_revokes_keys_and_keeps_ledger_rows(conn, secret):
    """A deleted user's keys leave the index, its ledger rows stay, its name is free again."""
    _, key = accounts.create_user(conn, secret, "alice", actor="root")
    prefix = keys.key_prefix(key)
    insert_rows(conn, [record("alice", prefix, time.time())])
    accounts.delete_user(conn, "alice", actor="root")
    assert prefix not in accounts.key_index(conn, time.time())
    assert accounts.list_users(conn) == []
    assert reports.user_totals(conn)["alice"]["requests"] == 1
    with pytest.raises(NotFound):
        accounts.delete_user(conn, "alice", actor="root")
    accounts.create_user(conn, secret, "alice", actor="root")  # a new alice may come
    assert conn.execute("SELECT revoked_at IS NOT NULL FROM keys WHERE prefix = ?",
                        (prefix,)).fetchone() == (1,)


def test_create_list_and_revoke_keys(conn, secret):
    """More keys per user; revoking is immediate, idempotent, and 404 for unknown prefixes."""
    _, first = accounts.create_user(conn, secret, "alice", actor="root")
    second, prefix = accounts.create_key(conn, secret, "alice", expires_at=32472144000.0,
                                         actor="root")  # 2999-01-01
    assert keys.key_prefix(second) == prefix and keys.looks_like_key(second)
    listed = accounts.list_keys(conn, "alice")
    assert [k.prefix for k in listed] == [keys.key_prefix(first), prefix]
    assert listed[1].to_json()["expires_at"] == "2999-01-01T00:00:00Z"
    assert set(listed[0].to_json()) == {"prefix", "created_at", "last_used_at", "expires_at",
                                        "revoked"}
    accounts.revoke_key(conn, prefix, actor="root")
    seq = accounts.accounts_seq(conn)
    accounts.revoke_key(conn, prefix, actor="root")  # again: fine, nothing changes
    assert accounts.accounts_seq(conn) == seq
    assert [k.revoked for k in accounts.list_keys(conn, "alice")] == [False, True]
    assert prefix not in accounts.key_index(conn, time.time())
    with pytest.raises(NotFound, match="op-unknown"):
        accounts.revoke_key(conn, "op-unknown", actor="root")
    with pytest.raises(NotFound):
        accounts.create_key(conn, secret, "bob", actor="root")


def test_key_index_excludes_revoked_expired_and_deleted(conn, secret):
    """Only live keys of live users authenticate."""
    now = time.time()
    _, live = accounts.create_user(conn, secret, "alice", actor="root")
    expiring, _ = accounts.create_key(conn, secret, "alice", expires_at=now + 60, actor="root")
    revoked, revoked_prefix = accounts.create_key(conn, secret, "alice", actor="root")
    accounts.revoke_key(conn, revoked_prefix, actor="root")
    _, gone = accounts.create_user(conn, secret, "bob", actor="root")
    accounts.delete_user(conn, "bob", actor="root")
    index = accounts.key_index(conn, now)
    assert set(index) == {keys.key_prefix(live), keys.key_prefix(expiring)}
    assert index[keys.key_prefix(expiring)].expires_at == now + 60
    assert set(accounts.key_index(conn, now + 61)) == {keys.key_prefix(live)}


def test_every_change_is_audited_and_bumps_the_seq(conn, secret):
    """Each write adds one audit row (actor, action, target) and raises accounts_seq."""
    seqs = [accounts.accounts_seq(conn)]
    _, key = accounts.create_user(conn, secret, "alice", actor="root")
    seqs.append(accounts.accounts_seq(conn))
    _, prefix = accounts.create_key(conn, secret, "alice", actor="cli")
    seqs.append(accounts.accounts_seq(conn))
    accounts.update_user(conn, "alice", limits={"token_quota": 9}, actor="root")
    seqs.append(accounts.accounts_seq(conn))
    accounts.revoke_key(conn, prefix, actor="root")
    seqs.append(accounts.accounts_seq(conn))
    accounts.delete_user(conn, "alice", actor="root")
    seqs.append(accounts.accounts_seq(conn))
    assert seqs == sorted(set(seqs))
    log = accounts.audit_log(conn)
    assert [(e["actor"], e["action"], e["target"]) for e in log] == [
        ("root", "user.delete", "alice"), ("root", "key.revoke", prefix),
        ("root", "user.update", "alice"), ("cli", "key.create", prefix),
        ("root", "user.create", "alice")]
    assert log[-1]["detail"] == {"role": "user", "limits": {}, "key": keys.key_prefix(key)}
    assert log[0]["time"].endswith("Z")
    assert len(accounts.audit_log(conn, limit=2)) == 2


def test_no_key_anywhere_in_the_database_files(path, conn, secret):
    """Neither the keys shown nor the env admin key appear in the database, WAL or secret."""
    admin_key = keys.new_key()
    accounts.ensure_admin(conn, secret, admin_key)
    _, first = accounts.create_user(conn, secret, "alice", actor="root")
    second, _ = accounts.create_key(conn, secret, "alice", actor="root")
    conn.close()
    blobs = b"".join(open(p, "rb").read() for p in (path, path + "-wal", keys.secret_path(path))
                     if os.path.exists(p))
    for key in (admin_key, first, second):
        assert key.encode() not in blobs
        assert key[11:].encode() not in blobs  # not even the secret part alone
        assert keys.key_prefix(key).encode() in blobs  # while the prefix is kept


async def test_ensure_admin_without_env_key(path, conn, secret):
    """An empty database gets an admin and a key, once; later starts print nothing."""
    key = accounts.ensure_admin(conn, secret, None)
    assert key is not None
    entry = await identified(path, secret, key)
    assert (entry.user, entry.role) == ("admin", "admin")
    assert accounts.ensure_admin(conn, secret, None) is None
    assert accounts.audit_log(conn)[0]["actor"] == "bootstrap"


def test_ensure_admin_without_env_key_leaves_populated_database(conn, secret):
    """A database that has users gets no extra admin."""
    accounts.create_user(conn, secret, "alice", actor="root")
    assert accounts.ensure_admin(conn, secret, None) is None
    assert [u.name for u in accounts.list_users(conn)] == ["alice"]


async def test_ensure_admin_with_env_key(path, conn, secret):
    """OLLAMA_PROXY_ADMIN_KEY is stored once for an admin user, and a revoked one stays revoked."""
    env_key = keys.new_key()
    assert accounts.ensure_admin(conn, secret, env_key) is None
    entry = await identified(path, secret, env_key)
    assert (entry.user, entry.role) == ("admin", "admin")
    seq = accounts.accounts_seq(conn)
    assert accounts.ensure_admin(conn, secret, env_key) is None  # known: nothing to do
    assert accounts.accounts_seq(conn) == seq
    accounts.revoke_key(conn, keys.key_prefix(env_key), actor="root")
    accounts.ensure_admin(conn, secret, env_key)
    assert keys.key_prefix(env_key) not in accounts.key_index(conn, time.time())


def test_ensure_admin_env_key_promotes_existing_admin_user(conn, secret):
    """A user named admin with role user is made admin when the env key is attached."""
    accounts.create_user(conn, secret, "admin", actor="root")
    accounts.ensure_admin(conn, secret, keys.new_key())
    assert accounts.get_user(conn, "admin").role == "admin"
    assert len(accounts.list_keys(conn, "admin")) == 2


def test_ensure_admin_rejects_malformed_env_key(conn, secret):
    """A malformed OLLAMA_PROXY_ADMIN_KEY is refused, explaining the format."""
    with pytest.raises(StoreError, match="op- followed by 43 base64url"):
        accounts.ensure_admin(conn, secret, "hunter2")


def test_ensure_admin_detects_a_replaced_secret(conn, secret):
    """The env key under another secret no longer matches its stored hash: say so."""
    env_key = keys.new_key()
    accounts.ensure_admin(conn, secret, env_key)
    with pytest.raises(StoreError, match="secret"):
        accounts.ensure_admin(conn, os.urandom(32), env_key)


def test_user_limits_are_json_in_the_row(conn, secret):
    """Limits are stored as a JSON object text."""
    accounts.create_user(conn, secret, "alice", limits={"quota_period": "total",
                                                        "token_quota": None}, actor="root")
    row = conn.execute("SELECT limits FROM users WHERE name = 'alice'").fetchone()
    assert json.loads(row[0]) == {"quota_period": "total"}


def test_missing_secret_with_existing_keys_is_refused(tmp_path):
    """A database with keys never gets a new secret silently (all its keys would die)."""
    from ollama_proxy.access.keys import secret_path

    database = str(tmp_path / "x.db")
    conn = db.connect(database)
    secret = accounts.server_secret(conn, database)
    accounts.create_user(conn, secret, "alice", actor="t")
    os.remove(secret_path(database))
    with pytest.raises(StoreError, match="is missing"):
        accounts.server_secret(conn, database)
    conn.close()
    fresh = str(tmp_path / "fresh.db")
    conn = db.connect(fresh)
    assert len(accounts.server_secret(conn, fresh)) == 32  # a new database: a new secret
    conn.close()


@pytest.mark.parametrize("change", ["delete", "demote", "suspend"])
def test_the_last_active_admin_cannot_be_removed(tmp_path, change):
    """Deleting, demoting or suspending the last active admin is a 409; with two it works."""
    database = str(tmp_path / "x.db")
    conn = db.connect(database)
    secret = accounts.server_secret(conn, database)
    accounts.create_user(conn, secret, "root", role="admin", actor="t")

    def apply(name):
        if change == "delete":
            accounts.delete_user(conn, name, actor="t")
        elif change == "demote":
            accounts.update_user(conn, name, role="user", actor="t")
        else:
            accounts.update_user(conn, name, suspended=True, actor="t")

    with pytest.raises(Conflict, match="last active admin"):
        apply("root")
    accounts.create_user(conn, secret, "second", role="admin", actor="t")
    apply("root")
    conn.close()
