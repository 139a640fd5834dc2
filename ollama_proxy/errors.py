"""One small exception tree for every failure the gateway answers, and the one
function that renders it in the API family's own shape.

Every boundary (server, upstream client, relay, dispatch table, admin API)
translates what it catches into a ``ProxyError`` so that the status, the OpenAI
``type``/``code`` and any ``Retry-After`` travel together. Failures that end a
command instead (a bad config, an unusable database) are ``CommandError``s:
they carry the exit code, not a status.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable


class ApiFamily(enum.Enum):
    """Which error dialect a path speaks: Ollama's native ``{"error"}`` or OpenAI's."""

    NATIVE = "native"  # /api/*, /, /health: {"error": "..."}
    OPENAI = "openai"  # /v1/*, /admin/api/*: {"error": {"message", "type", "code"}}


def family_of(path: str) -> ApiFamily:
    """The error dialect of ``path``: OpenAI for /v1 and /admin/api, else native."""
    if path.startswith("/v1/") or path == "/v1" or path.startswith("/admin/api"):
        return ApiFamily.OPENAI
    return ApiFamily.NATIVE


# OpenAI's error ``type`` by status; anything else is ``api_error`` (as Ollama's
# own /v1 layer does, middleware/openai.go).
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
}


class ProxyError(Exception):
    """A failure with the HTTP status, a short machine code and a message."""

    status = 500
    code = "internal_error"
    openai_type: str | None = None  # the OpenAI error "type", when not the status's usual one
    reason: str | None = None  # a refusal's reason in the metrics' rejections_total

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers this error carries (``Retry-After``)."""
        if self.retry_after_s is None:
            return []
        return [(b"retry-after", str(self.retry_after_s).encode())]


class BadRequest(ProxyError):
    status = 400
    code = "invalid_request"
    reason = "bad_request"


class Unauthorized(ProxyError):
    """No key, or one that is unknown, revoked or expired."""

    status = 401
    code = "invalid_api_key"
    reason = "unauthorized"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b"Bearer")]


class Forbidden(ProxyError):
    """A known key whose user may not do this (suspended, expired, not an admin)."""

    status = 403
    code = "forbidden"
    reason = "forbidden"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    """A path the gateway serves, with another method; ``Allow`` lists the right ones."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, method: str, path: str, allowed: Iterable[str]) -> None:
        self.allowed = tuple(sorted(allowed))
        super().__init__(f"method {method} is not allowed on {path} "
                         f"(allowed: {', '.join(self.allowed)})")

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", ", ".join(self.allowed).encode())]


class Conflict(ProxyError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"
    reason = "too_large"


class RequestTimeout(ProxyError):
    """The client took too long to send its request."""

    status = 408
    code = "request_timeout"


class ShuttingDown(ProxyError):
    """The gateway is draining and the grace ran out before an answer began."""

    status = 503
    code = "shutting_down"


class UpstreamUnreachable(ProxyError):
    """No connection to the backend could be made (nothing was sent)."""

    status = 502
    code = "upstream_unreachable"


class UpstreamProtocolError(ProxyError):
    """The backend answered something that is not valid HTTP, or broke off."""

    status = 502
    code = "upstream_error"


class UpstreamTimeout(ProxyError):
    """The backend sent no first byte, or went silent between chunks."""

    status = 504
    code = "upstream_timeout"


class ModelNotServed(ProxyError):
    """No backend serves the model (or none that speaks the request's API)."""

    status = 404
    code = "model_not_found"


class NoBackendAvailable(ProxyError):
    """Backends serve the model, but every one is down or ejected: retry later."""

    status = 503
    code = "backend_unavailable"
    openai_type = "server_error"


class Overloaded(ProxyError):
    """The fair queue is full (``QueueTimeout``: the request waited its whole
    ``queue_timeout_s``)."""

    status = 503
    code = "overloaded"
    openai_type = "server_error"
    reason = "queue_full"


class QueueTimeout(Overloaded):
    reason = "queue_timeout"


class TooManyQueued(ProxyError):
    """This user already has ``max_queued_per_user`` requests waiting for a slot."""

    status = 429
    code = "too_many_queued"
    reason = "queue_full"


class LimitError(ProxyError):
    """A per-user limit refused the request , before any backend saw it.

    Carries the ``x-ratelimit-*`` headers of the limits that apply; a 429 that
    waiting will not cure (no ``retry_after_s``) says ``x-should-retry: false``,
    which the official openai client obeys.
    """

    def __init__(self, message: str, *, status: int, code: str, openai_type: str | None = None,
                 retry_after_s: int | None = None,
                 extra_headers: list[tuple[bytes, bytes]] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message, status=status, code=code, retry_after_s=retry_after_s)
        self.openai_type = openai_type
        self.reason = reason
        self.extra_headers = extra_headers or []

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = super().headers()
        if self.status == 429 and self.retry_after_s is None:
            out.append((b"x-should-retry", b"false"))
        return out + self.extra_headers


class CommandError(Exception):
    """A failure that ends a command rather than answers a request: the command line
    prints ``message`` on one line and exits with ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(CommandError):
    """A bad config value; the message names file, section, key and what is allowed."""

    exit_code = 2  # as argparse's usage errors: the command line itself is wrong


class StoreError(CommandError):
    """The database or its secret cannot be used; the message says what to do."""


def error_body(family: ApiFamily, status: int, message: str, code: str | None,
               openai_type: str | None = None) -> bytes:
    """Render an error body in the API family's shape."""
    if family is ApiFamily.OPENAI:
        payload: dict[str, object] = {
            "error": {
                "message": message,
                "type": openai_type or _OPENAI_TYPES.get(status, "api_error"),
                "param": None,
                "code": code,
            }
        }
    else:
        payload = {"error": message}
    return json.dumps(payload).encode()


def openai_error(status: int, body: bytes) -> bytes | None:
    """A backend's error reply for an OpenAI client: None when already OpenAI-shaped
    (``{"error": {...}}``), else the same message in that shape (FastAPI's
    ``{"detail": ...}`` from llama-cpp-python, Ollama's ``{"error": "..."}``, plain text)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return None
    if isinstance(doc, dict) and ("detail" in doc or isinstance(doc.get("error"), str)):
        found = doc.get("detail", doc.get("error"))
        message = found if isinstance(found, str) else json.dumps(found)
    else:
        message = body.decode("utf-8", "replace").strip() or f"the backend answered {status}"
    return error_body(ApiFamily.OPENAI, status, message, None)


def render(family: ApiFamily, err: ProxyError) -> bytes:
    """Render a ``ProxyError`` in the API family's shape."""
    return error_body(family, err.status, err.message, err.code, err.openai_type)
