"""The official ``ollama`` and ``openai`` Python clients through the gateway get
exactly what they get from the simulated Ollama itself, and the ledger's counts
are the backend's own.

Every call is made twice from a worker thread (the clients are sync; the trio
loop keeps serving the stack meanwhile): first straight at the simulator, then
through the gateway. The simulator is deterministic for a given prompt, so the
two results must be equal once timestamps, ids and durations are removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

import ollama
import openai
import pytest
import trio

from gateway_stack import Stack, start_stack

if TYPE_CHECKING:
    from ollama_proxy.api.record import RequestRecord
    from ollama_proxy.sim.server import SimRecord

T = TypeVar("T")

TIMEOUT_S = 20
# Fields that differ between two identical requests: wall-clock times, durations, random ids.
OLLAMA_VOLATILE = frozenset(
    {"created_at", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration",
     "expires_at"}
)
OPENAI_VOLATILE = frozenset({"id", "created"})
NOTHING_VOLATILE: frozenset[str] = frozenset()

MESSAGES = [{"role": "user", "content": "Tell me about the gateway"}]
PROMPT = "Write a line about fair queues"


# --------------------------------------------------------------------------- helpers


def stable(value: Any, volatile: frozenset[str]) -> Any:
    """``value`` (a pydantic model, or lists/dicts of them) as plain data, volatile keys removed."""
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict):
        return {k: stable(v, volatile) for k, v in value.items() if k not in volatile}
    if isinstance(value, (list, tuple)):
        return [stable(v, volatile) for v in value]
    return value


# The key of the current test's gateway (the simulator ignores it, as Ollama does).
_KEY = {"value": ""}


@pytest.fixture
async def stack(nursery: trio.Nursery) -> Stack:
    """The shared stack, its admin key used by every client call of the test."""
    made = await start_stack(nursery)
    _KEY["value"] = made.key
    return made


def with_ollama(fn: Callable[[ollama.Client], T]) -> Callable[[str], T]:
    def call(url: str) -> T:
        with ollama.Client(host=url, timeout=10,
                           headers={"Authorization": f"Bearer {_KEY['value']}"}) as client:
            return fn(client)
    return call


def with_openai(fn: Callable[[openai.OpenAI], T]) -> Callable[[str], T]:
    def call(url: str) -> T:
        with openai.OpenAI(base_url=url + "/v1", api_key=_KEY["value"], max_retries=0,
                           timeout=10) as client:
            return fn(client)
    return call


def until_error(items: Iterable[T]) -> tuple[list[T], Exception | None]:
    """What an iterator yields before it raises, and what it raised (None if it ended)."""
    got: list[T] = []
    try:
        for item in items:
            got.append(item)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return got, exc
    return got, None


def raised(call: Callable[[str], Any]) -> Callable[[str], Exception | None]:
    """``call`` made to return the exception it raised (None if it did not raise)."""
    def run(url: str) -> Exception | None:
        try:
            call(url)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc
        return None
    return run


async def in_thread(call: Callable[[str], T], url: str) -> T:
    return await trio.to_thread.run_sync(call, url, abandon_on_cancel=True)


async def direct_and_via(stack: Stack, call: Callable[[str], T]) -> tuple[T, T]:
    """``call(url)``: straight at the simulator, then through the gateway."""
    return await in_thread(call, stack.sim_url), await in_thread(call, stack.url)


async def gateway_record(stack: Stack, endpoint: str) -> RequestRecord:
    """The gateway's one usage record for ``endpoint``."""
    await stack.sink.wait_for(lambda recs: any(r.endpoint == endpoint for r in recs))
    [record] = [r for r in stack.sink.records if r.endpoint == endpoint]
    return record


async def forwarded(stack: Stack, path: str) -> SimRecord:
    """The simulator's record of the request the gateway forwarded (the direct one came first)."""
    records = [r for r in stack.sim.records if r.path == path]
    assert len(records) == 2, [(r.path, r.outcome) for r in records]
    record = records[-1]
    await stack.sim.wait_for(lambda sim: record.outcome != "pending")
    return record


async def assert_exact_usage(stack: Stack, endpoint: str) -> RequestRecord:
    """The ledger has exactly the backend's own counts for the request through the gateway."""
    record = await gateway_record(stack, endpoint)
    sim_record = await forwarded(stack, endpoint)
    assert sim_record.outcome == "completed"
    assert sim_record.prompt_tokens > 0
    assert (record.status, record.outcome, record.estimated) == (200, "ok", False), record
    assert (record.prompt_tokens, record.completion_tokens) == (
        sim_record.prompt_tokens, sim_record.completion_tokens), (record, sim_record)
    return record


# --------------------------------------------------------------------------- ollama


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_ollama_chat(stack: Stack, stream: bool) -> None:
    """ollama chat: same messages, done_reason and counts as Ollama; exact usage."""
    with trio.fail_after(TIMEOUT_S):
        def call(client: ollama.Client) -> Any:
            result = client.chat(model="llama3.2", messages=MESSAGES, stream=stream)
            return list(result) if stream else result
        direct, via = await direct_and_via(stack, with_ollama(call))
        assert stable(via, OLLAMA_VOLATILE) == stable(direct, OLLAMA_VOLATILE)
        parts = via if stream else [via]
        assert "".join(p.message.content for p in parts).strip()
        assert parts[-1].done and parts[-1].done_reason == "stop"
        record = await assert_exact_usage(stack, "/api/chat")
        assert record.completion_tokens == parts[-1].eval_count
        assert record.stream is stream


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_ollama_generate(stack: Stack, stream: bool) -> None:
    """ollama generate: same response text, context and counts as Ollama; exact usage."""
    with trio.fail_after(TIMEOUT_S):
        def call(client: ollama.Client) -> Any:
            result = client.generate(model="llama3.2", prompt=PROMPT, stream=stream)
            return list(result) if stream else result
        direct, via = await direct_and_via(stack, with_ollama(call))
        assert stable(via, OLLAMA_VOLATILE) == stable(direct, OLLAMA_VOLATILE)
        parts = via if stream else [via]
        assert "".join(p.response for p in parts).strip()
        assert parts[-1].context
        record = await assert_exact_usage(stack, "/api/generate")
        assert record.prompt_tokens == parts[-1].prompt_eval_count


async def test_ollama_embed(stack: Stack) -> None:
    """ollama embed: identical vectors; the ledger has the backend's prompt count."""
    with trio.fail_after(TIMEOUT_S):
        direct, via = await direct_and_via(stack, with_ollama(
            lambda c: c.embed(model="all-minilm", input=["the first text", "a second one"])))
        assert stable(via, OLLAMA_VOLATILE) == stable(direct, OLLAMA_VOLATILE)
        assert len(via.embeddings) == 2 and via.embeddings[0] != via.embeddings[1]
        record = await assert_exact_usage(stack, "/api/embed")
        assert record.completion_tokens == 0


async def test_ollama_embeddings_legacy(stack: Stack) -> None:
    """ollama embeddings (legacy /api/embeddings): identical vector; no counts, so estimated."""
    with trio.fail_after(TIMEOUT_S):
        direct, via = await direct_and_via(stack, with_ollama(
            lambda c: c.embeddings(model="all-minilm", prompt="hello there")))
        assert via.embedding and list(via.embedding) == list(direct.embedding)
        record = await gateway_record(stack, "/api/embeddings")
        assert (record.status, record.outcome, record.estimated) == (200, "ok", True)
        assert record.completion_tokens == 0


@pytest.mark.parametrize(("endpoint", "call"), [
    ("/api/tags", lambda c: c.list()),
    ("/api/show", lambda c: c.show("llama3.2")),
    ("/api/ps", lambda c: c.ps()),
], ids=["list", "show", "ps"])
async def test_ollama_info(stack: Stack, endpoint: str, call: Callable[[ollama.Client], Any]) -> None:
    """ollama list/show/ps: the same models and details as Ollama; nothing metered."""
    with trio.fail_after(TIMEOUT_S):
        direct, via = await direct_and_via(stack, with_ollama(call))
        assert stable(via, OLLAMA_VOLATILE) == stable(direct, OLLAMA_VOLATILE)
        assert getattr(via, "models", None) or getattr(via, "modelinfo", None)
        record = await gateway_record(stack, endpoint)
        assert (record.status, record.outcome) == (200, "ok")
        assert (record.prompt_tokens, record.completion_tokens) == (0, 0)


async def test_ollama_chat_thinking(stack: Stack) -> None:
    """ollama chat think=True on a thinking model: same thinking and content as Ollama; exact usage."""
    with trio.fail_after(TIMEOUT_S):
        direct, via = await direct_and_via(stack, with_ollama(lambda c: list(
            c.chat(model="qwen3:4b", messages=MESSAGES, think=True, stream=True))))
        assert stable(via, OLLAMA_VOLATILE) == stable(direct, OLLAMA_VOLATILE)
        assert "".join(p.message.thinking or "" for p in via).strip()
        await assert_exact_usage(stack, "/api/chat")


async def test_ollama_unknown_model(stack: Stack) -> None:
    """ollama chat with an unknown model: ResponseError 404 with Ollama's message; nothing used."""
    with trio.fail_after(TIMEOUT_S):
        direct, via = await direct_and_via(stack, raised(with_ollama(
            lambda c: c.chat(model="no-such-model", messages=MESSAGES))))
        assert isinstance(via, ollama.ResponseError) and via.status_code == 404
        assert isinstance(direct, ollama.ResponseError)
        assert (via.status_code, via.error) == (direct.status_code, direct.error)
        record = await gateway_record(stack, "/api/chat")
        assert (record.status, record.prompt_tokens, record.completion_tokens) == (404, 0, 0)
        assert not record.estimated


@pytest.mark.parametrize("directive", ["error_after", "drop_after"])
async def test_ollama_stream_breaks_midway(stack: Stack, directive: str) -> None:
    """ollama stream broken after 2 frames: those frames, then ResponseError; ledger upstream_error."""
    with trio.fail_after(TIMEOUT_S):
        messages = [{"role": "user", "content": f"Go on [[sim:{directive}=2]]"}]
        direct, via = await direct_and_via(stack, with_ollama(lambda c: until_error(
            c.chat(model="llama3.2", messages=messages, stream=True))))
        (direct_parts, direct_exc), (via_parts, via_exc) = direct, via
        assert len(via_parts) == 2
        assert stable(via_parts, OLLAMA_VOLATILE) == stable(direct_parts, OLLAMA_VOLATILE)
        assert isinstance(via_exc, ollama.ResponseError), repr(via_exc)
        if directive == "error_after":  # Ollama's own error line goes through unchanged
            assert isinstance(direct_exc, ollama.ResponseError)
            assert via_exc.error == direct_exc.error
        record = await gateway_record(stack, "/api/chat")
        assert (record.status, record.outcome, record.estimated) == (200, "upstream_error", True)
        sim_record = await forwarded(stack, "/api/chat")
        assert sim_record.outcome == {"error_after": "error", "drop_after": "dropped"}[directive]


# --------------------------------------------------------------------------- openai


async def test_openai_chat(stack: Stack) -> None:
    """openai chat.completions: same message, finish_reason and usage as Ollama; exact usage."""
    with trio.fail_after(TIMEOUT_S):
        direct, via = await direct_and_via(stack, with_openai(
            lambda o: o.chat.completions.create(model="llama3.2", messages=MESSAGES)))
        assert stable(via, OPENAI_VOLATILE) == stable(direct, OPENAI_VOLATILE)
        assert via.choices[0].message.content and via.choices[0].finish_reason == "stop"
        record = await assert_exact_usage(stack, "/v1/chat/completions")
        assert (record.prompt_tokens, record.completion_tokens) == (
            via.usage.prompt_tokens, via.usage.completion_tokens)


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "include-usage"])
async def test_openai_chat_stream(stack: Stack, include_usage: bool) -> None:
    """openai chat stream: the chunks Ollama sends; a usage chunk only when asked; exact usage."""
    with trio.fail_after(TIMEOUT_S):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        direct, via = await direct_and_via(stack, with_openai(lambda o: list(
            o.chat.completions.create(model="llama3.2", messages=MESSAGES, stream=True, **extra))))
        assert stable(via, OPENAI_VOLATILE) == stable(direct, OPENAI_VOLATILE)
        text = "".join(c.choices[0].delta.content or "" for c in via if c.choices)
        assert text.strip()
        record = await assert_exact_usage(stack, "/v1/chat/completions")
        if include_usage:
            last = via[-1]
            assert last.choices == []
            assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
                record.prompt_tokens, record.completion_tokens)
        else:  # the gateway asked for usage itself, and hid the answer
            assert all(c.choices for c in via)
            assert all(c.usage is None for c in via)
        assert [c.choices[0].finish_reason for c in via if c.choices][-1] == "stop"


async def test_openai_max_completion_tokens(stack: Stack) -> None:
    """openai max_completion_tokens (which Ollama ignores) works through the gateway as max_tokens."""
    with trio.fail_after(TIMEOUT_S):
        def call(cap: str) -> Callable[[str], Any]:
            return with_openai(lambda o: list(o.chat.completions.create(
                model="llama3.2", messages=MESSAGES, stream=True, **{cap: 3})))
        direct = await in_thread(call("max_tokens"), stack.sim_url)
        via = await in_thread(call("max_completion_tokens"), stack.url)
        assert stable(via, OPENAI_VOLATILE) == stable(direct, OPENAI_VOLATILE)
        assert [c.choices[0].finish_reason for c in via][-1] == "length"
        record = await assert_exact_usage(stack, "/v1/chat/completions")
        assert record.completion_tokens == 3


@pytest.mark.parametrize(("stream", "include_usage"), [(False, False), (True, False), (True, True)],
                         ids=["whole", "stream", "stream-include-usage"])
async def test_openai_completions(stack: Stack, stream: bool, include_usage: bool) -> None:
    """openai completions: same text, finish_reason and usage as Ollama; exact usage."""
    with trio.fail_after(TIMEOUT_S):
        extra: dict[str, Any] = {"stream": True} if stream else {}
        if include_usage:
            extra["stream_options"] = {"include_usage": True}

        def call(o: openai.OpenAI) -> Any:
            result = o.completions.create(model="llama3.2", prompt=PROMPT, **extra)
            return list(result) if stream else result
        direct, via = await direct_and_via(stack, with_openai(call))
        assert stable(via, OPENAI_VOLATILE) == stable(direct, OPENAI_VOLATILE)
        chunks = via if stream else [via]
        assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        record = await assert_exact_usage(stack, "/v1/completions")
        if stream and not include_usage:  # neither the usage chunk nor the zero placeholders
            assert all(c.choices and c.usage is None for c in chunks)
        else:
            assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
                record.prompt_tokens, record.completion_tokens)


@pytest.mark.parametrize("encoding", [None, "float"], ids=["base64-default", "float"])
async def test_openai_embeddings(stack: Stack, encoding: str | None) -> None:
    """openai embeddings (base64 decoded by the client, or float): identical vectors; exact usage."""
    with trio.fail_after(TIMEOUT_S):
        extra = {"encoding_format": encoding} if encoding else {}
        direct, via = await direct_and_via(stack, with_openai(lambda o: o.embeddings.create(
            model="all-minilm", input=["the first text", "a second one"], **extra)))
        assert stable(via, NOTHING_VOLATILE) == stable(direct, NOTHING_VOLATILE)
        assert [len(d.embedding) for d in via.data] == [16, 16]
        record = await assert_exact_usage(stack, "/v1/embeddings")
        assert (record.prompt_tokens, record.completion_tokens) == (via.usage.prompt_tokens, 0)


@pytest.mark.parametrize(("endpoint", "call"), [
    ("/v1/models", lambda o: o.models.list()),
    ("/v1/models/llama3.2", lambda o: o.models.retrieve("llama3.2")),
], ids=["list", "retrieve"])
async def test_openai_models(stack: Stack, endpoint: str, call: Callable[[openai.OpenAI], Any]) -> None:
    """openai models.list/retrieve: the same model objects as Ollama; nothing metered."""
    with trio.fail_after(TIMEOUT_S):
        direct, via = await direct_and_via(stack, with_openai(call))
        assert stable(via, NOTHING_VOLATILE) == stable(direct, NOTHING_VOLATILE)
        assert "llama3.2" in str(stable(via, NOTHING_VOLATILE))
        record = await gateway_record(stack, endpoint)
        assert (record.status, record.outcome) == (200, "ok")
        assert (record.prompt_tokens, record.completion_tokens) == (0, 0)


@pytest.mark.parametrize(("endpoint", "call"), [
    ("/v1/chat/completions",
     lambda o: o.chat.completions.create(model="no-such-model", messages=MESSAGES)),
    ("/v1/models/no-such-model", lambda o: o.models.retrieve("no-such-model")),
], ids=["chat", "retrieve"])
async def test_openai_unknown_model(stack: Stack, endpoint: str,
                                    call: Callable[[openai.OpenAI], Any]) -> None:
    """openai with an unknown model: NotFoundError with Ollama's error body; nothing used."""
    with trio.fail_after(TIMEOUT_S):
        direct, via = await direct_and_via(stack, raised(with_openai(call)))
        assert isinstance(direct, openai.NotFoundError)
        assert isinstance(via, openai.NotFoundError), repr(via)
        assert (via.status_code, via.body, str(via)) == (direct.status_code, direct.body, str(direct))
        record = await gateway_record(stack, endpoint)
        assert (record.status, record.prompt_tokens, record.completion_tokens) == (404, 0, 0)


@pytest.mark.parametrize("directive", ["error_after", "drop_after"])
async def test_openai_stream_breaks_midway(stack: Stack, directive: str) -> None:
    """openai stream broken after 2 frames: those chunks, then APIError; ledger upstream_error."""
    with trio.fail_after(TIMEOUT_S):
        messages = [{"role": "user", "content": f"Go on [[sim:{directive}=2]]"}]
        direct, via = await direct_and_via(stack, with_openai(lambda o: until_error(
            o.chat.completions.create(model="llama3.2", messages=messages, stream=True))))
        (direct_chunks, direct_exc), (via_chunks, via_exc) = direct, via
        if directive == "error_after":
            assert direct_exc is None  # Ollama's /v1 stream just stops: no [DONE], no error
        assert len(via_chunks) >= 2
        assert stable(via_chunks, OPENAI_VOLATILE) == stable(direct_chunks, OPENAI_VOLATILE)
        assert isinstance(via_exc, openai.APIError), repr(via_exc)
        assert via_exc.message
        record = await gateway_record(stack, "/v1/chat/completions")
        assert (record.status, record.outcome, record.estimated) == (200, "upstream_error", True)
        sim_record = await forwarded(stack, "/v1/chat/completions")
        assert sim_record.outcome == {"error_after": "error", "drop_after": "dropped"}[directive]
