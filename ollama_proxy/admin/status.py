"""The gateway's answers that need no key: ``/`` (as Ollama answers it, so that
clients probing for an Ollama find one; a browser is sent on to the console at
``/admin``) and ``/health`` (for load balancers and monitors)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from .. import __version__
from ..backends.registry import BackendSet
from ..http.messages import JSON_TYPE, Request
from ..http.responder import Responder


class Status:
    """``root`` and ``health``, dispatch-table handlers."""

    def __init__(self, backends: BackendSet) -> None:
        self._backends = backends
        self._started = time.time()

    async def root(self, request: Request, responder: Responder,
                   params: Mapping[str, str]) -> None:
        if b"text/html" in (request.header(b"accept") or b""):  # a browser: the console
            await responder.respond(302, [(b"location", b"/admin")], b"")
            return
        await responder.respond(200, [(b"content-type", b"text/plain; charset=utf-8")],
                                b"Ollama is running")

    async def health(self, request: Request, responder: Responder,
                     params: Mapping[str, str]) -> None:
        """200 while a backend is up, else 503."""
        up = self._backends.any_up()
        body = json.dumps({
            "status": "ok" if up else "unavailable",
            "version": __version__,
            "uptime_s": round(time.time() - self._started, 3),
            # anyone may ask: names and state only (URLs and errors are for /admin/api/backends)
            "backends": [{"name": b.name, "up": bool(b.health.up)} for b in self._backends.backends],
        }).encode()
        await responder.respond(200 if up else 503, [(b"content-type", JSON_TYPE)], body)
