"""api/models.py: model names compared as Ollama does, globs, and the model lists
filtered by them."""

from __future__ import annotations

import json

import pytest

from ollama_proxy.api.models import Aliases, filter_listing, model_allowed, rename_model


@pytest.mark.parametrize(("globs", "model", "ok"), [
    (None, "anything", True),
    ((), "llama3.2", False),
    (("llama3.2",), "llama3.2", True),
    (("llama3.2",), "llama3.2:latest", True),
    (("llama3.2:latest",), "llama3.2", True),
    (("llama3.2",), "llama3.2:1b", False),
    (("LLaMA3.2",), "llama3.2:LATEST", True),
    (("llama3.2",), "registry.ollama.ai/library/llama3.2:latest", True),
    (("registry.ollama.ai/library/llama3.2",), "llama3.2", True),
    (("llama*",), "llama3.2:1b", True),
    (("llama3.2:*",), "llama3.2", True),
    (("qwen*", "mistral"), "llama3.2", False),
    (("*",), "hf.co/user/model:q4", True),
    (("myhost:5000/m",), "myhost:5000/m", True),
])
def test_model_allowed(globs, model, ok):
    """Globs are case-insensitive; :latest is implied; the registry prefix is ignored."""
    assert model_allowed(globs, model) is ok


@pytest.mark.parametrize(("body", "kept"), [
    ({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"},
                 {"name": "qwen2.5:7b", "model": "qwen2.5:7b"}]}, ["llama3.2:latest"]),
    ({"object": "list", "data": [{"id": "qwen2.5:7b"}, {"id": "llama3.2:1b"}]}, ["llama3.2:1b"]),
    ({"models": [{"model": "llama3.2"}, "junk", {"name": 7}]}, ["llama3.2"]),
])
def test_filter_listing_keeps_allowed_models(body, kept):
    """/api/tags, /api/ps and /v1/models replies lose the models the globs do not allow."""
    got = json.loads(filter_listing(("llama*",), json.dumps(body).encode()))
    entries = got.get("models", got.get("data"))
    assert [e.get("name") or e.get("model") or e.get("id") for e in entries] == kept
    assert got.get("object") == body.get("object")


def test_filter_listing_returns_the_same_bytes_when_nothing_goes():
    """Nothing filtered or not a listing: the backend's bytes, not a re-serialisation."""
    for raw in (b'{"models": [{"name": "llama3.2"}]}', b"not json", b"[1]", b'{"a": 1}'):
        assert filter_listing(("llama*",), raw) is raw


ALIASES = Aliases([("gpt-4o-mini", "llama3.2:latest"), ("embedder", "nomic-embed-text"),
                   ("qwen2.5:7b", "llama3.2")])
TAGS = {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 7},
                   {"name": "qwen2.5:7b", "model": "qwen2.5:7b", "size": 9}]}


def names(raw: bytes) -> list[str]:
    doc = json.loads(raw)
    return [e.get("name") or e.get("id") for e in doc.get("models", doc.get("data", []))]


def test_aliases_are_listed_as_copies_of_their_targets():
    """An alias whose target is listed gets the target's entry under its own name (an
    alias without its target listed is not shown); a model an alias shadows is left out."""
    got = json.loads(filter_listing(None, json.dumps(TAGS).encode(), ALIASES))
    assert got["models"] == [
        {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 7},
        {"name": "gpt-4o-mini", "model": "gpt-4o-mini", "size": 7},
        {"name": "qwen2.5:7b", "model": "qwen2.5:7b", "size": 7},
    ]
    v1 = {"object": "list", "data": [{"id": "llama3.2", "object": "model", "owned_by": "library"}]}
    got = json.loads(filter_listing(None, json.dumps(v1).encode(), ALIASES))
    assert got["data"][1] == {"id": "gpt-4o-mini", "object": "model", "owned_by": "library"}


@pytest.mark.parametrize(("globs", "listed"), [
    (("llama*",), ["llama3.2:latest", "gpt-4o-mini", "qwen2.5:7b"]),  # by the target
    (("gpt-*",), ["gpt-4o-mini"]),  # by the alias's own name
    (("mistral",), []),
])
def test_aliases_are_listed_when_the_target_or_the_alias_is_allowed(globs, listed):
    assert names(filter_listing(globs, json.dumps(TAGS).encode(), ALIASES)) == listed


def test_rename_model_gives_the_alias_its_id():
    body = b'{"id":"llama3.2:latest","object":"model","created":1}'
    assert json.loads(rename_model(body, "gpt-4o-mini")) == {
        "id": "gpt-4o-mini", "object": "model", "created": 1}
    assert rename_model(b"not json", "x") == b"not json"


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"models":' * 50_000])
def test_a_list_nested_too_deep_comes_back_unchanged(body):
    """A hostile reply nested past the parser's depth is passed on, not a crash."""
    assert filter_listing(("llama*",), body) == body
    assert rename_model(body, "alias") == body


def test_a_lone_surrogate_survives_filtering():
    """A "\\udc00" escape cannot be UTF-8: the filtered list escapes it again."""
    body = b'{"models":[{"name":"llama3.2:latest","x":"\\udc00"},{"name":"qwen:1b"}]}'
    got = filter_listing(("llama*",), body)
    assert json.loads(got) == {"models": [{"name": "llama3.2:latest", "x": "\udc00"}]}
