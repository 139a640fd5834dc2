"""Per-request decisions that need no I/O: parsing and checking the request
body, and the rewrites the gateway makes to it (an OpenAI stream must report
usage; ``max_completion_tokens`` is ignored by Ollama, so it becomes
``max_tokens``; a completion cap is set where limits demand one). Policy
steps (limits) work on the same ``Exchange`` and mark the body dirty; it is
re-serialised once, at the end.
"""

from __future__ import annotations

import json
import time
from urllib.parse import unquote
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .errors import ApiFamily, BadRequest
from .routes import Route, RouteKind

if TYPE_CHECKING:  # the pure core needs the types, not the trio server
    from .accounts import KeyEntry
    from .limit_counters import Reservation
    from .server import Request


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
    rewrite_reply: Callable[[bytes], bytes] | None = None  # a step's edit of a whole 2xx reply

    @property
    def model(self) -> str | None:
        obj = self.body_obj
        if obj is None:
            path = self.request.path
            if self.route.name == "openai_model":  # GET /v1/models/{id}
                return unquote(path[len("/v1/models/"):])
            return None
        model = obj.get("model") or obj.get("name")  # /api/show still takes "name"
        return model if isinstance(model, str) else None

    def body(self) -> bytes:
        """The body to send upstream: as received unless a step changed it."""
        if self.body_dirty and self.body_obj is not None:
            return json.dumps(self.body_obj, ensure_ascii=False, separators=(",", ":")).encode()
        return self.request.body


# A policy step may refuse (raise a ProxyError) or adjust the exchange.
PolicyStep = Callable[[Exchange], Awaitable[None]]


def parse_body(route: Route, raw: bytes) -> dict[str, Any] | None:
    """The JSON object of a JSON route's body (400 when it is not one)."""
    if not route.json_body:
        return None
    if not raw.strip():
        raise BadRequest("missing request body")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON in request body: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def wants_stream(route: Route, obj: dict[str, Any] | None) -> bool:
    """Whether the backend will stream: native defaults to true, /v1 to false."""
    if obj is None:
        return False
    value = obj.get("stream")
    if value is None:
        return route.stream_default
    if not isinstance(value, bool):
        raise BadRequest('"stream" must be true or false')
    return value


def apply_openai_rules(route: Route, obj: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    """Rewrite an OpenAI generation body; returns ``(changed, usage_injected)``."""
    if route.kind is not RouteKind.GENERATION or route.name not in (
        "openai_chat", "openai_completions"
    ):
        return False, False
    changed = False
    if "max_completion_tokens" in obj:
        cap = obj.pop("max_completion_tokens")
        changed = True
        if cap is not None:
            current = obj.get("max_tokens")
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
                raise BadRequest('"max_completion_tokens" must be a whole number >= 1')
            if not isinstance(current, int) or isinstance(current, bool) or current > cap:
                obj["max_tokens"] = cap
    injected = False
    if stream:
        options = obj.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest('"stream_options" must be an object')
        if not (options or {}).get("include_usage"):
            obj["stream_options"] = {**(options or {}), "include_usage": True}
            changed = injected = True
    return changed, injected


def requested_cap(route: Route, obj: dict[str, Any]) -> int | None:
    """The completion cap the client asked for: native ``options.num_predict``,
    OpenAI ``max_tokens`` (after ``apply_openai_rules``). None when absent, 0
    or negative (Ollama's "no limit"); 400 when it is not a number."""
    if route.family is ApiFamily.NATIVE:
        options = obj.get("options")
        if options is None:
            return None
        if not isinstance(options, dict):
            raise BadRequest('"options" must be an object')
        value, where = options.get("num_predict"), "options.num_predict"
    else:
        value, where = obj.get("max_tokens"), "max_tokens"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):  # also NaN and Infinity
        raise BadRequest(f'"{where}" must be a whole number')
    return int(value) if value >= 1 else None


def set_cap(route: Route, obj: dict[str, Any], cap: int) -> bool:
    """Send ``cap`` as the completion cap unless the client asked for no more;
    True when the body changed."""
    if route.family is ApiFamily.NATIVE:
        target = obj.get("options")
        if target is None:
            target = obj["options"] = {}
        key = "num_predict"
    else:
        target, key = obj, "max_tokens"
    current = target.get(key)
    if current is not None and not isinstance(current, bool) and 1 <= current <= cap:
        return False
    target[key] = cap
    return True
