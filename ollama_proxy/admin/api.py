"""The admin API (``/admin/api/*``, admin keys only) and the caller's own
``/v1/me`` and ``/v1/usage``, with the exact names the README documents: parse
the request, call the admin use-cases (``store.admin_ops``), render JSON. Which
method and path reach which endpoint is the dispatch table's.

Account changes and the audit log run in the accounts store's thread; usage
reports and the views of users (which carry usage) in the reports store's (a
long report never holds up an account change or a key revocation); ``/v1/me``
reads no SQL at all. After a change the key index is reloaded before the
answer, so the change holds from the next request on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl

from ..access.identity import KeyIndex, authorize
from ..access.limiter import Limiter
from ..api.jsonbody import decode_object
from ..backends.router import Router
from ..errors import BadRequest
from ..http.messages import JSON_TYPE, Request
from ..http.responder import Responder
from ..store import accounts, admin_ops
from ..store.accounts import DEFAULT_ROLE, KeyEntry
from ..store.threads import Store
from .openapi import document as openapi_document

Params = Mapping[str, str]
# One endpoint: the request of a caller the row admits → (status, JSON payload or None).
Call = Callable[["AdminApi", Request, KeyEntry, Params], Awaitable[tuple[int, Any]]]
# What the dispatch table calls.
Endpoint = Callable[[Request, Responder, Params], Awaitable[None]]
# Re-reads the config file and applies what it can (the argument: who asked, for the
# audit log); returns the answer of POST /admin/api/reload.
Reload = Callable[[str], Awaitable[dict[str, Any]]]
# Notes a key's use (prefix, unix time) without waiting: LedgerWriter.touch.
Touch = Callable[[str, float], None]


def _body(request: Request, allowed: set[str]) -> dict[str, Any]:
    """The JSON object of the request (decoded strictly: no deep nesting, no
    duplicate keys); unknown fields are named in the 400."""
    if not request.body.strip():
        return {}
    obj = decode_object(request.body)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BadRequest(f'unknown field "{unknown[0]}" (allowed: {", ".join(sorted(allowed))})')
    return obj


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    params = dict(parse_qsl(request.query, keep_blank_values=True))
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BadRequest(f'unknown query parameter "{unknown[0]}" (allowed: {", ".join(sorted(allowed))})')
    return params


class AdminApi:
    """The admin endpoints; ``endpoint`` makes each a dispatch-table handler."""

    def __init__(self, store: Store, reports: Store, touch: Touch, index: KeyIndex,
                 secret: bytes, router: Router, limiter: Limiter, reload: Reload) -> None:
        self._store = store
        self._reports = reports
        self._touch = touch
        self._index = index
        self._secret = secret
        self._router = router
        self._limiter = limiter
        self._reload = reload

    def endpoint(self, call: Call, *, admin: bool) -> Endpoint:
        """``call`` for callers with an admin key (``admin``), or with any key of an
        active user."""

        async def handle(request: Request, responder: Responder, params: Params) -> None:
            entry = self._index.identify(request)
            authorize(entry, admin=admin)
            if admin:  # an expired admin administers nothing (/v1/me still says why)
                expired = self._limiter.limits_for(entry).expired(self._limiter.clock())
                if expired is not None:
                    raise expired
            self._touch(entry.prefix, time.time())
            await request.read_body()  # only now: a stranger's body is never read
            status, payload = await call(self, request, entry, params)
            if payload is None:
                await responder.respond(status, [], b"")
            else:
                body = json.dumps(payload).encode()
                await responder.respond(status, [(b"content-type", JSON_TYPE)], body)

        return handle

    @staticmethod
    def _actor(entry: KeyEntry) -> str:
        return f"{entry.user} ({entry.prefix})"

    async def create_user(self, request: Request, entry: KeyEntry,
                          params: Params) -> tuple[int, Any]:
        body = _body(request, {"name", "role", "limits"})
        user, key = await self._store.call(
            admin_ops.create_user, self._secret, body.get("name"), body.get("role", DEFAULT_ROLE),
            body.get("limits"), actor=self._actor(entry))
        await self._index.reload()
        return 201, admin_ops.new_user_view(user, key)

    async def list_users(self, request: Request, entry: KeyEntry,
                         params: Params) -> tuple[int, Any]:
        return 200, await self._reports.call(admin_ops.users_view)

    async def get_user(self, request: Request, entry: KeyEntry,
                       params: Params) -> tuple[int, Any]:
        return 200, await self._reports.call(admin_ops.user_view, params["name"])

    async def patch_user(self, request: Request, entry: KeyEntry,
                         params: Params) -> tuple[int, Any]:
        body = _body(request, {"limits", "suspended", "role"})
        user = await self._store.call(
            admin_ops.update_user, params["name"], limits=body.get("limits"),
            suspended=body.get("suspended"), role=body.get("role"), actor=self._actor(entry))
        await self._index.reload()
        return 200, await self._reports.call(admin_ops.changed_user_view, user)

    async def delete_user(self, request: Request, entry: KeyEntry,
                          params: Params) -> tuple[int, Any]:
        await self._store.call(accounts.delete_user, params["name"], actor=self._actor(entry))
        await self._index.reload()
        return 204, None

    async def create_key(self, request: Request, entry: KeyEntry,
                         params: Params) -> tuple[int, Any]:
        body = _body(request, {"expires_at"})
        key, prefix = await self._store.call(
            admin_ops.create_key, self._secret, params["name"], expires_at=body.get("expires_at"),
            actor=self._actor(entry))
        await self._index.reload()
        return 201, admin_ops.new_key_view(key, prefix)

    async def revoke_key(self, request: Request, entry: KeyEntry,
                         params: Params) -> tuple[int, Any]:
        await self._store.call(admin_ops.revoke_key, params["prefix"], actor=self._actor(entry))
        await self._index.reload()
        return 204, None

    async def _usage(self, request: Request, *, user: str | None, default_group: str,
                     allowed: set[str]) -> tuple[int, Any]:
        q = _query(request, allowed)
        rows = await self._reports.call(
            admin_ops.usage, user=user if user is not None else q.get("user") or None,
            model=q.get("model") or None, since=q.get("since"), until=q.get("until"),
            group_by=q.get("group_by") or default_group)
        return 200, {"rows": rows}

    async def usage(self, request: Request, entry: KeyEntry,
                    params: Params) -> tuple[int, Any]:
        return await self._usage(request, user=None, default_group="user",
                                 allowed={"user", "model", "since", "until", "group_by"})

    async def my_usage(self, request: Request, entry: KeyEntry,
                       params: Params) -> tuple[int, Any]:
        return await self._usage(request, user=entry.user, default_group="day",
                                 allowed={"model", "since", "until", "group_by"})

    async def me(self, request: Request, entry: KeyEntry,
                 params: Params) -> tuple[int, Any]:
        """The caller's effective limits (defaults and own overrides merged), what is left,
        and its keys (prefixes and dates, revoked ones flagged; never a key)."""
        limits = self._limiter.limits_for(entry)
        await self._limiter.quota_known(limits)
        keys = await self._store.call(accounts.list_keys, entry.user)
        return 200, {"name": entry.user, "role": entry.role, "limits": limits.to_dict(),
                     "key": entry.prefix, "remaining": self._limiter.remaining(entry),
                     "keys": [k.to_json() for k in keys]}

    async def reload(self, request: Request, entry: KeyEntry,
                     params: Params) -> tuple[int, Any]:
        _body(request, set())
        return 200, await self._reload(self._actor(entry))

    async def audit(self, request: Request, entry: KeyEntry,
                    params: Params) -> tuple[int, Any]:
        q = _query(request, {"limit"})
        try:
            limit = int(q.get("limit", "100"))
        except ValueError as exc:
            raise BadRequest('"limit" must be a whole number') from exc
        return 200, {"entries": await self._store.call(accounts.audit_log, max(1, min(limit, 10000)))}

    async def openapi(self, request: Request, entry: KeyEntry,
                      params: Params) -> tuple[int, Any]:
        return 200, openapi_document()

    async def backends(self, request: Request, entry: KeyEntry,
                       params: Params) -> tuple[int, Any]:
        router = self._router
        return 200, {"backends": [b.describe(queued=router.queued_for(b))
                                  for b in router.backends.backends],
                     "queued": router.queue.waiting()}

