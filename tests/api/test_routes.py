"""api/routes.py: the table of proxied paths (the dispatch table finds a path's row:
tests/test_dispatch.py)."""

from __future__ import annotations

import pytest

from ollama_proxy.api.routes import PREFIX_ROUTES, ROUTES, Route, RouteKind, Text
from ollama_proxy.errors import ApiFamily

N, O = ApiFamily.NATIVE, ApiFamily.OPENAI
G, E, I, M = RouteKind.GENERATION, RouteKind.EMBEDDING, RouteKind.INFO, RouteKind.MANAGEMENT
GET, POST = {"GET", "HEAD"}, {"POST"}
MSG, PRO, OAI, INP = Text.MESSAGES, Text.PROMPT, Text.OPENAI_PROMPT, Text.INPUT
MOD, NAME = ("model",), ("model", "name")
ID = "/v1/models/"

# path -> (name, family, kind, methods, JSON body, streams by default, text field,
#          model fields, model required, a model list, model in the path after)
TABLE = {
    "/api/generate": ("generate", N, G, POST, True, True, PRO, MOD, True, False, None),
    "/api/chat": ("chat", N, G, POST, True, True, MSG, MOD, True, False, None),
    "/api/embed": ("embed", N, E, POST, True, False, INP, MOD, True, False, None),
    "/api/embeddings": ("embeddings", N, E, POST, True, False, PRO, MOD, True, False, None),
    "/api/tags": ("tags", N, I, GET, False, False, None, MOD, False, True, None),
    "/api/ps": ("ps", N, I, GET, False, False, None, MOD, False, True, None),
    "/api/version": ("version", N, I, GET, False, False, None, MOD, False, False, None),
    "/api/show": ("show", N, I, POST, True, False, None, NAME, True, False, None),
    "/api/pull": ("pull", N, M, POST, True, True, None, NAME, False, False, None),
    "/api/push": ("push", N, M, POST, True, True, None, NAME, False, False, None),
    "/api/create": ("create", N, M, POST, True, True, None, NAME, False, False, None),
    "/api/copy": ("copy", N, M, POST, True, False, None, MOD, False, False, None),
    "/api/delete": ("delete", N, M, {"DELETE"}, True, False, None, NAME, False, False, None),
    "/v1/chat/completions": ("openai_chat", O, G, POST, True, False, MSG, MOD, True, False, None),
    "/v1/completions": ("openai_completions", O, G, POST, True, False, OAI, MOD, True, False, None),
    "/v1/embeddings": ("openai_embeddings", O, E, POST, True, False, INP, MOD, True, False, None),
    "/v1/models": ("openai_models", O, I, GET, False, False, None, MOD, False, True, None),
    "/v1/models/llama3.2:latest": ("openai_model", O, I, GET, False, False, None, MOD, False, False,
                                   ID),
    "/api/blobs/sha256:0123abcd": ("blobs", N, M, {"HEAD", "POST"}, False, False, None, MOD, False,
                                   False, None),
}


def route_of(path: str) -> Route:
    """The table's route of an exact path, or of a prefix path with an id after it."""
    return ROUTES.get(path) or next(r for p, r in PREFIX_ROUTES if path.startswith(p))


@pytest.mark.parametrize(("path", "row"), TABLE.items(), ids=list(TABLE))
def test_every_proxied_path(path, row):
    """Each path's name, error dialect, kind, methods, body rule, stream default and
    where it names its model and carries its text."""
    route = route_of(path)
    assert (route.name, route.family, route.kind, route.methods, route.json_body,
            route.stream_default, route.text, route.model_fields, route.model_required,
            route.lists_models, route.model_in_path) == row


def test_the_table_is_every_path_there_is():
    """Nothing is relayed that the table above does not list."""
    listed = {route_of(path).name for path in TABLE}
    assert listed == {r.name for r in ROUTES.values()} | {r.name for _, r in PREFIX_ROUTES}


@pytest.mark.parametrize(("kind", "metered", "admin_only"), [
    (G, True, False), (E, True, False), (I, False, False), (M, False, True),
])
def test_what_a_kind_means(kind, metered, admin_only):
    """Generations and embeddings are metered (limited and counted) and require a model
    (the limits judge it); management is for admins; listings and info are neither."""
    routes = [route_of(path) for path in TABLE if route_of(path).kind is kind]
    assert routes and all((r.metered, r.admin_only) == (metered, admin_only) for r in routes)
    assert all(r.model_required for r in routes if r.metered)


def test_the_openai_generations():
    """The /v1 chat and completions, whose streams report usage only when asked."""
    names = {route_of(path).name for path in TABLE if route_of(path).openai_generation}
    assert names == {"openai_chat", "openai_completions"}
