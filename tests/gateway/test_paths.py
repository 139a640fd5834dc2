"""Paths and methods the gateway does not serve, over HTTP: the dispatch table answers
before any key is asked for, in the path's error shape, with ``Allow`` on a 405."""

from __future__ import annotations

import httpx
import pytest
import trio

from gateway_stack import Stack

TIMEOUT_S = 10


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("GET", "/api/chat", 405, "POST"),
    ("POST", "/", 405, "GET, HEAD"),
    ("PUT", "/admin/api/users/alice", 405, "DELETE, GET, PATCH"),
    ("DELETE", "/v1/models", 405, "GET, HEAD"),
    ("GET", "/api/nothing", 404, None),
    ("GET", "/admin/api/nothing", 404, None),
])
@pytest.mark.parametrize("keyed", [True, False], ids=["admin-key", "no-key"])
async def test_misses_answer_the_same_with_or_without_a_key(stack: Stack, method, path, status,
                                                            allow, keyed) -> None:
    """A miss is the same 404 or 405 for anyone, nothing reaches the backend."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5,
                                     headers=stack.headers if keyed else {}) as client:
            response = await client.request(method, path)
    assert (response.status_code, response.headers.get("allow")) == (status, allow)
    error = response.json()["error"]
    if path.startswith(("/v1/", "/admin/api/")):
        assert error["code"] == ("method_not_allowed" if status == 405 else "not_found")
    else:
        assert isinstance(error, str) and path in error
    assert not [r for r in stack.sim.records if r.path == path]
