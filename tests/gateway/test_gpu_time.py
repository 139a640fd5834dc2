"""GPU time end to end: Ollama's timings from the simulator's final frames (streamed and
whole) reach the ledger as they were sent, and every usage view sums them; the /v1
dialect reports none, so its rows keep NULL and a view of them only says null."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from gateway_stack import Stack, bearer, new_user
from ollama_proxy.sim.generation import PROMPT_EVAL_NS_PER_TOKEN
from ollama_proxy.store import db

TIMEOUT_S = 10
NS = ("total_ns", "load_ns", "prompt_eval_ns", "eval_ns")
KEYS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def timings(database: str) -> dict[str, dict[str, Any]]:
    """Each ledger row's timings and prompt count, by request id."""
    conn = db.connect(database)
    try:
        rows = conn.execute(f"SELECT request_id, prompt_tokens, {', '.join(NS)} FROM ledger")
        return {r[0]: {"prompt_tokens": r[1], **dict(zip(NS, r[2:]))} for r in rows}
    finally:
        conn.close()


def sent(frame: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The timings a native reply carried, as the ledger names them (missing: 0)."""
    return {name: frame.get(key, 0) for name, key in zip(NS, KEYS) if key in keys}


async def test_ollama_timings_reach_the_ledger_and_the_usage_views(stack: Stack) -> None:
    """Streamed and whole native replies: the ledger holds the final frame's timings;
    /api/embed its total and load only; /v1 replies none (NULL). /admin/api/usage (by
    user and model), /v1/usage and the record sum them as gpu_seconds and load_seconds."""
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "[[sim:tokens=5]] hi"}]}
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            key = await new_user(client, stack, "alice")
            finals: dict[str, dict[str, Any]] = {}
            async with client.stream("POST", "/api/chat", json=chat,
                                     headers=bearer(key, "native-stream")) as response:
                lines = [line async for line in response.aiter_lines() if line.strip()]
            finals["native-stream"] = json.loads(lines[-1])
            assert finals["native-stream"]["done"] is True
            for rid, path, body in (
                    ("native-whole", "/api/generate",
                     {"model": "llama3.2", "prompt": "[[sim:tokens=4]] a longer prompt here",
                      "stream": False}),
                    ("embed", "/api/embed", {"model": "all-minilm", "input": ["one", "two"]}),
                    ("openai-whole", "/v1/chat/completions", {**chat, "stream": False}),
                    ("openai-stream", "/v1/chat/completions",
                     {**chat, "stream": True, "stream_options": {"include_usage": True}})):
                response = await client.post(path, json=body, headers=bearer(key, rid))
                assert response.status_code == 200, response.text
                if path.startswith("/api/"):
                    finals[rid] = response.json()
            await stack.sink.wait_for(lambda records: len(records) == 5)
            by_model = (await client.get("/admin/api/usage?group_by=model",
                                         headers=stack.headers)).json()["rows"]
            by_user = (await client.get("/admin/api/usage", headers=stack.headers)).json()["rows"]
            mine = (await client.get("/v1/usage?group_by=model", headers=bearer(key))).json()[
                "rows"]
    rows = timings(stack.gateway.config.server.database)
    for rid in ("native-stream", "native-whole"):
        assert {k: rows[rid][k] for k in NS} == sent(finals[rid], *KEYS), rid
        # deterministic in the simulator: prompt evaluation at 20k tokens/s
        assert rows[rid]["prompt_eval_ns"] == rows[rid]["prompt_tokens"] * PROMPT_EVAL_NS_PER_TOKEN
        assert rows[rid]["eval_ns"] > 0 and rows[rid]["load_ns"] > 0
        assert rows[rid]["total_ns"] >= rows[rid]["prompt_eval_ns"] + rows[rid]["eval_ns"]
    assert {k: rows["embed"][k] for k in NS} == {
        **sent(finals["embed"], "total_duration", "load_duration"),
        "prompt_eval_ns": None, "eval_ns": None}
    assert rows["embed"]["total_ns"] > 0
    for rid in ("openai-whole", "openai-stream"):  # nothing invented for the /v1 dialect
        assert {k: rows[rid][k] for k in NS} == dict.fromkeys(NS), rid
    records = {r.request_id: r for r in stack.sink.records}
    assert records["openai-stream"].gpu_seconds is None
    assert records["embed"].gpu_seconds is None and records["embed"].load_seconds is not None

    def seconds(*rids: str, names: tuple[str, ...]) -> float:
        return round(sum(rows[r][n] for r in rids for n in names) / 1e9, 6)

    gpu, load = ("prompt_eval_ns", "eval_ns"), ("load_ns",)
    native = ("native-stream", "native-whole")
    assert [(r["key"], r["requests"], r["gpu_seconds"], r["load_seconds"]) for r in by_model] == [
        ("all-minilm", 1, None, seconds("embed", names=load)),
        ("llama3.2", 4, seconds(*native, names=gpu), seconds(*native, names=load))]
    assert mine == by_model
    alice, = (r for r in by_user if r["key"] == "alice")
    assert (alice["gpu_seconds"], alice["load_seconds"]) == (
        seconds(*native, names=gpu), seconds(*native, "embed", names=load))
    assert records["native-whole"].gpu_seconds == \
        (rows["native-whole"]["prompt_eval_ns"] + rows["native-whole"]["eval_ns"]) / 1e9


async def test_a_view_of_rows_without_timings_says_null(stack: Stack) -> None:
    """Only /v1 requests: the ledger keeps NULL and every view says null, not 0 s."""
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "[[sim:tokens=2]] x"}]}
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            key = await new_user(client, stack, "bob")
            response = await client.post("/v1/chat/completions", json=body,
                                         headers=bearer(key, "v1-only"))
            assert response.status_code == 200
            views = [(await client.get(f"/admin/api/usage?group_by={g}",
                                       headers=stack.headers)).json()["rows"]
                     for g in ("user", "model", "day", "hour")]
            views.append((await client.get("/v1/usage", headers=bearer(key))).json()["rows"])
    assert {k: timings(stack.gateway.config.server.database)["v1-only"][k] for k in NS} == \
        dict.fromkeys(NS)
    for rows in views:
        assert [(r["requests"], r["gpu_seconds"], r["load_seconds"]) for r in rows] == [
            (1, None, None)]
