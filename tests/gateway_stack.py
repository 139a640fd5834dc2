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
from ollama_proxy.backends.registry import Backend
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


# --------------------------------------------------------------------------- several backends


@dataclasses.dataclass
class Fleet:
    """Several backends (simulators, or any server by URL) behind one gateway whose
    config is an ini file naming them ``[upstream.NAME]``."""

    sims: dict[str, Simulator]  # the simulated backends, by upstream name
    urls: dict[str, str]  # every backend's URL, by upstream name
    scopes: dict[str, tuple[trio.CancelScope, trio.Event]]  # a simulator's (``kill``), by name
    gateway: Gateway
    url: str
    sink: MemorySink
    key: str
    ini: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def backend(self, name: str) -> Backend:
        found = self.gateway.backends.by_name(name)
        assert found is not None, name
        return found

    async def learn(self) -> None:
        """Make the gateway learn every backend's list and health now."""
        async with trio.open_nursery() as nursery:
            for backend in self.gateway.backends.backends:
                nursery.start_soon(backend.refresh)
        await self.gateway.backends.check_all()

    def landed(self) -> dict[str, int]:
        """How many client requests reached each simulator."""
        return {name: len(relayed(sim)) for name, sim in self.sims.items()}

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Return once ``predicate()`` holds, checked whenever a simulator's records change."""
        if predicate():
            return
        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as race:
                async def watch(sim: Simulator) -> None:
                    await sim.wait_for(lambda _: predicate(), timeout_s + 1)
                    race.cancel_scope.cancel()

                for sim in self.sims.values():
                    race.start_soon(watch, sim)

    async def kill(self, name: str) -> None:
        """Stop a simulator: its connections cut, its port closed once this returns."""
        scope, stopped = self.scopes[name]
        scope.cancel()
        await stopped.wait()

    async def revive(self, nursery: trio.Nursery, name: str, sim: Simulator) -> None:
        """A new simulator on the killed one's port."""
        port = int(self.urls[name].rsplit(":", 1)[1])
        self.sims[name] = sim
        scope, stopped, _ = await start_simulator(nursery, sim, port)
        self.scopes[name] = scope, stopped


async def start_simulator(nursery: trio.Nursery, sim: Simulator, port: int = 0
                          ) -> tuple[trio.CancelScope, trio.Event, str]:
    """Run ``sim`` on loopback in a scope of its own: the scope (cancel it to kill the
    simulator), an event set once it stopped, and its URL."""
    scope, stopped = trio.CancelScope(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        try:
            with scope:
                await run_simulator(sim, "127.0.0.1", port, task_status=task_status)
        finally:
            stopped.set()

    host, bound = await nursery.start(run)
    return scope, stopped, f"http://{host}:{bound}"


def _ini_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def start_fleet(nursery: trio.Nursery, directory: str,
                      backends: dict[str, Simulator | str],
                      upstream: dict[str, dict[str, object]] | None = None,
                      routing: dict[str, object] | None = None,
                      aliases: dict[str, str] | None = None,
                      env: dict[str, str] | None = None) -> Fleet:
    """Start the simulators of ``backends`` (a URL string: a server already running) and a
    gateway with ``[upstream.NAME]`` for each (``upstream[NAME]``: its other keys), the
    ``[routing]`` and ``[aliases]`` given; model lists and health checks are slow
    (``refresh_s``/``health_interval_s`` 3600 unless given): ``Fleet.learn`` does them now."""
    sims: dict[str, Simulator] = {}
    urls: dict[str, str] = {}
    scopes: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
    for name, given in backends.items():
        if isinstance(given, str):
            urls[name] = given
            continue
        scope, stopped, urls[name] = await start_simulator(nursery, given)
        scopes[name] = scope, stopped
        sims[name] = given
    ini = os.path.join(directory, "gateway.ini")
    lines = ["[server]", "listen = 127.0.0.1:0", f"database = {os.path.join(directory, 'gw.db')}",
             "[routing]"]
    lines += [f"{k} = {_ini_value(v)}" for k, v in
              {"refresh_s": 3600, "health_interval_s": 3600, **(routing or {})}.items()]
    for name, url in urls.items():
        lines += [f"[upstream.{name}]", f"url = {url}"]
        lines += [f"{k} = {_ini_value(v)}" for k, v in (upstream or {}).get(name, {}).items()]
    if aliases:
        lines += ["[aliases]", *(f"{k} = {v}" for k, v in aliases.items())]
    with open(ini, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    config = load_config(ini, env=env or {})
    gateway, url, sink, key = await start_gateway(nursery, config)
    fleet = Fleet(sims, urls, scopes, gateway, url, sink, key, ini)
    await fleet.learn()
    return fleet
