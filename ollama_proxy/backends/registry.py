"""The configured backends and what the gateway knows of each: health (probed, and
learned from real requests), the models it serves and has loaded, its slots.

The trio shell around the sans-IO ``health`` and ``catalogue``: it runs the health
checks and the model-list refreshes, and keeps the set current across reloads.
Which backend a request gets is ``router``'s job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import trio

from ..api.models import canonical_model
from ..errors import ProxyError
from ..http.client import UpstreamPool
from ..http.messages import host_port
from .catalogue import Catalogue
from .health import Health
from .settings import RoutingSettings

log = logging.getLogger("ollama_proxy.backends")

HEALTH_TIMEOUT_S = 5.0
LIST_TIMEOUT_S = 10.0
RETRY_AFTER_DOWN_S = 5  # no backend up: when to ask again, at most
MISS_REFRESH_S = 1.0  # a request for an unknown model refreshes a backend's list at most this often
MAX_LIST_BYTES = 32 << 20  # a model list (10,000 models is ~5 MB)
DEFAULT_ROUTING = RoutingSettings()


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What the config says of one backend (the rest is learned)."""

    name: str
    kind: str  # "ollama" or "openai"
    url: str
    base_path: str
    api_key: str | None
    priority: int = 0
    slots: int = 0  # 0: no limit
    globs: tuple[str, ...] | None = None  # None: learn the backend's own list
    max_model_bytes: int | None = None


class Backend:
    """One upstream server: its address, credentials, pool, health, models and slots."""

    def __init__(self, spec: BackendSpec, pool: UpstreamPool,
                 routing: RoutingSettings = DEFAULT_ROUTING) -> None:
        self.spec = spec
        self.name = spec.name
        self.kind = spec.kind
        self.url = spec.url
        self.base_path = spec.base_path
        self.api_key = spec.api_key
        self.priority = spec.priority
        self.slots = spec.slots
        self.pool = pool
        self.host_header = host_port(pool.settings.host, pool.settings.port).encode()
        self.health = Health(eject_after_failures=routing.eject_after_failures,
                             eject_s=routing.eject_s)
        self.catalogue = Catalogue(kind=spec.kind, globs=spec.globs,
                                   max_model_bytes=spec.max_model_bytes)
        self.in_flight = 0  # requests holding one of its slots
        self.requests = 0  # every request in flight here, slotted or not
        self.retired = False  # removed by a reload: finishes what it has, takes nothing new
        self.drained = trio.Event()  # retired and nothing left in flight
        self.origin: object = None  # the config it was made from (a reload compares them)
        self.last_miss_refresh = float("-inf")
        self._refreshing: trio.Event | None = None
        self._idle = trio.lowlevel.ParkingLot()  # woken when ``requests`` drops to 0

    def reconfigure(self, spec: BackendSpec) -> None:
        """A reload's new routing keys (priority, slots, models, size cap, key) for the
        same server: what it has in flight, its health and its lists stay."""
        assert (spec.name, spec.kind, spec.url) == (self.name, self.kind, self.url)
        self.spec = spec
        self.priority, self.slots, self.api_key = spec.priority, spec.slots, spec.api_key
        self.catalogue.globs = spec.globs
        self.catalogue.max_model_bytes = spec.max_model_bytes

    @property
    def native(self) -> bool:
        """Whether it serves Ollama's native ``/api`` paths (an openai one: ``/v1`` only)."""
        return self.kind == "ollama"

    def target(self, request_target: str) -> str:
        """The request target on this backend (its URL's path prefix added)."""
        return self.base_path + request_target

    def warm(self, model: str) -> bool:
        return self.catalogue.warm(model)

    @property
    def list_known(self) -> bool:
        """Its globs, or a list learned from it, say which models it serves."""
        return self.spec.globs is not None or self.catalogue.learned_at is not None

    def serves(self, model: str) -> bool:
        """Known to serve ``model``; a backend whose list was never learned (and has
        no globs) may serve anything: it answers for itself."""
        return self.catalogue.serves(model) if self.list_known else True

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Headers for the gateway's own requests to it (checks, lists)."""
        headers = [(b"host", self.host_header), (b"content-length", b"0")]
        if self.api_key:
            headers.append((b"authorization", b"Bearer " + self.api_key.encode()))
        return headers

    async def fetch(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                    body: bytes, max_bytes: int = MAX_LIST_BYTES) -> tuple[int, bytes]:
        """One whole exchange, read to its end, its connection given back; ``ProxyError``
        if it fails."""
        response = await self.pool.request(method, self.target(target), headers, body)
        try:
            data = await response.read_all(max_bytes)
        finally:
            await response.aclose()
        return response.status, data or b""

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        """One GET of the gateway's own; ``ProxyError`` or ``trio.TooSlowError`` if it fails."""
        with trio.fail_after(timeout_s):
            return await self.fetch("GET", path, self.headers(), b"")

    def failed(self, error: str) -> None:
        """A request could not be served here (refused, broke before its answer, 502-504)."""
        now = trio.current_time()
        if self.health.failed(now, error):
            left = (self.health.ejected_until or now) - now
            log.warning("backend %s ejected for %g s after %d failures in a row: %s", self.name,
                        left, self.health.eject_after_failures, error)

    def unreachable(self, error: str) -> None:
        """It refused the connection: down until a health check says otherwise."""
        self.failed(error)
        self._probed(False, error)

    def succeeded(self) -> None:
        if self.health.succeeded():
            log.info("backend %s is up", self.name)

    def describe(self, queued: int = 0) -> dict[str, object]:
        """Its state for ``/admin/api/backends``; ``queued``: requests waiting that may use it."""
        now = trio.current_time()
        return {
            "name": self.name,
            "url": self.url,
            "kind": self.kind,
            **self.health.describe(now),
            "priority": self.priority,
            "slots": self.slots,
            "in_flight": self.requests,  # all its requests; those holding a slot:
            "slots_in_use": self.in_flight,
            "queued": queued,
            "models": self.catalogue.models(),
            "loaded": sorted(self.catalogue.loaded),
            "models_from": "config" if self.spec.globs is not None else "backend",
            "connections": self.pool.stats(),
            **({"retired": True} if self.retired else {}),
        }

    @property
    def busy_openai(self) -> bool:
        """An openai backend serving requests: the gateway asks it nothing of its own
        then. llama-cpp-python's server ends a running stream when any other request
        arrives (its ``interrupt_requests``, on by default); its traffic shows it is up."""
        return not self.native and self.requests > 0

    def became_idle(self) -> None:
        """Its last request in flight ended (``Lease.release``); a retired one is drained
        unless a slot is still granted to a request about to go."""
        self._idle.unpark_all()
        if self.retired and self.in_flight == 0:
            self.drained.set()

    async def wait_idle(self) -> None:
        """Until no request of a client is in flight here."""
        while self.requests:
            await self._idle.park()

    async def probe(self) -> None:
        """One health check; never loads a model: ``/api/version`` and ``/api/ps``
        for ollama (which also tells the loaded models), ``/v1/models`` for openai
        (not while it serves requests: ``busy_openai``)."""
        if self.busy_openai:
            return
        try:
            if self.native:
                status, _ = await self.get("/api/version", HEALTH_TIMEOUT_S)
                if status < 500:
                    ps_status, body = await self.get("/api/ps", HEALTH_TIMEOUT_S)
                    if ps_status == 200:
                        _learn(self.catalogue.learn_ps, body)
            else:
                status, body = await self.get("/v1/models", HEALTH_TIMEOUT_S)
                if status == 200 and self.spec.globs is None:
                    _learn(lambda b: self.catalogue.learn_openai(b, trio.current_time()), body)
        except trio.TooSlowError:
            self._probed(False, f"no answer to a health check within {HEALTH_TIMEOUT_S:g} s")
        except ProxyError as err:
            self._probed(False, err.message)
        else:
            if status in (401, 403):  # no request of ours would pass either
                self._probed(False, f"health check answered {status}: the backend refuses the "
                                    "gateway's key (api_key_env / api_key_file)")
            elif status < 500:
                self._probed(True, None)
            else:
                self._probed(False, f"health check answered {status}")

    def _probed(self, ok: bool, error: str | None) -> None:
        if self.health.probed(ok, error, trio.current_time()):
            level = logging.INFO if ok else logging.WARNING
            log.log(level, "backend %s is %s%s", self.name, "up" if ok else "down",
                    f": {error}" if error else "")

    async def refresh(self) -> None:
        """Learn its model list (and sizes) again; a failure keeps the old list.
        Concurrent callers share one fetch."""
        if self._refreshing is not None:
            await self._refreshing.wait()
            return
        if self.busy_openai:  # its list is read once it is idle (``busy_openai``)
            return
        self._refreshing = done = trio.Event()
        path = "/api/tags" if self.native else "/v1/models"
        try:
            status, body = await self.get(path, LIST_TIMEOUT_S)
            if status != 200:
                log.warning("backend %s: %s answered %d; its model list is kept", self.name,
                            path, status)
            elif self.native:
                _learn(lambda b: self.catalogue.learn_tags(b, trio.current_time()), body)
            else:
                _learn(lambda b: self.catalogue.learn_openai(b, trio.current_time()), body)
        except (trio.TooSlowError, ProxyError) as err:
            log.info("backend %s: its model list could not be read: %s", self.name,
                     getattr(err, "message", None) or "no answer in time")
        finally:
            self._refreshing = None
            done.set()


def _learn(learn: object, body: bytes) -> None:
    try:
        learn(body)  # type: ignore[operator]
    except ValueError as err:
        log.warning("a backend's model list was not understood: %s", err)


class BackendSet:
    """The backends of one gateway, in config order; a reload swaps them in place."""

    def __init__(self, backends: list[Backend], routing: RoutingSettings = DEFAULT_ROUTING
                 ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.routing = routing
        self._set(backends)
        self.retired: list[Backend] = []  # removed by a reload, requests still in flight
        self.changed = trio.lowlevel.ParkingLot()  # health, lists or the set changed
        self._wake_checks = trio.Event()

    def by_name(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def _set(self, backends: list[Backend]) -> None:
        self.backends = backends
        self._native = [b for b in backends if b.native]  # per request: made once

    def of_kind(self, native: bool) -> list[Backend]:
        """The backends that speak a request's API: every one for ``/v1``, ollama for ``/api``."""
        return self._native if native else self.backends

    def serving(self, model: str, native: bool) -> list[Backend]:
        """Those known to serve ``model``; none: those whose list is not known yet (just
        started, or added by a reload), which may have it: never a guess when a
        backend is known to have it."""
        known = self.known_to_serve(model, native)
        return known or [b for b in self.of_kind(native) if not b.list_known]

    def known_to_serve(self, model: str, native: bool) -> list[Backend]:
        """Those whose list (or globs) names ``model``: a list never read says nothing."""
        key = canonical_model(model)
        return [b for b in self.of_kind(native) if b.catalogue.serves(key)]

    def any_up(self) -> bool:
        return any(b.health.up for b in self.backends)

    async def refresh_for_miss(self, native: bool) -> None:
        """A request named a model no backend is known to serve: learn the lists
        again now (each backend at most once a second), so a model pulled a moment
        ago works without waiting for ``refresh_s``."""
        now = trio.current_time()
        # one under way (another request's, or the periodic one) is waited for: a request
        # for the model it is learning must not get a 404 meanwhile
        due = [b for b in self.of_kind(native) if b.spec.globs is None
               and b.health.available(now)  # a dead one would only make the request wait
               and (now - b.last_miss_refresh >= MISS_REFRESH_S or b._refreshing is not None)]
        for backend in due:
            if backend._refreshing is None:
                backend.last_miss_refresh = now
        if due:
            async with trio.open_nursery() as nursery:
                for backend in due:
                    nursery.start_soon(backend.refresh)

    def replace(self, backends: Iterable[Backend]) -> list[Backend]:
        """A reload's new set (the caller keeps an unchanged backend's object, with its
        health, lists and slots in use). Returns the retired ones, which finish their
        requests in flight."""
        new = list(backends)
        if not new:
            raise ValueError("at least one backend is needed")
        retired = [b for b in self.backends if b not in new]
        self.retired += retired
        for backend in retired:
            backend.retired = True
            if backend.requests == 0 and backend.in_flight == 0:
                backend.drained.set()
        self._set(new)
        self._wake_checks.set()
        self.changed.unpark_all()
        return retired

    async def check_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for backend in list(self.backends):
                nursery.start_soon(backend.probe)
        self.changed.unpark_all()

    async def run_health_checks(self) -> None:
        """Probe every backend now and every ``health_interval_s``; learn the model
        lists now and every ``refresh_s``; at once after a reload."""
        next_refresh = float("-inf")
        while True:
            self._wake_checks = trio.Event()
            if trio.current_time() >= next_refresh:
                next_refresh = trio.current_time() + self.routing.refresh_s
                async with trio.open_nursery() as nursery:
                    for backend in list(self.backends):
                        nursery.start_soon(backend.refresh)
            await self.check_all()
            with trio.move_on_after(self.routing.health_interval_s):
                await self._wake_checks.wait()
                next_refresh = float("-inf")  # new backends: learn their lists

    async def close_retired(self, backend: Backend) -> None:
        """Close a retired backend's connections once its last request ended."""
        await backend.drained.wait()
        await backend.pool.close_idle()
        self.retired.remove(backend)

    async def aclose(self) -> None:
        for backend in [*self.backends, *self.retired]:
            await backend.pool.close_idle()
