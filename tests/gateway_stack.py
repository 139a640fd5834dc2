"""The simulated Ollama and the gateway in front of it, in-process on
OS-chosen loopback ports, plus a usage sink that tests can read."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable

import httpx
import trio

from ollama_proxy.access.keys import new_key
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.app import Gateway
from ollama_proxy.config import Config, load_config
from ollama_proxy.sim.server import SimRecord, Simulator, run_simulator
from ollama_proxy.store import db


class MemorySink:
    """Keeps usage records in memory; ``wait_for`` wakes on every new record."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self._changed = trio.Event()

    def observe(self, record: RequestRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[list[RequestRecord]], bool],
                       timeout_s: float = 5.0) -> None:
        with trio.fail_after(timeout_s):
            while not predicate(self.records):
                await self._changed.wait()

    async def record_of(self, request_id: str) -> RequestRecord:
        """The record of one request. Observers hear of it in the metering's after
        phase, once its response went out, so a client can be quicker: wait."""
        await self.wait_for(lambda records: any(r.request_id == request_id for r in records))
        return next(r for r in self.records if r.request_id == request_id)


@dataclasses.dataclass
class Stack:
    sim: Simulator
    sim_url: str
    gateway: Gateway
    url: str
    sink: MemorySink
    key: str  # the admin key: works on every path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def relayed(sim: Simulator) -> list[SimRecord]:
    """What reached the simulator from clients, without the gateway's own requests
    (health checks, model lists): those carry no X-Request-Id."""
    return [r for r in sim.records
            if any(name.lower() == b"x-request-id" for name, _ in r.headers)]


def _scratch_dir() -> str:
    path = tempfile.mkdtemp(prefix="ollama-proxy-test-")
    atexit.register(shutil.rmtree, path, True)
    return path


def gateway_config(upstream_urls: list[str], env: dict[str, str] | None = None,
                   **upstream_overrides: float) -> Config:
    """A config for tests: OS-chosen port, a fresh database, the given backends (named
    default, default2, ...; ``env`` may set their other keys)."""
    config = load_config(None, env=env or {}, listen="127.0.0.1:0", upstream_urls=upstream_urls)
    server = dataclasses.replace(config.server, database=os.path.join(_scratch_dir(), "test.db"))
    upstreams = tuple(dataclasses.replace(u, **upstream_overrides) for u in config.upstreams)
    return dataclasses.replace(config, server=server, upstreams=upstreams)


async def start_gateway(nursery: trio.Nursery, config: Config) -> tuple[Gateway, str, MemorySink, str]:
    """Run a gateway; returns it, its URL, the usage observer and the admin key."""
    sink = MemorySink()
    key = new_key()
    gateway = Gateway(config, on_record=sink.observe, admin_key=key)
    host, port = await nursery.start(lambda task_status: gateway.run(task_status=task_status))
    return gateway, f"http://{host}:{port}", sink, key


async def start_stack(nursery: trio.Nursery, sim: Simulator | None = None,
                      **upstream_overrides: float) -> Stack:
    sim = sim or Simulator()
    sim_host, sim_port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    sim_url = f"http://{sim_host}:{sim_port}"
    gateway, url, sink, key = await start_gateway(
        nursery, gateway_config([sim_url], **upstream_overrides))
    return Stack(sim, sim_url, gateway, url, sink, key)


def bearer(key: str, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return headers


async def new_user(client: httpx.AsyncClient, stack: Stack, name: str, **limits: Any) -> str:
    response = await client.post(stack.url + "/admin/api/users", headers=stack.headers,
                                 json={"name": name, "limits": limits})
    assert response.status_code == 201, response.text
    return response.json()["key"]


def forwarded(stack: Stack, request_id: str) -> list[SimRecord]:
    """The simulator's records of the request that carried ``request_id``."""
    wanted = request_id.encode()
    return [r for r in stack.sim.records if (b"x-request-id", wanted) in r.headers]


def ledger_rows(database: str, user: str) -> list[dict[str, Any]]:
    conn = db.connect(database)
    try:
        rows = conn.execute("SELECT request_id, endpoint, status, outcome, prompt_tokens, "
                            "completion_tokens FROM ledger WHERE user = ?", (user,)).fetchall()
    finally:
        conn.close()
    names = ("request_id", "endpoint", "status", "outcome", "prompt_tokens", "completion_tokens")
    return [dict(zip(names, row)) for row in rows]
