"""The usage ledger end to end: requests through the in-process gateway with
user keys, then the rows in the database file compared with what the simulated backend
counted, and the admin API's views of them (usage, users, keys, audit), its validation
errors, and the rule that no key text is ever stored or logged.

Rows are matched to the simulator's records by ``X-Request-Id``, which the client sends,
the gateway keeps, forwards upstream and stores in the ledger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
import trio

from gateway_stack import Stack
from ollama_proxy.access.keys import key_prefix, new_key
from ollama_proxy.sim.server import SimRecord
from ollama_proxy.store import db

TIMEOUT_S = 10
ROW_COLUMNS = ("request_id", "time", "user", "key_prefix", "backend", "model", "endpoint",
               "status", "outcome", "prompt_tokens", "completion_tokens", "estimated", "stream",
               "total_ns", "load_ns", "prompt_eval_ns", "eval_ns")


def db_path(stack: Stack) -> str:
    return stack.gateway.config.server.database


def ledger_rows(stack: Stack) -> dict[str, dict[str, Any]]:
    """Every ledger row, by request id, read from the file with a connection of our own."""
    conn = db.connect(db_path(stack))
    try:
        rows = conn.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM ledger").fetchall()
    finally:
        conn.close()
    out = {row[0]: dict(zip(ROW_COLUMNS, row)) for row in rows}
    assert len(out) == len(rows), "two ledger rows share a request id"
    return out


def sim_record(stack: Stack, request_id: str) -> SimRecord:
    """The simulator's record of the request that carried ``request_id``."""
    wanted = request_id.encode()
    found = [r for r in stack.sim.records
             if any(k == b"x-request-id" and v == wanted for k, v in r.headers)]
    assert len(found) == 1, f"{request_id}: {len(found)} simulator records"
    return found[0]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def admin_call(client: httpx.AsyncClient, stack: Stack, method: str, path: str,
                     body: Any = None, status: int = 200) -> Any:
    response = await client.request(method, path, json=body, headers=stack.headers)
    assert response.status_code == status, (method, path, response.text)
    return response.json() if response.content else None


async def create_user(client: httpx.AsyncClient, stack: Stack, name: str) -> str:
    return (await admin_call(client, stack, "POST", "/admin/api/users", {"name": name},
                             status=201))["key"]


def chat_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclasses.dataclass(frozen=True)
class Call:
    path: str
    body: dict[str, Any]
    stream: bool
    status: int = 200


def metered_calls() -> list[Call]:
    """Native and /v1 chat, generate, completions (streamed and not) and embeddings."""
    calls = []
    for n, stream in ((3, True), (7, False)):
        calls += [
            Call("/api/chat", {"model": "llama3.2", "stream": stream,
                               "messages": chat_messages(f"[[sim:tokens={n}]] native chat")},
                 stream),
            Call("/api/generate", {"model": "llama3.2", "stream": stream,
                                   "prompt": f"[[sim:tokens={n + 1}]] native generate, longer"},
                 stream),
            Call("/v1/chat/completions",
                 {"model": "llama3.2", "stream": stream,
                  "messages": chat_messages(f"[[sim:tokens={n + 2}]] openai chat")}, stream),
            Call("/v1/completions", {"model": "llama3.2", "stream": stream,
                                     "prompt": f"[[sim:tokens={n + 3}]] openai completion"},
                 stream),
        ]
    calls += [
        Call("/api/embed", {"model": "all-minilm", "input": ["one two three", "four"]}, False),
        Call("/v1/embeddings", {"model": "all-minilm", "input": "five six seven eight"}, False),
        # Refused by the backend (unknown model): a row with its status, nothing used.
        Call("/api/chat", {"model": "no-such-model", "stream": False,
                           "messages": chat_messages("hi")}, False, status=404),
    ]
    return calls


async def run_call(client: httpx.AsyncClient, call: Call, headers: dict[str, str],
                   request_id: str) -> httpx.Response:
    response = await client.post(call.path, json=call.body,
                                 headers={**headers, "X-Request-Id": request_id})
    assert response.status_code == call.status, (call, response.text)
    assert response.headers["x-request-id"] == request_id
    return response


def expected_groups(rows: list[dict[str, Any]], group_by: str) -> list[dict[str, Any]]:
    """What ``group_by`` should answer for these rows, computed here independently."""
    def key(row: dict[str, Any]) -> Any:
        when = datetime.fromtimestamp(row["time"], timezone.utc)
        return {"user": row["user"], "model": row["model"],
                "day": when.strftime("%Y-%m-%d"), "hour": when.strftime("%Y-%m-%dT%H:00Z")
                }[group_by]

    def add_ns(total: dict[str, Any], name: str, ns: int | None) -> None:
        """GPU time: summed over the rows that have it, None while none has."""
        if ns is not None:
            total[name] = (total[name] or 0) + ns

    totals: dict[Any, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0,
                 "gpu_seconds": None, "load_seconds": None})
    for row in rows:
        total = totals[key(row)]
        total["requests"] += 1
        total["prompt_tokens"] += row["prompt_tokens"]
        total["completion_tokens"] += row["completion_tokens"]
        total["errors"] += int(row["outcome"] != "ok" or row["status"] >= 400)
        if row["prompt_eval_ns"] is not None or row["eval_ns"] is not None:
            add_ns(total, "gpu_seconds", (row["prompt_eval_ns"] or 0) + (row["eval_ns"] or 0))
        add_ns(total, "load_seconds", row["load_ns"])
    for total in totals.values():
        for name in ("gpu_seconds", "load_seconds"):
            if total[name] is not None:
                total[name] = round(total[name] / 1e9, 6)
    return [{"key": k, **v} for k, v in sorted(totals.items(), key=lambda kv: str(kv[0]))]


async def test_ledger_rows_equal_the_simulator_counts(stack: Stack) -> None:
    """Each request's row has the backend's exact counts, the user, key prefix and status."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            key = await create_user(client, stack, "alice")
            calls = metered_calls()
            for index, call in enumerate(calls):
                await run_call(client, call, bearer(key), f"exact-{index}")
                # Committed before the response's last bytes: no waiting for it.
                assert f"exact-{index}" in ledger_rows(stack), call
            rows = ledger_rows(stack)
    problems = []
    for index, call in enumerate(calls):
        rid = f"exact-{index}"
        row, seen = rows[rid], sim_record(stack, rid)
        expected = {
            "user": "alice", "key_prefix": key_prefix(key), "endpoint": call.path,
            "model": call.body["model"], "status": call.status, "outcome": "ok", "estimated": 0,
            "stream": int(call.stream), "backend": stack.gateway.backends.backends[0].name,
            "prompt_tokens": seen.prompt_tokens, "completion_tokens": seen.completion_tokens,
        }
        got = {k: row[k] for k in expected}
        if got != expected:
            problems.append(f"{call.path} stream={call.stream}: {got} != {expected}")
        if call.status == 200 and not seen.prompt_tokens:
            problems.append(f"{call.path}: the simulator counted no prompt tokens")
    assert not problems, "\n".join(problems)
    assert sum(rows[f"exact-{i}"]["completion_tokens"] for i in range(len(calls))) > 0


async def test_legacy_embeddings_are_estimated(stack: Stack) -> None:
    """/api/embeddings reports no counts (as Ollama): its row is estimated from the prompt."""
    prompt = "the legacy embeddings endpoint reports no token counts"
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            key = await create_user(client, stack, "alice")
            await run_call(client, Call("/api/embeddings", {"model": "all-minilm",
                                                            "prompt": prompt}, False),
                           bearer(key), "legacy-1")
    row = ledger_rows(stack)["legacy-1"]
    assert (row["user"], row["status"], row["outcome"], row["estimated"]) == ("alice", 200, "ok", 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == ((len(prompt) + 3) // 4, 0)


@pytest.mark.parametrize("path, body, done_marker", [
    ("/api/chat", {"model": "llama3.2", "messages": chat_messages(
        "[[sim:tokens=400]] [[sim:rate=100]] a long answer")}, '"done":true'),
    ("/v1/chat/completions", {"model": "llama3.2", "stream": True, "messages": chat_messages(
        "[[sim:tokens=400]] [[sim:rate=100]] a long answer")}, "[DONE]"),
], ids=["native", "openai"])
async def test_client_leaving_mid_stream_is_client_closed_and_estimated(
        stack: Stack, path: str, body: dict[str, Any], done_marker: str) -> None:
    """A stream the client leaves gets a client_closed row with the tokens sent so far."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            key = await create_user(client, stack, "alice")
            received = 0
            async with client.stream("POST", path, json=body,
                                     headers={**bearer(key), "X-Request-Id": "leaver"}) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    assert done_marker not in line
                    if line.strip():
                        received += 1
                    if received == 5:
                        break  # leave: the connection is closed with the body unread
            await stack.sink.wait_for(lambda records: any(r.request_id == "leaver"
                                                          for r in records))
            await stack.sim.wait_for(lambda sim: sim_record(stack, "leaver").outcome != "pending")
    row, seen = ledger_rows(stack)["leaver"], sim_record(stack, "leaver")
    assert seen.outcome == "cancelled"
    assert (row["user"], row["key_prefix"], row["status"]) == ("alice", key_prefix(key), 200)
    assert (row["outcome"], row["estimated"], row["stream"]) == ("client_closed", 1, 1)
    # Counted as relayed: at least what the client read, at most what the backend sent.
    assert received <= row["completion_tokens"] <= seen.completion_tokens < 400
    assert row["prompt_tokens"] > 0


async def test_usage_reports_agree_with_the_rows(stack: Stack) -> None:
    """/admin/api/usage (every group_by and filter), /v1/usage and the user list sum the rows."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            keys = {"alice": await create_user(client, stack, "alice"),
                    "bob": await create_user(client, stack, "bob"),
                    "admin": stack.key}
            calls = metered_calls()
            for index, call in enumerate(calls):
                who = ("alice", "alice", "bob", "admin")[index % 4]
                await run_call(client, call, bearer(keys[who]), f"usage-{index}")
            rows = list(ledger_rows(stack).values())
            assert len(rows) == len(calls)
            assert {r["user"] for r in rows} == {"alice", "bob", "admin"}
            # native rows have GPU time, /v1 rows none: the sums cover both kinds
            assert {r["eval_ns"] is None for r in rows} == {True, False}

            async def get(path: str, key: str = stack.key) -> Any:
                response = await client.get(path, headers=bearer(key))
                assert response.status_code == 200, (path, response.text)
                return response.json()

            for group_by in ("user", "model", "day", "hour"):
                answer = await get(f"/admin/api/usage?group_by={group_by}")
                assert answer == {"rows": expected_groups(rows, group_by)}, group_by
            assert (await get("/admin/api/usage"))["rows"] == expected_groups(rows, "user")

            alice_rows = [r for r in rows if r["user"] == "alice"]
            assert (await get("/admin/api/usage?user=alice&group_by=model"))["rows"] == \
                expected_groups(alice_rows, "model")
            model_rows = [r for r in rows if r["model"] == "all-minilm"]
            assert (await get("/admin/api/usage?model=all-minilm"))["rows"] == \
                expected_groups(model_rows, "user")
            assert (await get("/admin/api/usage?since=2000-01-01&until=2999-01-01T00:00:00Z"))[
                "rows"] == expected_groups(rows, "user")
            assert (await get("/admin/api/usage?until=2000-01-01"))["rows"] == []
            assert (await get("/admin/api/usage?since=2999-01-01"))["rows"] == []

            # /v1/usage: the caller's own rows only, by day unless asked otherwise.
            for who in ("alice", "bob"):
                own = [r for r in rows if r["user"] == who]
                assert (await get("/v1/usage", keys[who]))["rows"] == expected_groups(own, "day")
                assert (await get("/v1/usage?group_by=model", keys[who]))["rows"] == \
                    expected_groups(own, "model")
            refused = await client.get("/v1/usage?user=bob", headers=bearer(keys["alice"]))
            assert refused.status_code == 400, "a user must not ask for someone else's usage"

            users = {u["name"]: u for u in (await get("/admin/api/users"))["users"]}
            for name in ("alice", "bob", "admin"):
                own = [r for r in rows if r["user"] == name]
                assert users[name]["usage"] == {
                    "requests": len(own),
                    "prompt_tokens": sum(r["prompt_tokens"] for r in own),
                    "completion_tokens": sum(r["completion_tokens"] for r in own),
                }, name
                one = await get(f"/admin/api/users/{name}")
                assert one["usage"] == users[name]["usage"]

            me = await get("/v1/me", keys["bob"])
            assert (me["name"], me["role"]) == ("bob", "user")


async def test_user_keys_show_prefix_and_last_use(stack: Stack) -> None:
    """GET /admin/api/users/{name} lists keys by prefix; last_used_at is set once used."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            used = await create_user(client, stack, "alice")
            unused = (await admin_call(client, stack, "POST", "/admin/api/users/alice/keys", {},
                                       status=201))
            assert unused["prefix"] == key_prefix(unused["key"])
            revoked = (await admin_call(client, stack, "POST", "/admin/api/users/alice/keys",
                                        {}, status=201))
            await admin_call(client, stack, "DELETE", f"/admin/api/keys/{revoked['prefix']}",
                             status=204)
            before = await admin_call(client, stack, "GET", "/admin/api/users/alice")
            assert all(k["last_used_at"] is None for k in before["keys"])
            await run_call(client, metered_calls()[1], bearer(used), "last-used")
            user = await admin_call(client, stack, "GET", "/admin/api/users/alice")
            me = await client.get("/v1/me", headers=bearer(used))
            assert me.status_code == 200, me.text
    # /v1/me: the caller's own keys, as the admin sees them (last use aside: this call is one).
    def undated(keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**k, "last_used_at": None} for k in keys]
    assert undated(me.json()["keys"]) == undated(user["keys"])
    assert used not in me.text and unused["key"] not in me.text
    by_prefix = {k["prefix"]: k for k in user["keys"]}
    assert list(by_prefix) == [key_prefix(used), unused["prefix"], revoked["prefix"]]
    assert set(user["keys"][0]) >= {"prefix", "created_at", "last_used_at", "revoked"}
    assert by_prefix[key_prefix(used)]["last_used_at"] is not None
    assert by_prefix[key_prefix(used)]["last_used_at"] >= by_prefix[key_prefix(used)]["created_at"]
    assert by_prefix[unused["prefix"]]["last_used_at"] is None
    assert [k["revoked"] for k in user["keys"]] == [False, False, True]
    assert (user["name"], user["role"], user["suspended"]) == ("alice", "user", False)
    text = json.dumps(user)
    assert used not in text and unused["key"] not in text and revoked["key"] not in text


async def test_audit_log_has_admin_actions_with_actor_and_no_secret(stack: Stack) -> None:
    """Every admin change is in the audit log, naming the acting admin, and no key text."""
    admin_actor = f"admin ({key_prefix(stack.key)})"
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            first = await create_user(client, stack, "alice")
            second = await admin_call(client, stack, "POST", "/admin/api/users/alice/keys", {},
                                      status=201)
            await admin_call(client, stack, "PATCH", "/admin/api/users/alice",
                             {"suspended": True, "limits": {"requests_per_day": 5}})
            await admin_call(client, stack, "DELETE", f"/admin/api/keys/{key_prefix(first)}",
                             status=204)
            await admin_call(client, stack, "DELETE", "/admin/api/users/alice", status=204)
            entries = (await admin_call(client, stack, "GET", "/admin/api/audit"))["entries"]
    mine = [(e["actor"], e["action"], e["target"]) for e in entries if e["actor"] == admin_actor]
    assert mine == [  # newest first
        (admin_actor, "user.delete", "alice"),
        (admin_actor, "key.revoke", key_prefix(first)),
        (admin_actor, "user.update", "alice"),
        (admin_actor, "key.create", second["prefix"]),
        (admin_actor, "user.create", "alice"),
    ]
    assert all(e["time"] for e in entries)
    update = next(e for e in entries if e["action"] == "user.update" and e["target"] == "alice")
    assert update["detail"]["suspended"] is True
    text = json.dumps(entries)
    for key in (first, second["key"], stack.key):
        assert key not in text and key[len(key_prefix(key)):] not in text


BAD_USER_BODIES = [
    ({"name": 5}, '"name"'),
    ({"role": "user"}, '"name"'),
    ({"name": "has space"}, '"name"'),
    ({"name": "x", "role": "boss"}, '"role"'),
    ({"name": "x", "limits": {"tokens_per_day": -1}}, "limits.tokens_per_day"),
    ({"name": "x", "limits": {"requests_per_minute": "many"}}, "limits.requests_per_minute"),
    ({"name": "x", "limits": {"colour": 1}}, "limits.colour"),
    ({"name": "x", "limits": {"quota_period": "week"}}, "limits.quota_period"),
    ({"name": "x", "limits": {"expires_at": "soon"}}, "limits.expires_at"),
    ({"name": "x", "limits": {"weight": 0}}, '"limits.weight" must be a number > 0 and <= 1000'),
    ({"name": "x", "limits": [1]}, '"limits"'),
    ({"name": "x", "colour": "red"}, '"colour"'),
]


def assert_openai_error(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, dict) and set(error) >= {"message", "type", "code"}, error
    for needle in needles:
        assert needle in error["message"], (needle, error)


async def test_admin_validation_errors_name_the_field(stack: Stack) -> None:
    """Bad admin API input is a 400 in the OpenAI shape whose message names the field."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5,
                                     headers=stack.headers) as client:
            for body, field in BAD_USER_BODIES:
                response = await client.post("/admin/api/users", json=body)
                assert_openai_error(response, 400, field)
                assert response.json()["error"]["type"] == "invalid_request_error"
            for raw in (b"{bad json", b"[1, 2]", b'"alice"'):
                response = await client.post("/admin/api/users", content=raw,
                                             headers={"content-type": "application/json"})
                assert_openai_error(response, 400)
            await create_user(client, stack, "alice")
            for body, field in (({"suspended": "yes"}, '"suspended"'), ({"role": "root"}, '"role"'),
                                ({"limits": {"max_concurrent": 1.5}}, "limits.max_concurrent"),
                                ({"limits": {"weight": "2"}}, '"limits.weight" must be a number'),
                                ({"limits": {"weight": 1e9}}, "<= 1000"),
                                ({"name": "bob"}, '"name"')):
                response = await client.patch("/admin/api/users/alice", json=body)
                assert_openai_error(response, 400, field)
            response = await client.post("/admin/api/users/alice/keys",
                                         json={"expires_at": "tomorrow"})
            assert_openai_error(response, 400, '"expires_at"')
            for query, field in (("group_by=week", '"group_by"'), ("since=yesterday", '"since"'),
                                 ("until=2026-13-45", '"until"'), ("colour=red", '"colour"')):
                assert_openai_error(await client.get(f"/admin/api/usage?{query}"), 400, field)
            users = (await client.get("/admin/api/users")).json()["users"]
            assert [u["name"] for u in users] == ["admin", "alice"]  # nothing half-made
            alice = (await client.get("/admin/api/users/alice")).json()
            assert (alice["limits"], alice["suspended"], alice["role"]) == ({}, False, "user")


async def test_admin_conflict_and_not_found(stack: Stack) -> None:
    """A duplicate user is 409; an unknown user, key or admin path is 404 (OpenAI shape)."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5,
                                     headers=stack.headers) as client:
            old_key = await create_user(client, stack, "alice")
            response = await client.post("/admin/api/users", json={"name": "alice",
                                                                   "role": "admin"})
            assert_openai_error(response, 409, "alice")
            assert response.json()["error"]["type"] == "conflict_error"
            for method, path, body in (("GET", "/admin/api/users/nobody", None),
                                       ("PATCH", "/admin/api/users/nobody", {"suspended": True}),
                                       ("DELETE", "/admin/api/users/nobody", None),
                                       ("POST", "/admin/api/users/nobody/keys", {})):
                assert_openai_error(await client.request(method, path, json=body), 404, "nobody")
            assert_openai_error(await client.delete("/admin/api/keys/op-nothing1"), 404,
                                "op-nothing1")
            assert_openai_error(await client.get("/admin/api/nothing"), 404)
            # A deleted user's name is free again; its old key stays dead.
            await client.delete("/admin/api/users/alice")
            assert (await client.get("/admin/api/users/alice")).status_code == 404
            assert (await client.post("/admin/api/users", json={"name": "alice"})).status_code \
                == 201
            assert (await client.get("/api/tags", headers=bearer(old_key))).status_code == 401


async def test_last_used_at_counts_self_service_and_admin_calls(stack: Stack) -> None:
    """A key used only on /v1/me, or only on the admin API, has a last_used_at."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            key = await create_user(client, stack, "alice")
            assert (await client.get("/v1/me", headers=bearer(key))).status_code == 200
            await stack.gateway.ledger.flush()  # the touches are written with a later batch
            alice = await admin_call(client, stack, "GET", "/admin/api/users/alice")
            admin = await admin_call(client, stack, "GET", "/admin/api/users/admin")
    assert alice["keys"][0]["last_used_at"] is not None, "used on /v1/me"
    assert admin["keys"][0]["last_used_at"] is not None, "used on /admin/api"


@pytest.mark.parametrize("limits", [[], 0, False, ""], ids=["list", "zero", "false", "empty"])
async def test_falsy_non_object_limits_are_refused(stack: Stack, limits: Any) -> None:
    """POST /admin/api/users with a limits that is not an object is 400 naming "limits"."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5,
                                     headers=stack.headers) as client:
            response = await client.post("/admin/api/users", json={"name": "x", "limits": limits})
            assert_openai_error(response, 400, '"limits"')


async def test_revoking_by_a_whole_key_uses_its_prefix_and_never_echoes_it(stack: Stack) -> None:
    """DELETE /admin/api/keys/{whole key} revokes by prefix, like the CLI, without echoing it."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5,
                                     headers=stack.headers) as client:
            key = await create_user(client, stack, "alice")
            response = await client.delete(f"/admin/api/keys/{key}")
            assert key not in response.text
            assert response.status_code == 204, response.text
            assert (await client.get("/api/tags", headers=bearer(key))).status_code == 401


async def test_no_key_text_in_the_database_files_or_the_logs(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """Keys made, used, refused and revoked leave no trace in the db, its WAL, or any log."""
    caplog.set_level(logging.DEBUG, logger="ollama_proxy")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            alice = await create_user(client, stack, "alice")
            extra = (await admin_call(client, stack, "POST", "/admin/api/users/alice/keys",
                                      {"expires_at": "2999-01-01"}, status=201))["key"]
            strangers = [new_key(), new_key()]
            calls = metered_calls()
            for index, call in enumerate(calls):
                await run_call(client, call, bearer(alice) if index % 2 else {"X-API-Key": extra},
                               f"secret-{index}")
            for stranger in strangers:  # unknown keys are refused, and not logged either
                refused = await client.get("/api/tags", headers=bearer(stranger))
                assert refused.status_code == 401
            await admin_call(client, stack, "DELETE", f"/admin/api/keys/{key_prefix(extra)}",
                             status=204)
            refused = await client.get("/api/tags", headers={"X-API-Key": extra})
            assert refused.status_code == 401
            await admin_call(client, stack, "PATCH", "/admin/api/users/alice", {"suspended": True})
            assert (await client.get("/api/tags", headers=bearer(alice))).status_code == 403
            rows = ledger_rows(stack)
            assert all(f"secret-{i}" in rows for i in range(len(calls)))
    ours = [r for r in caplog.records if r.name.startswith("ollama_proxy")]
    assert any(r.name == "ollama_proxy.usage" for r in ours), "nothing was captured"
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in ours)
    path = db_path(stack)
    files = {suffix: open(path + suffix, "rb").read()
             for suffix in ("", "-wal", "-shm") if os.path.exists(path + suffix)}
    assert files.get("-wal"), "the WAL file should hold the recent commits"
    for key in (stack.key, alice, extra, *strangers):
        secret_part = key[len(key_prefix(key)):]
        for needle in (key, secret_part):
            for suffix, data in files.items():
                assert needle.encode() not in data, f"key text in the database file{suffix}"
            assert needle not in logged, "key text in the log output"
