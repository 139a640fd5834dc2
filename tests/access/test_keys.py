"""Keys and the server secret: shape, hashing, the secret file's rules."""

from __future__ import annotations

import os
import stat

import pytest

from ollama_proxy.access import keys
from ollama_proxy.errors import StoreError


def test_new_key_shape_and_entropy():
    """A key is op- plus 43 base64url characters, and no two are alike."""
    made = {keys.new_key() for _ in range(200)}
    assert len(made) == 200
    for key in made:
        assert key.startswith("op-") and len(key) == 46
        assert keys.looks_like_key(key)


@pytest.mark.parametrize("text", [
    "", "op-", "op-short", "sk-" + "a" * 43, "op-" + "a" * 42, "op-" + "a" * 44,
    "op-" + "a" * 42 + "=", "op-" + "a" * 42 + "+", " op-" + "a" * 43,
])
def test_looks_like_key_rejects(text):
    """Anything but op- + exactly 43 base64url characters is not a key."""
    assert not keys.looks_like_key(text)


def test_prefix_is_op_and_eight_characters():
    """The prefix is the non-secret first 11 characters."""
    key = keys.new_key()
    assert keys.key_prefix(key) == key[:11]
    assert len(keys.key_prefix(key)) == 11


def test_hash_and_verify():
    """HMAC-SHA256 under the secret; another key or another secret does not verify."""
    secret, key = os.urandom(32), keys.new_key()
    stored = keys.hash_key(secret, key)
    assert len(stored) == 32
    assert keys.verify(secret, key, stored)
    assert not keys.verify(secret, keys.new_key(), stored)
    assert not keys.verify(os.urandom(32), key, stored)


@pytest.mark.parametrize(("database", "expected"), [
    ("ollama-proxy.db", "ollama-proxy.secret"),
    ("/var/lib/op/ollama-proxy.sqlite3", "/var/lib/op/ollama-proxy.secret"),
    ("data/accounts", "data/accounts.secret"),
    ("/a.dir/accounts", "/a.dir/accounts.secret"),
])
def test_secret_path(database, expected):
    """The secret sits beside the database, with the suffix .secret."""
    assert keys.secret_path(database) == expected


def test_secret_created_once_with_mode_0600(tmp_path):
    """The first call creates a 32-byte secret, mode 0600; later calls read it back."""
    db = str(tmp_path / "op.db")
    first = keys.load_or_create_secret(db)
    path = tmp_path / "op.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 32
    assert keys.load_or_create_secret(db) == first
    assert [p.name for p in tmp_path.iterdir()] == ["op.secret"]  # no temporary left


def test_secret_readable_by_others_is_refused(tmp_path):
    """A secret with group/other bits is an error that says chmod 600."""
    db = str(tmp_path / "op.db")
    keys.load_or_create_secret(db)
    os.chmod(tmp_path / "op.secret", 0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        keys.load_or_create_secret(db)


def test_damaged_secret_is_refused(tmp_path):
    """A secret of the wrong length is an error, not silently replaced."""
    path = tmp_path / "op.secret"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(StoreError, match="damaged"):
        keys.load_or_create_secret(str(tmp_path / "op.db"))


def test_memory_database_secret_is_per_process(tmp_path, monkeypatch):
    """:memory: gets one random secret for the process, and no file."""
    monkeypatch.chdir(tmp_path)
    assert keys.load_or_create_secret(":memory:") == keys.load_or_create_secret(":memory:")
    assert list(tmp_path.iterdir()) == []
