"""GET /admin/api/openapi.json is kept true: the document is valid OpenAPI 3.1, every
admin path of the dispatch table is in it (and nothing else), and every response it
documents, each status of each operation, is produced by a running gateway and
validated against the documented schema (JSON Schema 2020-12). A request that
succeeds is valid against the documented request body and query parameters too."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import trio
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway_stack import Stack, bearer
from ollama_proxy import __version__
from ollama_proxy.admin.openapi import document
from ollama_proxy.app import Gateway
from ollama_proxy.config import load_config
from ollama_proxy.dispatch import Caller, gateway_table

TIMEOUT_S = 20
DOC = document()
BASE = "urn:ollama-proxy:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(
    BASE, Resource.from_contents(DOC, default_specification=DRAFT202012))
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def schema_at(ref: str) -> Draft202012Validator:
    """A validator for the schema at a JSON pointer of the document (its refs resolved in it)."""
    return Draft202012Validator({"$ref": f"{BASE}#{ref}"}, registry=REGISTRY,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    """Every documented operation, by (METHOD, path template)."""
    return {(method.upper(), path): op for path, item in DOC["paths"].items()
            for method, op in item.items() if method in METHODS}


def documented_statuses() -> set[tuple[str, str, int]]:
    return {(method, path, int(status)) for (method, path), op in operations().items()
            for status in op["responses"]}


def query_names(method: str, path: str) -> set[str]:
    op = DOC["paths"][path][method.lower()]
    names = set()
    for param in [*DOC["paths"][path].get("parameters", []), *op.get("parameters", [])]:
        if "$ref" in param:
            param = DOC["components"]["parameters"][param["$ref"].rsplit("/", 1)[1]]
        if param["in"] == "query":
            names.add(param["name"])
    return names


class Checker:
    """Calls the gateway and checks each answer against the document; notes which
    documented responses it saw."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.seen: set[tuple[str, str, int]] = set()

    async def __call__(self, method: str, path: str, status: int, key: str | None = None, *,
                       body: Any = None, raw: bytes | None = None,
                       query: dict[str, str] | None = None, url: str | None = None,
                       **path_params: str) -> Any:
        op = DOC["paths"][path][method.lower()]
        headers = bearer(key) if key is not None else {}
        content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if content is not None:
            headers["content-type"] = "application/json"
        target = path.format(**{k: httpx.URL(v).raw_path.decode() for k, v in path_params.items()})
        response = await self.client.request(method, (url or self.url) + target, headers=headers,
                                             content=content, params=query)
        assert response.status_code == status, (method, target, response.text)
        documented = op["responses"].get(str(status))
        assert documented is not None, f"{method} {path} answered {status}, not documented"
        ref = pointer("paths", path, method.lower(), "responses", str(status))
        if "$ref" in documented:
            ref = documented["$ref"].removeprefix("#")
            documented = DOC["components"]["responses"][ref.rsplit("/", 1)[1]]
        if "content" in documented:
            assert response.headers["content-type"].startswith("application/json")
            payload = response.json()
            schema_at(ref + pointer("content", "application/json", "schema")).validate(payload)
        else:
            assert response.content == b"", (method, target, response.content)
            payload = None
        if 200 <= status < 300:  # what was sent is what the document allows
            unknown = set(query or {}) - query_names(method, path)
            assert not unknown, f"{method} {path}: undocumented query parameters {unknown}"
            if body is not None:
                request_ref = pointer("paths", path, method.lower(), "requestBody", "content",
                                      "application/json", "schema")
                schema_at(request_ref).validate(body)
            else:
                assert not op.get("requestBody", {}).get("required", False), (method, path)
        self.seen.add((method, path, status))
        return payload


def test_the_document_is_valid_openapi_3_1() -> None:
    validate_spec(DOC)
    assert DOC["openapi"].startswith("3.1.")
    assert DOC["info"]["version"] == __version__
    for (method, path), op in operations().items():
        for name in re.findall(r"\{(\w+)\}", path):  # each path parameter is declared
            declared = [p for p in [*DOC["paths"][path].get("parameters", []),
                                    *op.get("parameters", [])]
                        if p.get("name") == name
                        or p.get("$ref", "").endswith("/UserName") and name == "name"]
            assert declared, (method, path, name)


class FakeAdmin:
    """Stands for AdminApi: its endpoints say which call they are and for whom."""

    def endpoint(self, call: Any, *, admin: bool) -> Any:
        async def handle(request: Any, responder: Any, params: Any) -> None:
            raise AssertionError("not called")
        handle.made_by = (call.__name__, admin)  # type: ignore[attr-defined]
        return handle


async def relay(request: Any, responder: Any, route: Any) -> None:
    raise AssertionError("not called")


class FakeStatus:
    root = health = relay


def test_every_admin_path_of_the_dispatch_table_is_documented() -> None:
    """Each row the admin API answers is an operation of the document with its call's
    name as operationId and its caller as security (scope admin: an admin's key; no
    scope: any key); the document names no other operation. A new admin path cannot be
    forgotten here."""
    table = gateway_table(relay, FakeAdmin(), FakeStatus(), relay)  # type: ignore[arg-type]
    rows = {}
    for row in table.rows:
        made_by = getattr(row.handler, "made_by", None)
        if made_by is None:
            assert not row.path.startswith("/admin/api"), row.path
            continue
        assert row.caller is (Caller.ADMIN if made_by[1] else Caller.KEY), row.path
        for method in row.methods:
            rows[(method, row.path)] = made_by
    ops = operations()
    assert set(rows) == set(ops)
    for (method, path), (call, admin) in rows.items():
        op = ops[(method, path)]
        assert op["operationId"] == call, (method, path)
        security = op.get("security", DOC["security"])
        scopes = {scope for requirement in security for scopes in requirement.values()
                  for scope in scopes}
        assert scopes == ({"admin"} if admin else set()), (method, path, security)
        assert "401" in op["responses"] and "403" in op["responses"], (method, path)


async def make_user(check: Checker, admin: str, name: str, **fields: Any) -> str:
    answer = await check("POST", "/admin/api/users", 201, admin, body={"name": name, **fields})
    assert answer["name"] == name
    return str(answer["key"])


async def test_every_documented_answer_is_what_the_gateway_answers(
        nursery: trio.Nursery, stack: Stack, tmp_path: Path) -> None:
    admin = stack.key
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            check = Checker(client, stack.url)
            await calls(check, stack, admin)
            await reload_calls(check, nursery, stack, admin, tmp_path)
    missing = documented_statuses() - check.seen
    assert not missing, f"documented but never seen: {sorted(missing)}"


async def calls(check: Checker, stack: Stack, admin: str) -> None:
    # The description itself; who may read it.
    doc = await check("GET", "/admin/api/openapi.json", 200, admin)
    assert doc == DOC
    await check("GET", "/admin/api/openapi.json", 401)

    # Users: created with every kind of limit, refused for every documented reason.
    ann = await make_user(check, admin, "ann", limits={
        "tokens_per_day": 100000, "requests_per_minute": 100, "token_quota": 10**6,
        "quota_period": "month", "max_concurrent": 4, "max_tokens_per_request": 4000,
        "allowed_models": ["llama*"], "expires_at": "2099-01-01", "weight": 2})
    dan = await make_user(check, admin, "dan", role="user", limits=None)
    cid = await make_user(check, admin, "cid")
    await check("GET", "/admin/api/openapi.json", 403, dan)
    await check("POST", "/admin/api/users", 400, admin, body={"name": "no spaces"})
    await check("POST", "/admin/api/users", 400, admin, body={"name": "eve", "colour": "red"})
    await check("POST", "/admin/api/users", 400, admin, raw=b'{"name": ')
    await check("POST", "/admin/api/users", 409, admin, body={"name": "ann"})
    await check("POST", "/admin/api/users", 401, body={"name": "eve"})
    await check("POST", "/admin/api/users", 403, dan, body={"name": "eve"})

    users = await check("GET", "/admin/api/users", 200, admin)
    assert {u["name"] for u in users["users"]} == {"admin", "ann", "dan", "cid"}
    await check("GET", "/admin/api/users", 401)
    await check("GET", "/admin/api/users", 403, dan)

    # Changes: limits (one back to the default), suspension, role; the last admin kept.
    changed = await check("PATCH", "/admin/api/users/{name}", 200, admin, name="ann",
                          body={"limits": {"requests_per_minute": 50, "tokens_per_day": None}})
    assert changed["limits"]["requests_per_minute"] == 50
    await check("PATCH", "/admin/api/users/{name}", 200, admin, name="cid",
                body={"suspended": True, "role": "user", "limits": None})
    await check("PATCH", "/admin/api/users/{name}", 400, admin, name="ann",
                body={"suspended": "yes"})
    await check("PATCH", "/admin/api/users/{name}", 400, admin, name="ann",
                body={"limits": {"weight": 0}})
    await check("PATCH", "/admin/api/users/{name}", 404, admin, name="nobody",
                body={"suspended": True})
    await check("PATCH", "/admin/api/users/{name}", 409, admin, name="admin",
                body={"suspended": True})
    await check("PATCH", "/admin/api/users/{name}", 401, name="ann", body={})
    await check("PATCH", "/admin/api/users/{name}", 403, dan, name="ann", body={})

    # Keys: with an expiry, with no body at all; bad expiry; unknown user.
    key = await check("POST", "/admin/api/users/{name}/keys", 201, admin, name="ann",
                      body={"expires_at": "2099-12-31T18:00:00+01:00"})
    await check("POST", "/admin/api/users/{name}/keys", 201, admin, name="ann")
    await check("POST", "/admin/api/users/{name}/keys", 400, admin, name="ann",
                body={"expires_at": "soon"})
    await check("POST", "/admin/api/users/{name}/keys", 404, admin, name="nobody", body={})
    await check("POST", "/admin/api/users/{name}/keys", 401, name="ann", body={})
    await check("POST", "/admin/api/users/{name}/keys", 403, dan, name="ann", body={})

    # Some traffic, so that usage rows, last use and the backend's models are there.
    chat = {"model": "llama3.2", "stream": False,
            "messages": [{"role": "user", "content": "hello"}]}
    answer = await check.client.post(stack.url + "/api/chat", json=chat, headers=bearer(ann))
    assert answer.status_code == 200, answer.text
    await stack.sink.wait_for(lambda records: any(r.user == "ann" for r in records))

    detail = await check("GET", "/admin/api/users/{name}", 200, admin, name="ann")
    assert len(detail["keys"]) == 3 and detail["usage"]["requests"] == 1
    assert any(k["last_used_at"] is not None for k in detail["keys"])
    await check("GET", "/admin/api/users/{name}", 404, admin, name="nobody")
    await check("GET", "/admin/api/users/{name}", 401, name="ann")
    await check("GET", "/admin/api/users/{name}", 403, dan, name="ann")

    # Usage reports, every grouping and filter.
    usage = "/admin/api/usage"
    rows = (await check("GET", usage, 200, admin))["rows"]
    assert any(r["key"] == "ann" and r["requests"] == 1 for r in rows)
    for group in ("user", "model", "day", "hour"):
        await check("GET", usage, 200, admin, query={
            "group_by": group, "user": "ann", "model": "llama3.2:latest",
            "since": "2020-01-01", "until": "2999-01-01T00:00:00Z"})
    await check("GET", usage, 400, admin, query={"group_by": "week"})
    await check("GET", usage, 400, admin, query={"colour": "red"})
    await check("GET", usage, 401)
    await check("GET", usage, 403, dan)

    # The caller's own: any active user's key, an admin's too; a suspended user's is 403.
    me = await check("GET", "/v1/me", 200, ann)
    assert me["name"] == "ann" and me["limits"]["allowed_models"] == ["llama*"]
    assert [k["prefix"] for k in me["keys"]] == [k["prefix"] for k in detail["keys"]]
    await check("GET", "/v1/me", 200, admin)
    await check("GET", "/v1/me", 401)
    await check("GET", "/v1/me", 403, cid)
    mine = (await check("GET", "/v1/usage", 200, ann))["rows"]
    assert [r["requests"] for r in mine] == [1]
    for group in ("user", "model", "day", "hour"):
        await check("GET", "/v1/usage", 200, ann, query={
            "group_by": group, "model": "llama3.2:latest", "since": "2020-01-01",
            "until": "2999-01-01"})
    await check("GET", "/v1/usage", 400, ann, query={"since": "yesterday"})
    await check("GET", "/v1/usage", 400, ann, query={"user": "dan"})  # only one's own
    await check("GET", "/v1/usage", 401)
    await check("GET", "/v1/usage", 403, cid)

    # Operations.
    entries = (await check("GET", "/admin/api/audit", 200, admin))["entries"]
    assert entries and entries[0]["action"]
    assert len((await check("GET", "/admin/api/audit", 200, admin,
                            query={"limit": "2"}))["entries"]) == 2
    await check("GET", "/admin/api/audit", 400, admin, query={"limit": "some"})
    await check("GET", "/admin/api/audit", 401)
    await check("GET", "/admin/api/audit", 403, dan)

    backends = await check("GET", "/admin/api/backends", 200, admin)
    assert backends["backends"][0]["models"]
    await check("GET", "/admin/api/backends", 401)
    await check("GET", "/admin/api/backends", 403, dan)

    await check("POST", "/admin/api/reload", 400, admin)  # this gateway has no config file
    await check("POST", "/admin/api/reload", 401)
    await check("POST", "/admin/api/reload", 403, dan)

    # Revocations and deletions last.
    prefix = key["prefix"]
    await check("DELETE", "/admin/api/keys/{prefix}", 401, prefix=prefix)
    await check("DELETE", "/admin/api/keys/{prefix}", 403, dan, prefix=prefix)
    await check("DELETE", "/admin/api/keys/{prefix}", 204, admin, prefix=prefix)
    await check("DELETE", "/admin/api/keys/{prefix}", 404, admin, prefix="op-zzzzzzzz")
    await check("DELETE", "/admin/api/users/{name}", 401, name="ann")
    await check("DELETE", "/admin/api/users/{name}", 403, dan, name="ann")
    await check("DELETE", "/admin/api/users/{name}", 404, admin, name="nobody")
    await check("DELETE", "/admin/api/users/{name}", 409, admin, name="admin")
    await check("DELETE", "/admin/api/users/{name}", 204, admin, name="ann")


async def reload_calls(check: Checker, nursery: trio.Nursery, stack: Stack, admin: str,
                       tmp_path: Path) -> None:
    """A gateway started from a config file, on the same database: its reload's 200."""
    ini = tmp_path / "gateway.ini"
    database = stack.gateway.config.server.database
    ini.write_text(f"[server]\nlisten = 127.0.0.1:0\ndatabase = {database}\n"
                   "[limits]\nrequests_per_minute = 100\n")

    def loader() -> Any:
        return load_config(str(ini), env={}, upstream_urls=[stack.sim_url])

    gateway = Gateway(loader(), admin_key=admin, loader=loader)
    host, port = await nursery.start(lambda task_status: gateway.run(task_status=task_status))
    url = f"http://{host}:{port}"
    ini.write_text(ini.read_text().replace("= 100", "= 5"))
    answer = await check("POST", "/admin/api/reload", 200, admin, url=url)
    assert answer["reloaded"] == str(ini) and "limits.requests_per_minute" in answer["applied"]
    assert (await check("POST", "/admin/api/reload", 200, admin, url=url, body={}))["applied"] == []
