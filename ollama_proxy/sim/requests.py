"""Reading requests the way Ollama does, sans-IO: Go's JSON binding and its
messages, the fields each endpoint checks, the Host and CORS gate. Anything
Ollama would reject becomes a ``Refusal`` carrying its status and message.
"""

from __future__ import annotations

import http
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .frames import Api, Dialect, Native, OpenAIChat, OpenAICompletion
from .models import SimModel, full_name, keep_alive_ns, normalize_name
from .text import (
    Directives,
    GoJsonError,
    go_decode,
    json_kind,
    parse_directives,
    word_count,
)

# Ollama's templates add role headers: a flat cost per message is close enough.
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_REPLY_TOKENS = 3  # the assistant header that opens the reply
GENERATE_TEMPLATE_TOKENS = 6
EMBED_SPECIAL_TOKENS = 2  # BERT's [CLS] and [SEP]
STATUS_MESSAGES = {
    400: "invalid request",
    429: "too many requests",
    500: "model runner has unexpectedly stopped, this may be due to resource limitations "
    "or an internal error, check ollama server logs for details",
    502: "bad gateway",
    503: "server busy, please try again.  maximum pending requests exceeded",
}
# gin-contrib/cors as Ollama configures it (OLLAMA_ORIGINS unset).
_LOCAL_ORIGINS = ("localhost", "127.0.0.1", "0.0.0.0")
_APP_SCHEMES = ("app://", "file://", "tauri://", "vscode-webview://", "vscode-file://")
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Go's %T of a decoded JSON value, for "invalid message content type".
_GO_TYPE_NAMES = {
    type(None): "<nil>",
    bool: "bool",
    int: "float64",
    float: "float64",
    dict: "map[string]interface {}",
}


class Refusal(Exception):
    """An error answered before any frame, in the endpoint's error shape."""

    def __init__(
        self, status: int, message: str, api: Api, *, early: bool = False, outcome: str = "refused"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.api = api
        self.early = early  # raised by Ollama's /v1 middleware, before the handler
        self.outcome = outcome  # what the request record says afterwards


def status_message(status: int, model: str) -> str:
    """What Ollama says with ``status`` (for ``[[sim:status=CODE]]``)."""
    if status == 404:
        return f"model '{model}' not found"
    if status in STATUS_MESSAGES:
        return STATUS_MESSAGES[status]
    try:
        return http.HTTPStatus(status).phrase.lower()
    except ValueError:
        return f"simulated status {status}"


def _has_go_type(value: Any, go_type: str) -> bool:
    if go_type.startswith("[]"):
        return isinstance(value, list)
    if go_type == "string":
        return isinstance(value, str)
    if go_type == "bool":
        return isinstance(value, bool)
    if go_type == "int":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, dict)


def _type_error(value: Any, field: str, go_type: str, api: Api) -> Refusal:
    message = (
        f"json: cannot unmarshal {json_kind(value)} into Go struct field {field} of type {go_type}"
    )
    return Refusal(400, message, api, early=True)


class Body:
    """A decoded request object; fields are type-checked as Go's decoder would."""

    def __init__(self, data: dict[str, Any], go_type: str, api: Api) -> None:
        self.data = data
        self.struct = go_type.rsplit(".", 1)[-1]
        self.api = api

    def get(self, key: str, go_type: str) -> Any:
        """The field, or None when absent or null; a wrong JSON type is a 400."""
        value = self.data.get(key)
        if value is None or _has_go_type(value, go_type):
            return value
        raise _type_error(value, f"{self.struct}.{key}", go_type, self.api)

    def text(self, key: str) -> str:
        return self.get(key, "string") or ""

    def stream(self) -> bool:
        """Native streams unless told not to; /v1 only when asked."""
        value = self.get("stream", "bool")
        return value is not False if self.api is Api.NATIVE else value is True


def decode(raw: bytes | bytearray, api: Api, go_type: str) -> tuple[Any, Body]:
    """The parsed JSON and the body as ``ShouldBindJSON`` reads it into ``go_type``."""
    try:
        data = go_decode(raw)
    except GoJsonError as exc:
        message = str(exc)
        if api is Api.NATIVE and message == "EOF":
            message = "missing request body"
        raise Refusal(400, message, api, early=True) from None
    if data is not None and not isinstance(data, dict):
        message = f"json: cannot unmarshal {json_kind(data)} into Go value of type {go_type}"
        raise Refusal(400, message, api, early=True)
    return data, Body(data or {}, go_type, api)


def num_predict(options: dict[str, Any]) -> int | None:
    """``options.num_predict`` as a cap; absent, 0 or negative mean unbounded."""
    value = options.get("num_predict")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refusal(500, 'option "num_predict" must be of type integer', Api.NATIVE)
    return int(value) if value > 0 else None


def max_tokens(body: Body) -> int | None:
    """``max_tokens`` as a cap (``max_completion_tokens`` is ignored, as by Ollama)."""
    value = body.get("max_tokens", "int")
    return int(value) if value is not None and value > 0 else None


def include_usage(body: Body) -> bool:
    options = body.get("stream_options", "openai.StreamOptions") or {}
    return options.get("include_usage") is True


def reasoning_effort(body: Body) -> Any:
    reasoning = body.data.get("reasoning")
    nested = reasoning.get("effort") if isinstance(reasoning, dict) else None
    return body.data.get("reasoning_effort") or nested


def native_contents(messages: list[Any]) -> list[str]:
    """The ``content`` of each ``/api/chat`` message."""
    contents = []
    for message in messages:
        if not isinstance(message, dict):
            raise _type_error(message, "ChatRequest.messages", "api.Message", Api.NATIVE)
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise _type_error(content, "Message.messages.content", "string", Api.NATIVE)
        contents.append(content or "")
    return contents


def openai_contents(messages: list[Any]) -> list[str]:
    """Message texts as Ollama's ``FromChatRequest`` accepts them (400 otherwise)."""
    contents = []
    for message in messages:
        if not isinstance(message, dict):
            field = "ChatCompletionRequest.messages"
            raise _type_error(message, field, "openai.Message", Api.OPENAI)
        content = message.get("content")
        if isinstance(content, str):
            contents.append(content)
        elif isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind != "image_url":
                    raise Refusal(400, "invalid message format", Api.OPENAI, early=True)
            contents.append("\n".join(texts))
        elif message.get("tool_calls") is not None:
            contents.append("")
        else:
            go_type = _GO_TYPE_NAMES.get(type(content), "[]interface {}")
            message_text = f"invalid message content type: {go_type}"
            raise Refusal(400, message_text, Api.OPENAI, early=True)
    return contents


def embed_inputs(value: Any, api: Api) -> list[str]:
    """``input``: a string or a list of strings (absent and "" embed nothing)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise Refusal(400, "invalid input type", api)


def embed_tokens(texts: list[str]) -> int:
    return sum(word_count(text) + EMBED_SPECIAL_TOKENS for text in texts)


def _chat_tokens(contents: list[str]) -> int:
    words = sum(map(word_count, contents))
    return words + CHAT_TOKENS_PER_MESSAGE * len(contents) + CHAT_REPLY_TOKENS


def find_model(models: Mapping[str, SimModel], name: str, api: Api) -> SimModel:
    model = models.get(normalize_name(name)) if name else None
    if model is None:
        raise Refusal(404, f"model '{name}' not found", api)
    return model


def directives_in(text: str, api: Api) -> Directives:
    try:
        return parse_directives(text)
    except ValueError as exc:
        raise Refusal(400, str(exc), api) from None


def _generator(models: Mapping[str, SimModel], name: str, api: Api, refusal: str) -> SimModel:
    """The model, which must be able to generate (else 400 ``refusal``)."""
    model = find_model(models, name, api)
    if not model.generates:
        raise Refusal(400, refusal, api)
    return model


def _thinking(model: SimModel, think: Any, name: str, api: Api) -> bool:
    """Thinking models think unless told not to; asking another one to is a 400."""
    if think is None:
        return model.thinks
    if think is False or think == "none":
        return False
    if not model.thinks:
        raise Refusal(400, f"{name} does not support thinking", api)
    return True


@dataclass(frozen=True, slots=True)
class Generation:
    """One generation request, read: what to say, in which dialect, how to end."""

    dialect: Dialect  # its ``model`` is the name as requested (echoed back)
    model: SimModel
    prompt: str  # the text the words and directives come from
    prompt_tokens: int
    directives: Directives
    cap: int | None  # num_predict / max_tokens
    thinking: bool
    stream: bool
    keep_alive_ns: int | None = None
    with_context: bool = False  # /api/generate's final ``context``
    load_only: bool = False  # no prompt: just load (or unload) the model


def read_generate(body: Body, models: Mapping[str, SimModel], request_id: int) -> Generation:
    name, prompt, system = body.text("model"), body.text("prompt"), body.text("system")
    raw = body.get("raw", "bool") or False
    model = _generator(models, name, Api.NATIVE, f'"{name}" does not support generate')
    text = f"{system}\n{prompt}" if system and prompt else prompt
    return Generation(
        dialect=Native(name, chat=False),
        model=model,
        prompt=text,
        prompt_tokens=word_count(text) + (0 if raw else GENERATE_TEMPLATE_TOKENS),
        directives=directives_in(text, Api.NATIVE),
        cap=num_predict(body.get("options", "map[string]interface {}") or {}),
        thinking=_thinking(model, body.data.get("think"), f'"{name}"', Api.NATIVE),
        stream=body.stream(),
        keep_alive_ns=keep_alive_ns(body.data.get("keep_alive")),
        with_context=not raw,
        load_only=not prompt,
    )


def read_chat(body: Body, models: Mapping[str, SimModel], request_id: int) -> Generation:
    name = body.text("model")
    messages = body.get("messages", "[]api.Message") or []
    if not name:
        raise Refusal(400, "model is required", Api.NATIVE)
    model = _generator(models, name, Api.NATIVE, f"{full_name(name)} does not support chat")
    contents = native_contents(messages)
    text = "\n".join(contents)
    return Generation(
        dialect=Native(name, chat=True),
        model=model,
        prompt=text,
        prompt_tokens=_chat_tokens(contents),
        directives=directives_in(text, Api.NATIVE),
        cap=num_predict(body.get("options", "map[string]interface {}") or {}),
        thinking=_thinking(model, body.data.get("think"), full_name(name), Api.NATIVE),
        stream=body.stream(),
        keep_alive_ns=keep_alive_ns(body.data.get("keep_alive")),
        load_only=not messages,
    )


def _short_id(request_id: int) -> int:
    """Ollama's ``rand.Intn(999)`` id suffix, made deterministic (and as non-unique)."""
    return request_id * 7919 % 999


def read_openai_chat(body: Body, models: Mapping[str, SimModel], request_id: int) -> Generation:
    name = body.text("model")
    messages = body.get("messages", "[]openai.Message") or []
    if not messages:
        raise Refusal(400, "[] is too short - 'messages'", Api.OPENAI, early=True)
    contents = openai_contents(messages)
    if not name:
        raise Refusal(400, "model is required", Api.OPENAI)
    model = _generator(models, name, Api.OPENAI, f"{full_name(name)} does not support chat")
    text = "\n".join(contents)
    chat_id = f"chatcmpl-{_short_id(request_id)}"
    return Generation(
        dialect=OpenAIChat(name, chat_id, int(time.time()), include_usage(body)),
        model=model,
        prompt=text,
        prompt_tokens=_chat_tokens(contents),
        directives=directives_in(text, Api.OPENAI),
        cap=max_tokens(body),
        thinking=_thinking(model, reasoning_effort(body), full_name(name), Api.OPENAI),
        stream=body.stream(),
    )


def read_openai_completion(
    body: Body, models: Mapping[str, SimModel], request_id: int
) -> Generation:
    name, prompt = body.text("model"), body.text("prompt")
    model = _generator(models, name, Api.OPENAI, f'"{name}" does not support generate')
    completion_id = f"cmpl-{_short_id(request_id)}"
    return Generation(
        dialect=OpenAICompletion(name, completion_id, int(time.time()), include_usage(body)),
        model=model,
        prompt=prompt,
        prompt_tokens=word_count(prompt) + GENERATE_TEMPLATE_TOKENS,
        directives=directives_in(prompt, Api.OPENAI),
        cap=max_tokens(body),
        thinking=model.thinks,  # no think field here: a thinking model thinks
        stream=body.stream(),
    )


Reader = Callable[[Body, Mapping[str, SimModel], int], Generation]
# path -> (error dialect, the Go type the body binds to, reader)
GENERATION_READERS: dict[str, tuple[Api, str, Reader]] = {
    "/api/generate": (Api.NATIVE, "api.GenerateRequest", read_generate),
    "/api/chat": (Api.NATIVE, "api.ChatRequest", read_chat),
    "/v1/chat/completions": (Api.OPENAI, "openai.ChatCompletionRequest", read_openai_chat),
    "/v1/completions": (Api.OPENAI, "openai.CompletionRequest", read_openai_completion),
}


def allowed(host_header: bytes | None, origin_header: bytes | None) -> bool:
    """Ollama's Host check (it listens on loopback) and its CORS origin check.

    Both answer a bare 403 in Ollama; a proxy must rewrite Host and drop Origin.
    """
    host = (host_header or b"").decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if not _host_allowed(host):
        return False
    if origin_header is None:
        return True
    origin = origin_header.decode("latin-1").lower()
    if origin in (f"http://{host}", f"https://{host}") or origin.startswith(_APP_SCHEMES):
        return True
    return any(
        origin == f"{scheme}{local}" or origin.startswith(f"{scheme}{local}:")
        for scheme in ("http://", "https://")
        for local in _LOCAL_ORIGINS
    )


def _host_allowed(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        names = ("", "localhost", socket.gethostname().lower())
        return host in names or host.endswith(_LOCAL_SUFFIXES)
    return address.is_loopback or address.is_private or address.is_unspecified
