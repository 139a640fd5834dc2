"""Composition root: builds the gateway's objects from a ``Config`` and runs
them in one nursery tree; SIGINT/SIGTERM drain in-flight streams, then exit."""

from __future__ import annotations

import logging
import signal

import trio

from .backends import Backend, Router
from .config import Config, ServerConfig, UpstreamConfig
from .relay import LogUsageSink, Relay, UsageSink
from .server import HttpServer, ServerSettings
from .upstream import PoolSettings, UpstreamPool

log = logging.getLogger("ollama_proxy.app")


def server_settings(cfg: ServerConfig) -> ServerSettings:
    return ServerSettings(
        max_body_bytes=cfg.max_body_bytes,
        max_header_bytes=cfg.max_header_bytes,
        header_timeout_s=cfg.header_timeout_s,
        keepalive_timeout_s=cfg.keepalive_timeout_s,
    )


def make_backend(cfg: UpstreamConfig) -> Backend:
    pool = UpstreamPool(PoolSettings(
        host=cfg.host,
        port=cfg.port,
        max_connections=cfg.max_connections,
        connect_timeout_s=cfg.connect_timeout_s,
        first_byte_timeout_s=cfg.first_byte_timeout_s,
        chunk_gap_timeout_s=cfg.chunk_gap_timeout_s,
    ))
    return Backend(cfg.name, kind=cfg.kind, url=cfg.url, base_path=cfg.base_path,
                   api_key=cfg.api_key, pool=pool)


class Gateway:
    """The whole gateway for one ``Config``; ``run`` serves until drained."""

    def __init__(self, config: Config, *, sink: UsageSink | None = None) -> None:
        self.config = config
        self.router = Router([make_backend(u) for u in config.upstreams])
        self.relay = Relay(self.router, sink or LogUsageSink(),
                           max_response_bytes=config.server.max_body_bytes * 4)
        self.server = HttpServer(self.relay.handle, server_settings(config.server))

    def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting; in-flight responses get ``grace_s`` (default ``drain_s``)."""
        self.server.drain(self.config.server.drain_s if grace_s is None else grace_s)

    async def run(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until drained; ``task_status.started`` gets the bound ``(host, port)``."""
        cfg = self.config.server
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.router.run_health_checks)
                if handle_signals:
                    nursery.start_soon(self._drain_on_signals)
                await self.server.serve(cfg.host, cfg.port, task_status=task_status)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.router.aclose()

    async def _drain_on_signals(self) -> None:
        """First signal: drain for ``drain_s``. A second one: stop now."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            grace = self.config.server.drain_s
            async for signum in signals:
                log.info("%s: no new connections; in-flight requests get %g s",
                         signal.Signals(signum).name, grace)
                self.drain(grace)
                grace = 0.0
