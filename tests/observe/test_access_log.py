"""The access log: one JSON line per request on ``ollama_proxy.usage``, written off the
latency path (kept, then flushed while the next request waits for its backend)."""

from __future__ import annotations

import json

import httpx
import trio

from ollama_proxy.api.record import RECORD_FIELDS, Outcome, RequestRecord
from ollama_proxy.observe.access_log import AccessLog

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hello there"}],
        "stream": False}


def test_lines_are_kept_until_flushed(caplog):
    """Writing a line costs tens of microseconds: keep only keeps it; flush writes it,
    once, as the record's JSON with every field (the outcome as its stored text)."""
    caplog.set_level("INFO", logger="ollama_proxy.usage")
    log = AccessLog()
    record = RequestRecord(request_id="r1", time=0.0, endpoint="/api/chat", model="m",
                           backend="b", status=200, outcome=Outcome.OK, prompt_tokens=1,
                           completion_tokens=2, estimated=False, stream=False, duration_s=0.1,
                           ttfb_s=0.05, client="127.0.0.1")
    log.keep(record)
    assert caplog.records == []
    log.flush()
    log.flush()
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [tuple(line) for line in lines] == [RECORD_FIELDS]
    assert (lines[0]["request_id"], lines[0]["outcome"]) == ("r1", "ok")


async def test_lines_are_written_while_the_next_request_waits(stack, caplog):
    """The gateway writes kept lines once the next request is out to a backend."""
    caplog.set_level("INFO", logger="ollama_proxy.usage")
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            first = await client.post(stack.url + "/api/chat", json=CHAT)
            second = await client.post(stack.url + "/api/chat", json=CHAT)
    written = [json.loads(r.getMessage())["request_id"] for r in caplog.records
               if r.name == "ollama_proxy.usage"]
    assert first.headers["x-request-id"] in written
    # the after phase comes once the response went out: the log's turn comes first
    await stack.sink.record_of(second.headers["x-request-id"])
    stack.gateway.access_log.flush()  # what its timer does within a second
    written = [json.loads(r.getMessage())["request_id"] for r in caplog.records
               if r.name == "ollama_proxy.usage"]
    assert written == [first.headers["x-request-id"], second.headers["x-request-id"]]
