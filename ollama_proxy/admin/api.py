"""The admin API (``/admin/api/*``, admin keys only) and the caller's own
``/v1/me`` and ``/v1/usage``, with the exact names of PRODUCT §8.

Account calls run in the accounts store's thread, usage reports in the
reports store's (a long report never holds up an account change or a key
revocation); ``/v1/me`` reads no SQL at all. After a change the key index is
reloaded before the answer, so the change holds from the next request on.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, unquote

from ..store import accounts, reports
from ..access import keys
from ..store.accounts import KeyEntry
from ..access.identity import Forbidden, KeyIndex, authorize
from ..backends.registry import Router
from ..errors import BadRequest, NotFound, ProxyError
from ..api.jsonbody import decode_object
from ..access.limiter import Limiter
from ..http.messages import JSON_TYPE, Request
from ..http.responder import Responder
from ..store.threads import Store

SELF_SERVICE = ("/v1/me", "/v1/usage")

Handler = Callable[["AdminApi", Request, KeyEntry, dict[str, str]], Awaitable[tuple[int, Any]]]
# Re-reads the config file and applies what it can (the argument: who asked, for the
# audit log); returns the answer of POST /admin/api/reload.
Reload = Callable[[str], Awaitable[dict[str, Any]]]
# Notes a key's use (prefix, unix time) without waiting: LedgerWriter.touch.
Touch = Callable[[str, float], None]
_NO_USAGE = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def is_admin_path(path: str) -> bool:
    return path.startswith("/admin/api/") or path in SELF_SERVICE


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


def _role(value: Any) -> str:
    if value not in ("user", "admin"):
        raise BadRequest('"role" must be "user" or "admin"')
    return str(value)


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    params = dict(parse_qsl(request.query, keep_blank_values=True))
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BadRequest(f'unknown query parameter "{unknown[0]}" (allowed: {", ".join(sorted(allowed))})')
    return params


class AdminApi:
    """Handles the admin paths; ``handle`` is a server handler."""

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

    async def handle(self, request: Request, responder: Responder) -> None:
        entry = self._index.identify(request)
        admin_path = request.path not in SELF_SERVICE
        authorize(entry, admin=admin_path)
        if admin_path:  # an expired admin administers nothing (/v1/me still says why)
            expires_at = self._limiter.limits_for(entry).expires_at
            if expires_at is not None and self._limiter.clock() >= expires_at:
                raise Forbidden("this user expired (expires_at)", code="user_expired")
        self._touch(entry.prefix, time.time())
        await request.read_body()  # only now: a stranger's body is never read
        for method, pattern, handler in ROUTES:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method != request.method:
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            status, payload = await handler(self, request, entry, params)
            if payload is None:
                await responder.respond(status, [], b"")
            else:
                body = json.dumps(payload).encode()
                await responder.respond(status, [(b"content-type", JSON_TYPE)], body)
            return
        if any(pattern.fullmatch(request.path) for _, pattern, _ in ROUTES):
            raise ProxyError(f"method {request.method} is not allowed on {request.path}",
                             status=405, code="method_not_allowed")
        raise NotFound(f"{request.path} is not an admin API path")

    @staticmethod
    def _actor(entry: KeyEntry) -> str:
        return f"{entry.user} ({entry.prefix})"

    async def _user_json(self, user: accounts.User, *, keys: bool) -> dict[str, Any]:
        totals = await self._reports.call(reports.user_totals, user.name)
        out = user.to_json()
        out["usage"] = totals.get(user.name, _NO_USAGE)
        if keys:
            key_list = await self._store.call(accounts.list_keys, user.name)
            out["keys"] = [k.to_json() for k in key_list]
        return out

    async def create_user(self, request: Request, entry: KeyEntry,
                          params: dict[str, str]) -> tuple[int, Any]:
        body = _body(request, {"name", "role", "limits"})
        name = body.get("name")
        if not isinstance(name, str):
            raise BadRequest('"name" is required and must be a string')
        limits = body.get("limits")
        limits = accounts.validate_limits({} if limits is None else limits)
        user, key = await self._store.call(
            accounts.create_user, self._secret, name, _role(body.get("role", "user")), limits,
            actor=self._actor(entry))
        await self._index.reload()
        return 201, {**user.to_json(), "key": key}

    async def list_users(self, request: Request, entry: KeyEntry,
                         params: dict[str, str]) -> tuple[int, Any]:
        users = await self._store.call(accounts.list_users)
        totals = await self._reports.call(reports.user_totals)
        return 200, {"users": [{**u.to_json(), "usage": totals.get(u.name, _NO_USAGE)}
                               for u in users]}

    async def get_user(self, request: Request, entry: KeyEntry,
                       params: dict[str, str]) -> tuple[int, Any]:
        user = await self._store.call(accounts.get_user, params["name"])
        return 200, await self._user_json(user, keys=True)

    async def patch_user(self, request: Request, entry: KeyEntry,
                         params: dict[str, str]) -> tuple[int, Any]:
        body = _body(request, {"limits", "suspended", "role"})
        suspended = body.get("suspended")
        if suspended is not None and not isinstance(suspended, bool):
            raise BadRequest('"suspended" must be true or false')
        limits = body.get("limits")
        user = await self._store.call(
            accounts.update_user, params["name"],
            limits=None if limits is None else accounts.validate_limits(limits),
            suspended=suspended,
            role=None if body.get("role") is None else _role(body["role"]),
            actor=self._actor(entry))
        await self._index.reload()
        return 200, await self._user_json(user, keys=False)

    async def delete_user(self, request: Request, entry: KeyEntry,
                          params: dict[str, str]) -> tuple[int, Any]:
        await self._store.call(accounts.delete_user, params["name"], actor=self._actor(entry))
        await self._index.reload()
        return 204, None

    async def create_key(self, request: Request, entry: KeyEntry,
                         params: dict[str, str]) -> tuple[int, Any]:
        body = _body(request, {"expires_at"})
        expires = body.get("expires_at")
        expires_at = None if expires is None else accounts.parse_time(expires, "expires_at")
        key, prefix = await self._store.call(
            accounts.create_key, self._secret, params["name"], expires_at=expires_at,
            actor=self._actor(entry))
        await self._index.reload()
        return 201, {"key": key, "prefix": prefix}

    async def revoke_key(self, request: Request, entry: KeyEntry,
                         params: dict[str, str]) -> tuple[int, Any]:
        prefix = params["prefix"]
        if keys.looks_like_key(prefix):  # a pasted whole key: revoke it by its prefix, never echo it
            prefix = keys.key_prefix(prefix)
        await self._store.call(accounts.revoke_key, prefix, actor=self._actor(entry))
        await self._index.reload()
        return 204, None

    async def _usage(self, request: Request, *, user: str | None, default_group: str,
                     allowed: set[str]) -> tuple[int, Any]:
        q = _query(request, allowed)
        since = accounts.parse_time(q["since"], "since") if q.get("since") else None
        until = accounts.parse_time(q["until"], "until") if q.get("until") else None
        rows = await self._reports.call(
            reports.usage, user=user if user is not None else q.get("user") or None,
            model=q.get("model") or None, since=since, until=until,
            group_by=q.get("group_by") or default_group)
        return 200, {"rows": rows}

    async def usage(self, request: Request, entry: KeyEntry,
                    params: dict[str, str]) -> tuple[int, Any]:
        return await self._usage(request, user=None, default_group="user",
                                 allowed={"user", "model", "since", "until", "group_by"})

    async def my_usage(self, request: Request, entry: KeyEntry,
                       params: dict[str, str]) -> tuple[int, Any]:
        return await self._usage(request, user=entry.user, default_group="day",
                                 allowed={"model", "since", "until", "group_by"})

    async def me(self, request: Request, entry: KeyEntry,
                 params: dict[str, str]) -> tuple[int, Any]:
        """The caller's effective limits (defaults and own overrides merged) and what is left."""
        limits = self._limiter.limits_for(entry)
        await self._limiter.quota_known(limits)
        return 200, {"name": entry.user, "role": entry.role, "limits": limits.to_dict(),
                     "key": entry.prefix, "remaining": self._limiter.remaining(entry)}

    async def reload(self, request: Request, entry: KeyEntry,
                     params: dict[str, str]) -> tuple[int, Any]:
        _body(request, set())
        return 200, await self._reload(self._actor(entry))

    async def audit(self, request: Request, entry: KeyEntry,
                    params: dict[str, str]) -> tuple[int, Any]:
        q = _query(request, {"limit"})
        try:
            limit = int(q.get("limit", "100"))
        except ValueError as exc:
            raise BadRequest('"limit" must be a whole number') from exc
        return 200, {"entries": await self._store.call(accounts.audit_log, max(1, min(limit, 10000)))}

    async def backends(self, request: Request, entry: KeyEntry,
                       params: dict[str, str]) -> tuple[int, Any]:
        out = []
        for backend in self._router.backends:
            info = backend.describe()
            info["in_flight"] = backend.pool.in_use
            info["queued"] = 0
            out.append(info)
        return 200, {"backends": out}


_NAME = r"(?P<name>[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    (method, re.compile(path), handler) for method, path, handler in (
        ("POST", "/admin/api/users", AdminApi.create_user),
        ("GET", "/admin/api/users", AdminApi.list_users),
        ("GET", f"/admin/api/users/{_NAME}", AdminApi.get_user),
        ("PATCH", f"/admin/api/users/{_NAME}", AdminApi.patch_user),
        ("DELETE", f"/admin/api/users/{_NAME}", AdminApi.delete_user),
        ("POST", f"/admin/api/users/{_NAME}/keys", AdminApi.create_key),
        ("DELETE", "/admin/api/keys/(?P<prefix>[^/]+)", AdminApi.revoke_key),
        ("GET", "/admin/api/usage", AdminApi.usage),
        ("GET", "/admin/api/audit", AdminApi.audit),
        ("GET", "/admin/api/backends", AdminApi.backends),
        ("POST", "/admin/api/reload", AdminApi.reload),
        ("GET", "/v1/me", AdminApi.me),
        ("GET", "/v1/usage", AdminApi.my_usage),
    )
]
