"""The tokenize dialects as pure jobs: each driven against an in-memory backend of its
dialect (one token per character, ChatML), discovery, the counts of finished streams,
the text of a stream, and answers that cannot be used."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

from ollama_proxy.api.routes import ROUTES
from ollama_proxy.api.tokenizer import (
    Answer,
    Call,
    CountError,
    Dialect,
    Tokenizer,
    chat_contents,
    completion_prompt,
    discover,
    parse_answer,
    stream_counts,
    streamed_text,
    template_overhead,
)
from ollama_proxy.sim.llamacpp import char_tokens, chatml

CHAT, COMPLETIONS = ROUTES["/v1/chat/completions"], ROUTES["/v1/completions"]

Backend = Callable[[Call], Answer]
NOT_FOUND = Answer(404, {"detail": "Not Found"})


def llama_cpp_python(call: Call) -> Answer:
    if call.path == "/extras/tokenize/count":
        return Answer(200, {"count": char_tokens(call.body["input"], add_bos=True)})
    return NOT_FOUND


def llama_server(call: Call) -> Answer:
    if call.path == "/tokenize":
        count = char_tokens(call.body.get("content", ""), add_bos=call.body.get("add_special"))
        return Answer(200, {"tokens": list(range(count))})
    if call.path == "/apply-template":
        return Answer(200, {"prompt": chatml(call.body["messages"])})
    return Answer(404, "File Not Found")


def vllm(call: Call) -> Answer:
    if call.path != "/tokenize" or "model" not in call.body:
        return NOT_FOUND if call.path != "/tokenize" else Answer(400, {"object": "error"})
    if "messages" in call.body:
        assert call.body["add_generation_prompt"] is True
        count = char_tokens(chatml(call.body["messages"]),
                            add_bos=call.body.get("add_special_tokens", False))
    else:
        count = char_tokens(call.body["prompt"], add_bos=call.body.get("add_special_tokens", True))
    return Answer(200, {"count": count, "tokens": list(range(count)), "max_model_len": 2048})


def ollama(call: Call) -> Answer:
    return Answer(404, None)  # "404 page not found" is no JSON


def drive(job, backend: Backend) -> tuple[Any, list[Call]]:
    """Run a job to its end, answering each call as ``backend`` would."""
    calls: list[Call] = []
    try:
        call = next(job)
        while True:
            calls.append(call)
            json.loads(call.encode())  # every body goes out as JSON
            call = job.send(backend(call))
    except StopIteration as end:
        return end.value, calls


@pytest.mark.parametrize(("backend", "found", "asked"), [
    (llama_cpp_python, Tokenizer(Dialect.LLAMA_CPP_PYTHON, 1), 1),
    (llama_server, Tokenizer(Dialect.LLAMA_SERVER, 0), 2),
    (vllm, Tokenizer(Dialect.VLLM, 0), 3),
    (ollama, None, 3),  # no endpoint at all: remembered by the caller
    (lambda call: Answer(200, {"count": 0}) if call.path == "/tokenize" else NOT_FOUND,
     Tokenizer(Dialect.VLLM, 0), 3),  # a /tokenize that took the probe as a vLLM prompt
    (lambda call: Answer(200, {"ok": True}), None, 3),  # answers anything: no tokenizer
])
def test_discover(backend, found, asked):
    """The probes in order, the dialect told by the answer's shape."""
    result, calls = drive(discover("tiny"), backend)
    assert result == found and len(calls) == asked


@pytest.mark.parametrize("status", [500, 401, 503])
def test_discover_fails_on_an_answer_that_is_not_an_absence(status):
    """A 5xx or a refused key says nothing about the endpoint: try again later."""
    with pytest.raises(CountError):
        drive(discover("tiny"), lambda call: Answer(status, None))


def sse(*chunks: dict[str, Any]) -> list[bytes]:
    """Frames as a stream relays them, in uneven pieces."""
    data = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks)
    data += b"data: [DONE]\r\n\r\n"
    return [data[:7], data[7:100], data[100:]]


def delta(d: dict[str, Any], finish: str | None = None, index: Any = 0) -> dict[str, Any]:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": d, "finish_reason": finish}]}


def text(t: str, finish: str | None = None) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"text": t, "index": 0,
                                                      "finish_reason": finish}]}


CHAT_FRAMES = sse(delta({"role": "assistant"}), *(delta({"content": c}) for c in "a sWta o"),
                  delta({}, "length"))
COMPLETION_FRAMES = sse(*(text(c) for c in ", srsWta"), text("", "length"))
SAY_HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}],
             "max_tokens": 8, "stream": True}
FOUR = {"model": "tiny", "messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]}
ONCE = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "stream": True}


@pytest.mark.parametrize(("backend", "tok"), [
    (llama_server, Tokenizer(Dialect.LLAMA_SERVER)),
    (vllm, Tokenizer(Dialect.VLLM)),
])
@pytest.mark.parametrize(("body", "prompt"), [(SAY_HELLO, 40), (FOUR, 77)])
def test_chat_streams_count_exactly_where_the_backend_applies_its_template(
        backend, tok, body, prompt):
    """vLLM counts the messages itself, llama-server renders them for its tokenizer:
    the backend's own prompt count; the streamed text counted bare."""
    counts, _ = drive(stream_counts(tok, "tiny", CHAT, body, CHAT_FRAMES, (0, False)),
                      backend)
    # vLLM's template here has no BOS text and adds none: what the backend says is exact
    assert counts == (prompt - (tok.dialect is Dialect.VLLM), 8)


def test_llama_cpp_python_chat_needs_a_confirmed_template_overhead():
    """Text-only tokenizer: contents counted + the shape's confirmed overhead (exact);
    unconfirmed: nothing asked, no exact count."""
    tok = Tokenizer(Dialect.LLAMA_CPP_PYTHON, 1)
    counts, calls = drive(stream_counts(tok, "tiny", CHAT, SAY_HELLO, CHAT_FRAMES,
                                        (30, True)), llama_cpp_python)
    assert counts == (40, 8)
    assert [c.body["input"] for c in calls] == ["Say hello.", "a sWta o"]
    assert drive(stream_counts(tok, "tiny", CHAT, SAY_HELLO, CHAT_FRAMES,
                               (30, False)), llama_cpp_python) == (None, [])


@pytest.mark.parametrize(("backend", "tok"), [
    (llama_cpp_python, Tokenizer(Dialect.LLAMA_CPP_PYTHON, 1)),
    (llama_server, Tokenizer(Dialect.LLAMA_SERVER)),
    (vllm, Tokenizer(Dialect.VLLM)),
])
def test_completion_streams_count_exactly_everywhere(backend, tok):
    """A completion prompt is counted as the backend counts it (BOS added); the
    completion without what the tokenizer adds to an empty text."""
    counts, _ = drive(stream_counts(tok, "tiny", COMPLETIONS, ONCE,
                                    COMPLETION_FRAMES, (0, False)), backend)
    assert counts == (17, 8)


def test_template_overhead_of_an_exact_chat_count():
    """What the template added: the exact count minus the messages' own tokens."""
    tok = Tokenizer(Dialect.LLAMA_CPP_PYTHON, 1)
    assert drive(template_overhead(tok, "tiny", SAY_HELLO, 40), llama_cpp_python)[0] == (30, 10)
    assert drive(template_overhead(tok, "tiny", FOUR, 77), llama_cpp_python)[0] == (51, 26)
    assert drive(template_overhead(tok, "tiny", ONCE, 17), llama_cpp_python) == (None, [])


@pytest.mark.parametrize(("backend", "tok"), [
    (lambda call: Answer(200, {"tokens": "many"}), Tokenizer(Dialect.LLAMA_SERVER)),
    (lambda call: Answer(200, {"count": -1}), Tokenizer(Dialect.VLLM)),
    (lambda call: Answer(200, {"count": True}), Tokenizer(Dialect.LLAMA_CPP_PYTHON, 1)),
    (lambda call: Answer(503, {"count": 3}), Tokenizer(Dialect.VLLM)),
    (lambda call: Answer(200, {"tokens": [1]} if call.path == "/tokenize" else {}),
     Tokenizer(Dialect.LLAMA_SERVER)),  # /apply-template without a prompt
])
def test_unusable_answers_raise(backend, tok):
    """An answer without a usable count is an error (the caller keeps the estimate)."""
    with pytest.raises(CountError):
        drive(stream_counts(tok, "tiny", CHAT, SAY_HELLO, CHAT_FRAMES, (0, True)),
              backend)


@pytest.mark.parametrize(("frames", "texts"), [
    (CHAT_FRAMES, ["a sWta o"]),
    (COMPLETION_FRAMES, [", srsWta"]),
    (sse(delta({"content": "a"}), delta({"content": "b"}, index=1), delta({"content": "c"})),
     ["ac", "b"]),
    (sse({"choices": [], "usage": {"prompt_tokens": 1}}), []),
    (sse(delta({"content": "a", "reasoning_content": "hm"})), None),
    (sse(delta({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})), None),
    (sse(delta({"content": 5})), None),
    ([b"data: {not json\r\n\r\n"], None),
    ([b"data: [1]\r\n\r\n"], None),
    (sse(delta({"content": "a"}), delta({"content": "b"}, index=None)), None),  # hostile
    (sse(delta({"content": "a"}, index=[0])), None),
    (sse(delta({"content": "a"}, index=True)), None),
])
def test_streamed_text(frames, texts):
    """Each choice's text; None where a text count cannot stand for the tokens."""
    assert streamed_text(frames) == texts


@pytest.mark.parametrize(("body", "prompt"), [
    (ONCE, "Once upon a time"),
    ({"prompt": ["one"]}, "one"),
    ({"prompt": ["one", "two"]}, None),
    ({"prompt": [1, 2, 3]}, None),
    ({"prompt": "x", "suffix": "y"}, None),
    ({"prompt": "x", "echo": True}, None),
    (None, None),
])
def test_completion_prompt(body, prompt):
    """Only a prompt the backend counts as one text."""
    assert completion_prompt(body) == prompt


@pytest.mark.parametrize(("body", "contents"), [
    (FOUR, ["Be brief.", "Say hello.", "Hi", "Again"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, None),
    ({"messages": ["x"]}, None),
    ({"messages": "x"}, None),
    ({}, None),
])
def test_chat_contents(body, contents):
    """Message texts, when every message is text."""
    assert chat_contents(body) == contents


def test_parse_answer():
    """JSON bodies are parsed; anything else is None."""
    assert parse_answer(200, b'{"count": 3}') == Answer(200, {"count": 3})
    assert parse_answer(404, b"404 page not found") == Answer(404, None)
