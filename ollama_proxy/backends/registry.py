"""The configured backends, their health, and the order to try them in for a request.

Today a ``BackendSet`` knows one or more backends and their health (probed,
and learned passively from real requests) and hands out candidates in order
of preference; choosing by model, load-aware choice and fair queues grow here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import ProxyError
from ..http.client import UpstreamPool
from ..http.messages import host_port

if TYPE_CHECKING:
    from ..api.exchange import Exchange

log = logging.getLogger("ollama_proxy.backends")

HEALTH_INTERVAL_S = 10.0
HEALTH_TIMEOUT_S = 5.0


@dataclass(slots=True)
class BackendState:
    up: bool | None = None  # None: not probed yet
    last_error: str | None = None


class Backend:
    """One upstream server: its address, kind, credentials, pool and health."""

    def __init__(self, name: str, *, kind: str, url: str, base_path: str,
                 api_key: str | None, pool: UpstreamPool) -> None:
        self.name = name
        self.kind = kind
        self.url = url
        self.base_path = base_path
        self.api_key = api_key
        self.pool = pool
        self.host_header = host_port(pool.settings.host, pool.settings.port).encode()
        self.state = BackendState()

    def target(self, request_target: str) -> str:
        """The request target on this backend (its URL's path prefix added)."""
        return self.base_path + request_target

    def mark(self, up: bool, error: str | None = None) -> None:
        if up != self.state.up:
            level = logging.INFO if up else logging.WARNING
            log.log(level, "backend %s is %s%s", self.name, "up" if up else "down",
                    f": {error}" if error else "")
        self.state.up = up
        self.state.last_error = error

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "kind": self.kind,
            "up": bool(self.state.up),
            "error": self.state.last_error,
            "connections": self.pool.stats(),
        }


class BackendSet:
    """The backends of one gateway and which to try for an exchange; the seam that
    grows into choosing by model."""

    def __init__(self, backends: list[Backend]) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = backends

    def candidates(self, exchange: Exchange) -> list[Backend]:
        """Backends to try in order: healthy ones first, the rest as a last resort."""
        return sorted(self.backends, key=lambda b: b.state.up is False)

    def any_up(self) -> bool:
        return any(b.state.up for b in self.backends)

    async def probe(self, backend: Backend) -> None:
        """One health check: a cheap GET that every backend of that kind answers."""
        path = "/v1/models" if backend.kind == "openai" else "/api/version"
        headers = [(b"host", backend.host_header), (b"content-length", b"0")]
        if backend.api_key:
            headers.append((b"authorization", b"Bearer " + backend.api_key.encode()))
        try:
            with trio.fail_after(HEALTH_TIMEOUT_S):
                response = await backend.pool.request("GET", backend.target(path), headers, b"")
                try:
                    await response.read_all(1 << 20)
                finally:
                    await response.aclose()
        except trio.TooSlowError:
            backend.mark(False, f"no answer to a health check within {HEALTH_TIMEOUT_S:g} s")
        except ProxyError as err:
            backend.mark(False, err.message)
        else:
            if response.status < 500:
                backend.mark(True)
            else:
                backend.mark(False, f"health check answered {response.status}")

    async def run_health_checks(self, interval_s: float = HEALTH_INTERVAL_S) -> None:
        """Probe every backend now and then every ``interval_s``, forever."""
        while True:
            async with trio.open_nursery() as nursery:
                for backend in self.backends:
                    nursery.start_soon(self.probe, backend)
            await trio.sleep(interval_s)

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.pool.close_idle()
