"""Limits as the official clients and an operator meet them: the openai client gets
``RateLimitError`` and does not retry a used-up quota, the ollama client a
``ResponseError`` 429, and a ``serve`` process re-reads its ``[limits]`` on SIGHUP.

The clients are sync and run in worker threads while the trio loop serves the
in-process stack; the ``serve`` process is a child whose log is read line by line.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx
import ollama
import openai
import trio
from test_crash_and_cli import child_env, start_simulator

from child_process import Child
from gateway_stack import Stack
from ollama_proxy.access.keys import new_key
from ollama_proxy.store import db

T = TypeVar("T")
TIMEOUT_S = 20
MESSAGES = [{"role": "user", "content": "Tell me about the gateway"}]
LISTENING = re.compile(r"listening on http://([0-9.]+):(\d+)")
RELOADED = re.compile(r"SIGHUP: config reloaded; applied: (.*); needs a restart")


async def new_user(stack: Stack, name: str, **limits: Any) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(stack.url + "/admin/api/users", headers=stack.headers,
                                     json={"name": name, "limits": limits})
    assert response.status_code == 201, response.text
    return response.json()["key"]


async def in_thread(call: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(call, abandon_on_cancel=True)


def outcomes(stack: Stack, user: str) -> list[str]:
    """The user's ledger rows' outcomes, oldest first (committed before each response ended)."""
    conn = db.connect(stack.gateway.config.server.database)
    try:
        return [row[0] for row in conn.execute(
            "SELECT outcome FROM ledger WHERE user = ? ORDER BY id", (user,))]
    finally:
        conn.close()


async def test_openai_client_does_not_retry_a_used_up_quota(stack: Stack) -> None:
    """token_quota=25: the first call fits, the second is RateLimitError insufficient_quota,
    and the client (2 retries allowed) sent it once: x-should-retry false."""
    key = await new_user(stack, "ann", token_quota=25)

    def call() -> Any:
        with openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=2,
                           timeout=10) as client:
            return client.chat.completions.create(model="llama3.2", messages=MESSAGES)

    with trio.fail_after(TIMEOUT_S):
        first = await in_thread(call)
        assert first.usage.total_tokens <= 25
        try:
            await in_thread(call)
        except openai.RateLimitError as exc:
            error = exc
        else:
            raise AssertionError("the second call was not refused")
    assert (error.status_code, error.code, error.type) == (429, "insufficient_quota",
                                                           "insufficient_quota")
    assert error.response.headers["x-should-retry"] == "false"
    assert outcomes(stack, "ann") == ["ok", "refused"]


async def test_openai_client_sees_a_rate_limit_with_its_type(stack: Stack) -> None:
    """requests_per_minute=1: RateLimitError, type requests, Retry-After and the headers."""
    key = await new_user(stack, "ann", requests_per_minute=1)

    def call() -> Any:
        with openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0,
                           timeout=10) as client:
            return client.chat.completions.with_raw_response.create(model="llama3.2",
                                                                    messages=MESSAGES)

    with trio.fail_after(TIMEOUT_S):
        raw = await in_thread(call)
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        try:
            await in_thread(call)
        except openai.RateLimitError as exc:
            error = exc
    assert (error.code, error.type) == ("rate_limit_exceeded", "requests")
    assert 1 <= int(error.response.headers["retry-after"]) <= 61
    assert error.response.headers["x-ratelimit-limit-requests"] == "1"


async def test_ollama_client_gets_a_429_response_error(stack: Stack) -> None:
    """requests_per_minute=1, streaming and not: ResponseError with status 429 and the reason."""
    key = await new_user(stack, "ann", requests_per_minute=1)

    def call(stream: bool) -> Callable[[], Any]:
        def run() -> Any:
            with ollama.Client(host=stack.url, timeout=10,
                               headers={"Authorization": f"Bearer {key}"}) as client:
                answer = client.chat(model="llama3.2", messages=MESSAGES, stream=stream)
                return list(answer) if stream else answer
        return run

    with trio.fail_after(TIMEOUT_S):
        await in_thread(call(True))
        for stream in (True, False):
            try:
                await in_thread(call(stream))
            except ollama.ResponseError as exc:
                error = exc
            else:
                raise AssertionError("not refused")
            assert error.status_code == 429
            assert "requests_per_minute limit (1) reached" in error.error


async def test_sighup_reloads_the_limits_of_a_running_server(nursery: trio.Nursery,
                                                             tmp_path: Path) -> None:
    """`serve --config FILE`: edit [limits], send SIGHUP, and the next request is judged by
    the new defaults (the log says what was applied)."""
    upstream = await start_simulator(nursery)
    config = tmp_path / "gateway.ini"

    def write(rpm: int) -> None:
        config.write_text(f"[server]\ndatabase = {tmp_path / 'op.db'}\ndrain_s = 1\n\n"
                          f"[limits]\nrequests_per_minute = {rpm}\n")

    write(100)
    admin = new_key()
    env = child_env(admin)
    with Child([sys.executable, "-m", "ollama_proxy", "serve", "--listen", "127.0.0.1:0",
                "--upstream", upstream, "--config", str(config)], cwd=tmp_path, env=env) as child:
        with trio.fail_after(TIMEOUT_S):
            match = await trio.to_thread.run_sync(child.wait_match, "stderr", LISTENING, 15.0)
            url = f"http://{match.group(1)}:{match.group(2)}"
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                made = await client.post("/admin/api/users", json={"name": "ann"},
                                         headers={"Authorization": f"Bearer {admin}"})
                own = {"Authorization": f"Bearer {made.json()['key']}"}
                body = {"model": "llama3.2", "messages": MESSAGES, "stream": False}
                assert (await client.post("/api/chat", json=body, headers=own)).status_code == 200
                write(1)
                child.proc.send_signal(signal.SIGHUP)
                reloaded = await trio.to_thread.run_sync(child.wait_match, "stderr", RELOADED,
                                                         10.0)
                assert reloaded.group(1) == "limits.requests_per_minute"
                refused = await client.post("/api/chat", json=body, headers=own)
                assert refused.status_code == 429, refused.text
            assert await trio.to_thread.run_sync(child.terminate, 10.0) == 0
