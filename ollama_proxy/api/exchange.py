"""One proxied request's state on its way through the gateway: what the checks,
the rules and the policy steps (limits) decided about it, read by the relay."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import quote, unquote

from .models import NO_ALIASES, Aliases, filter_listing, rename_model
from .routes import Route, RouteKind

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
    alias: str | None = None  # the alias the client named; ``model`` is then its target
    path_model: str | None = None  # the target of an alias the path names
    listed_aliases: Aliases | None = None  # a model list gets an entry per alias
    target_override: str | None = None  # the target sent upstream, when not the client's
    pinned: Any = None  # the backend ``?backend=NAME`` named (a ``Backend``: api knows none)
    weight: float = 1.0  # the user's share of GPU slots when they are contended (a limit)

    @property
    def model(self) -> str | None:
        obj, route = self.body_obj, self.route
        if obj is None:
            prefix = route.model_in_path
            if prefix is None:
                return None
            return self.path_model or unquote(self.request.path[len(prefix):])
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
        return "GET" if method == "HEAD" and self.rewrites_reply else method

    @property
    def rewrites_reply(self) -> bool:
        """Whether a 2xx reply is rewritten (``reply``): a list filtered or given
        aliases, or the model an alias in the path stands for renamed back."""
        return (self.visible_models is not None or bool(self.listed_aliases)
                or self.path_model is not None)

    def reply(self, body: bytes) -> bytes:
        """The 2xx reply the client gets for ``body``, the backend's."""
        if self.path_model is not None:
            assert self.alias is not None
            return rename_model(body, self.alias)
        return filter_listing(self.visible_models, body, self.listed_aliases or NO_ALIASES)

    def resolve_alias(self, aliases: Aliases) -> None:
        """Send a request for an alias to its target (model lists: show the aliases).
        Model management names models to fetch or delete, never through an alias."""
        route = self.route
        if not aliases or route.kind is RouteKind.MANAGEMENT:
            return
        if route.lists_aliases:
            self.listed_aliases = aliases
            return
        model = self.model
        target = aliases.target(model) if model else None
        if model is None or target is None:
            return
        self.alias = model
        obj = self.body_obj
        if obj is None:
            self.path_model = target
            return
        field = next(name for name in route.model_fields if obj.get(name))
        obj[field] = target
        self.body_dirty = True

    @property
    def upstream_target(self) -> str:
        """The request target sent upstream: the client's, with an alias in the
        path replaced by its target."""
        if self.target_override is not None:
            return self.target_override
        prefix = self.route.model_in_path
        if self.path_model is None or prefix is None:
            return self.request.target
        query = self.request.target.partition("?")[2]
        return prefix + quote(self.path_model, safe=":/") + ("?" + query if query else "")

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
