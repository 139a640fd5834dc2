"""The ledger under hostile values, end to end: a user sends a model name with a lone
surrogate while a hostile backend answers with a token count of 2**63, among other users'
honest requests through the in-process gateway. Every row is written (the hostile ones
made storable and flagged), and a restart counts the attacker's usage again.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import trio

from gateway_stack import MemorySink, gateway_config, start_gateway
from ledger_rows import insert
from ollama_proxy.access import counters_from_ledger
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.app import Gateway
from ollama_proxy.http.messages import Request
from ollama_proxy.http.responder import Responder
from ollama_proxy.http.server import HttpServer
from ollama_proxy.sim.server import SERVER_SETTINGS
from ollama_proxy.store import accounts, db, ledger

TIMEOUT_S = 20
HUGE = 2**63
QUOTA = 10**12


async def hostile_backend(request: Request, responder: Responder) -> None:
    """An Ollama that answers every chat at once, counting 2**63 prompt tokens for the
    model "huge"."""
    if request.path != "/api/chat":
        await responder.respond(200, [(b"content-type", b"application/json")],
                                b'{"version": "0.0.0"}')
        return
    model = json.loads(await request.read_body())["model"]
    body = {"model": model, "created_at": "2026-11-27T00:00:00Z", "done": True,
            "message": {"role": "assistant", "content": "hi"}, "done_reason": "stop",
            "prompt_eval_count": HUGE if model == "huge" else 3, "eval_count": 2}
    await responder.respond(200, [(b"content-type", b"application/json")],
                            json.dumps(body).encode())


def record(request_id: str, when: float, prompt: int, completion: int) -> RequestRecord:
    return RequestRecord(request_id=request_id, time=when, endpoint="/api/chat", model="m",
                       backend="b", status=200, outcome="ok", prompt_tokens=prompt,
                       completion_tokens=completion, estimated=False, stream=False,
                       duration_s=0.1, ttfb_s=0.1, client="127.0.0.1", user="ann")


def chat(model: str) -> bytes:
    """The body as a client sends it: JSON escapes a lone surrogate, as ``\\udc00``."""
    return json.dumps({"model": model, "stream": False,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


def ledger_rows(path: str) -> dict[str, tuple]:
    conn = db.connect(path)
    try:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT request_id, user, model, prompt_tokens, completion_tokens, estimated "
            "FROM ledger")}
    finally:
        conn.close()


async def test_hostile_values_cost_no_row_and_survive_a_restart(nursery):
    """Honest rows of another user all land; the surrogate model is stored as U+FFFD, the
    2**63 count as 10**9 (estimated); after a restart the attacker's quota still counts them."""
    server = HttpServer(hostile_backend, SERVER_SETTINGS)
    host, port = await nursery.start(server.serve, "127.0.0.1", 0)
    config = gateway_config([f"http://{host}:{port}"])
    path = config.server.database
    first = trio.CancelScope()
    started: list[tuple[Gateway, str, MemorySink, str]] = []

    async def first_life(task_status: trio.TaskStatus[None]) -> None:
        with first:
            async with trio.open_nursery() as inner:
                started.append(await start_gateway(inner, config))
                task_status.started()

    await nursery.start(first_life)
    _gateway, url, _sink, admin_key = started[0]
    admin = {"Authorization": f"Bearer {admin_key}"}
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            keys = {}
            for name, limits in (("alice", {}), ("mallory", {"token_quota": QUOTA})):
                made = await client.post("/admin/api/users", headers=admin,
                                         json={"name": name, "limits": limits})
                assert made.status_code == 201, made.text
                keys[name] = made.json()["key"]

            async def call(user: str, model: str, request_id: str) -> None:
                await client.post("/api/chat", content=chat(model), headers={
                    "Authorization": f"Bearer {keys[user]}", "X-Request-Id": request_id,
                    "Content-Type": "application/json"})

            async with trio.open_nursery() as burst:  # honest and hostile rows share batches
                for i in range(20):
                    burst.start_soon(call, "alice", "llama3.2", f"honest-{i}")
                burst.start_soon(call, "mallory", "llama3.2\udc00", "surrogate")
                burst.start_soon(call, "mallory", "huge", "huge")
            rows = ledger_rows(path)
            assert all(rows[f"honest-{i}"][:4] == ("alice", "llama3.2", 3, 2) for i in range(20))
            user, model, _prompt, _completion, _estimated = rows["surrogate"]
            assert user == "mallory" and model in ("llama3.2\ufffd", None)  # None: refused unread
            assert rows["huge"][0] == "mallory" and rows["huge"][2] <= ledger.MAX_TOKENS
            used = sum(r[2] + r[3] for r in rows.values() if r[0] == "mallory")
            assert used > ledger.MAX_TOKENS // 2
            first.cancel()

            gateway = Gateway(config)
            host2, port2 = await nursery.start(lambda task_status: gateway.run(
                task_status=task_status))
            me = await client.get(f"http://{host2}:{port2}/v1/me",
                                  headers={"Authorization": f"Bearer {keys['mallory']}"})
    assert me.json()["remaining"]["token_quota"] == QUOTA - used
    assert os.path.exists(path)


async def test_a_start_on_a_long_backlog_counts_it_while_serving(nursery, monkeypatch):
    """Rows the summaries have not seen (an older file, rows added by hand): the gateway
    starts without summing them first, and a user's quota still counts every one."""
    monkeypatch.setattr(counters_from_ledger, "SYNC_BACKLOG_ROWS", 0)
    config = gateway_config(["http://127.0.0.1:9"])
    path = config.server.database
    conn = db.connect(path)
    try:
        secret = accounts.server_secret(conn, path)
        _, key = accounts.create_user(conn, secret, "ann", limits={"token_quota": QUOTA},
                                      actor="test")
        insert(conn, [record(f"r{i}", t, 100, 20) for i, t in enumerate(
            (time.time() - 400 * 86400, time.time() - 60, time.time()))])
    finally:
        conn.close()
    _gateway, url, _sink, _admin = await start_gateway(nursery, config)
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            me = await client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert me.json()["remaining"]["token_quota"] == QUOTA - 3 * 120
