"""api/models.py: model names compared as Ollama does, globs, and the model lists
filtered by them."""

from __future__ import annotations

import json

import pytest

from ollama_proxy.api.models import filter_listing, model_allowed


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
