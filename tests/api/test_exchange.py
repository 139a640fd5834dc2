"""The per-request state: which model a request names, and the body that goes upstream
(as received, or re-encoded without loss after a rewrite)."""

from __future__ import annotations

import json

import pytest

from ollama_proxy.api.body_rules import apply_openai_rules, parse_body
from ollama_proxy.api.exchange import Exchange
from ollama_proxy.api.models import Aliases
from ollama_proxy.api.routes import PREFIX_ROUTES, ROUTES
from ollama_proxy.http.messages import Request


def exchange(path: str, raw: bytes, method: str = "POST") -> Exchange:
    route = ROUTES[path]
    ex = Exchange(Request(method, path, path, "", [], raw, "127.0.0.1"), route, b"rid")
    ex.body_obj = parse_body(route, raw)
    return ex


@pytest.mark.parametrize(("path", "body", "model"), [
    ("/api/chat", {"model": "a", "name": "b"}, "a"),
    ("/api/chat", {"model": "a"}, "a"),
    ("/api/show", {"model": "a", "name": "b"}, "a"),
    ("/api/show", {"model": "", "name": "b"}, "b"),
    ("/api/show", {"name": "b"}, "b"),
    ("/api/pull", {"name": "b"}, "b"),
    ("/api/copy", {"source": "a", "destination": "b"}, None),
])
def test_the_model_is_the_one_the_backend_uses(path, body, model):
    """Ollama reads "name" only where its API still takes it (show and management),
    and only when "model" is empty: so does Exchange.model."""
    assert exchange(path, json.dumps(body).encode()).model == model


# -- re-encoding -------------------------------------------------------------------------


def test_an_unchanged_body_goes_as_received():
    """Bytes are forwarded untouched when nothing was rewritten (lone surrogates too)."""
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi\\udc00 \xc3\xa9"}]}'
    ex = exchange("/api/chat", raw)
    assert ex.body() is raw


@pytest.mark.parametrize(("content", "raw_utf8"), [
    ("hi\udc00", False), ("\udfff \u00e9", False), ("caf\u00e9 \U0001f600", True)])
def test_a_rewritten_body_is_valid_utf8_and_means_the_same(content, raw_utf8):
    """After a rewrite (here: usage injected into an OpenAI stream), the body is valid
    UTF-8 and decodes to what the client sent, a lone surrogate escape included."""
    raw = json.dumps({"model": "m", "stream": True,
                      "messages": [{"role": "user", "content": content}]}).encode()
    ex = exchange("/v1/chat/completions", raw)
    ex.body_dirty, _ = apply_openai_rules(ex.route, ex.body_obj, True)
    sent = ex.body()
    assert ex.body_dirty
    assert json.loads(sent.decode("utf-8"))["messages"][0]["content"] == json.loads(raw)[
        "messages"][0]["content"]
    assert json.loads(sent)["stream_options"] == {"include_usage": True}
    assert (content.encode("utf-8", "replace") in sent) is raw_utf8  # escaped only if it must be


@pytest.mark.parametrize(("method", "visible", "sent"), [
    ("HEAD", ("llama*",), "GET"), ("HEAD", None, "HEAD"), ("GET", ("llama*",), "GET")])
def test_a_filtered_listing_is_fetched_whole_for_a_head(method, visible, sent):
    """A HEAD of a model list that is filtered must announce the filtered length,
    which only the body tells: it goes upstream as a GET."""
    ex = exchange("/api/tags", b"", method)
    ex.visible_models = visible
    assert ex.upstream_method == sent


# -- aliases -----------------------------------------------------------------------------

ALIASES = Aliases([("gpt-4o-mini", "llama3.2:latest")])


def test_an_alias_in_the_body_becomes_its_target():
    """The field Ollama reads is rewritten (the body re-encoded); the alias is kept."""
    ex = exchange("/api/show", b'{"model": "", "name": "GPT-4o-mini"}')
    ex.resolve_alias(ALIASES)
    assert (ex.model, ex.alias) == ("llama3.2:latest", "GPT-4o-mini")
    assert json.loads(ex.body()) == {"model": "", "name": "llama3.2:latest"}


@pytest.mark.parametrize(("path", "raw"), [
    ("/api/chat", b'{"model": "llama3.2", "messages": []}'),  # not an alias
    ("/api/pull", b'{"name": "gpt-4o-mini"}'),  # management names models, never aliases
])
def test_a_body_without_an_alias_goes_as_received(path, raw):
    ex = exchange(path, raw)
    ex.resolve_alias(ALIASES)
    assert ex.alias is None and ex.body() is raw


def test_an_alias_in_the_path_is_asked_for_as_its_target():
    path = "/v1/models/gpt-4o-mini"
    ex = Exchange(Request("GET", path, path, "", [], b"", "127.0.0.1"), PREFIX_ROUTES[0][1], b"r")
    ex.resolve_alias(ALIASES)
    assert (ex.model, ex.upstream_target, ex.rewrites_reply) == (
        "llama3.2:latest", "/v1/models/llama3.2:latest", True)
    assert json.loads(ex.reply(b'{"id": "llama3.2:latest"}')) == {"id": "gpt-4o-mini"}
