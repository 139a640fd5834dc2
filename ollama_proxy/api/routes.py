"""The paths the gateway relays to a backend (Ollama's native API and its OpenAI
layer) as a table: who may call them, which error dialect they speak, whether
they stream and carry usage, where their body names the model and carries its
text. Pure data: the modules read a route's facts here, so a new path is a new row."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import ApiFamily


class RouteKind(enum.Enum):
    GENERATION = "generation"  # chat/generate/completions: may stream, usage in/out
    EMBEDDING = "embedding"  # usage: prompt tokens only
    INFO = "info"  # tags, ps, version, show, models: no usage
    MANAGEMENT = "management"  # pull/push/create/copy/delete/blobs: admin-only


class Text(enum.Enum):
    """Where a route's body carries the text the backend reads, and in which types."""

    MESSAGES = "messages"  # a chat: the backend applies the model's template to them
    PROMPT = "prompt"  # a string
    OPENAI_PROMPT = "openai_prompt"  # a string, strings, token ids or lists of token ids
    INPUT = "input"  # a string or a list


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    family: ApiFamily
    kind: RouteKind
    methods: frozenset[str]
    json_body: bool  # the body must be a JSON object (400 otherwise)
    stream_default: bool  # streams when the body has no "stream" field
    text: Text | None  # the body's text field (None: no text)
    model_fields: tuple[str, ...]  # the body fields read as the model, the first set wins
    model_required: bool  # a body without a model is refused (400)
    lists_models: bool  # a model list: answered with the user's allowed models only
    lists_aliases: bool  # a list of the models there are (not the loaded ones): aliases added
    model_in_path: str | None  # the path names the model after this prefix

    @property
    def admin_only(self) -> bool:
        return self.kind is RouteKind.MANAGEMENT

    @property
    def metered(self) -> bool:
        """Generations and embeddings: they use tokens, counted and limited."""
        return self.kind is RouteKind.GENERATION or self.kind is RouteKind.EMBEDDING

    @property
    def routes_by_model(self) -> bool:
        """The model it names picks the backend (generations, embeddings, /api/show,
        /v1/models/{id}); the rest go to any backend that speaks its API."""
        return self.kind is not RouteKind.MANAGEMENT and (
            self.model_required or self.model_in_path is not None)

    @property
    def openai_generation(self) -> bool:
        """/v1 chat and completions: a stream reports usage only if asked
        (``stream_options.include_usage``), and llama.cpp servers ignore the ask."""
        return self.family is ApiFamily.OPENAI and self.kind is RouteKind.GENERATION


_N, _O = ApiFamily.NATIVE, ApiFamily.OPENAI
_G, _E, _I, _M = RouteKind.GENERATION, RouteKind.EMBEDDING, RouteKind.INFO, RouteKind.MANAGEMENT
_GET = frozenset({"GET", "HEAD"})
_POST = frozenset({"POST"})
_MSG, _PROMPT, _OAI_PROMPT, _INPUT = Text.MESSAGES, Text.PROMPT, Text.OPENAI_PROMPT, Text.INPUT
# Ollama still reads "name" as the model on these routes (when "model" is empty).
_OR_NAME = ("model", "name")
_MODEL_PATH = "/v1/models/"


def _r(name: str, family: ApiFamily, kind: RouteKind, methods: frozenset[str],
       json_body: bool = False, stream_default: bool = False, *, text: Text | None = None,
       model_fields: tuple[str, ...] = ("model",), model_required: bool = False,
       lists_models: bool = False, lists_aliases: bool = False,
       model_in_path: str | None = None) -> Route:
    return Route(name, family, kind, methods, json_body, stream_default, text, model_fields,
                 model_required, lists_models, lists_aliases, model_in_path)


# Exact paths. Ollama streams by default on the native API (`stream` absent =
# true), also for pull/push/create; the /v1 layer does not. Generations and embeddings
# require a model (the limits judge it).
ROUTES: dict[str, Route] = {
    "/api/generate": _r("generate", _N, _G, _POST, True, True, text=_PROMPT, model_required=True),
    "/api/chat": _r("chat", _N, _G, _POST, True, True, text=_MSG, model_required=True),
    "/api/embed": _r("embed", _N, _E, _POST, True, text=_INPUT, model_required=True),
    "/api/embeddings": _r("embeddings", _N, _E, _POST, True, text=_PROMPT, model_required=True),
    "/api/tags": _r("tags", _N, _I, _GET, lists_models=True, lists_aliases=True),
    "/api/ps": _r("ps", _N, _I, _GET, lists_models=True),
    "/api/version": _r("version", _N, _I, _GET),
    "/api/show": _r("show", _N, _I, _POST, True, model_fields=_OR_NAME, model_required=True),
    "/api/pull": _r("pull", _N, _M, _POST, True, True, model_fields=_OR_NAME),
    "/api/push": _r("push", _N, _M, _POST, True, True, model_fields=_OR_NAME),
    "/api/create": _r("create", _N, _M, _POST, True, True, model_fields=_OR_NAME),
    "/api/copy": _r("copy", _N, _M, _POST, True),
    "/api/delete": _r("delete", _N, _M, frozenset({"DELETE"}), True, model_fields=_OR_NAME),
    "/v1/chat/completions": _r("openai_chat", _O, _G, _POST, True, text=_MSG, model_required=True),
    "/v1/completions": _r("openai_completions", _O, _G, _POST, True, text=_OAI_PROMPT,
                          model_required=True),
    "/v1/embeddings": _r("openai_embeddings", _O, _E, _POST, True, text=_INPUT,
                         model_required=True),
    "/v1/models": _r("openai_models", _O, _I, _GET, lists_models=True, lists_aliases=True),
}

# Paths with an id after a fixed prefix.
PREFIX_ROUTES: tuple[tuple[str, Route], ...] = (
    (_MODEL_PATH, _r("openai_model", _O, _I, _GET, model_in_path=_MODEL_PATH)),
    ("/api/blobs/", _r("blobs", _N, _M, frozenset({"HEAD", "POST"}))),
)

