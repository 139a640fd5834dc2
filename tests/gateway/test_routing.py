"""Routing across two and three simulated backends, in-process: each request lands
where its model is (warm first, then the least busy, then by priority and size),
model lists are merged, management fans out, and backends that die, hang or
answer 503 are left for the others without the client seeing it."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx
import ollama
import openai
import pytest
import trio

from gateway_stack import Fleet, bearer, relayed, start_fleet
from ollama_proxy.sim.models import DEFAULT_MODELS
from ollama_proxy.sim.server import Simulator

T = TypeVar("T")

TIMEOUT_S = 20
LLAMA, QWEN, MINILM = DEFAULT_MODELS
# A model too big for a small box (the simulator has no such model by default).
BIG = dataclasses.replace(LLAMA, name="llama3.3:70b", size=42_520_413_916,
                          digest="a6eb4748fd2990ad2952b2335a95a7f952d1a06119a0aa6a2df6cd052a93a3fa")
HOLD = "[[sim:delay=60]] hold"  # the simulator keeps the request until the client leaves


def chat(model: str, prompt: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "stream": False, **extra}


def models_sent(sim: Simulator) -> list[str]:
    """The model each client request that reached ``sim`` named."""
    return [r.body.get("model") if isinstance(r.body, dict) else r.model for r in relayed(sim)]




async def in_thread(call: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(call, abandon_on_cancel=True)


def ollama_client(fleet: Fleet, key: str | None = None) -> ollama.Client:
    return ollama.Client(host=fleet.url, timeout=10,
                         headers={"Authorization": f"Bearer {key or fleet.key}"})


def openai_client(fleet: Fleet, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=key or fleet.key, max_retries=0,
                         timeout=10)


async def backends_view(client: httpx.AsyncClient, fleet: Fleet) -> dict[str, dict[str, Any]]:
    response = await client.get(fleet.url + "/admin/api/backends", headers=fleet.headers)
    assert response.status_code == 200, response.text
    return {b["name"]: b for b in response.json()["backends"]}


async def new_user(client: httpx.AsyncClient, fleet: Fleet, name: str, **limits: Any) -> str:
    response = await client.post(fleet.url + "/admin/api/users", headers=fleet.headers,
                                 json={"name": name, "limits": limits})
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


async def ask(client: httpx.AsyncClient, fleet: Fleet, model: str, path: str = "/api/chat",
              key: str | None = None, prompt: str = "hello") -> httpx.Response:
    return await client.post(fleet.url + path, json=chat(model, prompt),
                             headers=bearer(key or fleet.key))


@pytest.fixture
async def split(nursery: trio.Nursery, tmp_path: Path) -> Fleet:
    """A serves llama, B serves qwen."""
    return await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[QWEN])})


# --------------------------------------------------------------------------- where requests go


async def test_each_request_lands_where_its_model_is(split: Fleet) -> None:
    """A serves llama, B serves qwen: each request reaches the one that has its model,
    whatever the API and client; the usage record names the backend."""
    fleet = split
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            for model in (QWEN.name, LLAMA.name, "llama3.2", QWEN.name):
                response = await ask(client, fleet, model)
                assert response.status_code == 200, response.text
        answer = await in_thread(lambda: ollama_client(fleet).chat(
            model="qwen3:4b", messages=[{"role": "user", "content": "hi"}]))
        assert answer.message.content
        completion = await in_thread(lambda: openai_client(fleet).chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]))
        assert completion.choices[0].message.content
        await fleet.sink.wait_for(lambda records: len(records) == 6)
    assert models_sent(fleet.sims["a"]) == [LLAMA.name, "llama3.2", "llama3.2"]
    assert models_sent(fleet.sims["b"]) == [QWEN.name, QWEN.name, "qwen3:4b"]
    by_model = {(r.model, r.backend) for r in fleet.sink.records}
    assert by_model == {(QWEN.name, "b"), (LLAMA.name, "a"), ("llama3.2", "a")}


async def test_a_backend_with_the_model_loaded_is_preferred(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    """Both serve both models; A has llama loaded, B has qwen loaded (their /api/ps):
    each model's requests go to the backend where it is warm, config order aside."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA, QWEN]), "b": Simulator(models=[QWEN, LLAMA])})
    assert fleet.backend("a").catalogue.loaded == {LLAMA.name}
    assert fleet.backend("b").catalogue.loaded == {QWEN.name}
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            for model in (QWEN.name, QWEN.name, LLAMA.name, QWEN.name, LLAMA.name):
                assert (await ask(client, fleet, model)).status_code == 200
    assert models_sent(fleet.sims["a"]) == [LLAMA.name] * 2
    assert models_sent(fleet.sims["b"]) == [QWEN.name] * 3


async def test_held_streams_spread_over_warm_backends(nursery: trio.Nursery,
                                                     tmp_path: Path) -> None:
    """Two warm backends: requests held at once go one here, one there (the least busy),
    not all to the first in config order; once they end, the counts are back to 0."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[LLAMA])})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            async with trio.open_nursery() as clients:
                for n in range(1, 5):
                    clients.start_soon(ask, client, fleet, LLAMA.name, "/api/chat", None, HOLD)
                    await fleet.wait_for(lambda n=n: sum(fleet.landed().values()) == n)
                    landed = fleet.landed()
                    assert max(landed.values()) - min(landed.values()) <= 1, landed
                assert fleet.landed() == {"a": 2, "b": 2}
                assert [fleet.backend(n).in_flight for n in "ab"] == [2, 2]
                clients.cancel_scope.cancel()
            await fleet.sink.wait_for(lambda records: len(records) == 4)
            assert [fleet.backend(n).in_flight for n in "ab"] == [0, 0]
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200


async def test_priority_fallback_only_when_the_preferred_one_is_full(nursery: trio.Nursery,
                                                                    tmp_path: Path) -> None:
    """B (priority 1) gets nothing while A (priority 0) has a free slot, even when A is
    busier; with A's one slot taken, B takes the next request."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[LLAMA])},
        upstream={"a": {"slots": 2}, "b": {"priority": 1}})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            assert fleet.landed() == {"a": 3, "b": 0}
            async with trio.open_nursery() as clients:
                clients.start_soon(ask, client, fleet, LLAMA.name, "/api/chat", None, HOLD)
                await fleet.wait_for(lambda: fleet.landed()["a"] == 4)
                # A holds one of its two slots: still preferred
                assert (await ask(client, fleet, LLAMA.name)).status_code == 200
                assert fleet.landed() == {"a": 5, "b": 0}
                clients.start_soon(ask, client, fleet, LLAMA.name, "/api/chat", None, HOLD)
                await fleet.wait_for(lambda: fleet.landed()["a"] == 6)
                # both of A's slots taken: the fallback serves
                assert (await ask(client, fleet, LLAMA.name)).status_code == 200
                assert fleet.landed() == {"a": 6, "b": 1}
                clients.cancel_scope.cancel()
            await fleet.sink.wait_for(lambda records: len(records) == 7)
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            assert fleet.landed() == {"a": 7, "b": 1}


async def test_priority_fallback_when_the_preferred_one_is_down(nursery: trio.Nursery,
                                                               tmp_path: Path) -> None:
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[LLAMA])},
        upstream={"b": {"priority": 1}})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            await fleet.kill("a")
            await fleet.gateway.backends.check_all()
            assert fleet.backend("a").health.up is False
            for _ in range(2):
                assert (await ask(client, fleet, LLAMA.name)).status_code == 200
    assert fleet.landed() == {"a": 1, "b": 2}


async def test_a_big_model_is_not_routed_to_the_small_box(nursery: trio.Nursery,
                                                         tmp_path: Path) -> None:
    """A (first in order, max_model_gb = 10) and B both list a 42 GB model: it goes to B
    only; the small model still goes to A. A's admin view omits the big one."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA, BIG]), "b": Simulator(models=[LLAMA, BIG])},
        upstream={"a": {"max_model_gb": 10}})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            for model in (BIG.name, LLAMA.name, BIG.name):
                assert (await ask(client, fleet, model)).status_code == 200
            view = await backends_view(client, fleet)
    assert models_sent(fleet.sims["a"]) == [LLAMA.name]
    assert models_sent(fleet.sims["b"]) == [BIG.name, BIG.name]
    assert view["a"]["models"] == [LLAMA.name]
    assert view["b"]["models"] == [LLAMA.name, BIG.name]


async def test_aliases_resolve_to_the_backend_of_their_target(nursery: trio.Nursery,
                                                              tmp_path: Path) -> None:
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[QWEN])},
        aliases={"fast": QWEN.name, "gpt-4o-mini": LLAMA.name})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await ask(client, fleet, "fast")).status_code == 200
            assert (await ask(client, fleet, "gpt-4o-mini", "/v1/chat/completions")).status_code \
                == 200
        completion = await in_thread(lambda: openai_client(fleet).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}]))
        assert completion.choices[0].message.content
        await fleet.sink.wait_for(lambda records: len(records) == 3)
    assert models_sent(fleet.sims["a"]) == [LLAMA.name]
    assert models_sent(fleet.sims["b"]) == [QWEN.name, QWEN.name]
    assert sorted((r.alias, r.model, r.backend) for r in fleet.sink.records) == [
        ("fast", QWEN.name, "b"), ("fast", QWEN.name, "b"), ("gpt-4o-mini", LLAMA.name, "a")]


# --------------------------------------------------------------------------- model lists


def names(doc: dict[str, Any]) -> list[str]:
    if "data" in doc:
        return [m["id"] for m in doc["data"]]
    return [m["name"] for m in doc["models"]]


async def test_model_lists_are_merged_and_filtered_per_user(nursery: trio.Nursery,
                                                            tmp_path: Path) -> None:
    """Three backends: /api/tags and /v1/models are the union (one entry per model,
    aliases added), /api/ps the union of the loaded ones; a user whose allowed_models
    name qwen only sees qwen and the alias that stands for it."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA, MINILM]), "b": Simulator(models=[QWEN, LLAMA]),
        "c": Simulator(models=[MINILM])},
        aliases={"fast": QWEN.name, "small": LLAMA.name})
    everything = {LLAMA.name, MINILM.name, QWEN.name, "fast", "small"}
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, fleet, "quinn", allowed_models=["qwen3*"])
            for who, expected in ((fleet.key, everything), (key, {QWEN.name, "fast"})):
                tags = (await client.get(fleet.url + "/api/tags", headers=bearer(who))).json()
                assert sorted(names(tags)) == sorted(expected)
                models = (await client.get(fleet.url + "/v1/models", headers=bearer(who))).json()
                assert sorted(names(models)) == sorted(expected)
            ps = (await client.get(fleet.url + "/api/ps", headers=fleet.headers)).json()
            assert sorted(names(ps)) == [LLAMA.name, QWEN.name]
            ps = (await client.get(fleet.url + "/api/ps", headers=bearer(key))).json()
            assert names(ps) == [QWEN.name]
        listed = await in_thread(lambda: ollama_client(fleet, key).list())
        assert sorted(m.model or "" for m in listed.models) == ["fast", QWEN.name]
        ids = await in_thread(lambda: [m.id for m in openai_client(fleet).models.list()])
        assert sorted(ids) == sorted(everything)
    for sim in fleet.sims.values():  # each backend was asked for its list
        assert any(r.path == "/api/tags" for r in relayed(sim))


async def test_model_info_goes_to_the_backend_that_has_the_model(split: Fleet) -> None:
    fleet = split
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(fleet.url + "/v1/models/qwen3:4b", headers=fleet.headers)
            assert response.status_code == 200 and response.json()["id"] == QWEN.name
            response = await client.post(fleet.url + "/api/show", headers=fleet.headers,
                                         json={"model": LLAMA.name})
            assert response.status_code == 200 and response.json()["details"]["family"] == "llama"
        shown = await in_thread(lambda: ollama_client(fleet).show("qwen3:4b"))
        assert shown.details is not None and shown.details.family == "qwen3"
        model = await in_thread(lambda: openai_client(fleet).models.retrieve("llama3.2:latest"))
        assert model.id == LLAMA.name
    assert [(r.path, r.model) for r in relayed(fleet.sims["a"])] == [
        ("/api/show", LLAMA.name), ("/v1/models/llama3.2:latest", LLAMA.name)]
    assert [(r.path, r.model) for r in relayed(fleet.sims["b"])] == [
        ("/v1/models/qwen3:4b", QWEN.name), ("/api/show", QWEN.name)]


async def test_a_model_nobody_serves_is_404_in_both_shapes(split: Fleet) -> None:
    fleet = split
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            native = await ask(client, fleet, "nope:1b")
            assert native.status_code == 404
            assert native.json() == {"error": "model 'nope:1b' not found"}
            v1 = await ask(client, fleet, "nope:1b", "/v1/chat/completions")
            assert v1.status_code == 404
            assert v1.json()["error"]["code"] == "model_not_found"
            assert "nope:1b" in v1.json()["error"]["message"]
            info = await client.get(fleet.url + "/v1/models/nope:1b", headers=fleet.headers)
            assert info.status_code == 404
        with pytest.raises(ollama.ResponseError) as native_error:
            await in_thread(lambda: ollama_client(fleet).chat(
                model="nope:1b", messages=[{"role": "user", "content": "hi"}]))
        assert native_error.value.status_code == 404
        with pytest.raises(openai.NotFoundError):
            await in_thread(lambda: openai_client(fleet).chat.completions.create(
                model="nope:1b", messages=[{"role": "user", "content": "hi"}]))
    assert fleet.landed() == {"a": 0, "b": 0}


# --------------------------------------------------------------------------- failures


async def test_a_killed_backend_is_left_and_taken_back(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    """A dies while it holds a request (no byte of it sent yet): that request is served by
    B, and so are the next ones, without a client error; /health stays 200, the admin
    view says A is down; a new server on A's port is taken back after a health check."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[LLAMA])})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            assert fleet.landed() == {"a": 1, "b": 0}
            statuses: list[int] = []

            async def slow() -> None:  # B answers it after its 0.2 s "load"
                response = await ask(client, fleet, LLAMA.name, prompt="[[sim:delay=0.2]] hi")
                statuses.append(response.status_code)

            async with trio.open_nursery() as clients:
                clients.start_soon(slow)
                await fleet.wait_for(lambda: fleet.landed()["a"] == 2)
                await fleet.kill("a")
            assert statuses == [200]
            assert fleet.landed() == {"a": 2, "b": 1}
            assert [r.outcome for r in relayed(fleet.sims["a"])] == ["completed", "cancelled"]
            for path in ("/api/chat", "/v1/chat/completions", "/api/chat"):
                response = await ask(client, fleet, LLAMA.name, path)
                assert response.status_code == 200, response.text
            answer = await in_thread(lambda: ollama_client(fleet).chat(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}]))
            assert answer.message.content
            assert fleet.landed() == {"a": 2, "b": 5}
            health = await client.get(fleet.url + "/health")
            assert health.status_code == 200
            assert health.json()["backends"] == [{"name": "a", "up": False},
                                                 {"name": "b", "up": True}]
            view = await backends_view(client, fleet)
            assert view["a"]["up"] is False and "unreachable" in view["a"]["error"]
            assert view["b"]["up"] is True
            tags = (await client.get(fleet.url + "/api/tags", headers=fleet.headers)).json()
            assert names(tags) == [LLAMA.name]  # B's list alone

            await fleet.revive(nursery, "a", Simulator(models=[LLAMA]))
            await fleet.gateway.backends.check_all()
            view = await backends_view(client, fleet)
            assert view["a"]["up"] is True and view["a"]["error"] is None
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            assert fleet.landed() == {"a": 1, "b": 6}  # the new server at A's port got it
            assert len(relayed(fleet.sims["a"])) == 1


async def silent_backend(nursery: trio.Nursery, posts: list[bytes]) -> str:
    """A server that answers the gateway's checks and lists (GET) like a minimal
    Ollama, and reads a POST but never answers it (a runner stuck in a load)."""
    answers = {b"/api/version": b'{"version":"0.33.0"}', b"/api/tags": b'{"models":[]}',
               b"/api/ps": b'{"models":[]}'}

    async def serve(stream: trio.SocketStream) -> None:
        data = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                method, target = head.split(b" ")[:2]
                if method != b"GET":
                    posts.append(target)
                    while await stream.receive_some(65536):
                        pass  # read, never answer
                    return
                body = answers.get(target, b"{}")
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                      b"content-length: %d\r\n\r\n%s" % (len(body), body))

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return f"http://{host}:{port}"


async def test_a_backend_that_never_answers_is_passed_over(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    """A (preferred) accepts a request and never answers: after its first-byte timeout
    the request goes to B, the client sees a plain 200; A is marked, and ejected after
    eject_after_failures, so the next request goes to B at once."""
    posts: list[bytes] = []
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": await silent_backend(nursery, posts), "b": Simulator(models=[LLAMA])},
        upstream={"a": {"models": "llama3.2*", "first_byte_timeout_s": 0.2},
                  "b": {"priority": 1}},
        routing={"eject_after_failures": 2, "eject_s": 60})
    assert fleet.backend("a").health.up is True
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            assert posts == [b"/api/chat"]
            view = await backends_view(client, fleet)
            assert view["a"]["failures_in_a_row"] == 1 and not view["a"]["ejected"]
            assert "no response within 0.2 s" in view["a"]["error"]
            answer = await in_thread(lambda: openai_client(fleet).chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}]))
            assert answer.choices[0].message.content
            assert posts == [b"/api/chat", b"/v1/chat/completions"]
            view = await backends_view(client, fleet)
            assert view["a"]["ejected"] and view["a"]["ejected_for_s"] > 50
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            assert len(posts) == 2  # ejected: not tried
    assert len(relayed(fleet.sims["b"])) == 3


async def test_a_backend_answering_503_fails_over_then_is_ejected(nursery: trio.Nursery,
                                                                  tmp_path: Path) -> None:
    """A answers every generation 503 at once (an overloaded Ollama): each request goes
    on to B transparently; after eject_after_failures A is ejected (the admin view says
    so) and no longer tried."""
    overloaded = Simulator(models=[LLAMA])
    overloaded.refuse_status = 503
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": overloaded, "b": Simulator(models=[LLAMA])},
        routing={"eject_after_failures": 2, "eject_s": 60})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await ask(client, fleet, LLAMA.name)
            assert response.status_code == 200, response.text
            view = await backends_view(client, fleet)
            assert view["a"]["failures_in_a_row"] == 1 and view["a"]["error"] == "answered 503"
            completion = await in_thread(lambda: openai_client(fleet).chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}]))
            assert completion.choices[0].message.content
            view = await backends_view(client, fleet)
            assert view["a"]["ejected"] and view["a"]["up"]  # it answers checks: ejected, not down
            for _ in range(2):
                assert (await ask(client, fleet, LLAMA.name)).status_code == 200
        await fleet.sink.wait_for(lambda records: len(records) == 4)
    assert [r.status for r in relayed(fleet.sims["a"])] == [503, 503]
    assert fleet.landed() == {"a": 2, "b": 4}
    assert {(r.status, r.backend) for r in fleet.sink.records} == {(200, "b")}


# --------------------------------------------------------------------------- management


async def test_pull_fans_out_and_copy_needs_a_backend(nursery: trio.Nursery,
                                                      tmp_path: Path) -> None:
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[LLAMA, QWEN])})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(fleet.url + "/api/pull", headers=fleet.headers,
                                         json={"model": "llama3.2", "stream": False})
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "success", "backends": {
                "a": {"status_code": 200, "status": "success"},
                "b": {"status_code": 200, "status": "success"}}}
            assert [r.path for r in relayed(fleet.sims["a"])] == ["/api/pull"]
            assert [r.path for r in relayed(fleet.sims["b"])] == ["/api/pull"]

            # one backend named: only it is asked, and its own (streamed) answer comes back
            response = await client.post(fleet.url + "/api/pull?backend=b", headers=fleet.headers,
                                         json={"model": "qwen3:4b"})
            assert response.status_code == 200
            lines = [json.loads(line) for line in response.text.splitlines()]
            assert lines[-1] == {"status": "success"} and len(lines) > 2
            assert fleet.landed() == {"a": 1, "b": 2}

            # a pull that fails on one backend says which
            response = await client.post(fleet.url + "/api/pull", headers=fleet.headers,
                                         json={"model": "qwen3:4b", "stream": False})
            assert response.status_code == 502
            doc = response.json()
            assert "a" in doc["error"] and doc["backends"]["b"]["status"] == "success"
            assert doc["backends"]["a"]["status_code"] == 500

            copy = {"source": LLAMA.name, "destination": "mine:latest"}
            response = await client.post(fleet.url + "/api/copy", headers=fleet.headers, json=copy)
            assert response.status_code == 400
            message = response.json()["error"]
            assert "?backend=NAME" in message and "a, b" in message
            assert fleet.landed() == {"a": 2, "b": 3}
            response = await client.post(fleet.url + "/api/copy?backend=a", headers=fleet.headers,
                                         json=copy)
            assert response.status_code == 200
            assert "mine:latest" in fleet.sims["a"].models
            assert "mine:latest" not in fleet.sims["b"].models
            response = await client.post(fleet.url + "/api/copy?backend=zz",
                                         headers=fleet.headers, json=copy)
            assert response.status_code == 400 and "a, b" in response.json()["error"]
        done = await in_thread(lambda: ollama_client(fleet).pull("llama3.2", stream=False))
        assert done.status == "success"
    assert fleet.landed() == {"a": 4, "b": 4}


async def test_a_pull_says_which_backend_it_missed(nursery: trio.Nursery,
                                                  tmp_path: Path) -> None:
    """A pull to every ollama backend while one is down: that one is not asked, and the
    answer is a 502 naming it (a 200 would hide that it lacks the model)."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[LLAMA])})
    await fleet.kill("b")
    await fleet.learn()
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(fleet.url + "/api/pull", headers=fleet.headers,
                                         json={"model": "llama3.2", "stream": False})
    assert response.status_code == 502, response.text
    doc = response.json()
    assert doc["backends"]["a"]["status"] == "success"
    assert doc["backends"]["b"]["status"] == "unreachable" and doc["backends"]["b"]["error"]
    assert "b" in doc["error"]


async def test_an_openai_backend_gets_its_key_and_serves_v1_only(nursery: trio.Nursery,
                                                                 tmp_path: Path) -> None:
    """B is an OpenAI-compatible backend (kind = openai, api_key_env): /v1 requests for
    its model reach it with the upstream key, never the client's; a native request for
    that model is a 404 that says to use /v1; the native lists are A's alone."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[QWEN])},
        upstream={"b": {"kind": "openai", "api_key_env": "B_KEY"}},
        env={"B_KEY": "sk-upstream-b"})
    assert fleet.backend("b").catalogue.models() == [QWEN.name]  # learned from /v1/models
    with trio.fail_after(TIMEOUT_S):
        completion = await in_thread(lambda: openai_client(fleet).chat.completions.create(
            model="qwen3:4b", messages=[{"role": "user", "content": "hi"}]))
        assert completion.choices[0].message.content
        async with httpx.AsyncClient(timeout=10) as client:
            response = await ask(client, fleet, QWEN.name, "/v1/chat/completions")
            assert response.status_code == 200
            native = await ask(client, fleet, QWEN.name)
            assert native.status_code == 404
            assert "OpenAI-compatible" in native.json()["error"]
            assert "/v1" in native.json()["error"]
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            tags = (await client.get(fleet.url + "/api/tags", headers=fleet.headers)).json()
            assert names(tags) == [LLAMA.name]
            models = (await client.get(fleet.url + "/v1/models", headers=fleet.headers)).json()
            assert sorted(names(models)) == [LLAMA.name, QWEN.name]
    reached_b = relayed(fleet.sims["b"])
    assert [r.path for r in reached_b] == ["/v1/chat/completions"] * 2 + ["/v1/models"]
    for record in fleet.sims["b"].records:  # its own checks and lists too
        assert (b"authorization", b"Bearer sk-upstream-b") in record.headers
    for record in fleet.sims["a"].records:
        assert all(name != b"authorization" for name, _ in record.headers)
    assert all(r.path.startswith("/v1/") for r in fleet.sims["b"].records)


async def test_max_model_gb_holds_with_one_backend_too(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    """The only backend lists a model over its max_model_gb: the request is refused
    with a 404 that says why, it does not go to the backend anyway."""
    fleet = await start_fleet(nursery, str(tmp_path), {"a": Simulator(models=[LLAMA, BIG])},
                              upstream={"a": {"max_model_gb": 10}})
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            for path in ("/api/chat", "/v1/chat/completions"):
                response = await ask(client, fleet, BIG.name, path)
                assert response.status_code == 404, response.text
                assert "max_model_gb" in response.text
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
    assert models_sent(fleet.sims["a"]) == [LLAMA.name]


# --------------------------------------------------------------------------- what is not retried


async def test_a_500_is_the_requests_own_answer_not_the_backends_failure(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """A 500 (Ollama's model errors: too little memory, a runner that crashed on this
    prompt) is about the request: forwarded at once, never tried elsewhere, and no
    backend counts it, so one user cannot eject every backend; a 503 is tried elsewhere."""
    fleet = await start_fleet(nursery, str(tmp_path), {
        "a": Simulator(models=[LLAMA]), "b": Simulator(models=[LLAMA])},
        routing={"eject_after_failures": 1})
    await fleet.learn()
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                answer = await ask(client, fleet, LLAMA.name, prompt="[[sim:status=500]]")
                assert answer.status_code == 500
            assert sum(fleet.landed().values()) == 3  # each tried once
            view = await backends_view(client, fleet)
            assert [view[n]["ejected"] for n in "ab"] == [False, False]
            assert (await ask(client, fleet, LLAMA.name)).status_code == 200
            overloaded = await ask(client, fleet, LLAMA.name, prompt="[[sim:status=503]]")
    assert overloaded.status_code == 503
    assert sum(fleet.landed().values()) == 4 + 2  # the 503 was tried on both


async def test_a_named_backends_5xx_is_its_own_answer(nursery: trio.Nursery,
                                                      tmp_path: Path) -> None:
    """/api/pull?backend=a that a refuses with a 5xx: the client gets a's answer (not a
    made-up 503), no other backend is asked, and a is not marked."""
    sim_a = Simulator(models=[LLAMA])
    sim_a.refuse_status = 503
    fleet = await start_fleet(nursery, str(tmp_path), {"a": sim_a, "b": Simulator(models=[LLAMA])},
                              routing={"eject_after_failures": 1})
    await fleet.learn()
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(fleet.url + "/api/show?backend=a",
                                       headers=fleet.headers, json={"model": LLAMA.name})
            assert answer.status_code == 200  # show is not refused: a is there
            pulled = await client.post(fleet.url + "/api/pull?backend=a", headers=fleet.headers,
                                       json={"model": "nosuch-model", "stream": False})
            view = await backends_view(client, fleet)
    assert pulled.status_code == 500, pulled.text  # the simulator's, as Ollama answers it
    assert "no ollama backend" not in pulled.json()["error"]
    assert [r.path for r in relayed(fleet.sims["b"])] == []
    assert view["a"]["ejected"] is False


# --------------------------------------------------------------------------- what lists show


async def test_a_backends_globs_and_size_cap_shape_the_lists_too(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """With one backend or several, /api/tags and /v1/models show what each backend is
    sent (its ``models`` globs, its ``max_model_gb``): a listed model answers."""
    fleet = await start_fleet(nursery, str(tmp_path), {"a": Simulator(models=[LLAMA, QWEN, BIG])},
                              upstream={"a": {"models": "llama*", "max_model_gb": 8}})
    await fleet.learn()
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            tags = (await client.get(fleet.url + "/api/tags", headers=fleet.headers)).json()
            v1 = (await client.get(fleet.url + "/v1/models", headers=fleet.headers)).json()
            qwen = await ask(client, fleet, QWEN.name)
    assert [m["name"] for m in tags["models"]] == [LLAMA.name]
    assert [m["id"] for m in v1["data"]] == [LLAMA.name]
    assert qwen.status_code == 404
    assert [r.path for r in relayed(fleet.sims["a"])] == ["/api/tags", "/v1/models"]


async def test_only_openai_backends_the_native_paths_say_so(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    """No ollama backend at all: /api/tags and /api/version are a 404 saying only /v1 is
    served (a 503 would invite retries that never help); /v1/models lists the models."""
    fleet = await start_fleet(nursery, str(tmp_path), {"a": Simulator(models=[LLAMA])},
                              upstream={"a": {"kind": "openai"}})
    await fleet.learn()
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            answers = [await client.get(fleet.url + path, headers=fleet.headers)
                       for path in ("/api/tags", "/api/version")]
            v1 = await client.get(fleet.url + "/v1/models", headers=fleet.headers)
    for answer in answers:
        assert answer.status_code == 404 and "/v1" in answer.json()["error"], answer.text
    assert [m["id"] for m in v1.json()["data"]] == [LLAMA.name]
