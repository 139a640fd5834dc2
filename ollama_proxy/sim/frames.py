"""How the simulated Ollama writes a generation, sans-IO: the token plan, the
final numbers, error bodies, and the frames of the three dialects (native
NDJSON, OpenAI chat SSE, OpenAI completions SSE), byte for byte as Ollama
writes them. Key order follows Go's struct field order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from .text import go_json, now_ns, pick_words, rfc3339nano

MODEL_ERROR = "an error was encountered while running the model"
JSON_CT = b"application/json; charset=utf-8"
# The /v1 writers set the type themselves, without a charset (middleware/openai.go).
OPENAI_JSON_CT = b"application/json"
NDJSON_CT = b"application/x-ndjson"
SSE_CT = b"text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"


class Api(enum.Enum):
    """The error dialect of an endpoint."""

    NATIVE = "native"
    OPENAI = "openai"


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token: one frame, one word (spaced from the 2nd on)."""

    text: str
    thinking: bool = False


def plan_tokens(
    prompt: str, natural: int, cap: int | None, thinking: bool
) -> tuple[list[Token], str]:
    """The tokens a generation emits and its done reason.

    ``natural`` is what the model would say; a smaller ``cap`` cuts it
    (``length``). A thinking model spends the first half on reasoning.
    """
    count = natural if cap is None else min(natural, cap)
    reasoning = natural // 2 if thinking else 0
    tokens = []
    for index, word in enumerate(pick_words(prompt, count)):
        first_of_channel = index in (0, reasoning)
        tokens.append(Token(word if first_of_channel else " " + word, index < reasoning))
    return tokens, "length" if count < natural else "stop"


@dataclass(frozen=True, slots=True)
class Stats:
    """The numbers of a finished generation (durations in ns; 0 = omitted)."""

    prompt_tokens: int
    completion_tokens: int
    done_reason: str
    total_ns: int = 0
    load_ns: int = 0
    prompt_eval_ns: int = 0
    eval_ns: int = 0
    context: list[int] | None = None

    def metrics(self) -> dict[str, int]:
        """Go's ``Metrics`` with ``omitempty``: zero values are left out."""
        pairs = (
            ("total_duration", self.total_ns),
            ("load_duration", self.load_ns),
            ("prompt_eval_count", self.prompt_tokens),
            ("prompt_eval_duration", self.prompt_eval_ns),
            ("eval_count", self.completion_tokens),
            ("eval_duration", self.eval_ns),
        )
        return {key: value for key, value in pairs if value}

    def usage(self) -> dict[str, int]:
        """The OpenAI ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def error_body(api: Api, status: int, message: str, *, early: bool = False) -> tuple[bytes, bytes]:
    """``(content_type, body)`` of an error in the API's shape.

    On /v1, errors the middleware raises ``early`` (bad JSON, bad fields) go
    out through gin's ``c.JSON``; the native handler's errors are rewritten
    by ``writeError`` with ``json.Encoder`` (type without charset, trailing
    newline).
    """
    if api is Api.NATIVE:
        return JSON_CT, go_json({"error": message})
    kind = _OPENAI_ERROR_TYPES.get(status, "api_error")
    body = go_json({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return (JSON_CT, body) if early else (OPENAI_JSON_CT, body + b"\n")


class Dialect(Protocol):
    """How one API writes a generation: per-token frames, the end, errors."""

    @property
    def model(self) -> str: ...
    @property
    def api(self) -> Api: ...
    @property
    def stream_type(self) -> bytes: ...

    def frame(self, token: Token, first: bool) -> bytes: ...
    def closing(self, stats: Stats) -> list[bytes]: ...
    def stream_error(self, first: bool) -> list[bytes]: ...
    def whole(self, tokens: list[Token], stats: Stats) -> tuple[bytes, bytes]: ...


def _joined(tokens: list[Token], thinking: bool) -> str:
    return "".join(token.text for token in tokens if token.thinking is thinking)


@dataclass(frozen=True, slots=True)
class Native:
    """``/api/generate`` (``response``) or ``/api/chat`` (``message``) NDJSON."""

    model: str
    chat: bool
    api: Api = Api.NATIVE
    stream_type: bytes = NDJSON_CT

    def _object(self, text: str, thinking: str, stats: Stats | None) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": self.model, "created_at": rfc3339nano(now_ns())}
        done = stats is not None
        if self.chat:  # ChatResponse puts done_reason before done
            message = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            obj["message"] = message
            if stats is not None:
                obj["done_reason"] = stats.done_reason
            obj["done"] = done
        else:
            obj["response"] = text
            if thinking:
                obj["thinking"] = thinking
            obj["done"] = done
            if stats is not None:
                obj["done_reason"] = stats.done_reason
                if stats.context:
                    obj["context"] = stats.context
        if stats is not None:
            obj.update(stats.metrics())
        return obj

    def frame(self, token: Token, first: bool) -> bytes:
        if token.thinking:
            return go_json(self._object("", token.text, None)) + b"\n"
        return go_json(self._object(token.text, "", None)) + b"\n"

    def closing(self, stats: Stats) -> list[bytes]:
        return [go_json(self._object("", "", stats)) + b"\n"]

    def stream_error(self, first: bool) -> list[bytes]:
        return [go_json({"error": MODEL_ERROR}) + b"\n"]

    def whole(self, tokens: list[Token], stats: Stats) -> tuple[bytes, bytes]:
        obj = self._object(_joined(tokens, False), _joined(tokens, True), stats)
        return JSON_CT, go_json(obj)


def _event(obj: Any) -> bytes:
    return b"data: " + go_json(obj) + b"\n\n"


@dataclass(frozen=True, slots=True)
class OpenAIChat:
    """``/v1/chat/completions``: SSE chunks, or one ``chat.completion``."""

    model: str
    id: str
    created: int
    include_usage: bool = False
    api: Api = Api.OPENAI
    stream_type: bytes = SSE_CT

    def _chunk(self, model: str, choices: list[Any], usage: dict[str, int] | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return _event(obj)

    @staticmethod
    def _delta(delta: dict[str, str], finish: str | None = None) -> list[Any]:
        return [{"index": 0, "delta": delta, "finish_reason": finish}]

    def frame(self, token: Token, first: bool) -> bytes:
        delta = {"role": "assistant"} if first else {}
        if token.thinking:
            delta.update(content="", reasoning=token.text)
        else:
            delta["content"] = token.text
        return self._chunk(self.model, self._delta(delta))

    def closing(self, stats: Stats) -> list[bytes]:
        events = [self._chunk(self.model, self._delta({}, stats.done_reason))]
        if self.include_usage:
            events.append(self._chunk(self.model, [], stats.usage()))
        events.append(SSE_DONE)
        return events

    def stream_error(self, first: bool) -> list[bytes]:
        # ChatWriter decodes the {"error":...} line as an empty ChatResponse (no model).
        delta = {"role": "assistant", "content": ""} if first else {"content": ""}
        return [self._chunk("", self._delta(delta))]

    def whole(self, tokens: list[Token], stats: Stats) -> tuple[bytes, bytes]:
        message = {"role": "assistant", "content": _joined(tokens, False)}
        reasoning = _joined(tokens, True)
        if reasoning:
            message["reasoning"] = reasoning
        obj = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": stats.done_reason}],
            "usage": stats.usage(),
        }
        return OPENAI_JSON_CT, go_json(obj) + b"\n"


@dataclass(frozen=True, slots=True)
class OpenAICompletion:
    """``/v1/completions``: ``text_completion`` chunks (choices before model, as Go's struct)."""

    model: str
    id: str
    created: int
    include_usage: bool = False
    api: Api = Api.OPENAI
    stream_type: bytes = SSE_CT

    def _chunk(self, model: str, choices: list[Any], usage: dict[str, int] | None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "choices": choices,
            "model": model,
            "system_fingerprint": "fp_ollama",
        }
        if usage is not None:
            obj["usage"] = usage
        return _event(obj)

    @staticmethod
    def _text(text: str, finish: str | None = None) -> list[Any]:
        return [{"text": text, "index": 0, "finish_reason": finish}]

    def _placeholder(self) -> dict[str, int] | None:
        # The quirk: with include_usage every chunk carries zero usage.
        return Stats(0, 0, "").usage() if self.include_usage else None

    def frame(self, token: Token, first: bool) -> bytes:
        # This layer forwards only ``response``: reasoning tokens show as "".
        text = "" if token.thinking else token.text
        return self._chunk(self.model, self._text(text), self._placeholder())

    def closing(self, stats: Stats) -> list[bytes]:
        events = [self._chunk(self.model, self._text("", stats.done_reason), self._placeholder())]
        if self.include_usage:
            events.append(self._chunk(self.model, [], stats.usage()))
        events.append(SSE_DONE)
        return events

    def stream_error(self, first: bool) -> list[bytes]:
        return [self._chunk("", self._text(""), self._placeholder())]

    def whole(self, tokens: list[Token], stats: Stats) -> tuple[bytes, bytes]:
        choice = {"text": _joined(tokens, False), "index": 0, "finish_reason": stats.done_reason}
        obj = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
            "usage": stats.usage(),
        }
        return OPENAI_JSON_CT, go_json(obj) + b"\n"
