"""The llama.cpp-like simulator behaves as the real llama-cpp-python 0.3.36 was measured
to: its counts, its stream shapes (no usage even when asked), its tokenizer endpoints
and 404s; and as llama-server where that flavor is asked for."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from ollama_proxy.sim.llamacpp import LlamaCppSim, char_tokens, chatml, run_llamacpp_sim

FOUR = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]


@pytest.mark.parametrize(("text", "count"), [
    (chatml([{"role": "user", "content": "Say hello."}]), 40),  # measured on the real server
    (chatml(FOUR), 77),
    ("Once upon a time", 17),
    ("Say hello.", 11),
    ("", 1),
    ("<|im_start|>user\n", 7),  # a marker is one token
])
def test_counts_match_the_real_server(text, count):
    """One token per character, BOS added, ChatML markers one token, an empty system turn."""
    assert char_tokens(text, add_bos=True) == count


async def serve(nursery: trio.Nursery, flavor: str = "llama-cpp-python") -> str:
    host, port = await nursery.start(run_llamacpp_sim, LlamaCppSim(flavor), "127.0.0.1", 0)
    return f"http://{host}:{port}"


def events(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.split("\r\n\r\n")
            if line.startswith("data: {")]


async def test_streams_ignore_include_usage(nursery):
    """N tokens: a role-only chunk, N one-character chunks, a finish chunk, [DONE]; no usage
    although it was asked for (N + 1 chunks on /v1/completions). Whole replies count."""
    url = await serve(nursery)
    asked = {"model": "tiny", "max_tokens": 5, "stream": True,
             "stream_options": {"include_usage": True}}
    with trio.fail_after(10):
        async with httpx.AsyncClient() as client:
            chat = await client.post(url + "/v1/chat/completions", json={
                **asked, "messages": [{"role": "user", "content": "Say hello."}]})
            completion = await client.post(url + "/v1/completions",
                                           json={**asked, "prompt": "Once upon a time"})
            whole = await client.post(url + "/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 5, "messages": FOUR})
    chunks = events(chat.text)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant"}, *({"content": ch} for ch in "Once "), {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(events(completion.text)) == 6 and chat.text.endswith("data: [DONE]\r\n\r\n")
    assert "usage" not in chat.text + completion.text
    assert whole.json()["usage"] == {"prompt_tokens": 77, "completion_tokens": 5,
                                     "total_tokens": 82}


@pytest.mark.parametrize(("flavor", "path", "body", "status", "answer"), [
    ("llama-cpp-python", "/extras/tokenize/count", {"input": "Say hello."}, 200, {"count": 11}),
    ("llama-cpp-python", "/extras/tokenize", {"input": "ab"}, 200, {"tokens": [1, 2, 3]}),
    ("llama-cpp-python", "/tokenize", {"content": "ab"}, 404, {"detail": "Not Found"}),
    ("llama-server", "/tokenize", {"content": "ab"}, 200, {"tokens": [1, 2]}),
    ("llama-server", "/tokenize", {"content": "ab", "add_special": True}, 200,
     {"tokens": [1, 2, 3]}),
    ("llama-server", "/apply-template", {"messages": [{"role": "user", "content": "x"}]}, 200,
     {"prompt": chatml([{"role": "user", "content": "x"}])}),
    ("llama-server", "/extras/tokenize/count", {"input": "x"}, 404, {"detail": "Not Found"}),
])
async def test_tokenizer_endpoints_per_flavor(nursery, flavor, path, body, status, answer):
    """Each flavor has its own tokenizer endpoints; the other's are 404s."""
    url = await serve(nursery, flavor)
    with trio.fail_after(10):
        async with httpx.AsyncClient() as client:
            reply = await client.post(url + path, json=body)
    assert (reply.status_code, reply.json()) == (status, answer)
