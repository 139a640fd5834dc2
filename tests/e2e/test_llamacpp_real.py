"""The real llama-cpp-python server (0.3.36, a tiny random model) behind the in-process
gateway: streams it leaves uncounted are estimated from their tokens, then counted
exactly with its /extras/tokenize; a chat prompt once its template overhead is
confirmed by two chats it counted itself.

The server comes from ``tests/llama_server.py`` (an existing venv, or one made by
``../shared/realup``); skipped, saying why, where neither can be had.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import trio

from gateway_stack import gateway_config, start_gateway
from llama_server import run_llama

VENV = Path(os.environ.get("OLLAMA_PROXY_LLAMA_VENV", "/tmp/llama-venv"))
MODEL = Path(os.environ.get("OLLAMA_PROXY_LLAMA_MODEL", "/tmp/tiny.gguf"))
PYTHON = VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
STARTUP_S = 60.0  # the model loads in ~2.5 s; a loaded machine takes longer
LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
SAY_HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}],
             "max_tokens": 8, "temperature": 0, "stream": True}
ONCE = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
        "stream": True}


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    yield from run_llama()


async def test_real_llama_cpp_python_streams_end_up_exact(nursery, llama_url):
    """Completion stream: estimated (4, 8) at once, exact (17, 8) after; chat stream:
    estimated (3, 8) and left so until two counted chats confirm the template overhead,
    then exact (40, 8) like the server's own count."""
    config = gateway_config([llama_url], kind="openai")
    gateway, url, sink, key = await start_gateway(nursery, config)

    async def row(body: dict, path: str = "/v1/chat/completions") -> tuple[int, int, int]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"},
                                     timeout=30) as client:
            reply = await client.post(url + path, json=body)
        assert reply.status_code == 200, reply.text
        rid = reply.headers["x-request-id"]
        await sink.record_of(rid)
        await gateway.recounter.idle()
        conn = sqlite3.connect(config.server.database)
        try:
            return conn.execute("SELECT prompt_tokens, completion_tokens, estimated FROM ledger "
                                "WHERE request_id = ?", (rid,)).fetchone()
        finally:
            conn.close()

    with trio.fail_after(120):
        assert await row(ONCE, "/v1/completions") == (17, 8, 0)
        assert await row(SAY_HELLO) == (3, 8, 1)
        counted = [await row({**SAY_HELLO, "stream": False,
                              "messages": [{"role": "user", "content": text}]})
                   for text in ("Say hello.", "Tell me a story.")]
        assert counted == [(40, 8, 0), (46, 8, 0)]
        assert await row(SAY_HELLO) == (40, 8, 0)
        assert gateway.recounter.failed == 0


async def test_health_checks_and_list_refreshes_never_cut_a_stream(nursery, llama_url):
    """The server ends a running stream when any other request arrives (its
    ``interrupt_requests``): with a health check and a list refresh due every 10 ms, a
    long stream still ends with all its tokens, because the gateway asks a busy openai
    backend nothing; once the stream is over, the checks go on."""
    config = gateway_config([llama_url], kind="openai", env={
        "OLLAMA_PROXY_ROUTING_HEALTH_INTERVAL_S": "0.01", "OLLAMA_PROXY_ROUTING_REFRESH_S": "0.01"})
    gateway, url, sink, key = await start_gateway(nursery, config)
    backend = gateway.backends.backends[0]
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 300, "temperature": 0,
            "stream": True}
    with trio.fail_after(60):
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"},
                                     timeout=30) as client:
            async with client.stream("POST", url + "/v1/completions", json=body) as reply:
                events = [line async for line in reply.aiter_lines()
                          if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert '"finish_reason": "length"' in events[-2]  # not cut: all 300 tokens
            record = await sink.record_of(reply.headers["x-request-id"])
            assert (record.outcome, record.completion_tokens) == ("ok", 300)
            checks = backend.pool.stats()
            await gateway.backends.changed.park()  # the next round of checks, now idle
    assert backend.health.up is True and checks is not None
