"""Composition root: builds the gateway's objects from a ``Config`` and runs
them in one nursery tree; SIGINT/SIGTERM drain in-flight streams, then exit."""

from __future__ import annotations

import logging
import signal

import trio

from . import accounts
from .admin import AdminApi, is_admin_path
from .auth import KeyIndex
from .backends import Backend, Router
from .config import Config, ServerConfig, UpstreamConfig
from .relay import Relay, UsageLog, UsageObserver
from .server import HttpServer, Request, Responder, ServerSettings
from .storage import LedgerWriter, Store
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
    """The whole gateway for one ``Config``; ``run`` serves until drained.

    The ledger gets every usage record before the response ends; the usage
    log line and ``observer`` (tests read it) get it right after.
    """

    def __init__(self, config: Config, *, observer: UsageObserver | None = None,
                 admin_key: str | None = None) -> None:
        self.config = config
        self.router = Router([make_backend(u) for u in config.upstreams])
        self.store = Store(config.server.database)
        self.ledger = LedgerWriter(config.server.database, wait=config.server.ledger_wait)
        self.observers: list[UsageObserver] = [UsageLog(), *([observer] if observer else [])]
        self._admin_key = admin_key
        self.secret = b""  # the key-hashing secret, once the database is open
        self.index: KeyIndex | None = None
        self.relay: Relay | None = None
        self.admin: AdminApi | None = None
        self.server = HttpServer(self._handle, server_settings(config.server))

    async def _handle(self, request: Request, responder: Responder) -> None:
        assert self.relay is not None and self.admin is not None
        if is_admin_path(request.path):
            await self.admin.handle(request, responder)
        else:
            await self.relay.handle(request, responder)

    def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting; in-flight responses get ``grace_s`` (default ``drain_s``)."""
        self.server.drain(self.config.server.drain_s if grace_s is None else grace_s)

    async def _open_accounts(self) -> KeyIndex:
        """Open the database, bootstrap the admin, load the key index."""
        await self.store.open()
        secret = await self.store.call(accounts.server_secret, self.config.server.database)
        self.secret = secret
        new_key = await self.store.call(accounts.ensure_admin, secret, self._admin_key)
        if new_key is not None:  # printed once, never logged
            print(f"Created the admin user 'admin'. Its API key, shown only this once:\n\n"
                  f"    {new_key}\n", flush=True)
        index = KeyIndex(self.store, secret)
        await index.reload()
        self.index = index
        self.admin = AdminApi(self.store, index, secret, self.router)
        return index

    async def run(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until drained; ``task_status.started`` gets the bound ``(host, port)``."""
        cfg = self.config.server
        try:
            index = await self._open_accounts()
            self.relay = Relay(self.router, self.ledger, observers=self.observers, index=index,
                               max_response_bytes=cfg.max_body_bytes * 4)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.ledger.run)
                nursery.start_soon(index.keep_fresh)
                nursery.start_soon(self.router.run_health_checks)
                if handle_signals:
                    nursery.start_soon(self._drain_on_signals)
                await self.server.serve(cfg.host, cfg.port, task_status=task_status)
                with trio.move_on_after(cfg.drain_s + 5):  # drained: commit what is pending
                    await self.ledger.flush()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.router.aclose()
                await self.store.aclose()

    async def _drain_on_signals(self) -> None:
        """First signal: drain for ``drain_s``. A second one: stop now."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            grace = self.config.server.drain_s
            async for signum in signals:
                log.info("%s: no new connections; in-flight requests get %g s",
                         signal.Signals(signum).name, grace)
                self.drain(grace)
                grace = 0.0
