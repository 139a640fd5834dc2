"""The authorisation matrix: every route family × every kind of
caller, in-process against the simulated Ollama.

Each request carries its own ``X-Request-Id``, which the gateway forwards upstream, so
"did this request reach the backend?" is answered exactly from the simulator's records
(the gateway's own health checks carry none).
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from typing import Any, Awaitable, Callable

import httpx
import pytest
import trio

from gateway_stack import Stack
from ollama_proxy.access import identity
from ollama_proxy.access.keys import key_prefix, new_key

TIMEOUT_S = 10

_ids = itertools.count(1)


def request_id(tag: str) -> str:
    return f"matrix-{tag}-{next(_ids)}"


@dataclasses.dataclass(frozen=True)
class Probe:
    """A representative request for one path the gateway answers."""

    method: str
    path: str
    body: Any = None
    admin_only: bool = False  # model management and /admin/api/*
    relayed: bool = True  # reaches the backend when allowed (False: answered by the gateway)
    ok: tuple[int, ...] = (200,)  # the allowed answer (the backend's own, when relayed)

    @property
    def openai_family(self) -> bool:
        return self.path.startswith("/v1/") or self.path.startswith("/admin/api/")

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


GEN = {"stream": False}
PROBES = [
    Probe("GET", "/api/tags"),
    Probe("GET", "/api/ps"),
    Probe("GET", "/api/version"),
    Probe("POST", "/api/show", {"model": "llama3.2"}),
    Probe("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi", **GEN}),
    Probe("POST", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                                **GEN}),
    Probe("POST", "/api/embed", {"model": "all-minilm", "input": "hi"}),
    Probe("POST", "/api/embeddings", {"model": "all-minilm", "prompt": "hi"}),
    Probe("POST", "/v1/chat/completions",
          {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}),
    Probe("POST", "/v1/completions", {"model": "llama3.2", "prompt": "hi"}),
    Probe("POST", "/v1/embeddings", {"model": "all-minilm", "input": "hi"}),
    Probe("GET", "/v1/models"),
    Probe("GET", "/v1/models/llama3.2"),
    # Model management: admin only. The copy's destination is what the delete removes,
    # so an admin leaves the simulator's catalogue as it found it.
    Probe("POST", "/api/pull", {"model": "llama3.2"}, admin_only=True),
    Probe("POST", "/api/copy", {"source": "llama3.2", "destination": "matrix-copy"},
          admin_only=True),
    Probe("DELETE", "/api/delete", {"model": "matrix-copy"}, admin_only=True),
    # The simulator serves no blobs: gin's own 404 is the backend's answer.
    Probe("HEAD", "/api/blobs/sha256:x", admin_only=True, ok=(404,)),
    Probe("GET", "/v1/me", relayed=False),
    Probe("GET", "/v1/usage", relayed=False),
    Probe("GET", "/admin/api/users", admin_only=True, relayed=False),
    Probe("GET", "/admin/api/usage", admin_only=True, relayed=False),
    Probe("GET", "/admin/api/backends", admin_only=True, relayed=False),
]


def reached_backend(stack: Stack, rid: str) -> bool:
    """Whether the simulator saw the request with this X-Request-Id."""
    wanted = rid.encode()
    return any(value == wanted for record in stack.sim.records
               for name, value in record.headers if name == b"x-request-id")


async def send(client: httpx.AsyncClient, probe: Probe, headers: dict[str, str],
               rid: str) -> httpx.Response:
    return await client.request(probe.method, probe.path, json=probe.body,
                                headers={**headers, "X-Request-Id": rid})


def refusal_problems(probe: Probe, response: httpx.Response, status: int) -> list[str]:
    """What is wrong with a refusal: status, WWW-Authenticate on 401, the family's body."""
    problems = []
    if response.status_code != status:
        problems.append(f"status {response.status_code}, expected {status}: {response.text[:200]}")
        return problems
    if status == 401 and response.headers.get("www-authenticate") != "Bearer":
        problems.append(f"WWW-Authenticate is {response.headers.get('www-authenticate')!r}")
    if probe.method == "HEAD":
        return problems  # no body to judge
    try:
        body = response.json()
    except ValueError:
        return problems + [f"body is not JSON: {response.text[:200]!r}"]
    error = body.get("error") if isinstance(body, dict) else None
    if probe.openai_family:
        if not (isinstance(error, dict) and isinstance(error.get("message"), str)
                and error["message"] and "type" in error and "code" in error):
            problems.append(f"not an OpenAI-shaped error: {body}")
    elif not (isinstance(error, str) and error and list(body) == ["error"]):
        problems.append(f"not a native error: {body}")
    return problems


# ------------------------------------------------------------------ callers


class Admin:
    """Admin API calls the tests need, with the stack's bootstrap admin key."""

    def __init__(self, client: httpx.AsyncClient, stack: Stack) -> None:
        self.client = client
        self.headers = stack.headers

    async def call(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        response = await self.client.request(method, path, json=body, headers=self.headers)
        assert response.status_code == status, (method, path, response.text)
        return response.json() if response.content else None

    async def create_user(self, name: str, role: str = "user") -> str:
        return (await self.call("POST", "/admin/api/users", {"name": name, "role": role},
                                status=201))["key"]


Setup = Callable[[Admin, Stack], Awaitable[dict[str, str]]]


async def no_key(admin: Admin, stack: Stack) -> dict[str, str]:
    return {}


async def malformed_key(admin: Admin, stack: Stack) -> dict[str, str]:
    return {"Authorization": "Bearer op-not a key"}


async def unknown_key(admin: Admin, stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_key()}"}


async def revoked_key(admin: Admin, stack: Stack) -> dict[str, str]:
    key = await admin.create_user("revoked")
    await admin.call("DELETE", f"/admin/api/keys/{key_prefix(key)}", status=204)
    return {"Authorization": f"Bearer {key}"}


async def expired_key(admin: Admin, stack: Stack) -> dict[str, str]:
    await admin.create_user("expired")
    made = await admin.call("POST", "/admin/api/users/expired/keys",
                            {"expires_at": "2020-01-01T00:00:00Z"}, status=201)
    return {"Authorization": f"Bearer {made['key']}"}


async def suspended_user(admin: Admin, stack: Stack) -> dict[str, str]:
    key = await admin.create_user("suspended")
    await admin.call("PATCH", "/admin/api/users/suspended", {"suspended": True})
    return {"Authorization": f"Bearer {key}"}


async def deleted_user(admin: Admin, stack: Stack) -> dict[str, str]:
    key = await admin.create_user("deleted")
    await admin.call("DELETE", "/admin/api/users/deleted", status=204)
    return {"Authorization": f"Bearer {key}"}


async def plain_user(admin: Admin, stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {await admin.create_user('alice')}"}


async def admin_user(admin: Admin, stack: Stack) -> dict[str, str]:
    return dict(stack.headers)


async def user_via_x_api_key(admin: Admin, stack: Stack) -> dict[str, str]:
    return {"X-API-Key": await admin.create_user("alice")}


# (setup, what every refused probe answers, or None for a working key; is the caller an admin)
CALLERS: dict[str, tuple[Setup, int | None, bool]] = {
    "no key": (no_key, 401, False),
    "malformed key": (malformed_key, 401, False),
    "unknown key": (unknown_key, 401, False),
    "revoked key": (revoked_key, 401, False),
    "expired key": (expired_key, 401, False),
    "suspended user": (suspended_user, 403, False),
    "deleted user's key": (deleted_user, 401, False),
    "user": (plain_user, None, False),
    "admin": (admin_user, None, True),
    "user via X-API-Key": (user_via_x_api_key, None, False),
}


@pytest.mark.parametrize("caller", list(CALLERS))
async def test_authorisation_matrix(stack: Stack, caller: str) -> None:
    """Every proxied, self-service and admin path answers this caller as the README's key rules say."""
    setup, refused_with, is_admin = CALLERS[caller]
    problems: list[str] = []
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            headers = await setup(Admin(client, stack), stack)
            for probe in PROBES:
                rid = request_id(caller.replace(" ", "-").replace("'", ""))
                response = await send(client, probe, headers, rid)
                expected = refused_with
                if expected is None and probe.admin_only and not is_admin:
                    expected = 403
                if expected is not None:
                    found = refusal_problems(probe, response, expected)
                    if reached_backend(stack, rid):
                        found.append("a refused request reached the backend")
                else:
                    found = []
                    if response.status_code not in probe.ok:
                        found.append(f"status {response.status_code}, expected {probe.ok}: "
                                     f"{response.text[:200]}")
                    if reached_backend(stack, rid) != probe.relayed:
                        found.append("reached the backend" if not probe.relayed
                                     else "never reached the backend")
                problems += [f"{probe}: {p}" for p in found]
    assert not problems, f"caller {caller!r}:\n" + "\n".join(problems)


async def test_refused_requests_leave_no_trace_in_the_simulator(stack: Stack) -> None:
    """A batch of refused generation requests adds not one record to the simulator."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            user = await Admin(client, stack).create_user("bob")

            def generation_records() -> int:
                return sum(1 for r in stack.sim.records if r.path == "/api/chat")

            before = generation_records()
            body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
            for headers in ({}, {"Authorization": f"Bearer {new_key()}"},
                            {"Authorization": "Basic Ym9iOnNlY3JldA=="},
                            {"X-API-Key": "garbage"}):
                response = await client.post("/api/chat", json=body, headers=headers)
                assert response.status_code == 401, response.text
            await Admin(client, stack).call("PATCH", "/admin/api/users/bob", {"suspended": True})
            response = await client.post("/api/chat", json=body,
                                         headers={"Authorization": f"Bearer {user}"})
            assert response.status_code == 403, response.text
            assert generation_records() == before


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nonsense"}],
                         ids=["no key", "bad key"])
async def test_public_paths_need_no_key(stack: Stack, method: str, headers: dict[str, str]) -> None:
    """``/`` and ``/health`` answer anyone, with or without a (bad) key."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5, headers=headers) as client:
            root = await client.request(method, "/")
            assert root.status_code == 200
            health = await client.request(method, "/health")
            assert health.status_code == 200
            if method == "GET":
                assert root.text == "Ollama is running"
                assert health.json()["status"] == "ok"


async def test_key_changes_take_effect_on_the_very_next_request(stack: Stack) -> None:
    """Revoke, suspend, resume and delete through the API hold from the next request on."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as admin_client, \
                httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            admin = Admin(admin_client, stack)
            first = await admin.create_user("carol")
            second = (await admin.call("POST", "/admin/api/users/carol/keys", {},
                                       status=201))["key"]

            async def status(key: str, path: str = "/api/tags") -> int:
                # One keep-alive connection: nothing is re-established between changes.
                response = await client.get(path, headers={"Authorization": f"Bearer {key}"})
                return response.status_code

            assert (await status(first), await status(second)) == (200, 200)
            await admin.call("DELETE", f"/admin/api/keys/{key_prefix(first)}", status=204)
            assert (await status(first), await status(second)) == (401, 200)

            await admin.call("PATCH", "/admin/api/users/carol", {"suspended": True})
            assert await status(second) == 403
            assert await status(second, "/v1/me") == 403
            await admin.call("PATCH", "/admin/api/users/carol", {"suspended": False})
            assert await status(second) == 200

            await admin.call("PATCH", "/admin/api/users/carol", {"role": "admin"})
            assert await status(second, "/admin/api/users") == 200
            await admin.call("PATCH", "/admin/api/users/carol", {"role": "user"})
            assert await status(second, "/admin/api/users") == 403

            await admin.call("DELETE", "/admin/api/users/carol", status=204)
            assert (await status(second), await status(second, "/v1/me")) == (401, 401)


async def test_key_expiring_while_indexed_is_refused(stack: Stack,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A key that expires after the index was loaded is refused (401) once its time passes."""
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
            admin = Admin(client, stack)
            await admin.create_user("dave")
            made = await admin.call("POST", "/admin/api/users/dave/keys",
                                    {"expires_at": "2999-01-01T00:00:00Z"}, status=201)
            headers = {"Authorization": f"Bearer {made['key']}"}
            assert (await client.get("/api/tags", headers=headers)).status_code == 200
            # The clock auth reads jumps past the expiry; the index is not reloaded.
            far_future = 32503680000.0 + 3600  # 3000-01-01T01:00Z
            monkeypatch.setattr(identity, "time", types.SimpleNamespace(time=lambda: far_future))
            response = await client.get("/api/tags", headers=headers)
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"] == "Bearer"
            assert (await client.get("/api/tags", headers=stack.headers)).status_code == 200
