"""[aliases] through the whole gateway and the simulator: a request for an alias
reaches the backend as its target, the ledger and the log keep both names, the model
lists show the alias, allowed_models judges the target or the alias's own name, and
a reload adds and removes aliases without touching a stream in flight."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import trio

from gateway_stack import MemorySink, bearer
from ollama_proxy.access.keys import new_key
from ollama_proxy.app import Gateway
from ollama_proxy.config import load_config
from ollama_proxy.sim.server import Simulator, run_simulator
from ollama_proxy.store import db

TIMEOUT_S = 20
TARGET = "llama3.2:latest"


class AliasStack:
    """A simulator and a gateway whose config file (``ini``) a test can rewrite and reload."""

    def __init__(self, tmp_path: Path) -> None:
        self.ini = tmp_path / "gateway.ini"
        self.database = str(tmp_path / "gateway.db")
        self.sim = Simulator()
        self.sim_url = self.url = ""
        self.key = new_key()
        self.sink = MemorySink()

    def write(self, aliases: str) -> None:
        self.ini.write_text(f"[server]\nlisten = 127.0.0.1:0\ndatabase = {self.database}\n"
                            f"[aliases]\n{aliases}\n")

    def load(self) -> Any:
        return load_config(str(self.ini), env={}, upstream_urls=[self.sim_url])

    async def start(self, nursery: trio.Nursery, aliases: str) -> AliasStack:
        host, port = await nursery.start(run_simulator, self.sim, "127.0.0.1", 0)
        self.sim_url = f"http://{host}:{port}"
        self.write(aliases)
        gateway = Gateway(self.load(), on_record=self.sink.observe, admin_key=self.key,
                          loader=self.load)
        host, port = await nursery.start(lambda task_status: gateway.run(task_status=task_status))
        self.url = f"http://{host}:{port}"
        return self

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.key)

    async def user(self, client: httpx.AsyncClient, name: str, **limits: Any) -> str:
        response = await client.post(self.url + "/admin/api/users", headers=self.headers,
                                     json={"name": name, "limits": limits})
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    def ledger(self, request_id: str) -> tuple[str, str | None]:
        conn = db.connect(self.database)
        try:
            row = conn.execute("SELECT model, alias FROM ledger WHERE request_id = ?",
                               (request_id,)).fetchone()
        finally:
            conn.close()
        return row[0], row[1]


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def listed(response: httpx.Response) -> list[str]:
    doc = response.json()
    return [e.get("name") or e["id"] for e in doc.get("models", doc.get("data", []))]


async def test_a_request_for_an_alias_reaches_the_backend_as_its_target(nursery, tmp_path):
    """Native and OpenAI chats, streamed or not, for the alias (any spelling of it) go out
    as the target; the record and the ledger row say model = target, alias = the name used."""
    stack = await AliasStack(tmp_path).start(nursery, "gpt-4o-mini = llama3.2")
    cases = [("/api/chat", chat("gpt-4o-mini", stream=False)),
             ("/api/chat", chat("GPT-4o-mini:latest")),
             ("/v1/chat/completions", chat("gpt-4o-mini", stream=True)),
             ("/api/generate", {"model": "gpt-4o-mini", "prompt": "hi", "stream": False})]
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            for i, (path, body) in enumerate(cases):
                rid = f"alias-{i}"
                response = await client.post(stack.url + path, json=body,
                                             headers=bearer(stack.key, rid))
                assert response.status_code == 200, response.text
                record = await stack.sink.record_of(rid)
                assert (record.model, record.alias) == ("llama3.2", body["model"])
                assert stack.ledger(rid) == ("llama3.2", body["model"])
                assert record.completion_tokens > 0 and not record.estimated
            plain = await client.post(stack.url + "/api/chat", json=chat(TARGET, stream=False),
                                      headers=bearer(stack.key, "plain"))
            assert plain.status_code == 200
    assert [r.body["model"] for r in stack.sim.records if r.method == "POST"] == (
        ["llama3.2"] * len(cases) + [TARGET])
    assert stack.ledger("plain") == (TARGET, None)
    assert (await stack.sink.record_of("plain")).alias is None


async def test_model_lists_show_the_alias(nursery, tmp_path):
    """/api/tags and /v1/models list the alias as a copy of its target's entry (an alias
    whose target the backend lacks is not listed); /v1/models/{alias} asks for the target
    and answers with the alias's id."""
    stack = await AliasStack(tmp_path).start(nursery, "gpt-4o-mini = llama3.2\nghost = nope:1b")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            tags = await client.get(stack.url + "/api/tags", headers=stack.headers)
            v1 = await client.get(stack.url + "/v1/models", headers=stack.headers)
            one = await client.get(stack.url + "/v1/models/gpt-4o-mini", headers=stack.headers)
            head = await client.head(stack.url + "/v1/models/gpt-4o-mini", headers=stack.headers)
    entries = {e["name"]: e for e in tags.json()["models"]}
    assert "gpt-4o-mini" in entries and "ghost" not in entries
    assert {**entries["gpt-4o-mini"], "name": TARGET, "model": TARGET} == entries[TARGET]
    assert "gpt-4o-mini" in listed(v1) and TARGET in listed(v1)
    assert one.status_code == 200 and one.json()["id"] == "gpt-4o-mini"
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(one.content)
    assert stack.sim.records[-1].path == "/v1/models/llama3.2"


async def test_allowed_models_judge_the_target_or_the_alias_name(nursery, tmp_path):
    """A user may use an alias whose target is allowed, or whose own name is allowed
    (without being allowed the target by its name); others get 403 naming the alias, and
    each sees the alias listed exactly when it may use it."""
    stack = await AliasStack(tmp_path).start(nursery, "gpt-4o-mini = llama3.2")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            keys = {name: await stack.user(client, name, allowed_models=globs)
                    for name, globs in (("by_target", ["llama*"]), ("by_alias", ["gpt-*"]),
                                        ("neither", ["qwen*"]))}

            async def status(user: str, model: str) -> httpx.Response:
                return await client.post(stack.url + "/api/chat", json=chat(model, stream=False),
                                         headers=bearer(keys[user]))

            async def models(user: str) -> list[str]:
                return listed(await client.get(stack.url + "/v1/models",
                                               headers=bearer(keys[user])))

            assert (await status("by_target", "gpt-4o-mini")).status_code == 200
            assert (await status("by_alias", "gpt-4o-mini")).status_code == 200
            assert (await status("by_alias", "llama3.2")).status_code == 403
            refused = await status("neither", "gpt-4o-mini")
            assert refused.status_code == 403 and "'gpt-4o-mini'" in refused.json()["error"]
            assert set(await models("by_target")) == {TARGET, "gpt-4o-mini"}
            assert await models("by_alias") == ["gpt-4o-mini"]
            assert "gpt-4o-mini" not in await models("neither")
            hidden = await client.get(stack.url + "/v1/models/gpt-4o-mini",
                                      headers=bearer(keys["neither"]))
            assert hidden.status_code == 404


async def test_reload_adds_and_removes_aliases_without_cutting_a_stream(nursery, tmp_path):
    """POST /admin/api/reload applies a changed [aliases] at once: a removed alias is an
    unknown model again, a new one works; a stream started before keeps its target to the end."""
    stack = await AliasStack(tmp_path).start(nursery, "old = llama3.2")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            async def chat_status(model: str) -> int:
                response = await client.post(stack.url + "/api/chat",
                                             json=chat(model, stream=False), headers=stack.headers)
                return response.status_code

            slow = chat("old", messages=[{"role": "user", "content": "[[sim:tokens=20]] "
                                          "[[sim:rate=50]] hello"}])
            async with client.stream("POST", stack.url + "/api/chat", json=slow,
                                     headers=bearer(stack.key, "in-flight")) as stream:
                lines = stream.aiter_lines()
                first = json.loads(await lines.__anext__())
                assert first["done"] is False
                stack.write("new = qwen3:4b")
                answer = await client.post(stack.url + "/admin/api/reload", headers=stack.headers)
                assert answer.status_code == 200, answer.text
                assert answer.json()["applied"] == ["aliases.old", "aliases.new"]
                assert answer.json()["restart_needed"] == []
                rest = [json.loads(line) async for line in lines if line]
            assert rest[-1]["done"] is True and "error" not in rest[-1]
            assert await chat_status("old") == 404
            assert await chat_status("new") == 200
            tags = await client.get(stack.url + "/api/tags", headers=stack.headers)
    record = await stack.sink.record_of("in-flight")
    assert (record.model, record.alias, record.outcome, record.completion_tokens) == (
        "llama3.2", "old", "ok", 20)
    assert "new" in listed(tags) and "old" not in listed(tags)
    assert [r.body["model"] for r in stack.sim.records if r.path == "/api/chat"] == [
        "llama3.2", "old", "qwen3:4b"]


async def test_the_openai_client_lists_and_chats_with_an_alias(nursery, tmp_path):
    """The official openai client (sync, from a worker thread) sees the alias in the model
    list, retrieves it, and chats with it, streamed and not."""
    stack = await AliasStack(tmp_path).start(nursery, "gpt-4o-mini = llama3.2")

    def use() -> tuple[list[str], str, str, str]:
        client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=0)
        ids = [m.id for m in client.models.list()]
        retrieved = client.models.retrieve("gpt-4o-mini").id
        messages: Any = [{"role": "user", "content": "hello"}]
        whole = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                          stream=True) if chunk.choices)
        return ids, retrieved, whole.choices[0].message.content or "", streamed

    with trio.fail_after(TIMEOUT_S):
        ids, retrieved, whole, streamed = await trio.to_thread.run_sync(use)
    assert "gpt-4o-mini" in ids and retrieved == "gpt-4o-mini"
    assert whole and whole == streamed
    chats = [r for r in stack.sim.records if r.path == "/v1/chat/completions"]
    assert [r.body["model"] for r in chats] == ["llama3.2", "llama3.2"]
    await stack.sink.wait_for(lambda records: [r.endpoint for r in records if r.alias] == [
        "/v1/models/gpt-4o-mini", "/v1/chat/completions", "/v1/chat/completions"])
