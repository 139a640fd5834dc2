"""The paths the gateway relays to a backend (Ollama's native API and its OpenAI
layer) as a table: who may call them, which error dialect they speak, whether
they stream and carry usage. Pure data."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import ApiFamily


class RouteKind(enum.Enum):
    GENERATION = "generation"  # chat/generate/completions: may stream, usage in/out
    EMBEDDING = "embedding"  # usage: prompt tokens only
    INFO = "info"  # tags, ps, version, show, models: no usage
    MANAGEMENT = "management"  # pull/push/create/copy/delete/blobs: admin-only


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    family: ApiFamily
    kind: RouteKind
    methods: frozenset[str]
    json_body: bool  # the body must be a JSON object (400 otherwise)
    stream_default: bool  # streams when the body has no "stream" field

    @property
    def admin_only(self) -> bool:
        return self.kind is RouteKind.MANAGEMENT

    @property
    def metered(self) -> bool:
        """Generations and embeddings: they use tokens, counted and limited."""
        return self.kind is RouteKind.GENERATION or self.kind is RouteKind.EMBEDDING


_N, _O = ApiFamily.NATIVE, ApiFamily.OPENAI
_G, _E, _I, _M = RouteKind.GENERATION, RouteKind.EMBEDDING, RouteKind.INFO, RouteKind.MANAGEMENT
_GET = frozenset({"GET", "HEAD"})
_POST = frozenset({"POST"})


def _r(name: str, family: ApiFamily, kind: RouteKind, methods: frozenset[str],
       json_body: bool = False, stream_default: bool = False) -> Route:
    return Route(name, family, kind, methods, json_body, stream_default)


# Exact paths. Ollama streams by default on the native API (`stream` absent =
# true), also for pull/push/create; the /v1 layer does not.
ROUTES: dict[str, Route] = {
    "/api/generate": _r("generate", _N, _G, _POST, True, True),
    "/api/chat": _r("chat", _N, _G, _POST, True, True),
    "/api/embed": _r("embed", _N, _E, _POST, True),
    "/api/embeddings": _r("embeddings", _N, _E, _POST, True),
    "/api/tags": _r("tags", _N, _I, _GET),
    "/api/ps": _r("ps", _N, _I, _GET),
    "/api/version": _r("version", _N, _I, _GET),
    "/api/show": _r("show", _N, _I, _POST, True),
    "/api/pull": _r("pull", _N, _M, _POST, True, True),
    "/api/push": _r("push", _N, _M, _POST, True, True),
    "/api/create": _r("create", _N, _M, _POST, True, True),
    "/api/copy": _r("copy", _N, _M, _POST, True),
    "/api/delete": _r("delete", _N, _M, frozenset({"DELETE"}), True),
    "/v1/chat/completions": _r("openai_chat", _O, _G, _POST, True),
    "/v1/completions": _r("openai_completions", _O, _G, _POST, True),
    "/v1/embeddings": _r("openai_embeddings", _O, _E, _POST, True),
    "/v1/models": _r("openai_models", _O, _I, _GET),
}

# Paths with an id after a fixed prefix.
PREFIX_ROUTES: tuple[tuple[str, Route], ...] = (
    ("/v1/models/", _r("openai_model", _O, _I, _GET)),
    ("/api/blobs/", _r("blobs", _N, _M, frozenset({"HEAD", "POST"}))),
)

