"""The body attacks of the hardening probe, replayed through the in-process gateway in
front of the simulated Ollama: a second spelling of a key the gateway checks, nesting
that made Python recurse, wrong types and lone surrogates. The simulator's records
show what the backend received (nothing, for a refused body); raw bodies are sent as
bytes because no JSON library writes duplicate keys."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from gateway_stack import bearer, forwarded, ledger_rows, new_user

TIMEOUT_S = 20
NATIVE, OPENAI = "/api/chat", "/v1/chat/completions"
MESSAGES = '"messages":[{"role":"user","content":"[[sim:tokens=40]] go"}]'


def error_message(response: httpx.Response, path: str) -> str:
    """The 400's message, checking the path family's error shape on the way."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str)
        return error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error["message"]


async def post_raw(client: httpx.AsyncClient, url: str, raw: bytes, key: str,
                   request_id: str) -> httpx.Response:
    return await client.post(url, content=raw, headers={
        **bearer(key, request_id), "content-type": "application/json"})


@pytest.mark.parametrize("path", [NATIVE, OPENAI])
@pytest.mark.parametrize("second", ['"Model"', '"MoDeL"', '"model"'])
async def test_a_second_model_key_never_reaches_the_backend(stack, path, second):
    """{"model":"llama3.2","Model":"secret-model"} passed allowed_models as llama3.2 and
    was served by secret-model: now a 400 in the path's shape, and the backend sees
    nothing (an identical second key too: Go takes the last one)."""
    raw = f'{{"model":"llama3.2",{second}:"secret-model",{MESSAGES},"stream":false}}'.encode()
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", allowed_models=["llama3.2"])
            response = await post_raw(client, stack.url + path, raw, key, "two-models")
            record = await stack.sink.record_of("two-models")
    message = error_message(response, path)
    assert '"model"' in message and (second in message or "twice" in message)
    assert forwarded(stack, "two-models") == []
    assert (record.status, record.outcome, record.model) == (400, "refused", None)


@pytest.mark.parametrize(("path", "caps"), [
    (NATIVE, '"options":{"num_predict":5},"Options":{"num_predict":100000}'),
    (NATIVE, '"options":{"num_predict":5,"NUM_PREDICT":100000}'),
    (NATIVE, '"Options":{"num_predict":100000}'),
    (OPENAI, '"max_tokens":5,"MAX_TOKENS":100000'),
    (OPENAI, '"max_tokens":5,"max_to\\u212aen\\u017f":100000'),
    (OPENAI, '"MAX_TOKENS":100000'),
    (OPENAI, '"max_completion_tokens":5,"Max_Completion_Tokens":100000'),
])
async def test_a_second_cap_key_never_reaches_the_backend(stack, path, caps):
    """A cap of 10 and 1,000 tokens a day: a second spelling of the cap got 100,000
    tokens; now a 400, nothing reaches the backend and nothing is counted."""
    raw = f'{{"model":"llama3.2",{MESSAGES},"stream":false,{caps}}}'.encode()
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", max_tokens_per_request=10,
                                 tokens_per_day=1000)
            response = await post_raw(client, stack.url + path, raw, key, "two-caps")
            await stack.sink.record_of("two-caps")
            me = (await client.get(stack.url + "/v1/me", headers=bearer(key))).json()
    error_message(response, path)
    assert forwarded(stack, "two-caps") == []
    assert me["remaining"]["tokens_per_day"] == 1000
    [row] = ledger_rows(stack.gateway.config.server.database, "ann")
    assert (row["status"], row["outcome"], row["completion_tokens"]) == (400, "refused", 0)


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(("method", "path", "raw"), [
    ("POST", NATIVE, DEEP),
    ("POST", OPENAI, DEEP),
    ("POST", NATIVE, b'{"model":"llama3.2","messages":' + DEEP + b"}"),
    ("POST", "/api/show", b'{"model":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001),
    ("POST", "/admin/api/users", b'{"name":' + DEEP + b"}"),
    ("PATCH", "/admin/api/users/ann", b'{"limits":' + DEEP + b"}"),
], ids=["native", "openai", "messages", "show-objects", "admin-create", "admin-patch"])
async def test_deep_bodies_are_400_on_every_json_path(stack, method, path, raw):
    """A 100,000-deep array or object was a 500 (RecursionError) on every JSON path,
    proxied and admin: now a 400 in the path's shape that names the depth."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.request(method, stack.url + path, content=raw,
                                            headers=stack.headers)
    assert "nested deeper than 64 levels" in error_message(response, path)


@pytest.mark.parametrize(("path", "body", "words"), [
    (NATIVE, {"model": "llama3.2", "messages": 5}, '"messages" must be a list'),
    (OPENAI, {"model": "llama3.2", "messages": [5]}, '"messages[0]" must be an object'),
    (NATIVE, {"model": 5, "messages": []}, '"model" must be a string'),
    (OPENAI, {"model": ["secret-model"], "messages": []}, '"model" must be a string'),
    (NATIVE, {"model": None, "messages": []}, '"model" is required'),
    ("/api/generate", {"model": "llama3.2", "prompt": {"text": "hi"}}, '"prompt" must be a string'),
    ("/v1/embeddings", {"model": "all-minilm", "input": 3}, '"input" must be a string or a list'),
])
async def test_wrong_types_are_400_for_users_with_limits(stack, path, body, words):
    """"messages": 5 was a 500 for a user with token limits, and a model that was not a
    string skipped allowed_models: each is a 400 now, and never reaches the backend."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", tokens_per_day=1000,
                                 allowed_models=["llama3.2", "all-minilm"])
            response = await client.post(stack.url + path, json=body,
                                         headers=bearer(key, "typed"))
    assert words in error_message(response, path)
    assert forwarded(stack, "typed") == []


@pytest.mark.parametrize("path", [NATIVE, OPENAI])
async def test_a_lone_surrogate_in_the_model_is_400(stack, path):
    """"llama3.2\\udc00" reaches logs, the ledger and glob matching: refused at the door,
    and the refusal's ledger row holds no model."""
    raw = b'{"model":"llama3.2\\udc00","messages":[],"stream":false}'
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", allowed_models=["llama3.2*"])
            response = await post_raw(client, stack.url + path, raw, key, "surrogate")
            await stack.sink.record_of("surrogate")
    assert "lone surrogate" in error_message(response, path)
    assert forwarded(stack, "surrogate") == []
    [row] = ledger_rows(stack.gateway.config.server.database, "ann")
    assert (row["status"], row["outcome"]) == (400, "refused")


@pytest.mark.parametrize(("path", "stream", "limits"), [
    (NATIVE, False, {}),
    (NATIVE, False, {"max_tokens_per_request": 10}),  # the cap rewrites the body
    (OPENAI, True, {}),  # usage is injected: rewritten
    (OPENAI, False, {"max_tokens_per_request": 10}),
])
async def test_a_lone_surrogate_in_content_reaches_the_backend_as_sent(stack, path, stream,
                                                                       limits):
    """Content with a "\\udc00" escape goes through: byte for byte when the body is not
    rewritten, re-escaped (valid UTF-8, same meaning) when it is; never a 500. The
    backend reads the escape as U+FFFD either way, as Go does."""
    raw = (b'{"model":"llama3.2","messages":[{"role":"user","content":"hi \\udc00 '
           b'\xc3\xa9 [[sim:tokens=3]]"}],"stream":' + json.dumps(stream).encode() + b"}")
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            key = await new_user(client, stack, "ann", **limits)
            response = await post_raw(client, stack.url + path, raw, key, "content")
    assert response.status_code == 200, response.text
    [record] = forwarded(stack, "content")
    assert record.body["messages"][0]["content"] == "hi \ufffd \u00e9 [[sim:tokens=3]]"
    sent_length = dict(record.headers)[b"content-length"]
    rewritten = bool(limits) or stream
    assert (sent_length == str(len(raw)).encode()) is not rewritten


async def test_admin_bodies_are_decoded_strictly(stack):
    """The admin API refuses a key spelled twice (one user name to us, another to a
    reader that takes the first) in its OpenAI shape."""
    raw = b'{"name":"ann","name":"bob"}'
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(stack.url + "/admin/api/users", content=raw,
                                         headers=stack.headers)
            users = (await client.get(stack.url + "/admin/api/users", headers=stack.headers)).json()
    assert "twice" in error_message(response, "/admin/api/users")
    assert [u["name"] for u in users["users"] if u["name"] in ("ann", "bob")] == []
