"""Streams a llama.cpp-like backend leaves uncounted, through the in-process gateway:
estimated from their tokens and the learned template overhead at once, then counted
with the backend's tokenizer after they ended (ledger row and limits corrected), per
tokenizer dialect; backends that report usage pay nothing; failures keep the estimate."""

from __future__ import annotations

import dataclasses
import sqlite3

import httpx
import pytest
import trio

from gateway_stack import MemorySink, gateway_config, start_gateway
from ollama_proxy.api.prompt_overhead import PromptOverheads
from ollama_proxy.app import Gateway, make_backend
from ollama_proxy.backends.settings import RoutingSettings
from ollama_proxy.config import load_config
from ollama_proxy.proxy import recount
from ollama_proxy.sim.llamacpp import LlamaCppSim, run_llamacpp_sim

SAY_HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}],
             "max_tokens": 8, "stream": True}
ONCE = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "stream": True}


@dataclasses.dataclass
class LlamaStack:
    sim: LlamaCppSim
    gateway: Gateway
    url: str
    sink: MemorySink
    key: str

    async def post(self, path: str, body: dict) -> str:
        """Send a request, read the whole answer; its request id."""
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {self.key}"}) as client:
            reply = await client.post(self.url + path, json=body)
        assert reply.status_code == 200, reply.text
        return reply.headers["x-request-id"]

    async def settled(self, request_id: str) -> tuple[int, int, int]:
        """(prompt, completion, estimated) of a request's ledger row once every counting
        job is done (its record is observed after the relay handed its stream over)."""
        await self.sink.record_of(request_id)
        await self.gateway.recounter.idle()
        conn = sqlite3.connect(self.gateway.config.server.database)
        try:
            return conn.execute("SELECT prompt_tokens, completion_tokens, estimated FROM ledger "
                                "WHERE request_id = ?", (request_id,)).fetchone()
        finally:
            conn.close()

    def tokenize_calls(self) -> list[str]:
        return [path for path, _ in self.sim.calls if "tokenize" in path or "template" in path]


async def start(nursery: trio.Nursery, flavor: str = "llama-cpp-python",
                tokenize: str = "auto") -> LlamaStack:
    sim = LlamaCppSim(flavor)
    host, port = await nursery.start(run_llamacpp_sim, sim, "127.0.0.1", 0)
    config = gateway_config([f"http://{host}:{port}"], kind="openai", tokenize=tokenize)
    gateway, url, sink, key = await start_gateway(nursery, config)
    return LlamaStack(sim, gateway, url, sink, key)


async def test_a_completion_stream_is_estimated_then_counted_exactly(nursery):
    """llama-cpp-python, /v1/completions: the row is estimated from the 8 tokens (not the
    9 chunks) at once; after the stream its tokenizer makes it exact: 17 + 8."""
    with trio.fail_after(10):
        stack = await start(nursery)
        rid = await stack.post("/v1/completions", ONCE)
        record = await stack.sink.record_of(rid)
        assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (4, 8, True)
        assert await stack.settled(rid) == (17, 8, 0)
        assert stack.tokenize_calls() == ["/extras/tokenize/count"] * 3  # probe, prompt, text
        assert stack.gateway.limiter.store.get("admin").quota.total == 17 + 8


async def test_a_chat_prompt_is_exact_once_its_template_overhead_is_confirmed(nursery):
    """llama-cpp-python's tokenizer counts text only: a chat stream keeps its estimated
    prompt until two chats of other sizes counted by the backend gave its shape the same
    template overhead (the same chat twice proves nothing); meanwhile the estimate is
    the text plus the learned overhead."""
    with trio.fail_after(10):
        stack = await start(nursery)
        first = await stack.post("/v1/chat/completions", SAY_HELLO)
        assert await stack.settled(first) == (3, 8, 1)  # 8 tokens, not 10 chunks

        async def counted(text: str) -> None:
            body = {**SAY_HELLO, "stream": False,
                    "messages": [{"role": "user", "content": text}]}
            assert (await stack.settled(await stack.post("/v1/chat/completions", body)))[2] == 0

        await counted("Say hello.")
        await counted("Say hello.")
        unconfirmed = await stack.post("/v1/chat/completions", SAY_HELLO)
        assert await stack.settled(unconfirmed) == (3 + 37, 8, 1)  # text + learned overhead
        await counted("Tell me a story.")
        again = await stack.post("/v1/chat/completions", SAY_HELLO)
        record = await stack.sink.record_of(again)
        # text 3 + the least of this shape's latest overheads (37, 37, and 42: "Tell me a
        # story." counted 46, 4 by its text)
        assert (record.prompt_tokens, record.estimated) == (3 + 37, True)
        assert await stack.settled(again) == (40, 8, 0)
        other_shape = {**SAY_HELLO, "messages": [{"role": "system", "content": "Be brief."},
                                                 *SAY_HELLO["messages"]]}
        assert (await stack.settled(await stack.post("/v1/chat/completions", other_shape)))[2] == 1


async def test_llama_server_applies_its_template_so_chat_counts_are_exact(nursery):
    """llama-server renders the messages (/apply-template) for its /tokenize: exact at once."""
    with trio.fail_after(10):
        stack = await start(nursery, flavor="llama-server")
        rid = await stack.post("/v1/chat/completions", SAY_HELLO)
        assert await stack.settled(rid) == (40, 8, 0)
        assert stack.tokenize_calls() == ["/extras/tokenize/count", "/tokenize",
                                          "/apply-template", "/tokenize", "/tokenize"]


async def test_tokenize_off_keeps_the_estimate_and_asks_nothing(nursery):
    """tokenize = off: no tokenize request, the row stays estimated (from the tokens)."""
    with trio.fail_after(10):
        stack = await start(nursery, tokenize="off")
        rid = await stack.post("/v1/completions", ONCE)
        assert await stack.settled(rid) == (4, 8, 1)
        assert stack.tokenize_calls() == []


async def test_backends_that_report_stream_usage_pay_nothing(stack):
    """Ollama reports usage: its first stream teaches that, later streams are not
    captured, and its tokenize endpoint is never looked for."""
    async with httpx.AsyncClient(headers=stack.headers) as client:
        with trio.fail_after(10):
            for _ in range(2):
                reply = await client.post(stack.url + "/v1/chat/completions", json={
                    "model": "llama3.2", "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]})
                record = await stack.sink.record_of(reply.headers["x-request-id"])
                assert not record.estimated
            await stack.gateway.recounter.idle()
    backend = stack.gateway.backends.backends[0]
    assert stack.gateway.recounter.capture_bytes(backend, _chat_exchange()) == 0
    assert not [r for r in stack.sim.records if "tokenize" in r.path]


def _chat_exchange():
    from ollama_proxy.api.exchange import Exchange
    from ollama_proxy.api.routes import ROUTES
    from ollama_proxy.http.messages import Request

    path = "/v1/chat/completions"
    return Exchange(Request("POST", path, path, "", [], b"{}", "127.0.0.1"), ROUTES[path],
                    b"rid")


async def test_a_failing_tokenizer_keeps_the_estimate(nursery, caplog):
    """A 500 from the tokenizer: logged, the row stays estimated, and the backend is not
    asked again for a while (not a 404: nothing is remembered as absent)."""
    with trio.fail_after(10):
        stack = await start(nursery)
        stack.sim.tokenize_status = 500
        rid = await stack.post("/v1/completions", ONCE)
        assert await stack.settled(rid) == (4, 8, 1)
        assert "counting with" in caplog.text and "estimate kept" in caplog.text
        assert stack.gateway.recounter.failed == 1
        rid = await stack.post("/v1/completions", ONCE)
        assert await stack.settled(rid) == (4, 8, 1)
        assert stack.tokenize_calls() == ["/extras/tokenize/count"]


async def test_a_hung_tokenizer_gives_up_and_never_holds_shutdown(monkeypatch):
    """A tokenizer that never answers: the job gives up after its timeout, the estimate
    stays; a job still waiting when the gateway stops goes with it, at once."""
    monkeypatch.setattr(recount, "JOB_TIMEOUT_S", 0.2)
    monkeypatch.setattr(recount, "RETRY_DISCOVERY_S", 0.0)
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            stack = await start(inner)
            stack.sim.tokenize_gate = trio.Event()
            rid = await stack.post("/v1/completions", ONCE)
            assert await stack.settled(rid) == (4, 8, 1)
            assert stack.gateway.recounter.failed == 1
            monkeypatch.setattr(recount, "JOB_TIMEOUT_S", 3600.0)
            rid = await stack.post("/v1/completions", ONCE)
            await stack.sink.record_of(rid)
            assert stack.gateway.recounter.running == 1  # waiting on the tokenizer
            inner.cancel_scope.cancel()


async def test_a_confirmed_template_overhead_costs_no_more_tokenize_calls(nursery):
    """Once two non-streamed chats of a shape confirmed its template's cost, further chats
    of that shape ask the tokenizer nothing (each asked two calls for ever: found in
    review)."""
    with trio.fail_after(20):
        stack = await start(nursery)
        await stack.settled(await stack.post("/v1/chat/completions", SAY_HELLO))
        calls = []
        for i in range(5):
            body = {**SAY_HELLO, "stream": False, "messages": [
                {"role": "system", "content": "Be brief." * (i + 1)},
                {"role": "user", "content": f"Say hello, number {i}."}]}
            await stack.settled(await stack.post("/v1/chat/completions", body))
            calls.append(len(stack.tokenize_calls()))
        assert calls[2:] == [calls[1]] * 3


async def test_a_job_that_breaks_unforeseen_never_stops_the_gateway(nursery, monkeypatch,
                                                                     caplog):
    """Whatever a counting job raises (a bug, an answer nobody foresaw) is logged and
    counted; the estimate stays and the gateway serves on."""
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("'<' not supported between instances of 'NoneType' and 'int'")

    monkeypatch.setattr(recount, "stream_counts", broken)
    with trio.fail_after(10):
        stack = await start(nursery)
        rid = await stack.post("/v1/completions", ONCE)
        assert await stack.settled(rid) == (4, 8, 1)
        assert stack.gateway.recounter.failed == 1 and "NoneType" in caplog.text
        async with httpx.AsyncClient() as client:
            assert (await client.get(stack.url + "/health")).status_code == 200


@pytest.mark.parametrize("queued", [0])
async def test_no_room_no_job(nursery, monkeypatch, queued):
    """Past the bound of waiting jobs a stream keeps its estimate (nothing asked)."""
    monkeypatch.setattr(recount, "MAX_QUEUED", queued)
    with trio.fail_after(10):
        stack = await start(nursery)
        rid = await stack.post("/v1/completions", ONCE)
        assert await stack.settled(rid) == (4, 8, 1)
        assert stack.tokenize_calls() == []


def test_a_reload_keeps_what_was_learned_of_an_unchanged_backend():
    """set_backends: a backend kept by the reload keeps its state (its tokenizer, found
    once); a new one starts unknown; one removed, or now tokenize = off, is forgotten."""
    config = load_config(None, env={}, upstream_urls=["http://127.0.0.1:1", "http://127.0.0.1:2"])
    a, b = (make_backend(u, RoutingSettings()) for u in config.upstreams)
    async def amend(*_: object) -> None:
        return None

    counter = recount.Recounter([a], ["default"], PromptOverheads(), amend=amend)
    state_a = counter._states["default"]
    state_a.tokenizer = None  # learned: no tokenize endpoint
    counter.set_backends([a, b], ["default", "default2"])
    assert counter._states["default"] is state_a
    assert counter._states["default2"].backend is b
    assert counter._states["default2"].tokenizer is recount._UNKNOWN
    counter.set_backends([b], ["default"])
    assert list(counter._states) == []
