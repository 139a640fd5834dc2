"""The simulated Ollama as a client sees it, over loopback: framing, final
counts, the OpenAI layer's quirks, error shapes, directives, cancellation and
the records; plus its pure pieces (Go JSON, decode errors, directives)."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct

import h11
import httpx
import pytest
import trio

from ollama_proxy.sim.frames import plan_tokens
from ollama_proxy.sim.models import keep_alive_ns, normalize_name
from ollama_proxy.sim.server import Simulator, run_simulator
from ollama_proxy.sim.text import (
    GoFloats,
    GoJsonError,
    go_decode,
    go_json,
    parse_directives,
    rfc3339nano,
)

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hello there"}]}
METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
           "eval_count", "eval_duration")


def say(text: str, **extra) -> dict:
    """A native chat body whose only message is ``text``."""
    return {**CHAT, "messages": [{"role": "user", "content": text}], **extra}


@dataclasses.dataclass
class Backend:
    sim: Simulator
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def post(self, path: str, body=None, **kwargs) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with httpx.AsyncClient(base_url=self.url) as client:
            return await client.post(path, content=content, **kwargs)

    async def get(self, path: str, **kwargs) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url) as client:
            return await client.get(path, **kwargs)


async def serve(nursery: trio.Nursery, **options) -> Backend:
    sim = Simulator(**options)
    _, port = await nursery.start(run_simulator, sim, "127.0.0.1", 0)
    return Backend(sim, port)


@pytest.fixture
async def backend(nursery):
    return await serve(nursery)


async def open_raw(port: int, path: str, body: dict) -> tuple[trio.SocketStream, h11.Connection]:
    """A raw socket with one POST sent, for watching HTTP chunks and hanging up at will."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    data = json.dumps(body).encode()
    head = h11.Request(method="POST", target=path, headers=[
        ("host", f"127.0.0.1:{port}"), ("content-length", str(len(data)))])
    await stream.send_all(conn.send(head) + conn.send(h11.Data(data=data))
                          + conn.send(h11.EndOfMessage()))
    return stream, conn


async def next_event(stream: trio.SocketStream, conn: h11.Connection):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def raw_chunks(port: int, path: str, body: dict) -> tuple[h11.Response, list[bytes]]:
    """The response head and its body as the HTTP chunks the server wrote."""
    stream, conn = await open_raw(port, path, body)
    async with stream:
        head = await next_event(stream, conn)
        chunks, current = [], b""
        while not isinstance(event := await next_event(stream, conn), h11.EndOfMessage):
            current += event.data
            if event.chunk_end:
                chunks.append(current)
                current = b""
    return head, chunks


def f32(values: list[float]) -> list[float]:
    """Round to float32, as the shortest JSON digits of a float32 read back."""
    return [struct.unpack("<f", struct.pack("<f", x))[0] for x in values]


def sse_events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n")
    return [event[len(b"data: "):] for event in body[:-2].split(b"\n\n")]


# --------------------------------------------------------------------------- native


async def test_ndjson_one_chunk_per_frame_and_final_counts(backend):
    """/api/generate streams one HTTP chunk per NDJSON frame, then the counted final frame."""
    with trio.fail_after(10):
        body = {"model": "llama3.2", "prompt": "three words please [[sim:tokens=4]]"}
        head, chunks = await raw_chunks(backend.port, "/api/generate", body)
        assert head.status_code == 200
        assert dict(head.headers)[b"content-type"] == b"application/x-ndjson"
        assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in chunks)
        frames = [json.loads(chunk) for chunk in chunks]
        assert [f["done"] for f in frames] == [False] * 4 + [True]
        words = [f["response"] for f in frames[:4]]
        assert not words[0].startswith(" ") and all(w.startswith(" ") for w in words[1:])
        final = frames[-1]
        assert final["response"] == "" and final["done_reason"] == "stop"
        assert all(final[key] > 0 for key in METRICS)
        assert final["eval_count"] == 4 and final["prompt_eval_count"] == 4 + 6
        assert len(final["context"]) == 10 + 4
        assert final["created_at"].endswith("Z") and "T" in final["created_at"]
        record = backend.sim.records[-1]
        assert (record.outcome, record.stream, record.model) == ("completed", True, "llama3.2")
        assert (record.prompt_tokens, record.completion_tokens) == (10, 4)
        assert backend.sim.counts() == {"requests": 1, "prompt_tokens": 10, "completion_tokens": 4}


async def test_omitempty_metrics_and_num_predict_cap(backend):
    """Zero counts are missing keys; options.num_predict cuts the reply with done_reason length."""
    with trio.fail_after(10):
        silent = await backend.post("/api/chat", say("[[sim:tokens=0]]"))
        final = json.loads(silent.text.splitlines()[-1])
        assert "eval_count" not in final and "eval_duration" not in final
        assert final["prompt_eval_count"] == 1 + 4 + 3 and final["message"]["content"] == ""
        capped = await backend.post("/api/chat", say("hi [[sim:tokens=9]]",
                                                     options={"num_predict": 5}))
        lines = [json.loads(line) for line in capped.text.splitlines()]
        assert len(lines) == 6 and lines[-1]["done_reason"] == "length"
        assert lines[-1]["eval_count"] == 5


async def test_non_stream_reply_and_determinism(backend):
    """stream:false gives one Content-Length JSON object, the same text as the stream."""
    with trio.fail_after(10):
        whole = await backend.post("/api/chat", say("same prompt", stream=False))
        assert whole.headers["content-type"] == "application/json; charset=utf-8"
        assert int(whole.headers["content-length"]) == len(whole.content)
        streamed = await backend.post("/api/chat", say("same prompt"))
        frames = [json.loads(line) for line in streamed.text.splitlines()]
        text = "".join(f["message"]["content"] for f in frames)
        reply = whole.json()
        assert reply["message"]["content"] == text and len(text.split()) == 12
        assert reply["done"] is True and reply["eval_count"] == 12
        assert backend.sim.records[-2].stream is False


async def test_load_only_and_unload(backend):
    """No prompt or no messages only loads the model; keep_alive 0 unloads it from /api/ps."""
    with trio.fail_after(10):
        loaded = await backend.post("/api/generate", {"model": "qwen3:4b"})
        assert loaded.headers["content-type"] == "application/json; charset=utf-8"
        assert loaded.json()["done_reason"] == "load" and loaded.json()["response"] == ""
        assert set(loaded.json()) == {"model", "created_at", "response", "done", "done_reason"}
        names = [m["name"] for m in (await backend.get("/api/ps")).json()["models"]]
        assert names[0] == "qwen3:4b" and "llama3.2:latest" in names
        unloaded = await backend.post("/api/chat", {"model": "qwen3:4b", "messages": [],
                                                    "keep_alive": 0})
        assert unloaded.json()["done_reason"] == "unload"
        names = [m["name"] for m in (await backend.get("/api/ps")).json()["models"]]
        assert "qwen3:4b" not in names


async def test_thinking_model_reasons_first(backend):
    """qwen3 thinks in its first half unless think:false; llama3.2 refuses think:true."""
    with trio.fail_after(10):
        reply = (await backend.post("/api/chat", {**say("hi [[sim:tokens=4]]"),
                                                  "model": "qwen3:4b", "stream": False})).json()
        assert len(reply["message"]["thinking"].split()) == 2
        assert len(reply["message"]["content"].split()) == 2 and reply["eval_count"] == 4
        plain = (await backend.post("/api/chat", {**say("hi"), "model": "qwen3:4b",
                                                  "stream": False, "think": False})).json()
        assert "thinking" not in plain["message"]
        refused = await backend.post("/api/generate", {"model": "llama3.2", "prompt": "x",
                                                       "think": True})
        assert refused.status_code == 400
        assert refused.json() == {"error": '"llama3.2" does not support thinking'}


async def test_embeddings_native_and_legacy(backend):
    """/api/embed returns unit vectors and a prompt count; /api/embeddings just the vector."""
    with trio.fail_after(10):
        reply = (await backend.post("/api/embed", {"model": "all-minilm",
                                                   "input": ["one two", "three"]})).json()
        assert reply["model"] == "all-minilm" and reply["prompt_eval_count"] == 2 + 2 + 1 + 2
        for vector in reply["embeddings"]:
            assert len(vector) == 16 and abs(sum(x * x for x in vector) - 1) < 1e-5
        legacy = (await backend.post("/api/embeddings", {"model": "all-minilm",
                                                         "prompt": "three"})).json()
        assert list(legacy) == ["embedding"]
        assert f32(legacy["embedding"]) == f32(reply["embeddings"][1])
        assert legacy["embedding"] != reply["embeddings"][1]  # widened: float64 digits


async def test_model_management(backend):
    """tags/show/version shapes, pull stream and stream:false, copy and delete bodies."""
    with trio.fail_after(10):
        tags = (await backend.get("/api/tags")).json()["models"]
        assert [m["name"] for m in tags] == ["llama3.2:latest", "qwen3:4b", "all-minilm:latest"]
        assert tags[0]["details"]["parameter_size"] == "3.2B"
        show = (await backend.post("/api/show", {"name": "LLAMA3.2"})).json()
        assert "model_info" in show and "completion" in show["capabilities"]
        assert (await backend.get("/api/version")).json() == {"version": "0.33.0"}
        pulled = await backend.post("/api/pull", {"model": "all-minilm"})
        statuses = [json.loads(line)["status"] for line in pulled.text.splitlines()]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        quiet = await backend.post("/api/pull", {"model": "all-minilm", "stream": False})
        assert quiet.json() == {"status": "success"}
        copied = await backend.post("/api/copy", {"source": "llama3.2", "destination": "mine"})
        assert copied.status_code == 200 and copied.content == b""
        assert "mine:latest" in [m["name"] for m in (await backend.get("/api/tags")).json()["models"]]
        async with httpx.AsyncClient(base_url=backend.url) as client:
            gone = await client.request("DELETE", "/api/delete", json={"model": "mine"})
            again = await client.request("DELETE", "/api/delete", json={"model": "mine"})
        assert gone.status_code == 200 and gone.content == b""
        assert again.status_code == 404 and again.json() == {"error": "model 'mine' not found"}


async def test_big_replies_are_chunked(nursery):
    """A JSON reply of 2 KB or more has no Content-Length, like Go's."""
    backend = await serve(nursery, embedding_dim=384)
    with trio.fail_after(10):
        reply = await backend.post("/api/embed", {"model": "all-minilm", "input": "big"})
        assert "content-length" not in reply.headers
        assert reply.headers["transfer-encoding"] == "chunked"
        assert len(reply.json()["embeddings"][0]) == 384


# --------------------------------------------------------------------------- OpenAI layer


async def test_sse_sequence_without_usage(backend):
    """Role only first, a separate finish chunk with an empty delta, no usage, then [DONE]."""
    with trio.fail_after(10):
        body = {**say("hi [[sim:tokens=3]]"), "stream": True}
        head, chunks = await raw_chunks(backend.port, "/v1/chat/completions", body)
        assert dict(head.headers)[b"content-type"] == b"text/event-stream"
        assert all(chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") for chunk in chunks)
        assert chunks[-1] == b"data: [DONE]\n\n" and len(chunks) == 5
        events = [json.loads(chunk[6:]) for chunk in chunks[:-1]]
        deltas = [e["choices"][0]["delta"] for e in events]
        assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
        assert deltas[-1] == {} and events[-1]["choices"][0]["finish_reason"] == "stop"
        assert all("usage" not in e for e in events)
        assert len({(e["id"], e["created"]) for e in events}) == 1
        assert events[0]["id"].startswith("chatcmpl-") and 0 <= int(events[0]["id"][9:]) < 999
        assert events[0]["system_fingerprint"] == "fp_ollama"


async def test_sse_usage_chunk_only_when_asked(backend):
    """include_usage adds one choices:[] chunk with the counts before [DONE]; max_tokens caps."""
    with trio.fail_after(10):
        body = {**say("hi [[sim:tokens=5]]"), "stream": True, "max_tokens": 2,
                "stream_options": {"include_usage": True}}
        response = await backend.post("/v1/chat/completions", body)
        events = sse_events(response.content)
        assert events[-1] == b"[DONE]"
        usage = json.loads(events[-2])
        assert usage["choices"] == []
        assert usage["usage"] == {"prompt_tokens": 2 + 4 + 3, "completion_tokens": 2,
                                  "total_tokens": 11}
        assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"


async def test_openai_non_stream_reply(backend):
    """stream is off by default on /v1: one chat.completion, newline-terminated, with usage."""
    with trio.fail_after(10):
        response = await backend.post("/v1/chat/completions", say("hi [[sim:tokens=3]]"))
        assert response.headers["content-type"] == "application/json"
        assert response.content.endswith(b"}\n")
        reply = response.json()
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] == 3


async def test_completions_usage_quirk(backend):
    """/v1/completions puts zero usage on every chunk; the real counts come last."""
    with trio.fail_after(10):
        body = {"model": "llama3.2", "prompt": "go [[sim:tokens=2]]", "stream": True,
                "stream_options": {"include_usage": True}}
        events = sse_events((await backend.post("/v1/completions", body)).content)
        chunks = [json.loads(event) for event in events[:-1]]
        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        assert [c["usage"] for c in chunks[:-1]] == [zero] * 3
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
        assert chunks[0]["id"].startswith("cmpl-") and chunks[0]["object"] == "text_completion"
        assert list(chunks[0])[:4] == ["id", "object", "created", "choices"]


async def test_base64_embeddings_decode_to_the_float_vector(backend):
    """encoding_format base64 is little-endian float32 of the same vector as float."""
    with trio.fail_after(10):
        body = {"model": "all-minilm", "input": ["hello world"]}
        floats = (await backend.post("/v1/embeddings", body)).json()
        packed = (await backend.post("/v1/embeddings", {**body, "encoding_format": "base64"})).json()
        raw = base64.b64decode(packed["data"][0]["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == f32(floats["data"][0]["embedding"])
        assert floats["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
        assert floats["object"] == "list" and floats["data"][0]["index"] == 0


async def test_models_list_and_retrieve(backend):
    """/v1/models lists every model; /v1/models/{id} echoes the id."""
    with trio.fail_after(10):
        listing = (await backend.get("/v1/models")).json()
        assert [m["id"] for m in listing["data"]][0] == "llama3.2:latest"
        one = (await backend.get("/v1/models/llama3.2")).json()
        assert one == {**listing["data"][0], "id": "llama3.2"}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("method", "path", "body", "status", "content_type", "expected"), [
    ("POST", "/api/chat", say("x", model="nope"), 404, "application/json; charset=utf-8",
     b'{"error":"model \'nope\' not found"}'),
    ("POST", "/v1/chat/completions", say("x", model="nope"), 404, "application/json",
     b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
     b'"param":null,"code":null}}\n'),
    ("GET", "/v1/models/nope", None, 404, "application/json",
     b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
     b'"param":null,"code":null}}\n'),
    ("POST", "/v1/chat/completions", {"model": "llama3.2", "messages": []}, 400,
     "application/json; charset=utf-8",
     b'{"error":{"message":"[] is too short - \'messages\'","type":"invalid_request_error",'
     b'"param":null,"code":null}}'),
    ("GET", "/nope", None, 404, "text/plain", b"404 page not found"),
    ("GET", "/api/chat", None, 405, "text/plain", b"405 method not allowed"),
    ("POST", "/api/chat", b"xyz", 400, "application/json; charset=utf-8",
     b'{"error":"invalid character \'x\' looking for beginning of value"}'),
    ("POST", "/api/chat", b"", 400, "application/json; charset=utf-8",
     b'{"error":"missing request body"}'),
    ("POST", "/api/show", {"model": "a<b>&c"}, 404, "application/json; charset=utf-8",
     b'{"error":"model \'a\\u003cb\\u003e\\u0026c\' not found"}'),
], ids=["native-model", "v1-model", "v1-retrieve", "v1-empty-messages", "path", "method",
        "bad-json", "empty-body", "go-escaping"])
async def test_error_shapes(backend, method, path, body, status, content_type, expected):
    """Each error comes with the endpoint's status, content type and exact bytes."""
    with trio.fail_after(10):
        content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        async with httpx.AsyncClient(base_url=backend.url) as client:
            response = await client.request(method, path, content=content)
        assert (response.status_code, response.headers["content-type"]) == (status, content_type)
        assert response.content == expected
        assert backend.sim.records[-1].outcome == "refused"
        assert backend.sim.records[-1].status == status


async def test_host_and_origin_checks(backend):
    """A foreign Host or Origin gets Ollama's bare 403; local origins pass."""
    with trio.fail_after(10):
        foreign = await backend.get("/api/tags", headers={"Host": "gateway.example.com"})
        assert (foreign.status_code, foreign.content) == (403, b"")
        evil = await backend.get("/api/tags", headers={"Origin": "http://evil.example"})
        assert (evil.status_code, evil.content) == (403, b"")
        local = await backend.get("/api/tags", headers={"Origin": "http://localhost:3000"})
        assert local.status_code == 200


async def test_status_directive(backend):
    """[[sim:status=CODE]] answers that status before any frame, in each API's shape."""
    with trio.fail_after(10):
        busy = await backend.post("/api/chat", say("[[sim:status=503]]"))
        assert busy.status_code == 503
        assert busy.json() == {
            "error": "server busy, please try again.  maximum pending requests exceeded"}
        crashed = await backend.post("/v1/chat/completions", say("[[sim:status=500]]"))
        assert crashed.status_code == 500
        assert crashed.json()["error"]["type"] == "api_error"
        assert crashed.json()["error"]["message"].startswith("model runner has unexpectedly")
        typo = await backend.post("/api/chat", say("[[sim:tokenz=3]]"))
        assert typo.status_code == 400 and "[[sim:tokenz=3]]" in typo.json()["error"]
        assert [r.outcome for r in backend.sim.records] == ["refused"] * 3


async def test_error_after_native(backend):
    """error_after=N: N frames, then Ollama's error line, and no done frame."""
    with trio.fail_after(10):
        response = await backend.post("/api/chat", say("hi [[sim:error_after=2]]"))
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert [line.get("done") for line in lines] == [False, False, None]
        assert lines[-1] == {"error": "an error was encountered while running the model"}
        record = backend.sim.records[-1]
        assert (record.outcome, record.completion_tokens) == ("error", 2)
        assert backend.sim.counts()["requests"] == 0


async def test_error_after_openai_stream(backend):
    """On /v1 the error becomes one empty chunk, then the stream ends without [DONE]."""
    with trio.fail_after(10):
        body = {**say("hi [[sim:error_after=1]]"), "stream": True,
                "stream_options": {"include_usage": True}}
        events = sse_events((await backend.post("/v1/chat/completions", body)).content)
        assert len(events) == 2 and b"[DONE]" not in events
        empty = json.loads(events[-1])
        assert empty["choices"][0]["delta"] == {"content": ""}
        assert empty["choices"][0]["finish_reason"] is None and "usage" not in empty


async def test_error_after_non_stream_is_a_500(backend):
    """Without streaming, the model error is a 500 in the endpoint's shape."""
    with trio.fail_after(10):
        response = await backend.post("/api/chat", say("[[sim:error_after=1]]", stream=False))
        assert response.status_code == 500
        assert response.json() == {"error": "an error was encountered while running the model"}
        assert backend.sim.records[-1].outcome == "error"


async def test_drop_after_cuts_the_connection(backend):
    """drop_after=N: N frames, then the connection drops mid-body."""
    with trio.fail_after(10):
        lines = []
        async with httpx.AsyncClient(base_url=backend.url) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("POST", "/api/chat",
                                         json=say("hi [[sim:drop_after=3]]")) as response:
                    async for line in response.aiter_lines():
                        lines.append(json.loads(line))
        assert len(lines) == 3 and not any(line["done"] for line in lines)
        record = backend.sim.records[-1]
        assert (record.outcome, record.completion_tokens) == ("dropped", 3)


# --------------------------------------------------------------------------- cancellation


async def test_client_leaving_midstream_is_recorded_as_cancelled(backend):
    """Hanging up mid-stream cancels the handler; the record keeps the frames sent."""
    with trio.fail_after(10):
        body = say("go [[sim:tokens=1000]] [[sim:rate=100]]")
        stream, conn = await open_raw(backend.port, "/api/chat", body)
        assert (await next_event(stream, conn)).status_code == 200
        frames = b""
        while frames.count(b"\n") < 2:
            frames += (await next_event(stream, conn)).data
        await stream.aclose()
        await backend.sim.wait_for(lambda sim: sim.records[-1].outcome == "cancelled")
        assert 2 <= backend.sim.records[-1].completion_tokens < 1000


async def test_client_leaving_before_first_byte_is_recorded_as_cancelled(backend):
    """Hanging up during the model-load wait cancels the sleeping handler too."""
    with trio.fail_after(10):
        stream, _ = await open_raw(backend.port, "/api/chat", say("[[sim:delay=60]]"))
        await backend.sim.wait_for(lambda sim: sim.records and sim.records[-1].prompt_tokens > 0)
        await stream.aclose()
        await backend.sim.wait_for(lambda sim: sim.records[-1].outcome == "cancelled")
        record = backend.sim.records[-1]
        assert (record.status, record.completion_tokens) == (0, 0)


async def test_first_byte_delay_and_cadence(nursery, autojump_clock):
    """first_byte_delay_s holds the head back; tokens_per_s paces the frames."""
    backend = await serve(nursery, first_byte_delay_s=0.2, tokens_per_s=50, default_tokens=5)
    with trio.fail_after(10):
        started = trio.current_time()
        response = await backend.post("/api/generate", {"model": "llama3.2", "prompt": "x"})
        elapsed = trio.current_time() - started
        assert elapsed == pytest.approx(0.2 + 5 * 0.02)  # trio's clock: the sleeps alone
        final = json.loads(response.text.splitlines()[-1])
        assert final["load_duration"] >= 200_000_000


async def test_wait_for_times_out(autojump_clock):
    """wait_for raises TimeoutError when the condition never comes."""
    sim = Simulator()
    started = trio.current_time()
    with pytest.raises(TimeoutError):
        await sim.wait_for(lambda sim: bool(sim.records), timeout_s=5)
    assert trio.current_time() - started == pytest.approx(5)


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("value", "expected"), [
    ({"a": "<b> & c", "n": None, "t": True}, b'{"a":"\\u003cb\\u003e \\u0026 c","n":null,"t":true}'),
    (["café", "\u2028"], '["café","\\u2028"]'.encode()),
    (GoFloats((1.0, 0.1, 1e-7, 1e21, 123456789.0), f32=False), b"[1,0.1,1e-7,1e+21,123456789]"),
    ({"v": GoFloats((0.1, -0.0000012345, 1 / 3))}, b'{"v":[0.1,-0.0000012345,0.33333334]}'),
    ({"v": GoFloats((1 / 3,), f32=False)}, b'{"v":[0.3333333333333333]}'),
])
def test_go_json(value, expected):
    """Compact, raw UTF-8, HTML characters escaped, floats in Go's float32/float64 notation."""
    assert go_json(value) == expected


def test_rfc3339nano_trims_trailing_zeros():
    """RFC3339Nano in UTC: the fraction loses its trailing zeros, or goes entirely."""
    assert rfc3339nano(1_787_306_523_041_700_000) == "2026-08-21T10:02:03.0417Z"
    assert rfc3339nano(1_787_306_523_000_000_000) == "2026-08-21T10:02:03Z"


@pytest.mark.parametrize(("body", "message"), [
    (b"", "EOF"),
    (b"  \n", "EOF"),
    (b"xyz", "invalid character 'x' looking for beginning of value"),
    (b'{"a":1', "unexpected EOF"),
    (b'{"a" 1}', "invalid character '1' after object key"),
    (b'{"a":1 "b":2}', "invalid character '\"' after object key:value pair"),
    (b"[1 2]", "invalid character '2' after array element"),
    (b"{'a':1}", "invalid character '\\'' looking for beginning of object key string"),
    (b"tru", "unexpected EOF"),
    (b"trux", "invalid character 'x' in literal true (expecting 'e')"),
    (b"NaN", "invalid character 'N' looking for beginning of value"),
    (b'"a\nb"', "invalid character '\\n' in string literal"),
])
def test_go_decode_errors(body, message):
    """Bad JSON gets the message Go's decoder would give."""
    with pytest.raises(GoJsonError) as caught:
        go_decode(body)
    assert str(caught.value) == message


def test_go_decode_reads_one_value():
    """Like json.Decoder, trailing bytes after the first value are ignored."""
    assert go_decode(b' {"a": [1, 2]} trailing') == {"a": [1, 2]}


def test_go_decode_reads_a_lone_surrogate_as_replacement_character():
    """Go decodes a "\\udc00" escape that is not half of a pair as U+FFFD; pairs stay."""
    assert go_decode(b'{"k\\udc00":["x\\ud800y","\\ud83d\\ude00","\\\\ud800"]}') == {
        "k\ufffd": ["x\ufffdy", "\U0001f600", "\\ud800"]}


def test_directives():
    """Directives parse anywhere in the text; a typo or a bad value is an error."""
    parsed = parse_directives("a [[sim:tokens=3]] b [[sim:delay=0.5]] [[sim:status=503]]")
    assert (parsed.tokens, parsed.delay, parsed.status, parsed.rate) == (3, 0.5, 503, None)
    for bad in ("[[sim:tokenz=3]]", "[[sim:tokens=-1]]", "[[sim:status=200]]", "[[sim:rate]]"):
        with pytest.raises(ValueError, match="bad directive"):
            parse_directives(bad)


def test_plan_tokens():
    """Words are a stable prefix per prompt; the cap gives length; thinking takes half."""
    long, reason = plan_tokens("p", 6, None, False)
    short, capped = plan_tokens("p", 6, 3, False)
    assert (reason, capped) == ("stop", "length") and short == long[:3]
    thought, _ = plan_tokens("p", 6, None, True)
    assert [t.thinking for t in thought] == [True] * 3 + [False] * 3
    assert not thought[3].text.startswith(" ") and thought[4].text.startswith(" ")


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), (0, 0), ("0", 0), (300, 300 * 10**9), ("5m", 300 * 10**9),
    ("1h30m", 5400 * 10**9), ("bogus", None), (-1, (1 << 63) - 1),
])
def test_keep_alive(value, expected):
    """keep_alive: seconds as a number, a Go duration as a string, negative = forever."""
    assert keep_alive_ns(value) == expected


def test_model_names():
    """Names compare case-insensitively, without the default registry, with :latest."""
    assert normalize_name("Llama3.2") == "llama3.2:latest"
    assert normalize_name("registry.ollama.ai/library/qwen3:4b") == "qwen3:4b"
    assert normalize_name("bob/model") == "bob/model:latest"
