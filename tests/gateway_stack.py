"""The simulated Ollama and the gateway in front of it, in-process on
OS-chosen loopback ports, plus a usage sink that tests can read."""

from __future__ import annotations

import dataclasses
from typing import Callable

import trio

from ollama_proxy.app import Gateway
from ollama_proxy.config import load_config
from ollama_proxy.relay import UsageRecord
from ollama_proxy.simulator import Simulator, run_simulator


class MemorySink:
    """Keeps usage records in memory; ``wait_for`` wakes on every new record."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self._changed = trio.Event()

    async def record(self, record: UsageRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[list[UsageRecord]], bool],
                       timeout_s: float = 5.0) -> None:
        with trio.fail_after(timeout_s):
            while not predicate(self.records):
                await self._changed.wait()


@dataclasses.dataclass
class Stack:
    sim: Simulator
    sim_url: str
    gateway: Gateway
    url: str
    sink: MemorySink


async def start_stack(nursery: trio.Nursery, sim: Simulator | None = None,
                      **upstream_overrides: float) -> Stack:
    sim = sim or Simulator()
    sim_host, sim_port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    sim_url = f"http://{sim_host}:{sim_port}"
    config = load_config(None, env={}, listen="127.0.0.1:0", upstream_urls=[sim_url])
    if upstream_overrides:
        upstreams = tuple(dataclasses.replace(u, **upstream_overrides) for u in config.upstreams)
        config = dataclasses.replace(config, upstreams=upstreams)
    sink = MemorySink()
    gateway = Gateway(config, sink=sink)
    host, port = await nursery.start(lambda task_status: gateway.run(task_status=task_status))
    return Stack(sim, sim_url, gateway, f"http://{host}:{port}", sink)
