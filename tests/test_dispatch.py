"""The dispatch table: every path the gateway answers reaches its row (handler, methods,
API family, who may call); a miss is a 404, a wrong method a 405 with ``Allow``, each
in the path's error shape; a handler's early error speaks its row's family."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from ollama_proxy.api.routes import PREFIX_ROUTES, ROUTES
from ollama_proxy.dispatch import Caller, DispatchTable, Row, gateway_table
from ollama_proxy.errors import ApiFamily, Conflict, family_of
from ollama_proxy.http.messages import Request

NATIVE, OPENAI = ApiFamily.NATIVE, ApiFamily.OPENAI
ANYONE, KEY, ADMIN = Caller.ANYONE, Caller.KEY, Caller.ADMIN


@dataclass
class FakeResponder:
    """Keeps what a handler or the table answered."""

    started: bool = False
    called: tuple[Any, ...] | None = None
    answers: list[tuple[int, dict[bytes, bytes], Any]] = field(default_factory=list)

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.answers.append((status, dict(headers), json.loads(body)))


async def relay(request, responder, route):
    responder.called = ("relay", route.name)


class FakeAdmin:
    """Stands for AdminApi: its endpoints say which call they are and for whom."""

    def endpoint(self, call, *, admin):
        async def handle(request, responder, params):
            responder.called = ("admin", call.__name__, admin, dict(params))
        return handle


class FakeStatus:
    async def root(self, request, responder, params):
        responder.called = ("status", "root")

    async def health(self, request, responder, params):
        responder.called = ("status", "health")


async def metrics(request, responder, params):
    responder.called = ("metrics",)


async def console(request, responder, params):
    responder.called = ("console",)


TABLE = gateway_table(relay, FakeAdmin(), FakeStatus(), metrics, console)


def request(method: str, path: str) -> Request:
    return Request(method=method, target=path, path=path, query="", headers=[], body=b"",
                   client="127.0.0.1")


GET, GET_HEAD, POST = {"GET"}, {"GET", "HEAD"}, {"POST"}
# (method, path, what answers it, family, who may call, the path's methods)
EXPECTED = [
    ("GET", "/", ("status", "root"), NATIVE, ANYONE, GET_HEAD),
    ("HEAD", "/health", ("status", "health"), NATIVE, ANYONE, GET_HEAD),
    ("GET", "/metrics", ("metrics",), NATIVE, ANYONE, GET_HEAD),
    ("GET", "/admin", ("console",), NATIVE, ANYONE, GET_HEAD),
    ("GET", "/admin/console.css", ("console",), NATIVE, ANYONE, GET_HEAD),
    ("HEAD", "/admin/console.js", ("console",), NATIVE, ANYONE, GET_HEAD),
    ("POST", "/api/generate", ("relay", "generate"), NATIVE, KEY, POST),
    ("POST", "/api/chat", ("relay", "chat"), NATIVE, KEY, POST),
    ("POST", "/api/embed", ("relay", "embed"), NATIVE, KEY, POST),
    ("POST", "/api/embeddings", ("relay", "embeddings"), NATIVE, KEY, POST),
    ("GET", "/api/tags", ("relay", "tags"), NATIVE, KEY, GET_HEAD),
    ("HEAD", "/api/ps", ("relay", "ps"), NATIVE, KEY, GET_HEAD),
    ("GET", "/api/version", ("relay", "version"), NATIVE, KEY, GET_HEAD),
    ("POST", "/api/show", ("relay", "show"), NATIVE, KEY, POST),
    ("POST", "/api/pull", ("relay", "pull"), NATIVE, ADMIN, POST),
    ("POST", "/api/push", ("relay", "push"), NATIVE, ADMIN, POST),
    ("POST", "/api/create", ("relay", "create"), NATIVE, ADMIN, POST),
    ("POST", "/api/copy", ("relay", "copy"), NATIVE, ADMIN, POST),
    ("DELETE", "/api/delete", ("relay", "delete"), NATIVE, ADMIN, {"DELETE"}),
    ("HEAD", "/api/blobs/sha256:ab12", ("relay", "blobs"), NATIVE, ADMIN, {"HEAD", "POST"}),
    ("POST", "/api/blobs/sha256:ab12", ("relay", "blobs"), NATIVE, ADMIN, {"HEAD", "POST"}),
    ("POST", "/v1/chat/completions", ("relay", "openai_chat"), OPENAI, KEY, POST),
    ("POST", "/v1/completions", ("relay", "openai_completions"), OPENAI, KEY, POST),
    ("POST", "/v1/embeddings", ("relay", "openai_embeddings"), OPENAI, KEY, POST),
    ("GET", "/v1/models", ("relay", "openai_models"), OPENAI, KEY, GET_HEAD),
    ("GET", "/v1/models/hf.co/org/model:Q4", ("relay", "openai_model"), OPENAI, KEY, GET_HEAD),
    ("POST", "/admin/api/users", ("admin", "create_user", True, {}), OPENAI, ADMIN,
     {"GET", "POST"}),
    ("GET", "/admin/api/users", ("admin", "list_users", True, {}), OPENAI, ADMIN,
     {"GET", "POST"}),
    ("GET", "/admin/api/users/al%40ice", ("admin", "get_user", True, {"name": "al@ice"}),
     OPENAI, ADMIN, {"GET", "PATCH", "DELETE"}),
    ("PATCH", "/admin/api/users/alice", ("admin", "patch_user", True, {"name": "alice"}),
     OPENAI, ADMIN, {"GET", "PATCH", "DELETE"}),
    ("DELETE", "/admin/api/users/alice", ("admin", "delete_user", True, {"name": "alice"}),
     OPENAI, ADMIN, {"GET", "PATCH", "DELETE"}),
    ("POST", "/admin/api/users/alice/keys", ("admin", "create_key", True, {"name": "alice"}),
     OPENAI, ADMIN, POST),
    ("DELETE", "/admin/api/keys/op-AbCd1234", ("admin", "revoke_key", True,
                                              {"prefix": "op-AbCd1234"}), OPENAI, ADMIN,
     {"DELETE"}),
    ("GET", "/admin/api/usage", ("admin", "usage", True, {}), OPENAI, ADMIN, GET),
    ("GET", "/admin/api/audit", ("admin", "audit", True, {}), OPENAI, ADMIN, GET),
    ("GET", "/admin/api/backends", ("admin", "backends", True, {}), OPENAI, ADMIN, GET),
    ("POST", "/admin/api/reload", ("admin", "reload", True, {}), OPENAI, ADMIN, POST),
    ("GET", "/admin/api/openapi.json", ("admin", "openapi", True, {}), OPENAI, ADMIN, GET),
    ("GET", "/v1/me", ("admin", "me", False, {}), OPENAI, KEY, GET),
    ("GET", "/v1/usage", ("admin", "my_usage", False, {}), OPENAI, KEY, GET),
]


@pytest.mark.parametrize(("method", "path", "handler", "family", "caller", "methods"), EXPECTED,
                         ids=[f"{m} {p}" for m, p, *_ in EXPECTED])
async def test_every_path_reaches_its_row(method, path, handler, family, caller, methods):
    """The row a request matches has the family, caller and methods of its path, and
    its handler gets the request with the path's decoded parameters. The server's own
    errors (400, 408, 431: before any row is matched) speak the same family."""
    row, _ = TABLE.match(method, path)
    assert (row.family, row.caller, method in row.methods) == (family, caller, True)
    assert family_of(path) is family
    assert set().union(*(r.methods for r in TABLE.rows if r.path == row.path)) == methods
    responder = FakeResponder()
    await TABLE.handle(request(method, path), responder)
    assert responder.called == handler and responder.answers == []


def test_the_expectations_cover_every_row_and_every_proxied_route():
    """No row goes untested, and the table holds every route of api.routes."""
    reached = {TABLE.match(method, path)[0] for method, path, *_ in EXPECTED}
    assert reached == set(TABLE.rows)
    assert {r.path for r in TABLE.rows} >= set(ROUTES) | {p + "*" for p, _ in PREFIX_ROUTES}


MISSES = [
    ("GET", "/nothing", NATIVE),
    ("GET", "/api/nothing", NATIVE),
    ("GET", "/api/blobs/", NATIVE),  # a prefix row wants something after it
    ("GET", "/health/", NATIVE),
    ("GET", "/v1/nothing", OPENAI),
    ("GET", "/v1/models/", OPENAI),
    ("GET", "/admin/api/nothing", OPENAI),
    ("GET", "/admin/api/users/alice/keys/more", OPENAI),
    ("DELETE", "/admin/api/keys/", OPENAI),
]


def assert_error_shape(family: ApiFamily, body: Any, status: int, code: str) -> str:
    """The error message, once the body has the family's shape."""
    if family is OPENAI:
        assert set(body) == {"error"} and body["error"]["code"] == code, body
        assert body["error"]["type"] == {404: "not_found_error", 405: "api_error",
                                         409: "conflict_error"}[status]
        return str(body["error"]["message"])
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return str(body["error"])


@pytest.mark.parametrize(("method", "path", "family"), MISSES)
async def test_a_path_no_row_holds_is_404_in_its_prefixs_shape(method, path, family):
    """An unknown path is a 404 naming it, in the dialect of its prefix."""
    responder = FakeResponder()
    await TABLE.handle(request(method, path), responder)
    [(status, headers, body)] = responder.answers
    assert status == 404 and responder.called is None
    assert path in assert_error_shape(family, body, 404, "not_found")


WRONG_METHODS = [  # (method, path, family, Allow)
    ("GET", "/api/chat", NATIVE, "POST"),
    ("POST", "/", NATIVE, "GET, HEAD"),
    ("DELETE", "/health", NATIVE, "GET, HEAD"),
    ("GET", "/api/blobs/sha256:ab12", NATIVE, "HEAD, POST"),
    ("POST", "/v1/models", OPENAI, "GET, HEAD"),
    ("PUT", "/admin/api/users/alice", OPENAI, "DELETE, GET, PATCH"),
    ("HEAD", "/admin/api/users", OPENAI, "GET, POST"),
    ("POST", "/v1/me", OPENAI, "GET"),
]


@pytest.mark.parametrize(("method", "path", "family", "allow"), WRONG_METHODS)
async def test_a_wrong_method_is_405_with_allow_in_the_rows_shape(method, path, family, allow):
    """A held path with another method: 405, Allow lists the row's methods."""
    responder = FakeResponder()
    await TABLE.handle(request(method, path), responder)
    [(status, headers, body)] = responder.answers
    assert (status, headers[b"allow"], responder.called) == (405, allow.encode(), None)
    message = assert_error_shape(family, body, 405, "method_not_allowed")
    assert method in message and path in message and allow in message


async def failing(request, responder, params):
    raise Conflict("taken")


async def failing_late(request, responder, params):
    responder.started = True
    raise Conflict("too late")


@pytest.mark.parametrize("family", [NATIVE, OPENAI])
async def test_a_handlers_early_error_speaks_its_rows_family(family):
    """An error raised before the answer began is rendered in the row's family; once it
    began, it goes on to the server (which cuts the answer short)."""
    table = DispatchTable([Row("/x", frozenset({"GET"}), family, ANYONE, failing),
                           Row("/late", frozenset({"GET"}), family, ANYONE, failing_late)])
    responder = FakeResponder()
    await table.handle(request("GET", "/x"), responder)
    [(status, headers, body)] = responder.answers
    assert status == 409 and headers[b"content-type"].startswith(b"application/json")
    assert assert_error_shape(family, body, 409, "conflict") == "taken"
    with pytest.raises(Conflict):
        await table.handle(request("GET", "/late"), FakeResponder())


@pytest.mark.parametrize("rows", [
    [Row("/x", frozenset({"GET"}), NATIVE, ANYONE, failing),
     Row("/x", frozenset({"GET", "HEAD"}), NATIVE, ANYONE, failing)],
    [Row("/x/{id}", frozenset({"GET"}), NATIVE, ANYONE, failing),
     Row("/x/{id}", frozenset({"GET"}), NATIVE, ANYONE, failing)],
    [Row("/x", frozenset({"GET"}), NATIVE, ANYONE, failing),
     Row("/x", frozenset({"POST"}), OPENAI, ANYONE, failing)],
], ids=["same-method-twice", "same-pattern-twice", "two-families"])
def test_a_table_with_two_answers_for_one_request_is_refused(rows):
    """One method and path have one row; one path speaks one family."""
    with pytest.raises(ValueError):
        DispatchTable(rows)
