"""The request-body checks, as tables: every field the gateway reads spelled as it
reads it and of its documented type, and the model's text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ollama_proxy.api.body_rules import parse_body
from ollama_proxy.api.models import MAX_MODEL_CHARS
from ollama_proxy.api.routes import ROUTES
from ollama_proxy.errors import BadRequest

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def parse(path: str, body: dict[str, Any] | bytes) -> dict[str, Any] | None:
    route = ROUTES[path]
    return parse_body(route, body if isinstance(body, bytes) else json.dumps(body).encode())


def refusal(path: str, body: dict[str, Any] | bytes) -> str:
    with pytest.raises(BadRequest) as info:
        parse(path, body)
    return info.value.message


# -- spellings ---------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "bad", "good"), [
    ("/api/chat", {"Model": "x", "messages": []}, '"Model"', '"model"'),
    ("/v1/chat/completions", {**CHAT, "MAX_TOKENS": 9}, '"MAX_TOKENS"', '"max_tokens"'),
    ("/v1/chat/completions", {**CHAT, "max_to\u212aen\u017f": 9}, "max_to", '"max_tokens"'),
    ("/v1/chat/completions", {**CHAT, "Max_Completion_Tokens": 9}, "Max_",
     '"max_completion_tokens"'),
    ("/api/chat", {**CHAT, "Options": {"num_predict": 9}}, '"Options"', '"options"'),
    ("/api/chat", {**CHAT, "options": {"Num_Predict": 9}}, '"options.Num_Predict"',
     '"options.num_predict"'),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"INCLUDE_USAGE": False}},
     '"stream_options.INCLUDE_USAGE"', '"stream_options.include_usage"'),
    ("/api/chat", {**CHAT, "Stream": False}, '"Stream"', '"stream"'),
    ("/v1/chat/completions", {**CHAT, "Stream_Options": {}}, '"Stream_Options"',
     '"stream_options"'),
    ("/api/chat", {"model": "m", "Messages": []}, '"Messages"', '"messages"'),
    ("/api/generate", {"model": "m", "PROMPT": "x"}, '"PROMPT"', '"prompt"'),
    ("/api/generate", {"model": "m", "System": "x"}, '"System"', '"system"'),
    ("/api/generate", {"model": "m", "Suffix": "x"}, '"Suffix"', '"suffix"'),
    ("/api/embed", {"model": "m", "Input": "x"}, '"Input"', '"input"'),
    ("/api/chat", {**CHAT, "Keep_Alive": 0}, '"Keep_Alive"', '"keep_alive"'),
    ("/api/show", {"Name": "m"}, '"Name"', '"name"'),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "Content": "x"}]},
     '"messages[0].Content"', '"messages[0].content"'),
])
def test_a_field_spelled_in_another_case_is_refused(path, body, bad, good):
    """A field the gateway reads, in another case where it reads it: 400 saying how to
    spell it (the backend would read it, the gateway would not)."""
    message = refusal(path, body)
    assert bad in message and f"must be spelled {good}" in message


@pytest.mark.parametrize(("path", "body"), [
    # a tool's JSON schema: properties named like our fields are not ours to judge
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "Model": {"type": "string"}, "Content": {}, "MAX_TOKENS": {}}}}}]}),
    ("/api/chat", {**CHAT, "format": {"properties": {"Prompt": {}, "Messages": {}}}}),
    ("/api/chat", {**CHAT, "options": {"temperature": 0.1, "Seed": 1}}),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x",
                                               "images": [], "Tool_Calls": []}]}),
    ("/api/chat", {**CHAT, "Name": "not the model here"}),  # only show and management read it
    ("/api/generate", {"model": "m", "prompt": "p", "Options2": {}}),
])
def test_spellings_are_not_judged_where_the_gateway_does_not_read(path, body):
    """Keys the gateway never reads, in any case, pass untouched."""
    assert parse(path, body) == body


# -- types -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/api/chat", {"model": 5, "messages": []}, '"model" must be a string'),
    ("/api/chat", {"model": ["llama3.2"]}, '"model" must be a string'),
    ("/api/chat", {"model": {"name": "x"}}, '"model" must be a string'),
    ("/api/chat", {"model": None, "messages": []}, '"model" is required'),
    ("/api/chat", {"messages": []}, '"model" is required'),
    ("/api/chat", {"model": "", "messages": []}, '"model" is required'),
    ("/api/chat", {"model": "", "name": "x"}, '"model" is required'),  # chat has no "name"
    ("/v1/embeddings", {"input": "x"}, '"model" is required'),
    ("/api/show", {}, '"model" is required'),
    ("/api/show", {"model": "", "name": 3}, '"name" must be a string'),
    ("/api/pull", {"model": 1}, '"model" must be a string'),
    ("/api/chat", {"model": "m", "messages": 5}, '"messages" must be a list'),
    ("/api/chat", {"model": "m", "messages": "hi"}, '"messages" must be a list'),
    ("/api/chat", {"model": "m", "messages": ["hi"]}, '"messages[0]" must be an object'),
    ("/api/generate", {"model": "m", "messages": {"content": "x"}}, '"messages" must be a list'),
    ("/api/generate", {"model": "m", "prompt": ["a"]}, '"prompt" must be a string'),
    ("/api/embeddings", {"model": "m", "prompt": 1}, '"prompt" must be a string'),
    ("/v1/completions", {"model": "m", "prompt": 1}, '"prompt" must be a string, a list'),
    ("/v1/completions", {"model": "m", "prompt": ["a", 1]}, '"prompt" must be a string, a list'),
    ("/v1/completions", {"model": "m", "prompt": [[1], "a"]}, '"prompt" must be a string, a list'),
    ("/v1/completions", {"model": "m", "prompt": [True]}, '"prompt" must be a string, a list'),
    ("/api/embed", {"model": "m", "input": 5}, '"input" must be a string or a list'),
    ("/v1/embeddings", {"model": "m", "input": {"a": 1}}, '"input" must be a string or a list'),
    ("/api/chat", {**CHAT, "options": [1]}, '"options" must be an object'),
    ("/api/embed", {"model": "m", "input": "x", "options": "fast"}, '"options" must be an object'),
    ("/v1/chat/completions", {**CHAT, "stream_options": True},
     '"stream_options" must be an object'),
    ("/v1/completions", {"model": "m", "prompt": "x", "stream_options": []},
     '"stream_options" must be an object'),
])
def test_fields_the_gateway_reads_must_have_their_documented_types(path, body, words):
    """A wrong type where the gateway reads a field is a 400, never a skipped check or
    a 500 (a number as the model skipped allowed_models; "messages": 5 was a 500)."""
    assert words in refusal(path, body)


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", {**CHAT, "options": None, "messages": None, "stream": None}),
    ("/api/show", {"name": "llama3.2"}),
    ("/api/show", {"model": None, "name": "llama3.2"}),
    ("/api/copy", {"source": "a", "destination": "b"}),
    ("/api/delete", {"name": "a"}),
    ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}),
    ("/v1/completions", {"model": "m", "prompt": [1, 2, 3]}),
    ("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]]}),
    ("/v1/completions", {"model": "m", "prompt": []}),
    ("/v1/embeddings", {"model": "m", "input": [[1, 2]]}),
    ("/api/embed", {"model": "m", "input": ["a", "b"]}),
    ("/v1/chat/completions", {**CHAT, "options": "not read on /v1"}),
    ("/api/generate", {"model": "m", "prompt": "p", "stream_options": 5}),  # not read natively
    ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
])
def test_documented_types_and_nulls_pass(path, body):
    """What the APIs allow passes, null included (it means absent)."""
    assert parse(path, body) == body


# -- the model's text --------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"model":"llama3.2\\udc00","messages":[]}', "lone surrogate"),
    (b'{"model":"\\ud800","messages":[]}', "lone surrogate"),
    (b'{"model":"llama3.2\\n","messages":[]}', "control character"),
    (b'{"model":"a\\u0000b","messages":[]}', "control character"),
    (b'{"model":"' + b"m" * (MAX_MODEL_CHARS + 1) + b'","messages":[]}', "longer than 1024"),
])
def test_a_model_no_backend_could_have_is_refused(raw, words):
    """The model reaches logs, the ledger and glob matching: text no model name has
    (lone surrogates, control characters, absurd lengths) is a 400."""
    assert words in refusal("/api/chat", raw)


def test_real_model_names_pass():
    """Long registry names, tags, digests and Unicode pass."""
    names = ["registry.example.com:5000/team/llama3.2:8b-instruct-q4_K_M",
             "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "m" * MAX_MODEL_CHARS,
             "llama3.2@sha256:" + "a" * 64, "mod\u00e8le-\U0001f999"]
    for name in names:
        assert parse("/api/chat", {"model": name})["model"] == name
