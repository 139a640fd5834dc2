"""Counting with a backend's own tokenizer, sans-IO: which endpoint a server
has, what to send it and what its answer means.

A stream from a server that ignores ``stream_options.include_usage`` (the
llama.cpp servers) ends without counts. Most such servers can count for us:

* vLLM: ``POST /tokenize`` ``{"model", "prompt"}`` or ``{"model", "messages"}``
  (the chat template applied) answers ``{"count", "tokens", "max_model_len"}``.
* llama.cpp's llama-server: ``POST /tokenize`` ``{"content", "add_special"}``
  answers ``{"tokens"}``; ``POST /apply-template`` ``{"messages"}`` answers
  ``{"prompt"}``, the text its chat path tokenizes (with specials).
* llama-cpp-python: ``POST /extras/tokenize/count`` ``{"input"}`` answers
  ``{"count"}``: text only, special tokens parsed, BOS always added.

Each job is a generator (``Counting``): it yields the ``Call`` to make and is
sent the ``Answer``; the trio shell (``recount.py``) does the I/O. A count is
*exact* when the backend counted the text it generated from: a completion
prompt, a chat prompt through vLLM's or llama-server's template, the streamed
text. llama-cpp-python cannot apply its template, so a chat prompt there is
its messages' text counted plus the template's overhead learned from that
shape's exact counts, exact only once confirmed (``prompt_overhead.py``).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Generator

from .framing import sse_data, sse_events
from .routes import Route, Text

# Answers that say "not this endpoint, or not this dialect's body": try the next one.
ABSENT = frozenset({400, 404, 405, 422, 501})
# Chat request fields the template renders; passed on to a server that applies it.
TEMPLATE_FIELDS = ("tools", "tool_choice", "chat_template", "chat_template_kwargs",
                   "documents", "add_generation_prompt", "continue_final_message",
                   "add_special_tokens")


class Dialect(enum.Enum):
    VLLM = "vllm"
    LLAMA_SERVER = "llama-server"
    LLAMA_CPP_PYTHON = "llama-cpp-python"


class CountError(Exception):
    """A tokenize answer that cannot be used (the estimate stays)."""


@dataclass(frozen=True, slots=True)
class Call:
    """One ``POST`` to the backend."""

    path: str
    body: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any  # the parsed JSON, None when it was not JSON


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """A backend's tokenize endpoint, found: ``bos`` is what counting "" gives
    (llama-cpp-python always adds it; the others are asked without specials)."""

    dialect: Dialect
    bos: int = 0


Counting = Generator[Call, Answer, Any]


def parse_answer(status: int, raw: bytes) -> Answer:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return Answer(status, body)


def discover(model: str) -> Counting:
    """Which tokenizer the backend has: a ``Tokenizer``, or None when no endpoint
    answers in its dialect's shape (the caller remembers it). Any other answer
    (a 5xx, a refused key) raises ``CountError``: ask again later."""
    probes = (
        (Dialect.LLAMA_CPP_PYTHON, Call("/extras/tokenize/count", {"input": ""})),
        (Dialect.LLAMA_SERVER, Call("/tokenize", {"content": "", "add_special": False})),
        (Dialect.VLLM, Call("/tokenize", {"model": model, "prompt": "",
                                          "add_special_tokens": False})),
    )
    for dialect, call in probes:
        answer = yield call
        if answer.status in ABSENT:
            continue
        if answer.status != 200:
            raise CountError(f"{call.path} answered {answer.status}")
        count = _count_of(dialect, answer.body)
        # vLLM takes the llama-server probe's body as a prompt: its "count" tells it apart
        if count is not None and not (dialect is Dialect.LLAMA_SERVER and "count" in answer.body):
            return Tokenizer(dialect, count if dialect is Dialect.LLAMA_CPP_PYTHON else 0)
    return None


def _count_of(dialect: Dialect, body: Any) -> int | None:
    """The count in a tokenize answer of ``dialect``'s shape, else None."""
    if not isinstance(body, dict):
        return None
    if dialect is Dialect.LLAMA_SERVER:
        tokens = body.get("tokens")
        return len(tokens) if isinstance(tokens, list) else None
    count = body.get("count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    return None


def _read_count(dialect: Dialect, answer: Answer) -> int:
    count = _count_of(dialect, answer.body) if answer.status == 200 else None
    if count is None:
        raise CountError(f"the tokenizer answered {answer.status} without a count")
    return count


def count_text(tok: Tokenizer, model: str, text: str, *, special: bool) -> Counting:
    """Tokens of ``text``: with ``special``, as the backend counts a prompt (BOS and
    the like added), else the bare text (a completion)."""
    if tok.dialect is Dialect.LLAMA_CPP_PYTHON:
        answer = yield Call("/extras/tokenize/count", {"input": text})
        count = _read_count(tok.dialect, answer)
        return count if special else max(0, count - tok.bos)
    if tok.dialect is Dialect.LLAMA_SERVER:
        answer = yield Call("/tokenize", {"content": text, "add_special": special})
    else:
        answer = yield Call("/tokenize", {"model": model, "prompt": text,
                                          "add_special_tokens": special})
    return _read_count(tok.dialect, answer)


def chat_prompt_exact(tok: Tokenizer, model: str, body: dict[str, Any]) -> Counting:
    """The prompt tokens of a chat request where the backend applies its template
    (vLLM, llama-server); raises ``CountError`` for llama-cpp-python."""
    fields = {name: body[name] for name in TEMPLATE_FIELDS if name in body}
    if tok.dialect is Dialect.VLLM:
        call = Call("/tokenize", {"add_generation_prompt": True, **fields, "model": model,
                                  "messages": body["messages"]})
        return _read_count(tok.dialect, (yield call))
    if tok.dialect is Dialect.LLAMA_SERVER:
        answer = yield Call("/apply-template", {**fields, "messages": body["messages"]})
        prompt = answer.body.get("prompt") if isinstance(answer.body, dict) else None
        if answer.status != 200 or not isinstance(prompt, str):
            raise CountError(f"/apply-template answered {answer.status} without a prompt")
        # its chat path tokenizes the rendered prompt with specials (BOS) parsed and added
        return (yield from count_text(tok, model, prompt, special=True))
    raise CountError("this tokenizer cannot apply the chat template")


def contents_tokens(tok: Tokenizer, model: str, contents: list[str]) -> Counting:
    """The messages' own tokens, without what a tokenizer adds to every text."""
    total = 0
    for text in contents:
        total += yield from count_text(tok, model, text, special=False)
    return total


# -- what a stream said ------------------------------------------------------------------

_TEXT_FIELDS = ("content", "text")
# Generated tokens a text count would miss or get wrong: reasoning (its tags are
# stripped), tool calls (rendered through the template), refusals.
_UNCOUNTABLE = ("reasoning", "reasoning_content", "tool_calls", "function_call", "refusal")


def streamed_text(frames: list[bytes]) -> list[str] | None:
    """The text of each choice of an OpenAI SSE stream (chat deltas or completion
    chunks), from the frames as relayed; None when it holds what a text count
    cannot stand for exactly (reasoning, tool calls, unreadable chunks)."""
    texts: dict[int, list[str]] = {}
    region = b"".join(frames)
    for start, end in sse_events(region):
        data = sse_data(region[start:end])
        if data is None or data.startswith(b"[DONE]"):
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
            return None
        for choice in chunk.get("choices") or ():
            piece = _choice_text(choice)
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            if piece is None or type(index) is not int:  # a backend's frame is not trusted
                return None
            texts.setdefault(index, []).append(piece)
    return ["".join(pieces) for _, pieces in sorted(texts.items())]


def _choice_text(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    delta = choice.get("delta", choice)  # chat: a delta; completions: the choice itself
    if not isinstance(delta, dict) or any(delta.get(name) for name in _UNCOUNTABLE):
        return None
    pieces = [delta.get(name) for name in _TEXT_FIELDS]
    if not all(piece is None or isinstance(piece, str) for piece in pieces):
        return None
    return "".join(piece for piece in pieces if piece)


def completion_prompt(body: Any) -> str | None:
    """The text of a ``/v1/completions`` prompt the backend counts as it is (one
    string, no suffix, no echo); None otherwise."""
    if not isinstance(body, dict) or body.get("suffix") or body.get("echo"):
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None


def chat_contents(body: Any) -> list[str] | None:
    """The message texts of a chat request made only of role and text content."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return None
    contents: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            return None
        contents.append(content)
    return contents


# -- the jobs -----------------------------------------------------------------------------


def stream_counts(tok: Tokenizer, model: str, route: Route, body: Any, frames: list[bytes],
                  overhead: tuple[int, bool]) -> Counting:
    """Exact ``(prompt_tokens, completion_tokens)`` of a finished stream on ``route``
    (an OpenAI chat or completion), or None when they cannot be exact.
    ``overhead``: the learned template overhead of this prompt's shape on this
    tokenizer and whether it is confirmed (what a llama-cpp-python chat needs)."""
    texts = streamed_text(frames)
    if texts is None:
        return None
    if route.text is Text.OPENAI_PROMPT:
        text = completion_prompt(body)
        if text is None:
            return None
        prompt = yield from count_text(tok, model, text, special=True)
    else:
        contents = chat_contents(body)  # text only: images are tokens no text count sees
        if contents is None:
            return None
        if tok.dialect is not Dialect.LLAMA_CPP_PYTHON:
            prompt = yield from chat_prompt_exact(tok, model, body)
        elif overhead[1]:
            prompt = overhead[0] + (yield from contents_tokens(tok, model, contents))
        else:
            return None  # no confirmed template overhead: the estimate stays
    completion = 0
    for text in texts:
        completion += yield from count_text(tok, model, text, special=False)
    return prompt, completion


def template_overhead(tok: Tokenizer, model: str, body: Any, prompt_tokens: int) -> Counting:
    """``(overhead, text tokens)``: what the template added to a chat prompt the
    backend counted (``prompt_tokens``) beyond its messages' own tokens; None if it is
    not a text chat."""
    contents = chat_contents(body)
    if contents is None:
        return None
    text = yield from contents_tokens(tok, model, contents)
    return prompt_tokens - text, text
