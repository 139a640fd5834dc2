"""Who is calling (``identify``: the key's user, else 401) and whether they may
(``authorize``: else 403), from API keys checked against an in-memory index.

The index (prefix → ``KeyEntry``) is loaded from the database at start,
reloaded at once after every change the server makes itself, and reloaded
within ``REFRESH_S`` of a change made elsewhere (the offline CLI bumps
``accounts_seq``). Requests never wait on SQLite; a key is checked with one
dict lookup and one HMAC compared in constant time.
"""

from __future__ import annotations

import logging
import time

import trio

from ..errors import Forbidden, Unauthorized
from ..http.messages import Request
from ..store import accounts
from ..store.accounts import KeyEntry
from ..store.threads import Store
from . import keys

log = logging.getLogger("ollama_proxy.auth")

REFRESH_S = 1.0  # a change made by the CLI is seen within this (+ one reload)


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer`` or ``X-API-Key``, if any."""
    value = request.header(b"authorization")
    if value is not None:
        scheme, _, token = value.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip().decode("latin-1")
    value = request.header(b"x-api-key")
    if value is not None and value.strip():
        return value.strip().decode("latin-1")
    return None


class KeyIndex:
    """The keys that work right now, kept in step with the database."""

    def __init__(self, store: Store, secret: bytes) -> None:
        self._store = store
        self._secret = secret
        self._entries: dict[str, KeyEntry] = {}
        self._seq = -1

    async def reload(self) -> None:
        seq = await self._store.call(accounts.accounts_seq)
        self._entries = await self._store.call(accounts.key_index, time.time())
        self._seq = seq

    async def keep_fresh(self) -> None:
        """Poll for changes made by others (the offline CLI) until cancelled."""
        while True:
            await trio.sleep(REFRESH_S)
            try:
                if await self._store.call(accounts.accounts_seq) != self._seq:
                    await self.reload()
            except Exception:  # a locked or broken file: keep the old index, say so
                log.exception("reloading the key index failed")

    def identify(self, request: Request) -> KeyEntry:
        """The caller's key entry, or 401 for a missing, unknown, revoked or expired key."""
        key = presented_key(request)
        if key is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        entry = self._entries.get(keys.key_prefix(key)) if keys.looks_like_key(key) else None
        if entry is None or not keys.verify(self._secret, key, entry.hash):
            raise Unauthorized("invalid API key")
        if entry.expires_at is not None and entry.expires_at <= time.time():
            raise Unauthorized("API key expired")
        return entry


def authorize(entry: KeyEntry, *, admin: bool) -> None:
    """Whether the identified caller may go on: 403 for a suspended user, or for a
    non-admin where ``admin`` is needed. Apart from ``identify`` because the relay
    records this refusal in the ledger under the caller's name (a stranger's 401 it
    does not record)."""
    if entry.suspended:
        raise Forbidden(f"user '{entry.user}' is suspended", code="user_suspended")
    if admin and entry.role != "admin":
        raise Forbidden("this path needs an admin key", code="admin_only")
