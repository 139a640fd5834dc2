"""Limits end to end: users with limits call the in-process gateway in front
of the simulated Ollama over loopback. What the backend received (the simulator's
records), what the ledger holds and what the clients got are compared.

Requests are matched to the simulator's records by ``X-Request-Id``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import gateway_stack
from gateway_stack import (
    Stack,
    bearer,
    forwarded,
    gateway_config,
    ledger_rows,
    new_user,
    start_gateway,
    start_stack,
)
from ollama_proxy.__main__ import main as cli_main
from ollama_proxy.app import Gateway
from ollama_proxy.config import load_config
from ollama_proxy.http.server import HttpServer
from ollama_proxy.sim.server import SERVER_SETTINGS, SimRecord, Simulator
from ollama_proxy.store import db

TIMEOUT_S = 20
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
# Long words: the gateway's estimate (4 characters a token) is above the simulator's count
# (a token a word plus the chat template), so the reservations cover the real prompts.
LONG = " ".join(["abcdefghijklmnopqrst"] * 4)


def chat(text: str = "hello", model: str = "llama3.2", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def rate_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}


async def patch_limits(client: httpx.AsyncClient, stack: Stack, name: str, **limits: Any) -> None:
    response = await client.patch(f"{stack.url}/admin/api/users/{name}", headers=stack.headers,
                                  json={"limits": limits})
    assert response.status_code == 200, response.text


def relayed(stack: Stack) -> list[SimRecord]:
    """What reached the simulator from clients."""
    return gateway_stack.relayed(stack.sim)


# -- headers and caps -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body", "stream"), [
    ("POST", "/api/chat", chat(), True),
    ("POST", "/api/chat", chat(stream=False), False),
    ("POST", "/v1/chat/completions", chat(stream=True), True),
    ("POST", "/v1/chat/completions", chat(), False),
    ("POST", "/api/embed", {"model": "all-minilm", "input": "a b"}, False),
    ("GET", "/api/tags", None, False),
], ids=["native-stream", "native", "v1-stream", "v1", "embed", "tags"])
async def test_every_response_carries_the_ratelimit_headers(stack, method, path, body, stream):
    """Streamed or not, counted or not: the x-ratelimit-* trio of both families; a user
    without limits gets none."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", requests_per_minute=10,
                                 tokens_per_day=100_000)
            free = await new_user(client, stack, "bob")
            response = await client.request(method, stack.url + path, json=body,
                                            headers=bearer(key))
            unlimited = await client.request(method, stack.url + path, json=body,
                                             headers=bearer(free))
    assert response.status_code == 200 and unlimited.status_code == 200
    got = rate_headers(response)
    assert set(got) == set(RATE_HEADERS)
    counted = path != "/api/tags"
    assert got["x-ratelimit-remaining-requests"] == ("9" if counted else "10")
    assert (got["x-ratelimit-reset-requests"] != "0s") is counted
    assert ("ndjson" in response.headers["content-type"]
            or "event-stream" in response.headers["content-type"]) is stream
    assert rate_headers(unlimited) == {}


@pytest.mark.parametrize(("path", "extra", "sent"), [
    ("/api/chat", {}, {"options": {"num_predict": 5}}),
    ("/api/chat", {"options": {"num_predict": 100, "seed": 1}},
     {"options": {"num_predict": 5, "seed": 1}}),
    ("/api/chat", {"options": {"num_predict": 3}}, {"options": {"num_predict": 3}}),
    ("/api/generate", {"prompt": "hi"}, {"options": {"num_predict": 5}}),
    ("/v1/chat/completions", {}, {"max_tokens": 5}),
    ("/v1/chat/completions", {"max_tokens": 100}, {"max_tokens": 5}),
    ("/v1/chat/completions", {"max_completion_tokens": 100}, {"max_tokens": 5}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, {"max_tokens": 2}),
], ids=["native-absent", "native-larger", "native-smaller", "generate", "v1-absent",
        "v1-larger", "v1-max-completion-tokens", "v1-smaller"])
async def test_the_cap_reaches_the_backend(stack, path, extra, sent):
    """max_tokens_per_request=5: the backend gets num_predict / max_tokens 5 unless the
    client asked for less, and the answer is no longer."""
    body = {**chat("[[sim:tokens=40]] go", stream=False), **extra}
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", max_tokens_per_request=5)
            response = await client.post(stack.url + path, json=body,
                                         headers=bearer(key, "cap-1"))
        assert response.status_code == 200, response.text
        usage = await stack.sink.record_of("cap-1")
    [record] = forwarded(stack, "cap-1")
    assert {k: record.body[k] for k in sent} == sent
    assert "max_completion_tokens" not in record.body
    cap = sent["options"]["num_predict"] if "options" in sent else sent["max_tokens"]
    assert record.completion_tokens == cap
    assert usage.completion_tokens == cap


# -- quotas under concurrency ------------------------------------------------------------


async def test_thirty_concurrent_requests_never_overshoot_a_small_quota(stack):
    """30 requests at once, each wanting 100 tokens, against token_quota=500: the caps keep
    the ledger (= the backend's own counts) within the quota; refused requests never reach
    the backend and leave a ``refused`` row; then it is used up."""
    quota = 500
    text = f"[[sim:tokens=100]] [[sim:rate=400]] {LONG}"
    answers: dict[str, int] = {}

    async def one(client: httpx.AsyncClient, key: str, i: int) -> None:
        path = ("/api/chat", "/v1/chat/completions")[i % 2]
        body = chat(text, stream=i % 3 == 0)
        async with client.stream("POST", stack.url + path, json=body,
                                 headers=bearer(key, f"q-{i}")) as response:
            await response.aread()
            answers[f"q-{i}"] = response.status_code

    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=15, limits=httpx.Limits(max_connections=40)) as client:
            key = await new_user(client, stack, "ann", token_quota=quota,
                                 max_tokens_per_request=60)
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(one, client, key, i)
            for i in range(30, 60):  # one by one now, until the quota says no
                await one(client, key, i)
                if answers[f"q-{i}"] == 429:
                    last = await client.post(stack.url + "/api/chat", json=chat(text),
                                             headers=bearer(key))
                    break
    assert last.status_code == 429 and last.json()["error"].endswith("is used up")
    assert last.headers["x-should-retry"] == "false" and "retry-after" not in last.headers
    rows = ledger_rows(stack.gateway.config.server.database, "ann")
    admitted = [r for r in rows if r["outcome"] != "refused"]
    refused = [r for r in rows if r["outcome"] == "refused"]
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) <= quota
    assert refused and len(admitted) >= 6
    assert all(r["status"] == 429 for r in refused)
    for r in admitted:
        [record] = forwarded(stack, r["request_id"])
        assert (record.prompt_tokens, record.completion_tokens) == (
            r["prompt_tokens"], r["completion_tokens"])
    for r in refused:
        assert forwarded(stack, r["request_id"]) == []
    assert {status for status in answers.values()} == {200, 429}


async def test_short_prompts_at_once_stay_within_the_quota(stack):
    """Prompts like "hi", whose text estimate (1 token) is far below the backend's count
    (the chat template): after one request of the model on each route, 30 at once against
    token_quota=300 stay within it, prompts included (they went over by the template of
    every request in flight before the reservations learned it)."""
    quota = 300
    text = "hi [[sim:tokens=5]]"

    async def one(client: httpx.AsyncClient, key: str, i: int) -> None:
        path = ("/api/chat", "/v1/chat/completions")[i % 2]
        async with client.stream("POST", stack.url + path, json=chat(text, stream=i % 3 == 0),
                                 headers=bearer(key)) as response:
            await response.aread()

    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=15, limits=httpx.Limits(max_connections=40)) as client:
            key = await new_user(client, stack, "ann", token_quota=quota,
                                 max_tokens_per_request=5)
            await one(client, key, 0)
            await one(client, key, 1)
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(one, client, key, i)
    rows = ledger_rows(stack.gateway.config.server.database, "ann")
    admitted = [r for r in rows if r["outcome"] != "refused"]
    assert len(admitted) >= 10 and len(rows) == 32
    assert all(r["prompt_tokens"] > 1 for r in admitted)  # the template counts
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) <= quota


async def test_max_concurrent_comes_back_to_zero_after_clients_leave(stack):
    """max_concurrent=2: clients that leave mid-stream or before the first byte free their
    slot; afterwards two requests go at once again."""
    leave_mid = chat("[[sim:tokens=1000]] [[sim:rate=50]]", stream=True)
    leave_early = chat("[[sim:delay=60]]")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", max_concurrent=2)
            for i in range(3):
                async with client.stream("POST", stack.url + "/api/chat", json=leave_mid,
                                         headers=bearer(key)) as response:
                    async for _line in response.aiter_lines():
                        break
                await stack.sink.wait_for(lambda records, n=2 * i + 1: len(records) == n)
                request_id = f"early-{i}"
                async with trio.open_nursery() as client_side:
                    client_side.start_soon(functools.partial(
                        client.post, stack.url + "/v1/chat/completions", json=leave_early,
                        headers=bearer(key, request_id)))
                    # the backend has the request and keeps it pending: the client leaves
                    await stack.sim.wait_for(lambda sim, rid=request_id: bool(forwarded(stack, rid)))
                    client_side.cancel_scope.cancel()
                await stack.sink.wait_for(lambda records, n=2 * i + 2: len(records) == n)
            counters = stack.gateway.limiter.store.get("ann")
            assert counters.in_flight == 0 and counters.held == 0
            assert {r.outcome for r in stack.sink.records} == {"client_closed"}
            async with trio.open_nursery() as nursery:
                statuses: list[int] = []

                async def go() -> None:
                    response = await client.post(stack.url + "/api/chat", json=chat(
                        "[[sim:tokens=3]]", stream=False), headers=bearer(key))
                    statuses.append(response.status_code)
                nursery.start_soon(go)
                nursery.start_soon(go)
    assert statuses == [200, 200]


# -- models and expiry -------------------------------------------------------------------


async def test_model_lists_show_only_allowed_models_and_others_are_refused(stack):
    """allowed_models=[llama3.2]: tags, ps and /v1/models list it alone; other models get
    403 (404 for /v1/models/{id}) in the family's shape; an unrestricted key sees the
    backend's bytes unchanged."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", allowed_models=["LLAMA3.2"])
            own = bearer(key)

            async def get(path: str, headers: dict[str, str]) -> httpx.Response:
                return await client.get(stack.url + path, headers=headers)

            tags_reply = await get("/api/tags", own)
            tags = tags_reply.json()
            assert [m["name"] for m in tags["models"]] == ["llama3.2:latest"]
            head = await client.head(stack.url + "/api/tags", headers=own)
            assert (head.status_code, head.content) == (200, b"")
            assert head.headers["content-length"] == str(len(tags_reply.content))
            assert [m["name"] for m in (await get("/api/ps", own)).json()["models"]] == [
                "llama3.2:latest"]
            listed = (await get("/v1/models", own)).json()
            assert [m["id"] for m in listed["data"]] == ["llama3.2:latest"]
            assert listed["object"] == "list"
            assert (await get("/v1/models/llama3.2", own)).status_code == 200
            hidden = await get("/v1/models/qwen3:4b", own)
            assert hidden.status_code == 404
            assert hidden.json()["error"]["code"] == "model_not_found"
            show = await client.post(stack.url + "/api/show", json={"model": "qwen3:4b"},
                                     headers=own)
            assert (show.status_code, set(show.json())) == (403, {"error"})
            for path in ("/api/chat", "/v1/chat/completions"):
                denied = await client.post(stack.url + path, json=chat(model="qwen3:4b"),
                                           headers=own)
                assert denied.status_code == 403
            assert denied.json()["error"]["code"] == "model_not_allowed"
            ok = await client.post(stack.url + "/api/chat", json=chat(stream=False), headers=own)
            assert ok.status_code == 200
            whole = await get("/api/tags", stack.headers)
            direct = await client.get(stack.sim_url + "/api/tags")
    assert whole.content == direct.content
    assert len(relayed(stack)) == 7  # 6 allowed, the unfiltered tags: no refusal



async def test_an_expired_user_is_refused_everywhere(stack):
    """expires_at in the past: 403 on every proxied path, nothing reaches the backend."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", expires_at="2020-01-01")
            chat_answer = await client.post(stack.url + "/v1/chat/completions", json=chat(),
                                            headers=bearer(key))
            tags = await client.get(stack.url + "/api/tags", headers=bearer(key))
            await stack.sink.wait_for(lambda records: len(records) == 2)
    assert chat_answer.status_code == tags.status_code == 403
    assert chat_answer.json()["error"]["code"] == "user_expired"
    assert relayed(stack) == []
    assert [r.outcome for r in stack.sink.records] == ["refused", "refused"]


async def test_an_expired_admin_administers_nothing_but_can_see_why(stack):
    """An admin past expires_at gets 403 on the admin API; /v1/me still answers."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(stack.url + "/admin/api/users", headers=stack.headers,
                                         json={"name": "old", "role": "admin",
                                               "limits": {"expires_at": "2020-01-01"}})
            key = response.json()["key"]
            users = await client.get(stack.url + "/admin/api/users", headers=bearer(key))
            me = await client.get(stack.url + "/v1/me", headers=bearer(key))
    assert users.status_code == 403
    assert users.json()["error"]["code"] == "user_expired"
    assert me.status_code == 200 and me.json()["limits"]["expires_at"] is not None


# -- hot edits, restart, /v1/me, reload ---------------------------------------------------


async def test_patch_applies_to_the_next_request(stack):
    """PATCH limits: the very next request is judged by them; null brings the default back."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann")

            async def status() -> int:
                response = await client.post(stack.url + "/api/chat",
                                             json=chat(stream=False), headers=bearer(key))
                return response.status_code

            assert await status() == 200
            await patch_limits(client, stack, "ann", requests_per_minute=1)
            assert await status() == 429  # the first request is in the window already
            await patch_limits(client, stack, "ann", requests_per_minute=None)
            assert await status() == 200
            await patch_limits(client, stack, "ann", allowed_models=["qwen*"])
            assert await status() == 403


async def test_cli_limits_apply_to_the_next_request(stack):
    """`users limits NAME --set` on the database file reaches the running gateway (the key
    index reloads within a second; polled with a bound) and holds from the next request."""
    database = stack.gateway.config.server.database
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann")
            code = await trio.to_thread.run_sync(cli_main, [
                "users", "limits", "ann", "--set", "token_quota=0", "--database", database])
            assert code == 0
            while (await client.get(stack.url + "/v1/me", headers=bearer(key))).json()[  # noqa: ASYNC110
                    "limits"]["token_quota"] != 0:
                # The index polls the file every REFRESH_S of real time: that poll is what is
                # under test, so the test can only observe it, with a short, bounded poll.
                await trio.sleep(0.05)
            response = await client.post(stack.url + "/api/chat", json=chat(),
                                         headers=bearer(key))
    assert response.status_code == 429
    assert response.json()["error"] == "token_quota is 0"


async def test_me_shows_effective_limits_and_what_remains(stack):
    """/v1/me: the defaults merged with the user's own limits, and the live counters."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", requests_per_day=10, token_quota=1000,
                                 quota_period="month", max_concurrent=3,
                                 expires_at="2099-01-01", weight=2.5)
            answer = await client.post(stack.url + "/api/chat", json=chat(stream=False),
                                       headers=bearer(key))
            me = (await client.get(stack.url + "/v1/me", headers=bearer(key))).json()
    used = answer.json()["prompt_eval_count"] + answer.json()["eval_count"]
    assert me["limits"] == {
        "requests_per_minute": None, "requests_per_day": 10, "tokens_per_minute": None,
        "tokens_per_day": None, "token_quota": 1000, "quota_period": "month",
        "max_concurrent": 3, "max_tokens_per_request": None, "allowed_models": None,
        "expires_at": "2099-01-01T00:00:00Z", "weight": 2.5}
    assert me["remaining"] == {
        "requests_per_minute": None, "requests_per_day": 9, "tokens_per_minute": None,
        "tokens_per_day": None, "token_quota": 1000 - used, "max_concurrent": 3}


async def test_a_restart_keeps_windows_and_quotas(nursery):
    """The same database after a restart: the minute window still holds its requests and
    the quota its tokens (rebuilt from the ledger before the first request)."""
    stack_scope = trio.CancelScope()
    started: list[Stack] = []

    async def first_life(task_status: trio.TaskStatus[None]) -> None:
        with stack_scope:
            async with trio.open_nursery() as inner:
                started.append(await start_stack(inner))
                task_status.started()
    await nursery.start(first_life)
    stack = started[0]
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", requests_per_minute=3, token_quota=10_000)
            for _ in range(2):
                answer = await client.post(stack.url + "/api/chat", json=chat(stream=False),
                                           headers=bearer(key))
                assert answer.status_code == 200
            before = (await client.get(stack.url + "/v1/me", headers=bearer(key))).json()
            stack_scope.cancel()
            gateway = Gateway(stack.gateway.config, admin_key=stack.key)
            host, port = await nursery.start(
                lambda task_status: gateway.run(task_status=task_status))
            url = f"http://{host}:{port}"
            after = (await client.get(url + "/v1/me", headers=bearer(key))).json()
            assert after["remaining"] == before["remaining"]
            assert after["remaining"]["requests_per_minute"] == 1
            assert after["remaining"]["token_quota"] < 10_000
            # the third goes (the backend went with the first life: 502, or 503 once a health
            # check found it down, but a request all the same); the fourth is over the window
            # that survived the restart
            gone = await client.post(url + "/api/chat", json=chat(stream=False),
                                     headers=bearer(key))
            assert gone.status_code in (502, 503)
            refused = await client.post(url + "/api/chat", json=chat(stream=False),
                                        headers=bearer(key))
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1


async def test_each_ledger_row_says_whether_the_limits_count_it(stack):
    """Generations and embeddings are metered, listings are not, and a refused generation
    keeps its flag (its outcome tells the rebuild it reserved nothing): a restart reads
    the flag, not the path."""
    calls = [("chat", "POST", "/api/chat", chat(stream=False)),
             ("embed", "POST", "/v1/embeddings", {"model": "all-minilm", "input": "a b"}),
             ("tags", "GET", "/api/tags", None),
             ("denied", "POST", "/api/chat", chat(model="qwen3:4b", stream=False))]
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", allowed_models=["llama3.2", "all-minilm"])
            for request_id, method, path, body in calls:
                await client.request(method, stack.url + path, json=body,
                                     headers=bearer(key, request_id))
            await stack.sink.wait_for(lambda records: len(records) == len(calls))
    conn = db.connect(stack.gateway.config.server.database)
    try:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT request_id, outcome, metered FROM ledger WHERE user = 'ann'")}
    finally:
        conn.close()
    assert rows == {"chat": ("ok", 1), "embed": ("ok", 1), "tags": ("ok", 0),
                    "denied": ("refused", 1)}


async def test_reload_applies_new_defaults_and_keeps_the_old_config_when_invalid(
        nursery, tmp_path: Path):
    """POST /admin/api/reload: new [limits] hold from the next request; other changes are
    named as needing a restart; a bad file is a 400 naming the key and nothing changes."""
    stack = await start_stack(nursery)
    database = stack.gateway.config.server.database
    ini = tmp_path / "gateway.ini"

    def write(limits: str, drain: str = "30") -> None:
        ini.write_text(f"[server]\nlisten = 127.0.0.1:0\ndatabase = {database}\n"
                       f"drain_s = {drain}\n[limits]\n{limits}\n")

    def loader():  # as the CLI does: same file, same --upstream
        return load_config(str(ini), env={}, upstream_urls=[stack.sim_url])

    write("requests_per_minute = 100")
    gateway = Gateway(loader(), admin_key=stack.key, loader=loader)
    host, port = await nursery.start(lambda task_status: gateway.run(task_status=task_status))
    url = f"http://{host}:{port}"
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, dataclasses.replace(stack, url=url), "ann")

            async def reload(headers: dict[str, str] = stack.headers) -> httpx.Response:
                return await client.post(url + "/admin/api/reload", headers=headers)

            async def status() -> int:
                response = await client.post(url + "/api/chat", json=chat(stream=False),
                                             headers=bearer(key))
                return response.status_code

            assert await status() == 200
            write("requests_per_minute = 1\ntokens_per_day = 99999", drain="5")
            answer = await reload()
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"reloaded": str(ini),
                                     "applied": ["limits.requests_per_minute",
                                                 "limits.tokens_per_day"],
                                     "restart_needed": ["server.drain_s"]}
            assert await status() == 429
            write("requests_per_minute = lots")
            bad = await reload()
            assert bad.status_code == 400
            assert "[limits] requests_per_minute" in bad.json()["error"]["message"]
            assert await status() == 429  # the old defaults still hold
            assert (await reload(bearer(key))).status_code == 403
            audit = await client.get(url + "/admin/api/audit", headers=stack.headers)
    assert [e["action"] for e in audit.json()["entries"]].count("config.reload") == 1
    assert gateway.config.limits.requests_per_minute == 1
    assert gateway.config.server.drain_s == 30  # the running server's settings stay


async def test_reload_without_a_config_to_read_is_400(stack):
    """A gateway built without a loader (tests, embedding) says so."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(stack.url + "/admin/api/reload", headers=stack.headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_config"


class BackendLimits:
    """A Responder that adds a backend's own x-ratelimit header to every response."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def start(self, status: int, headers: list, **kwargs: Any) -> None:
        await self._inner.start(status, [*headers, (b"x-ratelimit-remaining-requests", b"999")],
                                **kwargs)

    async def respond(self, status: int, headers: list, body: bytes) -> None:
        await self._inner.respond(
            status, [*headers, (b"x-ratelimit-remaining-requests", b"999")], body)


async def test_a_backends_own_ratelimit_headers_give_way_to_ours(nursery):
    """A user with limits sees the gateway's x-ratelimit-* only; one without sees the backend's."""
    sim = Simulator()
    backend = HttpServer(lambda request, responder: sim.handle(request, BackendLimits(responder)),
                         SERVER_SETTINGS)
    host, port = await nursery.start(backend.serve, "127.0.0.1", 0)
    gateway, url, _sink, admin = await start_gateway(
        nursery, gateway_config([f"http://{host}:{port}"]))
    stack = Stack(sim, f"http://{host}:{port}", gateway, url, _sink, admin)
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            limited = await new_user(client, stack, "ann", requests_per_minute=10)
            free = await new_user(client, stack, "bob")
            for stream in (False, True):
                ours = await client.post(url + "/api/chat", json=chat(stream=stream),
                                         headers=bearer(limited))
                theirs = await client.post(url + "/api/chat", json=chat(stream=stream),
                                           headers=bearer(free))
                assert ours.headers.get_list("x-ratelimit-remaining-requests") == [
                    "9" if not stream else "8"]
                assert theirs.headers.get_list("x-ratelimit-remaining-requests") == ["999"]
