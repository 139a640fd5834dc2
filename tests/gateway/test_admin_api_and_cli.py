"""The admin API and the offline CLI are two faces of the same use-cases: on one
database file, the same question gets the same JSON from both, and the same change
the same answer, whichever of them made the users."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from gateway_stack import Stack, bearer
from ollama_proxy.__main__ import main

TIMEOUT_S = 10
LIMITS = {"tokens_per_day": 100, "expires_at": "2030-01-01T00:00:00Z", "allowed_models": ["ll*"],
          "weight": 0.5}


def cli(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """The CLI's --json answer, run on the gateway's own database file."""
    code = main([*argv, "--database", stack.gateway.config.server.database, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


async def api(client: httpx.AsyncClient, method: str, path: str, body: Any = None,
              status: int = 200) -> Any:
    response = await client.request(method, path, json=body)
    assert response.status_code == status, response.text
    return response.json()


# (CLI arguments, API path, the part of the CLI's answer that the API answers)
READS = [
    (("users", "list"), "/admin/api/users", lambda payload: payload),
    (("users", "show", "alice"), "/admin/api/users/alice", lambda payload: payload),
    (("users", "show", "bob"), "/admin/api/users/bob", lambda payload: payload),
    (("usage",), "/admin/api/usage", lambda payload: {"rows": payload["rows"]}),
    (("usage", "--group-by", "model", "--user", "alice", "--since", "2020-01-01",
      "--until", "2999-01-01T00:00:00+01:00"),
     "/admin/api/usage?group_by=model&user=alice&since=2020-01-01"
     "&until=2999-01-01T00:00:00%2B01:00",
     lambda payload: {"rows": payload["rows"]}),
]


async def test_the_api_and_the_cli_answer_alike(stack: Stack,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Users made by either, changed by either, used once: every read is the same JSON,
    and a change answers the same (but for the user's own name, time and usage)."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers,
                                     timeout=5) as client:
            alice = (await api(client, "POST", "/admin/api/users",
                               {"name": "alice", "limits": LIMITS}, status=201))["key"]
            cli(stack, capsys, "users", "create", "bob",
                *(f"--limit={k}={','.join(v) if isinstance(v, list) else v}"
                  for k, v in LIMITS.items()))
            chat = {"model": "llama3.2", "stream": False,
                    "messages": [{"role": "user", "content": "hi"}]}
            answer = await client.post("/api/chat", json=chat, headers=bearer(alice))
            assert answer.status_code == 200, answer.text
            by_api = await api(client, "PATCH", "/admin/api/users/bob", {"suspended": True})
            by_cli = cli(stack, capsys, "users", "suspend", "alice")
            mine = ("name", "created_at", "usage")
            assert {k: v for k, v in by_api.items() if k not in mine} == \
                {k: v for k, v in by_cli.items() if k not in mine}
            assert by_api["limits"] == LIMITS
            for argv, path, part in READS:
                assert await api(client, "GET", path) == part(cli(stack, capsys, *argv)), argv
            assert [r["key"] for r in (await api(client, "GET", "/admin/api/usage"))["rows"]] \
                == ["alice"]
