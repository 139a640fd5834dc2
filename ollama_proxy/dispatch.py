"""Every path the gateway answers, in one table: path → methods, the API family
its errors speak, who may call, and the handler.

A row's path is exact (``/api/chat``), holds ``{name}`` for one path segment
(``/admin/api/users/{name}``), or ends in ``*`` for any rest of at least one
character (``/api/blobs/*``). Exact paths are one dict lookup, the hot path of
every proxied request; the others are tried in table order. A path no row holds
is a 404, a held path with another method a 405 whose ``Allow`` lists the right
ones; an error a handler raises before its answer began is rendered in its
row's family. ``/metrics``, ``/admin`` or a folder of static files are rows of
the same shape.

Who may call is the row's to say and its handler's to check: the relay checks
in its own flow (it records a refused user in the ledger), the admin API before
it reads a body.

Kept apart from ``app`` (which builds the objects and hands their handlers in)
so that the table can be built and tested without a running gateway.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import unquote

from .admin import console_page
from .admin.api import AdminApi, Call
from .admin.status import Status
from .api.routes import PREFIX_ROUTES, ROUTES, Route
from .errors import ApiFamily, MethodNotAllowed, NotFound, ProxyError, family_of, render
from .http.messages import JSON_TYPE, Request
from .http.responder import Responder

Params = Mapping[str, str]  # the path's {name} parts, percent-decoded
Handler = Callable[[Request, Responder, Params], Awaitable[None]]
# The relay's handler: a proxied request with the route its row stands for.
RelayHandler = Callable[[Request, Responder, Route], Awaitable[None]]

_NO_PARAMS: Params = MappingProxyType({})
_PARAM = re.compile(r"\{(\w+)\}")


class Caller(enum.Enum):
    """Who may call a row's path."""

    ANYONE = "anyone"  # no key asked
    KEY = "key"  # any key of an active user
    ADMIN = "admin"  # an admin's key


@dataclass(frozen=True, slots=True)
class Row:
    """A path and some of its methods: who may call, the error dialect, the handler."""

    path: str
    methods: frozenset[str]
    family: ApiFamily
    caller: Caller
    handler: Handler


def _pattern(path: str) -> re.Pattern[str] | None:
    """The regular expression of a path with ``{name}`` parts or a ``*`` rest;
    None for an exact path."""
    rest = path.endswith("*")
    fixed = path[:-1] if rest else path
    if not rest and _PARAM.search(fixed) is None:
        return None
    regex, last = "", 0
    for part in _PARAM.finditer(fixed):
        regex += re.escape(fixed[last:part.start()]) + f"(?P<{part[1]}>[^/]+)"
        last = part.end()
    return re.compile(regex + re.escape(fixed[last:]) + (".+" if rest else ""), re.DOTALL)


class DispatchTable:
    """The rows, by path; ``handle`` is the HTTP server's handler."""

    def __init__(self, rows: Iterable[Row]) -> None:
        self.rows = tuple(rows)
        # told the reason of each refusal it answers (the admin API's 401 and 403, /metrics'
        # 403, a bad body): the relay counts its own, these are the rest
        self.on_refused: Callable[[str], None] | None = None
        self._exact: dict[str, dict[str, Row]] = {}
        patterns: dict[str, tuple[re.Pattern[str], dict[str, Row]]] = {}
        for row in self.rows:
            pattern = _pattern(row.path)
            if pattern is None:
                by_method = self._exact.setdefault(row.path, {})
            else:
                by_method = patterns.setdefault(row.path, (pattern, {}))[1]
            if any(other.family is not row.family for other in by_method.values()):
                raise ValueError(f"{row.path}: one path speaks one API family")
            for method in row.methods:
                if method in by_method:
                    raise ValueError(f"{method} {row.path} has two rows")
                by_method[method] = row
        self._patterns = list(patterns.values())

    def _rows_of(self, path: str) -> tuple[dict[str, Row] | None, Params]:
        """The rows of ``path`` by method (None: no row holds it), and its parameters."""
        by_method = self._exact.get(path)
        if by_method is not None:
            return by_method, _NO_PARAMS
        for pattern, rows in self._patterns:
            found = pattern.fullmatch(path)
            if found is not None:
                return rows, {k: unquote(v) for k, v in found.groupdict().items()}
        return None, _NO_PARAMS

    def match(self, method: str, path: str) -> tuple[Row, Params]:
        """The row for ``method`` on ``path`` and the path's parameters; else
        ``NotFound`` or ``MethodNotAllowed``."""
        by_method, params = self._rows_of(path)
        if by_method is None:
            raise NotFound(f"{path} is not a path this gateway serves")
        row = by_method.get(method)
        if row is None:
            raise MethodNotAllowed(method, path, by_method)
        return row, params

    def family(self, path: str) -> ApiFamily:
        """The error dialect of ``path``: its rows', or for a path no row holds, its
        prefix's (``errors.family_of``, which the server's own errors use too)."""
        by_method, _ = self._rows_of(path)
        if by_method:
            return next(iter(by_method.values())).family
        return family_of(path)

    async def handle(self, request: Request, responder: Responder) -> None:
        try:
            row, params = self.match(request.method, request.path)
        except ProxyError as err:
            await _answer(responder, self.family(request.path), err)
            return
        try:
            await row.handler(request, responder, params)
        except ProxyError as err:
            if responder.started:  # too late for a status: the server cuts the answer short
                raise
            if err.reason is not None and self.on_refused is not None:
                self.on_refused(err.reason)
            await _answer(responder, row.family, err)


async def _answer(responder: Responder, family: ApiFamily, err: ProxyError) -> None:
    headers = [(b"content-type", JSON_TYPE), *err.headers()]
    await responder.respond(err.status, headers, render(family, err))


def _relaying(relay: RelayHandler, route: Route) -> Handler:
    # Returns the relay's own coroutine: no extra frame on the hot path.
    return lambda request, responder, params: relay(request, responder, route)


def proxied_rows(relay: RelayHandler) -> list[Row]:
    """A row per relayed path of ``api.routes`` (whose own data the relay reads)."""
    paths = [*ROUTES.items(), *((prefix + "*", route) for prefix, route in PREFIX_ROUTES)]
    return [Row(path, route.methods, route.family,
                Caller.ADMIN if route.admin_only else Caller.KEY, _relaying(relay, route))
            for path, route in paths]


def gateway_table(relay: RelayHandler, admin: AdminApi, status: Status,
                  metrics: Handler, console: Handler = console_page.serve) -> DispatchTable:
    """Every path the gateway answers (``metrics``: /metrics, which checks the
    caller's address or admin key itself; ``console``: the web console's files)."""
    native, anyone = ApiFamily.NATIVE, Caller.ANYONE
    get_head = frozenset({"GET", "HEAD"})

    def api(method: str, path: str, call: Call, caller: Caller = Caller.ADMIN) -> Row:
        return Row(path, frozenset({method}), ApiFamily.OPENAI, caller,
                   admin.endpoint(call, admin=caller is Caller.ADMIN))

    return DispatchTable([
        Row("/", get_head, native, anyone, status.root),
        Row("/health", get_head, native, anyone, status.health),
        Row("/metrics", get_head, native, anyone, metrics),
        *(Row(path, get_head, native, anyone, console) for path in console_page.FILES),
        *proxied_rows(relay),
        api("POST", "/admin/api/users", AdminApi.create_user),
        api("GET", "/admin/api/users", AdminApi.list_users),
        api("GET", "/admin/api/users/{name}", AdminApi.get_user),
        api("PATCH", "/admin/api/users/{name}", AdminApi.patch_user),
        api("DELETE", "/admin/api/users/{name}", AdminApi.delete_user),
        api("POST", "/admin/api/users/{name}/keys", AdminApi.create_key),
        api("DELETE", "/admin/api/keys/{prefix}", AdminApi.revoke_key),
        api("GET", "/admin/api/usage", AdminApi.usage),
        api("GET", "/admin/api/audit", AdminApi.audit),
        api("GET", "/admin/api/backends", AdminApi.backends),
        api("POST", "/admin/api/reload", AdminApi.reload),
        api("GET", "/admin/api/openapi.json", AdminApi.openapi),
        api("GET", "/v1/me", AdminApi.me, Caller.KEY),
        api("GET", "/v1/usage", AdminApi.my_usage, Caller.KEY),
    ])
