"""The learned prompt overheads: message shapes, learning per basis/route/model/shape,
the model's latest as the fallback, confirmation, the bound, and the usage hook."""

from __future__ import annotations

import dataclasses

import pytest

from ollama_proxy.api.body_rules import parse_body
from ollama_proxy.api.exchange import Exchange
from ollama_proxy.api.prompt_overhead import (
    FLOOR_OF,
    MAX_TEXT_OVERHEAD,
    TEXT,
    PromptOverheads,
    prompt_shape,
)
from ollama_proxy.api.record import RequestRecord
from ollama_proxy.api.routes import ROUTES
from ollama_proxy.http.messages import Request

USER = {"role": "user", "content": "Say hello."}


@pytest.mark.parametrize(("body", "shape"), [
    ({"messages": [USER]}, ("user",)),
    ({"messages": [{"role": "system", "content": "Be brief."}, USER,
                   {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]},
     ("system", "user", "assistant", "user")),
    ({"messages": []}, ()),
    ({"prompt": "Once upon a time"}, ("prompt",)),
    ({"prompt": "x", "system": "Be brief.", "raw": False}, ("system", "prompt")),
    ({"input": ["a", "b"]}, ("input", "input")),
    ({"input": "a"}, ("input",)),
    ({"messages": [USER], "tools": []}, None),  # the template renders the tools
    ({"messages": [{**USER, "name": "ann"}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, None),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": []}]}, None),
    ({"messages": "hi"}, None),
    ({"messages": [5]}, None),
    (None, None),
])
def test_prompt_shape(body, shape):
    """A prompt's shape is what a template's cost depends on; None where it is more."""
    assert prompt_shape(body) == shape


def test_overhead_per_shape_with_the_model_latest_as_fallback():
    """A shape's own overhead when learned, else the model's on that route (not
    confirmed; on the TEXT basis the least seen), else nothing; routes, bases and models
    are apart; names are canonical."""
    o = PromptOverheads()
    assert o.overhead(TEXT, "openai_chat", "tiny", ("user",)) == (0, False)
    o.learn(TEXT, "openai_chat", "tiny", ("user",), 37, 3)
    o.learn(TEXT, "openai_chat", "tiny", ("system", "user", "assistant", "user"), 68, 9)
    assert o.overhead(TEXT, "openai_chat", "TINY:latest", ("user",)) == (37, False)
    assert o.overhead(TEXT, "openai_chat", "tiny", ("user", "user")) == (37, False)
    assert o.overhead(TEXT, "openai_chat", "tiny", None) == (37, False)
    assert o.overhead(TEXT, "openai_completions", "tiny", ("user",)) == (0, False)
    assert o.overhead("tokenizer:b", "openai_chat", "tiny", ("user",)) == (0, False)
    assert o.overhead(TEXT, "openai_chat", "other", ("user",)) == (0, False)
    o.learn("tokenizer:b", "openai_chat", "tiny", ("user",), 30, 3)
    o.learn("tokenizer:b", "openai_chat", "tiny", ("user", "user"), 50, 9)
    assert o.overhead("tokenizer:b", "openai_chat", "tiny", None) == (50, False)  # latest


def test_one_users_prompt_cannot_inflate_everyones_text_overhead():
    """TEXT basis: the overhead is the least of the latest seen, never above
    MAX_TEXT_OVERHEAD: 8,000 characters of Chinese counted 8,030 tokens (an 'overhead'
    of 6,030 to the 4-characters estimate) leave the next 'hi' at 1 + 37."""
    o = PromptOverheads()
    shape = ("user",)
    o.learn(TEXT, "openai_chat", "tiny", shape, 37, 3)
    o.learn(TEXT, "openai_chat", "tiny", shape, 6030, 2000)
    assert o.overhead(TEXT, "openai_chat", "tiny", shape) == (37, False)
    fresh = PromptOverheads()
    fresh.learn(TEXT, "openai_chat", "tiny", shape, 6030, 2000)
    assert fresh.overhead(TEXT, "openai_chat", "tiny", shape)[0] == MAX_TEXT_OVERHEAD
    for _ in range(FLOOR_OF):  # the template really changed: the floor follows, in time
        o.learn(TEXT, "openai_chat", "tiny", shape, 50, 3)
    assert o.overhead(TEXT, "openai_chat", "tiny", shape)[0] == 50


def test_an_overhead_seen_twice_in_a_row_is_confirmed():
    """Confirmed: the same overhead from two counts in a row over texts of different
    sizes (the same prompt twice proves nothing); a different one starts over."""
    o = PromptOverheads()
    shape = ("user",)
    o.learn("tokenizer:b", "openai_chat", "tiny", shape, 30, 10)
    assert o.overhead("tokenizer:b", "openai_chat", "tiny", shape) == (30, False)
    o.learn("tokenizer:b", "openai_chat", "tiny", shape, 30, 10)
    assert o.overhead("tokenizer:b", "openai_chat", "tiny", shape) == (30, False)
    o.learn("tokenizer:b", "openai_chat", "tiny", shape, 30, 16)
    assert o.overhead("tokenizer:b", "openai_chat", "tiny", shape) == (30, True)
    o.learn("tokenizer:b", "openai_chat", "tiny", shape, 31, 12)
    assert o.overhead("tokenizer:b", "openai_chat", "tiny", shape) == (31, False)


def test_learned_entries_are_bounded():
    """Past the bound the table starts afresh instead of growing."""
    o = PromptOverheads(max_entries=4)
    for n in range(10):
        o.learn(TEXT, "chat", f"m{n}", ("user",), n, 1)
        assert len(o._learned) <= 4
    assert o.overhead(TEXT, "chat", "m9", ("user",)) == (9, False)


def test_text_estimate_adds_only_a_positive_overhead():
    """The text estimate plus what the template adds; a text that over-counts adds 0."""
    o = PromptOverheads()
    body = {"model": "tiny", "messages": [USER]}
    assert o.text_estimate("openai_chat", "tiny", body) == (3, 0)
    o.learn(TEXT, "openai_chat", "tiny", ("user",), 37, 3)
    assert o.text_estimate("openai_chat", "tiny", body) == (3, 37)
    assert o.text_estimate("openai_chat", None, body) == (3, 0)
    o.learn(TEXT, "openai_chat", "tiny", ("user",), -2, 3)
    assert o.text_estimate("openai_chat", "tiny", body) == (3, 0)


def exchange(path: str, body: bytes) -> Exchange:
    route = ROUTES[path]
    ex = Exchange(Request("POST", path, path, "", [], body, "127.0.0.1"), route, b"rid")
    ex.body_obj = parse_body(route, body)
    return ex


def record(prompt: int, estimated: bool = False) -> RequestRecord:
    return RequestRecord(request_id="rid", time=0.0, endpoint="/v1/chat/completions",
                       model="tiny", backend="b", status=200, outcome="ok",
                       prompt_tokens=prompt, completion_tokens=8, estimated=estimated,
                       stream=True, duration_s=0.1, ttfb_s=0.01, client="127.0.0.1")


def test_observe_learns_from_exact_generation_rows_only():
    """The usage hook learns exact count minus text estimate, and nothing from estimated
    rows, rows without a prompt count or model, or routes that are not metered."""
    o = PromptOverheads()
    chat = exchange("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user",'
                                            b'"content":"Say hello."}]}')
    o.observe(chat, record(50, estimated=True))
    o.observe(chat, record(0))
    tags = exchange("/api/tags", b"")
    o.observe(tags, record(40))
    assert o._learned == {}
    o.observe(chat, record(40))
    assert o.estimate(chat) == 40
    nameless = exchange("/v1/chat/completions", b'{"model":"tiny","messages":[]}')
    nameless.body_obj = {"messages": []}  # what the relay never lets through: no model
    o.observe(nameless, dataclasses.replace(record(40)))
    assert o.overhead(TEXT, "openai_chat", "tiny", ("user",)) == (37, False)
