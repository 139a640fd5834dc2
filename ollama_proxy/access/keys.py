"""API keys and the server secret that hashes them, sans-IO except the secret file.

A key is ``op-`` + 43 base64url characters (256 random bits). The database
keeps only its non-secret prefix and an HMAC-SHA256 under a secret stored
beside the database file, so a copied database alone does not let anyone
check guesses against the hashes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat

from ..errors import StoreError

KEY_MARK = "op-"
KEY_RANDOM_BYTES = 32  # 256 bits: more than the 192 that put guessing out of reach
KEY_CHARS = 43  # base64url of 32 bytes without padding
PREFIX_CHARS = 8  # after "op-": 48 bits, enough to tell keys apart, useless to guess
SECRET_BYTES = 32
KEY_FORMAT = f"{KEY_MARK} followed by {KEY_CHARS} base64url characters (A-Z a-z 0-9 - _)"

_KEY_RE = re.compile(rf"{KEY_MARK}[A-Za-z0-9_-]{{{KEY_CHARS}}}")
# ":memory:" databases live as long as the process, and so does their secret.
_MEMORY_SECRET = secrets.token_bytes(SECRET_BYTES)


def new_key() -> str:
    """A fresh key, to be shown once and then only kept as a hash."""
    raw = secrets.token_bytes(KEY_RANDOM_BYTES)
    return KEY_MARK + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def key_prefix(key: str) -> str:
    """The non-secret identifier of a key: ``op-`` and its next 8 characters."""
    return key[: len(KEY_MARK) + PREFIX_CHARS]


def looks_like_key(text: str) -> bool:
    """Whether ``text`` has a key's shape (cheap; lets garbage skip the HMAC)."""
    return _KEY_RE.fullmatch(text) is not None


def hash_key(secret: bytes, key: str) -> bytes:
    """The stored form of a key: HMAC-SHA256 under the server secret."""
    return hmac.new(secret, key.encode("utf-8"), hashlib.sha256).digest()


def verify(secret: bytes, key: str, stored: bytes) -> bool:
    """Whether ``key`` hashes to ``stored``, compared in constant time."""
    return hmac.compare_digest(hash_key(secret, key), stored)


def secret_path(database: str) -> str:
    """Where the secret of ``database`` lives: same name, suffix ``.secret``."""
    root, _ = os.path.splitext(database)
    return root + ".secret"


def load_or_create_secret(database: str) -> bytes:
    """The server secret beside ``database``, created (mode 0600) on first use.

    Creation writes a private temporary file and hard-links it into place, so a
    second process starting at the same moment reads either nothing or the
    whole secret, never a half-written one.
    """
    if database == ":memory:":
        return _MEMORY_SECRET
    path = secret_path(database)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secret)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process won the race: use its secret
            return _read_secret(path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise StoreError(f"cannot create the server secret {path}: {exc}") from exc
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return secret


def _read_secret(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        mode = os.fstat(fd).st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StoreError(
                f"the server secret {path} is readable by others "
                f"(mode {stat.S_IMODE(mode):04o}): run chmod 600 {path}")
        data = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != SECRET_BYTES:
        raise StoreError(f"the server secret {path} is damaged ({len(data)} bytes, "
                         f"expected {SECRET_BYTES}); without it no stored key works")
    return data


def _fsync_dir(directory: str) -> None:
    """Make the new directory entry durable (a lost secret voids every key)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported here (Windows); the file itself was synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
