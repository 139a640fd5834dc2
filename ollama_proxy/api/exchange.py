"""One proxied request's state on its way through the gateway: what the checks,
the rules and the policy steps (limits) decided about it, read by the relay."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import unquote

from .routes import Route

if TYPE_CHECKING:  # the pure core needs the types, not the trio server
    from ..access.counters import Reservation
    from ..http.messages import Request
    from ..store.accounts import KeyEntry


@dataclass(slots=True)
class Exchange:
    """One proxied request on its way through the policy chain to a backend."""

    request: Request
    route: Route
    request_id: bytes
    body_obj: dict[str, Any] | None = None  # parsed JSON body (routes with json_body)
    body_dirty: bool = False  # a step changed body_obj: re-serialise before sending
    stream: bool = False
    usage_injected: bool = False  # we asked for usage the client did not: hide it
    principal: KeyEntry | None = None  # the caller, once its key was checked
    started_at: float = field(default_factory=time.time)
    reservation: Reservation | None = None  # what the limits hold until the usage is known
    extra_headers: list[tuple[bytes, bytes]] | None = None  # a step's response headers
    # A model list is answered with these globs' models only (None: all of them);
    # ``models.filter_listing`` applies them to the backend's 2xx reply.
    visible_models: tuple[str, ...] | None = None

    @property
    def model(self) -> str | None:
        obj, route = self.body_obj, self.route
        if obj is None:
            prefix = route.model_in_path
            return None if prefix is None else unquote(self.request.path[len(prefix):])
        model = None
        for name in route.model_fields:
            model = obj.get(name)
            if model:
                break
        return model if isinstance(model, str) else None

    @property
    def upstream_method(self) -> str:
        """The method sent to the backend: the client's, but a HEAD of a model list
        that is filtered is fetched with GET (its answer announces the filtered
        length, which only the body tells)."""
        method = self.request.method
        return "GET" if method == "HEAD" and self.visible_models is not None else method

    def body(self) -> bytes | bytearray:
        """The body to send upstream: as received unless a step changed it.

        A changed body is re-encoded as UTF-8; a lone surrogate (only a
        ``"\\udc00"`` escape can make one: raw ones are not UTF-8) cannot be,
        so such a body is re-encoded with every non-ASCII character escaped,
        which the backend decodes exactly as it would the client's bytes.
        """
        if self.body_dirty and self.body_obj is not None:
            text = json.dumps(self.body_obj, ensure_ascii=False, separators=(",", ":"))
            try:
                return text.encode()
            except UnicodeEncodeError:
                return json.dumps(self.body_obj, separators=(",", ":")).encode()
        return self.request.body


# A policy step may refuse (raise a ProxyError) or adjust the exchange.
PolicyStep = Callable[[Exchange], Awaitable[None]]
