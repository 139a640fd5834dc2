"""Composition root: builds the gateway's objects from a ``Config`` and runs
them in one nursery tree; SIGINT/SIGTERM drain in-flight streams, then exit;
SIGHUP (like ``POST /admin/api/reload``) re-reads the config."""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import trio

from . import __version__
from .access.counters_from_ledger import Backlog, load_counters
from .access.identity import KeyIndex
from .access.limiter import Limiter
from .admin.api import AdminApi
from .admin.metrics_page import MetricsPage
from .admin.status import Status
from .api.prompt_overhead import PromptOverheads
from .api.record import RequestRecord
from .backends.registry import Backend, BackendSet, BackendSpec
from .backends.router import Router
from .backends.settings import RoutingSettings
from .config import Config, ServerConfig, UpstreamConfig, settings
from .dispatch import DispatchTable, gateway_table
from .errors import BadRequest, ConfigError, ProxyError
from .http.client import PoolSettings, UpstreamPool, tls_context
from .http.clientip import AddressPolicy
from .http.messages import Request
from .http.responder import Responder
from .http.server import HttpServer, ServerSettings
from .observe.access_log import AccessLog
from .observe.metrics import BackendState, GatewayMetrics
from .proxy.metering import Metering
from .proxy.recount import Recounter
from .proxy.relay import ProxyHandler
from .store import accounts
from .store.threads import LedgerWriter, Store

log = logging.getLogger("ollama_proxy.app")

# Config sections a reload applies at once; a change anywhere else needs a restart.
LIVE_SECTIONS = ("limits", "log", "aliases", "upstream")
BACKLOG_RETRY_S = 5.0  # after a failed read of the ledger rows the quotas miss at start


# File descriptors kept for what is not a connection: the database and its journal
# files, listeners, the ledger's wake-up sockets, the event loop, logs.
RESERVED_FDS = 64
# Without resource limits to read (not Unix), the cap is this; it is never below
# MIN_CONNECTIONS, and by default never above MAX_DEFAULT_CONNECTIONS (each connection is
# memory too: where the open-file limit is a million, it alone would bound nothing).
FALLBACK_CONNECTIONS = 1024
MIN_CONNECTIONS = 16
MAX_DEFAULT_CONNECTIONS = 16384


def open_file_limit() -> int | None:
    """The open-file limit, with the soft limit raised to the hard one first (as Go
    programs do): a server's connections are file descriptors. None when unknown."""
    try:
        import resource
    except ImportError:  # not Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return None if soft == resource.RLIM_INFINITY else int(soft)


def connection_cap(nofile: int | None, pool_connections: int) -> int:
    """The default ``max_connections``: the file descriptors left after the reserve
    and the backend connections. Each request in flight holds one backend
    connection, so those take at most half of what is left."""
    if nofile is None:
        return FALLBACK_CONNECTIONS
    budget = nofile - RESERVED_FDS
    return max(MIN_CONNECTIONS,
               min(MAX_DEFAULT_CONNECTIONS, budget - min(pool_connections, budget // 2)))


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Settings = TypeVar("Settings", bound="DataclassInstance")


def from_section(cls: type[Settings], section: object, **derived: Any) -> Settings:
    """A settings dataclass of a lower layer, each field the config section's value of the
    same name, but those ``derived`` here: the config stays the one source of values."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{name: getattr(section, name) for name in names if name not in derived},
               **derived)


def server_settings(cfg: ServerConfig, upstreams: tuple[UpstreamConfig, ...] = ()) -> ServerSettings:
    max_connections = cfg.max_connections
    if max_connections is None:
        max_connections = connection_cap(open_file_limit(),
                                         sum(u.max_connections for u in upstreams))
    return from_section(ServerSettings, cfg, max_connections=max_connections,
                        addresses=AddressPolicy(cfg.allow, cfg.deny, cfg.trusted_proxies))


def pool_settings(cfg: UpstreamConfig) -> PoolSettings:
    tls = tls_context(cfg.ca_file, cfg.tls_verify) if cfg.scheme == "https" else None
    return from_section(PoolSettings, cfg, tls=tls)


# The [upstream.NAME] keys a reload changes on the running backend; any other change
# (its address, kind, TLS, timeouts, pool) makes a new one.
ROUTING_KEYS = ("priority", "slots", "models", "max_model_bytes", "api_key")


def backend_spec(cfg: UpstreamConfig) -> BackendSpec:
    return BackendSpec(cfg.name, kind=cfg.kind, url=cfg.url, base_path=cfg.base_path,
                       api_key=cfg.api_key, priority=cfg.priority, slots=cfg.slots,
                       globs=cfg.models or None, max_model_bytes=cfg.max_model_bytes)


def _connection(cfg: object) -> tuple[object, ...]:
    """What of a backend's config its connections depend on (its routing keys aside)."""
    assert isinstance(cfg, UpstreamConfig)
    return tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                 if f.name not in ROUTING_KEYS)


def make_backend(cfg: UpstreamConfig, routing: RoutingSettings) -> Backend:
    if cfg.scheme == "https" and not cfg.tls_verify:
        log.warning("backend %s: tls_verify = false: its certificate and name are not checked "
                    "(for testing only)", cfg.name)
    backend = Backend(backend_spec(cfg), UpstreamPool(pool_settings(cfg)), routing)
    backend.origin = cfg
    return backend


def _counted(config: Config) -> list[str]:
    """The backends whose streams without usage are counted with their tokenizer."""
    return [u.name for u in config.upstreams if u.tokenize == "auto"]


def _flat_settings(config: Config) -> dict[str, str]:
    """``{"section.key": value}`` of every effective setting."""
    return {f"{section}.{key}": value for section, values in settings(config).items()
            for key, value in values.items()}


class Gateway:
    """The whole gateway for one ``Config``; ``run`` serves until drained.

    The ledger gets every request's record before the response ends; the access
    log and ``on_record`` (tests read it) get it right after. ``loader``
    re-reads the config (``reload``); without one there is nothing to re-read.
    """

    def __init__(self, config: Config, *,
                 on_record: Callable[[RequestRecord], None] | None = None,
                 admin_key: str | None = None,
                 loader: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._loader = loader
        # What templates add to prompts, learned from exact counts: the limits' reservations
        # and the estimated usage rows both add it to the text.
        self.overheads = PromptOverheads()
        self.limiter = Limiter(config.limits, overheads=self.overheads)
        routing = config.routing
        self.backends = BackendSet([make_backend(u, routing) for u in config.upstreams], routing)
        self.router = Router(self.backends)
        self.store = Store(config.server.database)  # accounts: keys, users, audit
        self.reports = Store(config.server.database)  # usage reports, never in the way of those
        self.metrics = GatewayMetrics(per_user=config.metrics.per_user, version=__version__,
                                      backends=self._backend_states)
        self.ledger = LedgerWriter(config.server.database, wait=config.server.ledger_wait,
                                   on_commit=self.metrics.ledger_committed)
        # Streams whose backend reports no usage, counted with its tokenizer afterwards.
        self.recounter = Recounter(
            self.backends.backends, _counted(config),
            self.overheads, self.ledger.amend, on_exact=[self.limiter.amend])
        try:
            self.access_log = AccessLog(config.log.access)
        except OSError as err:
            raise ConfigError(f"[log] access = {config.log.access}: cannot open it: "
                              f"{err.strerror}") from None
        self.metering = Metering(
            self.ledger, on_built=[self.limiter.settle, self.overheads.observe],
            estimate_prompt=self.overheads.estimate, access_log=self.access_log,
            recounter=self.recounter, observers=[on_record] if on_record else [],
            metrics=self.metrics.observe)
        self._admin_key = admin_key
        self.secret = b""  # the key-hashing secret, once the database is open
        self._nursery: trio.Nursery | None = None  # background tasks, while running
        self.index: KeyIndex | None = None
        self.relay: ProxyHandler | None = None
        self.admin: AdminApi | None = None
        self.table: DispatchTable | None = None  # every path, once relay and admin exist
        self.server = HttpServer(self._handle, server_settings(config.server, config.upstreams))

    def _backend_states(self) -> list[BackendState]:
        """Each backend's gauges for /metrics, read when scraped."""
        router = self.router
        return [(b.name, bool(b.health.up), b.requests, router.queued_for(b))
                for b in self.backends.backends]

    async def _handle(self, request: Request, responder: Responder) -> None:
        assert self.table is not None
        await self.table.handle(request, responder)

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
        self.admin = AdminApi(self.store, self.reports, self.ledger.touch, index, secret,
                              self.router, self.limiter, self.reload)
        return index

    async def reload(self, actor: str) -> dict[str, Any]:
        """Re-read the config: new ``[limits]`` defaults, ``[aliases]``, backends
        (``[upstream.NAME]``) and log level hold from the next request (one in flight keeps
        its target and backend); other changes are named as needing a restart. A bad file
        is a 400 and the running config stays."""
        if self._loader is None:
            raise BadRequest("this gateway was not started from a config it can re-read",
                             code="invalid_config")
        try:
            new = await trio.to_thread.run_sync(self._loader)
        except ConfigError as err:
            raise BadRequest(f"config not reloaded, the running one is kept: {err.message}",
                             code="invalid_config") from None
        try:  # first, as it can fail: a file is opened again (rotated logs start anew)
            self.access_log.reopen(new.log.access)
        except OSError as err:
            raise BadRequest(f"config not reloaded, the running one is kept: [log] access = "
                             f"{new.log.access}: cannot open it: {err.strerror}",
                             code="invalid_config") from None
        before, after = _flat_settings(self.config), _flat_settings(new)
        changed = [name for name in dict.fromkeys([*before, *after])
                   if before.get(name) != after.get(name)]
        self.limiter.set_defaults(new.limits)
        if self.relay is not None:
            self.relay.aliases = new.aliases
        self._swap_backends(new)
        if new.log.level != self.config.log.level:
            logging.getLogger().setLevel(new.log.level.upper())
        self.config = dataclasses.replace(self.config, limits=new.limits, log=new.log,
                                          aliases=new.aliases, upstreams=new.upstreams)
        answer = {
            "reloaded": new.source,
            "applied": [c for c in changed if c.split(".")[0] in LIVE_SECTIONS],
            "restart_needed": [c for c in changed if c.split(".")[0] not in LIVE_SECTIONS],
        }
        await self.store.call(accounts.audit, actor, "config.reload", new.source or "", answer)
        return answer

    def _swap_backends(self, new: Config) -> None:
        """Backends added, removed or changed by a reload. One whose address and
        connection settings are unchanged is the same object, its routing keys updated
        (its requests in flight, slots in use, health and lists stay); one removed, or
        now elsewhere, finishes its requests in flight, then its connections close."""
        if new.upstreams == self.config.upstreams:
            return
        current = {b.name: b for b in self.backends.backends}
        routing = self.backends.routing
        fresh = []
        for cfg in new.upstreams:
            backend = current.get(cfg.name)
            if backend is None or _connection(cfg) != _connection(backend.origin):
                backend = make_backend(cfg, routing)
            elif cfg != backend.origin:
                backend.reconfigure(backend_spec(cfg))
                backend.origin = cfg
            fresh.append(backend)
        for backend in self.backends.replace(fresh):
            log.info("backend %s removed or moved by the reload: it finishes its %d "
                     "requests in flight", backend.name, backend.requests)
            if self._nursery is not None:
                self._nursery.start_soon(self.backends.close_retired, backend)
        self.recounter.set_backends(fresh, _counted(new))
        self.router.wake_all()

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
            await self.reports.open()
            # Before the first request: a restart neither resets a window nor forgets a quota.
            self.limiter.store, backlog = await self.reports.call(load_counters,
                                                                  self.limiter.clock())
            self.relay = ProxyHandler(self.router, index, self.metering, steps=[self.limiter],
                                      aliases=self.config.aliases,
                                      max_response_bytes=cfg.max_response_bytes)
            assert self.admin is not None
            metrics = MetricsPage(self.metrics.render, self.config.metrics.allow, index)
            self.table = gateway_table(self.relay.handle, self.admin, Status(self.backends),
                                       metrics.handle)
            self.table.on_refused = self.metrics.refused
            async with trio.open_nursery() as nursery:
                await nursery.start(self.ledger.run)
                if backlog is not None:  # a long one is summed while the gateway serves
                    await nursery.start(self._count_backlog, backlog)
                await nursery.start(self.recounter.run)
                nursery.start_soon(index.keep_fresh)
                nursery.start_soon(self.backends.run_health_checks)
                nursery.start_soon(self.router.run)
                self._nursery = nursery
                nursery.start_soon(self.access_log.run)
                if handle_signals:
                    nursery.start_soon(self._drain_on_signals)
                    if hasattr(signal, "SIGHUP"):  # not on Windows
                        nursery.start_soon(self._reload_on_sighup)
                await self.server.serve(cfg.host, cfg.port, task_status=task_status)
                with trio.move_on_after(cfg.drain_s + 5):  # drained: commit what is pending
                    await self.ledger.flush()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.backends.aclose()
                await self.store.aclose()
                await self.reports.aclose()
            self.access_log.close()

    async def _count_backlog(self, backlog: Backlog, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """Sum the ledger rows the quotas miss; meanwhile (from ``started`` on) requests
        that a token quota counts wait."""
        summed = trio.Event()
        self.limiter.quota_pending = summed.wait
        task_status.started()
        while True:
            try:
                sums = await self.reports.call(backlog.sums)
                break
            except Exception:
                log.exception("summing the ledger rows not yet in the usage summaries failed "
                              "(requests with a token quota wait): retrying")
                await trio.sleep(BACKLOG_RETRY_S)
        backlog.add(self.limiter.store, sums, self.limiter.clock())
        self.limiter.quota_pending = None
        summed.set()

    async def _drain_on_signals(self) -> None:
        """First signal: drain for ``drain_s``. A second one: stop now."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            grace = self.config.server.drain_s
            async for signum in signals:
                log.info("%s: no new connections; in-flight requests get %g s",
                         signal.Signals(signum).name, grace)
                self.drain(grace)
                grace = 0.0

    async def _reload_on_sighup(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                try:
                    answer = await self.reload("SIGHUP")
                except ProxyError as err:
                    log.error("SIGHUP: %s", err.message)
                    continue
                log.info("SIGHUP: config reloaded; applied: %s; needs a restart: %s",
                         ", ".join(answer["applied"]) or "nothing",
                         ", ".join(answer["restart_needed"]) or "nothing")
