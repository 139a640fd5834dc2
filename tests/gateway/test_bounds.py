"""The gateway's bounds end to end (simulator behind it, loopback): strangers are
refused before their body is read, a client that stops reading is cut and its
backend request cancelled, an oversized reply is a 502 that still counts, a
drain ends streams well, and a bug is a 500 with its own ledger row."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket

import httpx
import pytest
import trio
import trio.testing

from gateway_stack import Stack, gateway_config, start_gateway
from ollama_proxy.sim.server import Simulator, run_simulator
from wire import read_until_close

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hello there"}]}


async def stack_with(nursery: trio.Nursery, **server: object) -> Stack:
    """The simulator and a gateway whose ``[server]`` settings are changed by ``server``."""
    sim = Simulator()
    host, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    config = gateway_config([f"http://{host}:{port}"])
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, **server))
    gateway, url, sink, key = await start_gateway(nursery, config)
    return Stack(sim, f"http://{host}:{port}", gateway, url, sink, key)


def port_of(stack: Stack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


async def slow_reader(stack: Stack, tokens: int) -> trio.socket.SocketType:
    """A client with a tiny receive buffer that asks for a long stream and reads nothing."""
    body = json.dumps({**CHAT, "messages": [
        {"role": "user", "content": f"[[sim:tokens={tokens}]]"}]}).encode()
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port_of(stack)))
    await sock.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + stack.key.encode() + b"\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(body), body))
    return sock


@pytest.mark.parametrize(("path", "shape"), [("/api/chat", "native"),
                                             ("/v1/chat/completions", "openai"),
                                             ("/admin/api/users", "openai")])
async def test_a_stranger_never_sends_its_body(stack, path, shape):
    """No key and a 64 MB body announced: 401 in the path's dialect after the head
    and a few bytes, Connection: close, and the backend never hears of it."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(stack))
        await stream.send_all(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode()
                              + b"Content-Length: 67108864\r\n\r\n" + b"{" * 4096)
        data = await read_until_close(stream)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert (error["code"] == "invalid_api_key") if shape == "openai" else isinstance(error, str)
        assert not [r for r in stack.sim.records if r.path == path]


async def test_a_client_that_stops_reading_is_cut_and_its_backend_request_cancelled(nursery):
    """A stream to a client that reads nothing: after send_timeout_s the connection is
    cut, the simulator's generation cancelled, and the ledger row says client_stalled."""
    stack = await stack_with(nursery, send_timeout_s=0.5)
    with trio.fail_after(30):
        sock = await slow_reader(stack, 100_000)
        await stack.sink.wait_for(lambda records: bool(records), timeout_s=30)
        record = stack.sink.records[0]
        assert record.outcome == "client_stalled" and record.estimated
        await stack.sim.wait_for(lambda sim: any(
            r.path == "/api/chat" and r.outcome == "cancelled" for r in sim.records))
        sock.close()


async def test_a_reply_past_max_response_is_502_and_still_counted(nursery):
    """A non-streamed reply bigger than max_response_mb: 502 in the path's dialect;
    the backend did the work, so the row counts an estimate of it."""
    stack = await stack_with(nursery, max_response_bytes=400)
    body = {**CHAT, "stream": False, "messages": [
        {"role": "user", "content": "[[sim:tokens=300]] hello"}]}
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + "/v1/chat/completions", json=body)
        assert response.status_code == 502
        assert "max_response_mb" in response.json()["error"]["message"]
        record = await stack.sink.record_of(response.headers["x-request-id"])
        assert record.status == 502 and record.outcome == "upstream_error"
        assert record.estimated and record.completion_tokens >= 400 // 4


@pytest.mark.parametrize(("path", "last_frame"), [
    ("/api/chat", lambda line: json.loads(line)),
    ("/v1/chat/completions", lambda line: json.loads(line.removeprefix("data: "))),
], ids=["ndjson", "sse"])
async def test_a_drain_ends_streams_like_a_backend_death(stack, path, last_frame):
    """Streams still running when the drain's grace ends get the error frame an
    upstream death gives, and a well-formed end; the row says cancelled."""
    body = {**CHAT, "stream": True, "messages": [
        {"role": "user", "content": "[[sim:tokens=1000]] [[sim:rate=20]]"}]}
    with trio.fail_after(20):
        async with httpx.AsyncClient(headers=stack.headers, timeout=20) as client:
            async with client.stream("POST", stack.url + path, json=body) as response:
                lines = []
                async for line in response.aiter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) == 2:
                        stack.gateway.drain(0.1)
        error = last_frame(lines[-1])["error"]
        assert "shutting down" in (error["message"] if isinstance(error, dict) else error)
        record = await stack.sink.record_of(response.headers["x-request-id"])
        assert record.outcome == "cancelled" and record.estimated
        await stack.sim.wait_for(lambda sim: any(
            r.path == path and r.outcome == "cancelled" for r in sim.records))


async def test_a_drain_never_cuts_a_write_to_a_slow_client(stack, caplog):
    """A stream whose client reads nothing when the grace ends: the write under way is
    not cut; once the client reads, the stream ends with the error line and a clean
    last chunk, and nothing is logged as a failure."""
    with trio.fail_after(30):
        sock = await slow_reader(stack, 200_000)
        await trio.testing.wait_all_tasks_blocked(0.05)  # every buffer on the way is full
        stack.gateway.drain(0)
        await trio.testing.wait_all_tasks_blocked()  # the grace ended while the write waits
        data = b""
        while chunk := await sock.recv(1 << 20):
            data += chunk
        sock.close()
    assert data.endswith(b"\r\n0\r\n\r\n")
    last = data.rsplit(b"\r\n", 4)[-4]  # the last chunk's payload
    assert b"shutting down" in last
    await stack.sink.wait_for(lambda records: bool(records))
    assert stack.sink.records[0].outcome == "cancelled"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_bug_is_a_500_with_its_own_ledger_row(stack, caplog, monkeypatch):
    """An unexpected exception: a short 500 in the path's dialect, logged once, and
    a ledger row with status 500 and outcome error (not a client that left)."""
    async def broken_choice(**request: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(stack.gateway.router, "lease", broken_choice)
    with trio.fail_after(10):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            response = await client.post(stack.url + "/v1/chat/completions", json=CHAT)
        assert response.status_code == 500
        assert response.json()["error"]["message"] == "internal error"
        await stack.sink.wait_for(lambda records: bool(records))
    record = stack.sink.records[0]
    assert (record.status, record.outcome) == (500, "error")
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and "a bug" in (failures[0].exc_text or "")


async def test_a_big_body_is_decoded_off_the_event_loop(stack):
    """A body past PARSE_IN_THREAD_BYTES (or with many containers) is decoded in a
    worker thread with the same verdicts: a big honest chat is relayed, a big over-deep
    one refused with 400, a small one of many objects answered."""
    from ollama_proxy.proxy.relay import PARSE_IN_THREAD_BYTES

    big = "x" * PARSE_IN_THREAD_BYTES
    deep = json.dumps({"model": "llama3.2", "pad": big, "messages": []})[:-1] + ', "x": ' \
        + "[" * 100 + "]" * 100 + "}"
    with trio.fail_after(20):
        async with httpx.AsyncClient(headers=stack.headers) as client:
            ok = await client.post(stack.url + "/api/chat", json={
                **CHAT, "stream": False, "messages": [{"role": "user", "content": big}]})
            refused = await client.post(stack.url + "/api/chat", content=deep)
    assert ok.status_code == 200 and "message" in ok.json()
    assert refused.status_code == 400 and "deep" in refused.json()["error"]
    many = {**CHAT, "stream": False, "messages": [{"role": "user", "content": "hi"}] * 1100}
    async with httpx.AsyncClient(headers=stack.headers) as client:
        reply = await client.post(stack.url + "/api/chat", json=many)
    assert reply.status_code == 200 and "message" in reply.json()
