"""A real llama.cpp server (llama-cpp-python 0.3.36's, a tiny random model) as an
``openai`` backend next to a simulated Ollama, both behind the in-process gateway,
driven by the official ``openai`` and ``ollama`` clients.

The server comes from ``tests/llama_server.py``: an existing venv (``/tmp/llama-venv``,
``/tmp/tiny.gguf`` or ``OLLAMA_PROXY_LLAMA_VENV`` / ``OLLAMA_PROXY_LLAMA_MODEL``), else one
built by ``../shared/realup/setup.sh`` (offline, ~10-20 s, once, cached in /tmp, bounded
at two minutes; ``OLLAMA_PROXY_LLAMA_SETUP=0`` turns that off). Where neither can be had
(a fresh clone in CI has no ``../shared/realup``) every test here skips and says why.
One server runs for the module (~2.5 s to start), started with ``--api_key``; each test
runs its own gateway.

A quirk of this server shapes the tests: with its default ``--interrupt_requests true``
any request that reaches it while a stream runs (a chat, but also a ``GET /v1/models``)
ends that stream at once with ``data: [DONE]`` and no ``finish_reason``. The gateway's own
health checks and list refreshes are such requests, so the gateways here check rarely
(``health_interval_s`` and ``refresh_s`` an hour) and each test waits for the first
check to be over before it sends anything. In return the quirk is a witness: a stream
that ends with ``finish_reason: "length"`` after all its tokens met no other request
at the server while it ran.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import httpx
import ollama
import openai
import pytest
import trio

from gateway_stack import MemorySink, relayed
from llama_server import run_llama
from ollama_proxy.access.keys import new_key
from ollama_proxy.app import Gateway
from ollama_proxy.config import load_config
from ollama_proxy.sim.server import Simulator, run_simulator

T = TypeVar("T")

UPSTREAM_KEY = "llama-upstream-secret"
TIMEOUT_S = 30
SAY_HELLO = [{"role": "user", "content": "Say hello."}]
SAY_HELLO_TOKENS = 40  # the server's own count: BOS, ChatML and an empty system turn


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    yield from run_llama("--api_key", UPSTREAM_KEY)


@dataclasses.dataclass
class Two:
    """A gateway with two backends: ``sim`` (a simulated Ollama) and ``llama`` (openai)."""

    sim: Simulator
    gateway: Gateway
    url: str
    sink: MemorySink
    key: str

    def ledger(self, request_id: str) -> dict[str, Any]:
        conn = sqlite3.connect(self.gateway.config.server.database)
        try:
            row = conn.execute("SELECT backend, model, status, outcome, prompt_tokens, "
                               "completion_tokens, queued_s FROM ledger WHERE request_id = ?",
                               (request_id,)).fetchone()
        finally:
            conn.close()
        assert row is not None, f"no ledger row for {request_id}"
        names = ("backend", "model", "status", "outcome", "prompt_tokens", "completion_tokens",
                 "queued_s")
        return dict(zip(names, row))

    async def row_of(self, request_id: str) -> dict[str, Any]:
        await self.sink.record_of(request_id)  # the ledger row is written by then
        return self.ledger(request_id)

    async def backends(self) -> dict[str, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            reply = await client.get(self.url + "/admin/api/backends",
                                     headers={"Authorization": f"Bearer {self.key}"})
        assert reply.status_code == 200, reply.text
        return {b["name"]: b for b in reply.json()["backends"]}

    def openai_client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0,
                             timeout=TIMEOUT_S)

    def ollama_client(self) -> ollama.Client:
        return ollama.Client(host=self.url, timeout=TIMEOUT_S,
                             headers={"Authorization": f"Bearer {self.key}"})


async def start_two(nursery: trio.Nursery, tmp_path: Path, llama_url: str,
                    upstream_key: str = UPSTREAM_KEY, llama_keys: str = "") -> Two:
    sim = Simulator()
    host, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    ini = tmp_path / "gateway.ini"
    ini.write_text(
        f"[server]\nlisten = 127.0.0.1:0\ndatabase = {tmp_path / 'gateway.db'}\n"
        "[routing]\nhealth_interval_s = 3600\nrefresh_s = 3600\n"
        f"[upstream.sim]\nurl = http://{host}:{port}\nkind = ollama\n"
        f"[upstream.llama]\nurl = {llama_url}\nkind = openai\nslots = 1\n"
        f"api_key_env = LLAMA_UPSTREAM_KEY\n{llama_keys}")
    config = load_config(str(ini), env={"LLAMA_UPSTREAM_KEY": upstream_key})
    sink, key = MemorySink(), new_key()
    gateway = Gateway(config, on_record=sink.observe, admin_key=key)
    host, port = await nursery.start(lambda task_status: gateway.run(task_status=task_status))
    with trio.fail_after(TIMEOUT_S):  # the first health check over: no probe meets a stream
        while any(b.health.up is None for b in gateway.backends.backends):
            await gateway.backends.changed.park()
    return Two(sim, gateway, f"http://{host}:{port}", sink, key)


async def in_thread(fn: Callable[[], T]) -> T:
    """A call of a sync official client, off the trio loop that serves the stack."""
    with trio.fail_after(TIMEOUT_S * 2):
        return await trio.to_thread.run_sync(fn)


async def test_v1_models_lists_both_backends(nursery, tmp_path, llama_url):
    """/v1/models: the tiny model of llama.cpp and every model of the simulator, once each."""
    two = await start_two(nursery, tmp_path, llama_url)

    def listing() -> list[str]:
        with two.openai_client() as client:
            return [m.id for m in client.models.list()]

    ids = await in_thread(listing)
    sim_names = [m.name for m in two.sim.models.values()]
    assert sorted(ids) == sorted(["tiny", *sim_names])
    assert (await two.backends())["llama"]["models"] == ["tiny"]


async def test_chat_for_the_llama_model_goes_to_llama_cpp(nursery, tmp_path, llama_url):
    """Non-streamed and streamed through the openai client: the server's own tokens and
    counts (it answers only with the upstream key: the gateway sent it), the ledger says
    llama, and the simulator saw nothing."""
    two = await start_two(nursery, tmp_path, llama_url)

    def chat() -> Any:
        with two.openai_client() as client:
            return client.chat.completions.with_raw_response.create(
                model="tiny", messages=SAY_HELLO, max_tokens=8, temperature=0)

    raw = await in_thread(chat)
    reply = raw.parse()
    assert reply.model == "tiny" and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (SAY_HELLO_TOKENS, 8)
    row = await two.row_of(raw.headers["x-request-id"])
    assert (row["backend"], row["model"], row["status"], row["outcome"]) == \
        ("llama", "tiny", 200, "ok")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (SAY_HELLO_TOKENS, 8)

    def stream() -> tuple[str, list[Any]]:
        with two.openai_client() as client:
            raw = client.chat.completions.with_raw_response.create(
                model="tiny", messages=SAY_HELLO, max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True})
            return raw.headers["x-request-id"], list(raw.parse())

    request_id, chunks = await in_thread(stream)
    assert len(chunks) == 8 + 2  # a role-only delta, 8 tokens, the finish_reason
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # temperature 0: the same 8 tokens
    row = await two.row_of(request_id)
    assert (row["backend"], row["model"], row["status"], row["outcome"]) == \
        ("llama", "tiny", 200, "ok")
    assert row["completion_tokens"] == 8  # counted from the stream: the server sends no usage
    assert relayed(two.sim) == []


async def test_a_wrong_upstream_key_makes_the_backend_down_saying_why(
        nursery, tmp_path, llama_url):
    """The server refuses the gateway's key (FastAPI's 401): the first health check marks
    it down naming the key settings, /admin/api/backends shows why, and a chat for its
    model is a 503 with Retry-After in OpenAI's shape (the openai client raises
    InternalServerError), not a 401 that would blame the client's own key."""
    two = await start_two(nursery, tmp_path, llama_url, upstream_key="not-the-key",
                          llama_keys="models = tiny\n")
    llama = (await two.backends())["llama"]
    assert llama["up"] is False and "api_key_env" in llama["error"], llama

    def chat() -> openai.APIStatusError:
        with two.openai_client() as client:
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(model="tiny", messages=SAY_HELLO, max_tokens=8)
            return caught.value

    error = await in_thread(chat)
    assert error.status_code == 503 and int(error.response.headers["retry-after"]) >= 1
    body = error.response.json()["error"]
    assert (body["type"], body["code"]) == ("server_error", "backend_unavailable"), body
    assert relayed(two.sim) == []


async def test_native_chat_for_the_llama_model_is_a_404_naming_the_v1_api(
        nursery, tmp_path, llama_url):
    """/api/chat for a model only the openai backend serves: Ollama's shape, 404, saying
    only OpenAI-compatible backends serve it; nothing reaches either backend."""
    two = await start_two(nursery, tmp_path, llama_url)

    def chat() -> ollama.ResponseError:
        with two.ollama_client() as client:
            with pytest.raises(ollama.ResponseError) as caught:
                client.chat(model="tiny", messages=SAY_HELLO)
            return caught.value

    error = await in_thread(chat)
    assert error.status_code == 404
    assert "only by OpenAI-compatible backends" in error.error and "/v1" in error.error
    assert relayed(two.sim) == []


async def test_a_simulator_model_goes_to_the_simulator(nursery, tmp_path, llama_url):
    """The simulator's model, through /v1 and through /api/chat: the simulator serves
    both, the ledger says sim."""
    two = await start_two(nursery, tmp_path, llama_url)
    model = next(iter(two.sim.models.values())).name

    def both() -> tuple[str, str]:
        with two.openai_client() as client:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=SAY_HELLO, max_tokens=8)
            assert raw.parse().choices[0].message.content
        with two.ollama_client() as native:
            assert native.chat(model=model, messages=SAY_HELLO).message.content
        return raw.headers["x-request-id"], two.sink.records[-1].request_id

    v1_id, _ = await in_thread(both)
    assert [r.path for r in relayed(two.sim)] == ["/v1/chat/completions", "/api/chat"]
    await two.sink.wait_for(lambda records: len(records) >= 2)
    for record in two.sink.records:
        row = await two.row_of(record.request_id)
        assert (row["backend"], row["model"], row["status"]) == ("sim", model, 200)
    assert (await two.row_of(v1_id))["backend"] == "sim"


async def test_slots_1_the_second_request_waits_in_the_gateway_not_at_llama_cpp(
        nursery, tmp_path, llama_url):
    """slots = 1 on llama: a stream holds the slot; a second chat arrives and waits in
    the gateway's queue (the admin API shows it queued, one in flight at llama). The
    stream then ends with all its tokens and ``finish_reason: "length"``: had the second
    request reached the server meanwhile, the server would have cut it short (module
    docstring). Then the second is served; both succeed; the ledger says llama for both
    and that only the second waited."""
    two = await start_two(nursery, tmp_path, llama_url)
    # ~1 ms a token here: ~1 s in which the second request must reach the gateway's queue
    # (milliseconds); a machine 100 times slower would fail the "queued" assertion below
    long_tokens = 1000
    headers = {"Authorization": f"Bearer {two.key}"}
    second: dict[str, Any] = {}

    async def second_chat() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            reply = await client.post(two.url + "/v1/chat/completions", headers=headers, json={
                "model": "tiny", "messages": SAY_HELLO, "max_tokens": 8, "temperature": 0})
        second["reply"] = reply

    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            async with client.stream("POST", two.url + "/v1/chat/completions", headers=headers,
                                     json={"model": "tiny", "messages": SAY_HELLO,
                                           "max_tokens": long_tokens, "temperature": 0,
                                           "stream": True}) as first:
                assert first.status_code == 200
                lines = first.aiter_lines()
                first_lines = [await lines.__anext__()]  # the slot is taken: it streams
                async with trio.open_nursery() as inner:
                    inner.start_soon(second_chat)
                    for _ in range(1000):  # until the gateway holds it in its queue
                        state = (await two.backends())["llama"]
                        if state["queued"] == 1:
                            break
                    assert (state["queued"], state["in_flight"]) == (1, 1), \
                        f"the second request is not waiting behind the stream: {state}"
                    assert "reply" not in second
                    first_lines += [line async for line in lines]
                first_id = first.headers["x-request-id"]
    events = [line[len("data: "):] for line in first_lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert len(events) == long_tokens + 3, events[-3:]  # role, tokens, finish, [DONE]
    assert '"finish_reason": "length"' in events[-2]
    reply = second["reply"]
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"] == {"prompt_tokens": SAY_HELLO_TOKENS, "completion_tokens": 8,
                                     "total_tokens": SAY_HELLO_TOKENS + 8}
    rows = [await two.row_of(first_id), await two.row_of(reply.headers["x-request-id"])]
    assert [(r["backend"], r["status"], r["outcome"]) for r in rows] == [("llama", 200, "ok")] * 2
    assert rows[0]["queued_s"] == 0 and rows[1]["queued_s"] > 0
    assert rows[0]["completion_tokens"] == long_tokens
    assert relayed(two.sim) == []
