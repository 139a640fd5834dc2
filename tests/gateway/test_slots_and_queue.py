"""GPU slots and the fair queue through the whole gateway, in-process: a request beyond
a backend's slots waits in the gateway (the simulator never sees it) and runs when a slot
frees; the fair queue's order; queue timeout, max_queue and max_queued_per_user; a
client leaving while queued or mid-stream; the weight limit; reloads that add and remove
backends under load; the official ollama client through a queued request.

The simulators here hold chosen requests (by X-Request-Id) at a gate before their last
bytes, so a test decides when a request ends; the tests wait for causes (the simulator
holds a request, the queue has n waiting), never for time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncContextManager, AsyncIterator, Callable

import httpx
import ollama
import pytest
import trio

from gateway_stack import MemorySink, bearer, new_user, relayed
from ollama_proxy.access.keys import new_key
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.app import Gateway
from ollama_proxy.backends.fairqueue import FairQueue
from ollama_proxy.config import Config, load_config
from ollama_proxy.http.messages import Request
from ollama_proxy.http.responder import Responder
from ollama_proxy.sim.server import SimRecord, Simulator, run_simulator
from ollama_proxy.store import db

TIMEOUT_S = 20
MODEL = "llama3.2"

# What each tapped responder wrote, by responder (see TapResponder).
_TAPS: dict[Responder, bytearray] = {}


class TapResponder(Responder):
    """A simulator's responder that keeps a copy of the body bytes it writes (swapped in
    as the class of the real one: same slots)."""

    __slots__ = ()

    async def write(self, data: bytes) -> None:
        _TAPS[self] += data
        await super().write(data)


def request_id(record: SimRecord) -> str:
    return next((value.decode() for name, value in record.headers
                 if name.lower() == b"x-request-id"), "")


class GatedSimulator(Simulator):
    """A simulator whose reply to a request ``hold`` names waits at a gate before its
    last bytes: a whole reply before its body, a stream after its every token, before
    the closing frame. ``sent`` keeps the body bytes of every client request."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, trio.Event] = {}
        self.at_gate: set[str] = set()
        self.sent: dict[str, bytearray] = {}

    def hold(self, rid: str) -> trio.Event:
        """Hold ``rid``'s reply until the returned event is set."""
        self.gates[rid] = gate = trio.Event()
        return gate

    async def held(self, rid: str) -> None:
        """Return once ``rid`` waits at its gate (every token of a stream is out)."""
        await self.wait_for(lambda sim: rid in self.at_gate)

    def ids(self, path: str = "") -> list[str]:
        """The request ids of the client requests it saw, in arrival order."""
        return [request_id(r) for r in relayed(self) if not path or r.path == path]

    def record(self, rid: str) -> SimRecord:
        return next(r for r in relayed(self) if request_id(r) == rid)

    async def handle(self, request: Request, responder: Responder) -> None:
        rid = (request.header(b"x-request-id") or b"").decode()
        if rid:
            responder.__class__ = TapResponder
            _TAPS[responder] = self.sent.setdefault(rid, bytearray())
        try:
            await super().handle(request, responder)
        finally:
            _TAPS.pop(responder, None)

    async def last(self, responder: Responder, record: SimRecord, outcome: str, data: bytes,
                   *, chunked: bool) -> None:
        gate = self.gates.get(request_id(record))
        if gate is not None:
            self.at_gate.add(request_id(record))
            self.notify()
            try:
                await gate.wait()
            finally:
                self.at_gate.discard(request_id(record))
        await super().last(responder, record, outcome, data, chunked=chunked)


class SlotStack:
    """Two gated simulators (``a``, ``b``) and a gateway whose config file names some of
    them as backends; ``write`` and ``reload`` change it."""

    def __init__(self, tmp_path: Path) -> None:
        self.ini = tmp_path / "gateway.ini"
        self.database = str(tmp_path / "gateway.db")
        self.sims = {"a": GatedSimulator(), "b": GatedSimulator()}
        self.sim_urls: dict[str, str] = {}
        self.key = new_key()
        self.sink = MemorySink()
        self.url = ""
        self.gateway: Gateway | None = None
        self._queue_changed = trio.lowlevel.ParkingLot()

    def write(self, backends: dict[str, str], **routing: object) -> None:
        """``backends``: name (a simulator) -> its other keys, e.g. ``"slots = 1"``."""
        lines = ["[server]", "listen = 127.0.0.1:0", f"database = {self.database}",
                 "[routing]", *(f"{key} = {value}" for key, value in routing.items())]
        for name, keys in backends.items():
            lines += [f"[upstream.{name}]", f"url = {self.sim_urls[name]}",
                      *keys.split(";")]
        self.ini.write_text("\n".join(lines) + "\n")

    def load(self) -> Config:
        return load_config(str(self.ini), env={})

    async def start(self, nursery: trio.Nursery, backends: dict[str, str],
                    **routing: object) -> SlotStack:
        for name, sim in self.sims.items():
            host, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
            self.sim_urls[name] = f"http://{host}:{port}"
        self.write(backends, **routing)
        self.gateway = Gateway(self.load(), on_record=self.sink.observe, admin_key=self.key,
                               loader=self.load)
        self._watch(self.gateway.router.queue)
        host, port = await nursery.start(
            lambda task_status: self.gateway.run(task_status=task_status))  # type: ignore[union-attr]
        self.url = f"http://{host}:{port}"
        return self

    def _watch(self, queue: FairQueue) -> None:
        """Wake ``queued`` whenever the queue changes (a push, a grant, a removal)."""
        for name in ("push", "remove", "grant_next"):
            def changed(*args: Any, _method: Callable[..., Any] = getattr(queue, name)) -> Any:
                try:
                    return _method(*args)
                finally:
                    self._queue_changed.unpark_all()
            setattr(queue, name, changed)

    @property
    def queue(self) -> FairQueue:
        assert self.gateway is not None
        return self.gateway.router.queue

    async def queued(self, count: int) -> None:
        """Return once exactly ``count`` requests wait for a slot."""
        with trio.fail_after(5):
            while self.queue.waiting() != count:
                await self._queue_changed.park()

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.key)

    async def user(self, client: httpx.AsyncClient, name: str, **limits: Any) -> str:
        return await new_user(client, self, name, **limits)  # type: ignore[arg-type]

    async def reload(self, client: httpx.AsyncClient) -> dict[str, Any]:
        response = await client.post(self.url + "/admin/api/reload", headers=self.headers)
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def backends(self, client: httpx.AsyncClient) -> dict[str, Any]:
        response = await client.get(self.url + "/admin/api/backends", headers=self.headers)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def ledger(self, rid: str) -> dict[str, Any]:
        conn = db.connect(self.database)
        try:
            row = conn.execute("SELECT backend, outcome, queued_s, prompt_tokens, "
                               "completion_tokens FROM ledger WHERE request_id = ?",
                               (rid,)).fetchone()
        finally:
            conn.close()
        assert row is not None, rid
        return dict(zip(("backend", "outcome", "queued_s", "prompt_tokens",
                         "completion_tokens"), row))


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": False,
            **extra}


class Calls:
    """Requests sent in the background; each one's response (read whole) by its id."""

    def __init__(self, nursery: trio.Nursery, client: httpx.AsyncClient, stack: SlotStack
                 ) -> None:
        self.nursery, self.client, self.stack = nursery, client, stack
        self.responses: dict[str, httpx.Response] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self._done: dict[str, trio.Event] = {}

    def send(self, rid: str, key: str, body: dict[str, Any] | None = None,
             path: str = "/api/chat") -> None:
        self._done[rid] = done = trio.Event()
        self.scopes[rid] = scope = trio.CancelScope()

        async def call() -> None:
            with scope:
                self.responses[rid] = await self.client.post(
                    self.stack.url + path, json=body or chat(), headers=bearer(key, rid))
            done.set()

        self.nursery.start_soon(call)

    async def enqueue(self, rid: str, key: str, *, waiting: int) -> None:
        """Send ``rid`` and return once it waits for a slot, the ``waiting``-th."""
        self.send(rid, key)
        await self.stack.queued(waiting)

    async def occupy(self, sim: GatedSimulator, key: str, rid: str = "hold") -> trio.Event:
        """Send ``rid`` and return once ``sim`` holds it; setting the event ends it."""
        gate = sim.hold(rid)
        self.send(rid, key)
        await sim.held(rid)
        return gate

    async def response(self, rid: str) -> httpx.Response:
        await self._done[rid].wait()
        return self.responses[rid]


def five_tokens(client: httpx.AsyncClient, stack: SlotStack, rid: str
                ) -> AsyncContextManager[httpx.Response]:
    """A streamed chat of five tokens, as the admin."""
    return client.stream("POST", stack.url + "/api/chat",
                         json=chat("[[sim:tokens=5]] hi", stream=True),
                         headers=bearer(stack.key, rid))


async def held_stream(stream: httpx.Response, sim: GatedSimulator, rid: str, count: int
                      ) -> tuple[AsyncIterator[str], list[str]]:
    """Read ``count`` NDJSON lines of the stream ``rid``, then wait until ``sim`` holds
    its end; returns the line iterator and the lines read."""
    lines = stream.aiter_lines()
    read = [await lines.__anext__() for _ in range(count)]
    await sim.held(rid)
    return lines, read


# --------------------------------------------------------------------------- slots=1


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_second_request_waits_for_the_slot_and_runs_when_the_first_ends(
        nursery, tmp_path, streamed):
    """slots = 1: while the first request runs (a whole reply held before its body, or a
    stream held after its last token), a second one waits in the gateway and the
    simulator never sees it; when the first ends it runs; its record and ledger row say
    it waited (queued_s > 0) and which backend served it."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"})
    sim = stack.sims["a"]
    gate = sim.hold("first")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            calls = Calls(background, client, stack)
            calls.send("first", stack.key, chat("[[sim:tokens=5]] hi", stream=streamed))
            await sim.held("first")
            await calls.enqueue("second", stack.key, waiting=1)
            assert sim.ids() == ["first"]  # the second waits at the gateway
            view = await stack.backends(client)
            assert (view["queued"], view["backends"][0]["queued"],
                    view["backends"][0]["in_flight"]) == (1, 1, 1)
            gate.set()
            body = (await calls.response("first")).content
            second = await calls.response("second")
    assert second.status_code == 200, second.text
    assert sim.ids() == ["first", "second"]
    assert sim.record("first").outcome == sim.record("second").outcome == "completed"
    assert body == bytes(sim.sent["first"])
    record = await stack.sink.record_of("second")
    assert record.backend == "a" and record.queued_s > 0 and record.outcome == "ok"
    row = stack.ledger("second")
    assert row["backend"] == "a" and row["queued_s"] > 0 and row["completion_tokens"] == 12
    assert (await stack.sink.record_of("first")).queued_s == 0
    assert stack.queue.waiting() == 0 and stack.gateway.backends.backends[0].in_flight == 0


@pytest.mark.parametrize("fair, order", [
    ("true", ["hold", "b1", "a1", "a2", "a3"]),
    ("false", ["hold", "a1", "a2", "a3", "b1"])])
async def test_the_freed_slot_goes_to_the_user_served_least(nursery, tmp_path, fair, order):
    """slots = 1, user A runs a request and has three more waiting; B's one request,
    queued last, gets the next slot (A's counter grew by what it was served, B arrived
    at A's level); first come first served (fair_queue = false) would make B wait for
    all of A's."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"}, fair_queue=fair)
    sim = stack.sims["a"]
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            keys = {name: await stack.user(client, name) for name in ("ann", "bob")}
            calls = Calls(background, client, stack)
            gate = await calls.occupy(sim, keys["ann"])
            for i, rid in enumerate(("a1", "a2", "a3", "b1")):
                await calls.enqueue(rid, keys["ann" if rid[0] == "a" else "bob"], waiting=i + 1)
            assert sim.ids() == ["hold"]
            gate.set()
            statuses = [(await calls.response(rid)).status_code for rid in order]
    assert statuses == [200] * 5
    assert sim.ids("/api/chat") == order


@pytest.mark.parametrize("weight, order", [
    (1, ["hold", "a1", "b1", "a2", "b2", "a3", "b3"]),
    (4, ["hold", "a1", "b1", "b2", "b3", "a2", "a3"])])
async def test_the_weight_limit_set_by_the_admin_api_buys_more_grants(
        nursery, tmp_path, weight, order):
    """Two users with three requests waiting each (A's queued first), equal prompts and
    answers: with equal weights the slots alternate; with B's weight 4 (set through the
    admin API) B's counter grows a quarter as fast, and B gets three grants in a row."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"})
    sim = stack.sims["a"]
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            keys = {name: await stack.user(client, name) for name in ("ann", "bob")}
            patched = await client.patch(stack.url + "/admin/api/users/bob", headers=stack.headers,
                                         json={"limits": {"weight": weight}})
            assert patched.status_code == 200, patched.text
            me = await client.get(stack.url + "/v1/me", headers=bearer(keys["bob"]))
            assert me.json()["limits"]["weight"] == weight
            calls = Calls(background, client, stack)
            gate = await calls.occupy(sim, stack.key)
            for i, rid in enumerate(("a1", "a2", "a3", "b1", "b2", "b3")):
                await calls.enqueue(rid, keys["ann" if rid[0] == "a" else "bob"], waiting=i + 1)
            gate.set()
            statuses = [(await calls.response(rid)).status_code for rid in order]
    assert statuses == [200] * 7
    assert sim.ids("/api/chat") == order


# --------------------------------------------------------------------------- refusals


async def test_a_request_that_waits_too_long_gets_503_in_its_paths_shape(nursery, tmp_path):
    """queue_timeout_s: a native and an OpenAI request waiting behind a held one get 503
    with Retry-After, {"error": str} and type server_error code overloaded; neither ever
    reaches the simulator; both records say how long they waited."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"}, queue_timeout_s=0.2)
    sim = stack.sims["a"]
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            calls = Calls(background, client, stack)
            gate = await calls.occupy(sim, stack.key)
            calls.send("native", stack.key)
            calls.send("openai", stack.key, path="/v1/chat/completions")
            native = await calls.response("native")
            openai_style = await calls.response("openai")
            assert sim.ids() == ["hold"]
            gate.set()
    for response in (native, openai_style):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert list(native.json()) == ["error"] and "queue_timeout_s" in native.json()["error"]
    error = openai_style.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "overloaded")
    for rid in ("native", "openai"):
        record = await stack.sink.record_of(rid)
        assert record.status == 503 and record.queued_s >= 0.2 and record.backend is None
    assert sim.ids() == ["hold"]


async def test_max_queue_gives_503_and_max_queued_per_user_429(nursery, tmp_path):
    """max_queue = 2, max_queued_per_user = 1: A's second waiting request gets 429 at once
    (B's still queues), and with two waiting a third user's request gets 503 with
    Retry-After; the queued ones run once the slot frees."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"}, max_queue=2,
                                            max_queued_per_user=1)
    sim = stack.sims["a"]
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            keys = {name: await stack.user(client, name) for name in ("ann", "bob", "cat")}
            calls = Calls(background, client, stack)
            gate = await calls.occupy(sim, stack.key)
            await calls.enqueue("a1", keys["ann"], waiting=1)
            too_many = await client.post(stack.url + "/api/chat", json=chat(),
                                         headers=bearer(keys["ann"], "a2"))
            too_many_v1 = await client.post(stack.url + "/v1/chat/completions", json=chat(),
                                            headers=bearer(keys["ann"], "a3"))
            await calls.enqueue("b1", keys["bob"], waiting=2)
            full = await client.post(stack.url + "/api/chat", json=chat(),
                                     headers=bearer(keys["cat"], "c1"))
            full_v1 = await client.post(stack.url + "/v1/chat/completions", json=chat(),
                                        headers=bearer(keys["cat"], "c2"))
            assert stack.queue.waiting() == 2
            gate.set()
            assert (await calls.response("a1")).status_code == 200
            assert (await calls.response("b1")).status_code == 200
    assert too_many.status_code == too_many_v1.status_code == 429
    assert "requests waiting" in too_many.json()["error"]
    assert too_many_v1.json()["error"]["code"] == "too_many_queued"
    assert full.status_code == full_v1.status_code == 503
    assert "retry-after" in full.headers and "retry-after" in full_v1.headers
    assert "already waiting" in full.json()["error"]
    assert (full_v1.json()["error"]["type"], full_v1.json()["error"]["code"]) == (
        "server_error", "overloaded")
    assert sorted(sim.ids()) == ["a1", "b1", "hold"]


# --------------------------------------------------------------------------- clients leaving


async def test_a_client_that_leaves_while_queued_leaves_the_queue_at_once(nursery, tmp_path):
    """A queued request whose client closes its connection is gone from the queue (the
    admin API shows 0 queued) before any slot frees; it never reaches the simulator; its
    record has no tokens, only the time it waited; the next request runs when the slot
    frees."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"})
    sim = stack.sims["a"]
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            calls = Calls(background, client, stack)
            gate = await calls.occupy(sim, stack.key)
            await calls.enqueue("leaver", stack.key, waiting=1)
            calls.scopes["leaver"].cancel()  # the client closes its connection
            await stack.queued(0)
            view = await stack.backends(client)
            assert (view["queued"], view["backends"][0]["queued"]) == (0, 0)
            record = await stack.sink.record_of("leaver")
            assert sim.record("hold").outcome == "pending"  # the slot is still taken
            gate.set()
            assert (await calls.response("hold")).status_code == 200
            after = await client.post(stack.url + "/api/chat", json=chat(),
                                      headers=bearer(stack.key, "after"))
    assert after.status_code == 200
    assert sim.ids() == ["hold", "after"]
    assert record.outcome == "client_closed" and record.backend is None and record.queued_s > 0
    assert (record.prompt_tokens, record.completion_tokens) == (0, 0)
    row = stack.ledger("leaver")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)


async def test_a_stream_cancelled_mid_way_gives_its_slot_to_the_next_waiter(nursery, tmp_path):
    """slots = 1: a stream whose client leaves after a few tokens (the rest held at the
    simulator) frees its slot; the request waiting behind it runs."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"})
    sim = stack.sims["a"]
    sim.hold("stream")  # never opened: only the client's leaving ends it
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            calls = Calls(background, client, stack)
            async with five_tokens(client, stack, "stream") as stream:
                _, lines = await held_stream(stream, sim, "stream", 2)
                await calls.enqueue("next", stack.key, waiting=1)
            # the client closed the stream: the gateway cancels it and hands its slot on
            nxt = await calls.response("next")
            await sim.wait_for(lambda s: s.record("stream").outcome == "cancelled")
    assert [json.loads(line)["done"] for line in lines] == [False, False]
    assert nxt.status_code == 200 and sim.ids() == ["stream", "next"]
    record = await stack.sink.record_of("stream")
    assert record.outcome == "client_closed" and record.completion_tokens >= 2
    assert stack.queue.waiting() == 0 and stack.gateway.backends.backends[0].in_flight == 0


# --------------------------------------------------------------------------- reloads


async def test_a_reload_adds_a_backend_that_takes_a_queued_request(nursery, tmp_path):
    """Under load (backend a's one slot held by a stream, a request queued), a reload
    that adds backend b gives the queued request to b at once; the stream on a goes on
    byte for byte."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"})
    sim_a, sim_b = stack.sims["a"], stack.sims["b"]
    gate = sim_a.hold("stream")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            calls = Calls(background, client, stack)
            async with five_tokens(client, stack, "stream") as stream:
                lines, head = await held_stream(stream, sim_a, "stream", 1)
                await calls.enqueue("queued", stack.key, waiting=1)
                stack.write({"a": "slots = 1", "b": "slots = 1"})
                answer = await stack.reload(client)
                assert "upstream.b.url" in answer["applied"], answer
                queued = await calls.response("queued")
                assert sim_a.record("stream").outcome == "pending"
                gate.set()
                rest = [line async for line in lines]
            body = "\n".join(head + rest) + "\n"
            view = await stack.backends(client)
    assert queued.status_code == 200 and sim_b.ids() == ["queued"] and sim_a.ids() == ["stream"]
    record = await stack.sink.record_of("queued")
    assert record.backend == "b" and record.queued_s > 0
    assert body.encode() == bytes(sim_a.sent["stream"])
    assert json.loads(rest[-1])["done"] is True
    assert [b["name"] for b in view["backends"]] == ["a", "b"]


async def test_a_reload_removes_a_backend_while_a_stream_runs_on_it(nursery, tmp_path):
    """A reload that removes backend a while a stream runs there: the stream completes
    byte for byte, new requests go to b, and a's connections are closed once its last
    request ended."""
    backends = {"a": "slots = 1", "b": "slots = 1;priority = 1"}
    stack = await SlotStack(tmp_path).start(nursery, backends)
    sim_a, sim_b = stack.sims["a"], stack.sims["b"]
    assert stack.gateway is not None
    removed = stack.gateway.backends.by_name("a")
    assert removed is not None
    gate = sim_a.hold("stream")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            async with five_tokens(client, stack, "stream") as stream:
                lines, head = await held_stream(stream, sim_a, "stream", 1)
                stack.write({"b": "slots = 1;priority = 1"})
                answer = await stack.reload(client)
                assert "upstream.a.url" in answer["applied"], answer
                view = await stack.backends(client)
                assert [b["name"] for b in view["backends"]] == ["b"]
                new = await client.post(stack.url + "/api/chat", json=chat(),
                                        headers=bearer(stack.key, "new"))
                assert removed.retired and not removed.drained.is_set()
                gate.set()
                rest = [line async for line in lines]
            body = "\n".join(head + rest) + "\n"
            await stack.sink.record_of("stream")
            await removed.drained.wait()
    assert new.status_code == 200 and sim_b.ids() == ["new"] and sim_a.ids() == ["stream"]
    assert (await stack.sink.record_of("new")).backend == "b"
    assert body.encode() == bytes(sim_a.sent["stream"])
    assert (await stack.sink.record_of("stream")).backend == "a"
    await trio.testing.wait_all_tasks_blocked()
    assert removed.pool.stats() == {"idle": 0, "in_use": 0}


# --------------------------------------------------------------------------- official client


async def test_the_ollama_client_through_a_queued_request(nursery, tmp_path):
    """The official ollama client (sync, in a worker thread) streams a chat that waits
    for the slot; it gets the whole answer once the slot frees."""
    stack = await SlotStack(tmp_path).start(nursery, {"a": "slots = 1"})
    sim = stack.sims["a"]

    def use() -> str:
        with ollama.Client(host=stack.url, timeout=10,
                           headers={**bearer(stack.key, "ollama-client")}) as client:
            parts = client.chat(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                stream=True)
            return "".join(part.message.content or "" for part in parts)

    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as background:
            calls = Calls(background, client, stack)
            gate = await calls.occupy(sim, stack.key)
            answer: list[str] = []

            async def in_thread() -> None:
                answer.append(await trio.to_thread.run_sync(use))

            background.start_soon(in_thread)
            await stack.queued(1)
            assert sim.ids() == ["hold"]
            gate.set()
    assert answer and answer[0]
    assert sim.ids() == ["hold", "ollama-client"]
    record: RequestRecord = await stack.sink.record_of("ollama-client")
    assert record.queued_s > 0 and record.backend == "a" and record.completion_tokens == 12
