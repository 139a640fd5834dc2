"""api/routes.py: the table of proxied paths (the dispatch table finds a path's row:
tests/test_dispatch.py)."""

from __future__ import annotations

import pytest

from ollama_proxy.api.routes import PREFIX_ROUTES, ROUTES, Route, RouteKind
from ollama_proxy.errors import ApiFamily

N, O = ApiFamily.NATIVE, ApiFamily.OPENAI
G, E, I, M = RouteKind.GENERATION, RouteKind.EMBEDDING, RouteKind.INFO, RouteKind.MANAGEMENT
GET, POST = {"GET", "HEAD"}, {"POST"}

# path -> (name, family, kind, methods, JSON body, streams by default)
TABLE = {
    "/api/generate": ("generate", N, G, POST, True, True),
    "/api/chat": ("chat", N, G, POST, True, True),
    "/api/embed": ("embed", N, E, POST, True, False),
    "/api/embeddings": ("embeddings", N, E, POST, True, False),
    "/api/tags": ("tags", N, I, GET, False, False),
    "/api/ps": ("ps", N, I, GET, False, False),
    "/api/version": ("version", N, I, GET, False, False),
    "/api/show": ("show", N, I, POST, True, False),
    "/api/pull": ("pull", N, M, POST, True, True),
    "/api/push": ("push", N, M, POST, True, True),
    "/api/create": ("create", N, M, POST, True, True),
    "/api/copy": ("copy", N, M, POST, True, False),
    "/api/delete": ("delete", N, M, {"DELETE"}, True, False),
    "/v1/chat/completions": ("openai_chat", O, G, POST, True, False),
    "/v1/completions": ("openai_completions", O, G, POST, True, False),
    "/v1/embeddings": ("openai_embeddings", O, E, POST, True, False),
    "/v1/models": ("openai_models", O, I, GET, False, False),
    "/v1/models/llama3.2:latest": ("openai_model", O, I, GET, False, False),
    "/api/blobs/sha256:0123abcd": ("blobs", N, M, {"HEAD", "POST"}, False, False),
}


def route_of(path: str) -> Route:
    """The table's route of an exact path, or of a prefix path with an id after it."""
    return ROUTES.get(path) or next(r for p, r in PREFIX_ROUTES if path.startswith(p))


@pytest.mark.parametrize(("path", "row"), TABLE.items(), ids=list(TABLE))
def test_every_proxied_path(path, row):
    """Each path's name, error dialect, kind, methods, body rule and stream default."""
    route = route_of(path)
    assert (route.name, route.family, route.kind, route.methods, route.json_body,
            route.stream_default) == row


def test_the_table_is_every_path_there_is():
    """Nothing is relayed that the table above does not list."""
    listed = {route_of(path).name for path in TABLE}
    assert listed == {r.name for r in ROUTES.values()} | {r.name for _, r in PREFIX_ROUTES}


@pytest.mark.parametrize(("kind", "metered", "admin_only"), [
    (G, True, False), (E, True, False), (I, False, False), (M, False, True),
])
def test_what_a_kind_means(kind, metered, admin_only):
    """Generations and embeddings are metered (limited and counted); management is for
    admins; listings and info are neither."""
    routes = [route_of(path) for path in TABLE if route_of(path).kind is kind]
    assert routes and all((r.metered, r.admin_only) == (metered, admin_only) for r in routes)
