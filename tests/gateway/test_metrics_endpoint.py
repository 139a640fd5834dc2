"""GET /metrics end to end: requests through the in-process gateway in front of the
simulated Ollama (an answer, a stream, a 401, a 429 from a limit, a 400) show in the counters
as prometheus_client's parser reads them; who may read the page."""

from __future__ import annotations

import dataclasses
import ipaddress
import json

import httpx
import trio
import trio.lowlevel

from gateway_stack import bearer, gateway_config, new_user, start_gateway, start_stack
from ollama_proxy.config import MetricsConfig
from ollama_proxy.sim.models import DEFAULT_MODELS
from ollama_proxy.sim.server import Simulator, run_simulator
from prom_text import samples

TIMEOUT_S = 20
# A model name may hold quotes and backslashes (not control characters): a label value
# the page must escape.
ODD = dataclasses.replace(DEFAULT_MODELS[0], name='we"ird\\name:latest')


def chat(model: str, stream: bool) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


async def test_requests_show_in_the_counters(nursery):
    stack = await start_stack(nursery, Simulator(models=[*DEFAULT_MODELS, ODD]))
    llama = DEFAULT_MODELS[0].name
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            key = await new_user(client, stack, "ann", requests_per_minute=3)
            ok = await client.post(stack.url + "/api/chat", headers=bearer(key),
                                   json=chat(llama, False))
            assert ok.status_code == 200, ok.text
            async with client.stream("POST", stack.url + "/api/chat", headers=bearer(key),
                                     json=chat(ODD.name, True)) as streamed:
                lines = [json.loads(line) async for line in streamed.aiter_lines() if line]
            assert lines[-1]["done"] is True
            third = await client.post(stack.url + "/api/chat", headers=bearer(key),
                                      json=chat(llama, False))
            fourth = await client.post(stack.url + "/api/chat", headers=bearer(key),
                                       json=chat(llama, False))  # over 3 a minute
            stranger = await client.post(stack.url + "/api/chat", headers=bearer("op-nope"),
                                         json=chat(llama, False))
            bad = await client.post(stack.url + "/api/chat", headers=bearer(key), content=b"{")
            assert [r.status_code for r in (third, fourth, stranger, bad)] == [200, 429, 401, 400]
            await stack.sink.wait_for(lambda records: len(records) == 5)
            # a stranger leaves no record: its request's after phase, once its task runs
            for _ in range(1000):
                if stack.gateway.metrics.rejections.values.get(("unauthorized",)):
                    break
                await trio.lowlevel.checkpoint()
            page = await client.get(stack.url + "/metrics")  # from 127.0.0.1: no key needed
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = page.text
    requests = samples(text, "ollama_proxy_requests_total")
    assert requests == {
        (("backend", "default"), ("code", "200"), ("endpoint", "/api/chat"), ("model", llama),
         ("user", "ann")): 2,
        (("backend", "default"), ("code", "200"), ("endpoint", "/api/chat"),
         ("model", ODD.name), ("user", "ann")): 1,
        (("backend", ""), ("code", "429"), ("endpoint", "/api/chat"), ("model", ""),
         ("user", "ann")): 1,
        (("backend", ""), ("code", "400"), ("endpoint", "/api/chat"), ("model", ""),
         ("user", "ann")): 1,
    }
    assert '\\"' in text and "\\\\" in text  # the odd name's quote and backslash, escaped
    assert {k: v for k, v in samples(text, "ollama_proxy_rejections_total").items() if v} == {
        (("reason", "rate_limit"),): 1, (("reason", "unauthorized"),): 1,
        (("reason", "bad_request"),): 1}
    tokens = samples(text, "ollama_proxy_tokens_total")
    assert {(dict(k)["type"], dict(k)["model"]) for k in tokens} == {
        ("prompt", llama), ("completion", llama), ("prompt", ODD.name), ("completion", ODD.name)}
    ledger = [r for r in stack.sink.records if r.user == "ann" and r.status == 200]
    assert sum(tokens.values()) == sum(r.prompt_tokens + r.completion_tokens for r in ledger)
    # the stream alone has a first token and a time per token
    for name in ("ollama_proxy_time_to_first_token_seconds_count",
                 "ollama_proxy_time_per_output_token_seconds_count"):
        assert samples(text, name) == {(("backend", "default"), ("model", ODD.name)): 1}, name
    assert sum(samples(text, "ollama_proxy_request_duration_seconds_count").values()) == 5
    assert samples(text, "ollama_proxy_backend_up") == {(("backend", "default"),): 1}
    assert samples(text, "ollama_proxy_in_flight_requests") == {(("backend", "default"),): 0}
    assert samples(text, "ollama_proxy_queue_depth") == {(("backend", "default"),): 0}
    assert samples(text, "ollama_proxy_ledger_commit_seconds_count")[()] >= 1
    assert samples(text, "process_open_fds")[()] > 0


async def test_only_allowed_addresses_and_admin_keys_read_the_page(nursery):
    """With 127.0.0.1 outside [metrics] allow, the test's client needs an admin key; a
    user's key, a wrong one or none get 403 in the native shape (/metrics is no /v1)."""
    sim = Simulator()
    host, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    config = gateway_config([f"http://{host}:{port}"])
    config = dataclasses.replace(config, metrics=MetricsConfig(
        allow=(ipaddress.ip_network("10.0.0.0/8"),)))
    gateway, url, _, admin_key = await start_gateway(nursery, config)
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            created = await client.post(url + "/admin/api/users", headers=bearer(admin_key),
                                        json={"name": "bob"})
            user_key = created.json()["key"]
            answers = {
                name: await client.get(url + "/metrics", headers=headers)
                for name, headers in (("none", {}), ("wrong", bearer("op-wrong")),
                                      ("user", bearer(user_key)), ("admin", bearer(admin_key)))}
            head = await client.head(url + "/metrics", headers=bearer(admin_key))
    for name in ("none", "wrong", "user"):
        assert answers[name].status_code == 403, name
        assert isinstance(answers[name].json()["error"], str), name
    assert answers["admin"].status_code == 200
    assert "ollama_proxy_build_info" in answers["admin"].text
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0


async def test_per_user_false_names_no_user(nursery):
    sim = Simulator()
    host, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    config = gateway_config([f"http://{host}:{port}"],
                            env={"OLLAMA_PROXY_METRICS_PER_USER": "false"})
    _, url, sink, admin_key = await start_gateway(nursery, config)
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            answer = await client.post(url + "/api/chat", headers=bearer(admin_key),
                                       json=chat(DEFAULT_MODELS[0].name, False))
            assert answer.status_code == 200
            await sink.wait_for(lambda records: len(records) == 1)
            text = (await client.get(url + "/metrics")).text
    assert samples(text, "ollama_proxy_requests_total")
    assert 'user="' not in text


async def test_a_request_through_a_local_proxy_is_not_the_allowed_addresss_own(nursery):
    """127.0.0.1 is allowed (the default), but a request that a reverse proxy on the box
    forwarded (X-Forwarded-For) needs an admin key: the proxy makes every caller local."""
    sim = Simulator()
    host, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    _, url, _, admin_key = await start_gateway(nursery, gateway_config([f"http://{host}:{port}"]))
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            local = await client.get(url + "/metrics")
            proxied = await client.get(url + "/metrics", headers=forwarded)
            admin = await client.get(url + "/metrics", headers={**forwarded,
                                                                **bearer(admin_key)})
    assert (local.status_code, proxied.status_code, admin.status_code) == (200, 403, 200)


async def test_refusals_outside_the_relay_are_counted_too(nursery):
    """A wrong key on the admin API (401), a user's key there (403) and a stranger at
    /metrics (403): each is a rejection by its reason, as a refused proxied request is."""
    sim = Simulator()
    host, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    _, url, _, admin_key = await start_gateway(nursery, gateway_config([f"http://{host}:{port}"]))
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            created = await client.post(url + "/admin/api/users", headers=bearer(admin_key),
                                        json={"name": "bob"})
            user_key = created.json()["key"]
            wrong = await client.get(url + "/admin/api/users", headers=bearer("op-wrong"))
            user = await client.get(url + "/admin/api/users", headers=bearer(user_key))
            stranger = await client.get(url + "/metrics",
                                        headers={"X-Forwarded-For": "203.0.113.9"})
            text = (await client.get(url + "/metrics")).text
    assert (wrong.status_code, user.status_code, stranger.status_code) == (401, 403, 403)
    assert {k: v for k, v in samples(text, "ollama_proxy_rejections_total").items() if v} == {
        (("reason", "unauthorized"),): 1, (("reason", "forbidden"),): 2}
