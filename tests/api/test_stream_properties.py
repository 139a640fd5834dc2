"""Properties of the stream path (framing.FrameBuffer, usage.StreamScanner) over
generated NDJSON and SSE streams cut into pieces every way hypothesis finds: the
bytes forwarded are the input bytes (minus the usage-only chunk the gateway asked
for, when it drops it) and the usage tally is the one of the stream fed whole."""

from __future__ import annotations

import json
from dataclasses import astuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ollama_proxy.api.framing import FrameBuffer, FrameKind
from ollama_proxy.api.usage import StreamScanner

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text that looks like the markers the scanner searches for, inside JSON strings.
TEXT = st.lists(st.sampled_from(["a", " ", "\n", '"', "\\", "data:", "[DONE]", '"usage"',
                                 '"done":true', '"error"', "\u00e9", "\r"]),
                max_size=5).map("".join)
COUNT = st.integers(0, 10**6)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, repeats allowed: empty pieces)."""
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# -- NDJSON ------------------------------------------------------------------------------

NDJSON_LINE = st.one_of(
    TEXT.map(lambda t: json.dumps({"model": "m", "message": {"role": "assistant", "content": t},
                                   "done": False})),
    st.tuples(COUNT, COUNT).map(lambda c: json.dumps(
        {"model": "m", "done": True, "done_reason": "stop", "prompt_eval_count": c[0],
         "eval_count": c[1]})),
    TEXT.map(lambda t: json.dumps({"error": t or "boom"})),
    st.just(""),  # a blank line
    st.just("not json {"),
)


@st.composite
def ndjson_streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(NDJSON_LINE, max_size=8))
    data = "".join(line + "\n" for line in lines).encode()
    if data and draw(st.booleans()):  # the backend broke off before its last newline
        data = data[:-1]
    return data


# -- SSE ---------------------------------------------------------------------------------


def chunk(choices: list[object], **extra: object) -> str:
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": choices, **extra},
                      separators=(",", ":"))


ZERO = ',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'

# (data, the data forwarded when the scanner drops what the gateway asked for, or None
# when the whole event goes).
SSE_DATA = st.one_of(
    TEXT.map(lambda t: (chunk([{"index": 0, "delta": {"content": t},
                                "finish_reason": None}]),) * 2),
    st.just((chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),) * 2),
    st.just((chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),) * 2),
    st.tuples(COUNT, COUNT).map(lambda c: (chunk([], usage={
        "prompt_tokens": c[0], "completion_tokens": c[1], "total_tokens": c[0] + c[1]}), None)),
    st.tuples(COUNT, COUNT).map(lambda c: (chunk(  # llama.cpp: usage on the last choice chunk
        [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        usage={"prompt_tokens": c[0], "completion_tokens": c[1], "total_tokens": 1}),) * 2),
    TEXT.map(lambda t: (  # /v1/completions repeats zero usage once usage is asked for
        '{"id":"cmpl-1","object":"text_completion","choices":[{"text":%s,"index":0,'
        '"finish_reason":null}]%s}' % (json.dumps(t), ZERO),
        '{"id":"cmpl-1","object":"text_completion","choices":[{"text":%s,"index":0,'
        '"finish_reason":null}]}' % json.dumps(t))),
    TEXT.map(lambda t: (json.dumps({"error": {"message": t or "boom", "type": "api_error"}}),) * 2),
    st.just(("[DONE]",) * 2),
)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A stream and what the scanner forwards of it when it drops the usage chunk."""
    stream, dropped = [], []
    for _ in range(draw(st.integers(0, 8))):
        eol = draw(st.sampled_from(["\n", "\r\n"]))
        if draw(st.integers(0, 5)) == 0:  # a comment or a keep-alive: forwarded as is
            event = draw(st.sampled_from([": keep-alive", ": ping data:", "event: ping"])) + eol * 2
            stream.append(event)
            dropped.append(event)
            continue
        data, kept = draw(SSE_DATA)
        prefix = draw(st.sampled_from(["data: ", "data:", "event: message" + eol + "data: "]))
        stream.append(prefix + data + eol * 2)
        dropped.append("" if kept is None else prefix + kept + eol * 2)
    return "".join(stream).encode(), "".join(dropped).encode()


# -- properties --------------------------------------------------------------------------


def scan(kind: FrameKind, parts: list[bytes], drop: bool) -> tuple[bytes, tuple[object, ...]]:
    scanner = StreamScanner(kind, drop_usage_chunk=drop)
    out = b"".join(scanner.feed(part) for part in parts) + scanner.finish()
    return out, astuple(scanner.tally)


@PROPERTY
@given(st.one_of(ndjson_streams().map(lambda d: (FrameKind.NDJSON, d)),
                 sse_streams().map(lambda s: (FrameKind.SSE, s[0]))),
       st.lists(st.integers(0, 2000), max_size=12), st.integers(8, 64))
def test_frame_buffer_releases_every_byte_in_order(stream, cuts, max_frame_bytes):
    """Cut anywhere, with any frame cap: the released regions and the final flush
    are the input, byte for byte."""
    kind, data = stream
    buf = FrameBuffer(kind, max_frame_bytes)
    out = b"".join(buf.feed(part) for part in pieces(data, cuts)) + buf.flush()
    assert out == data


@PROPERTY
@given(ndjson_streams(), st.lists(st.integers(0, 2000), max_size=12))
def test_ndjson_forwards_the_input_and_tallies_as_whole(data, cuts):
    """NDJSON: the bytes forwarded are the input, and the tally (counts, frames, end
    marker, error) is the one of the stream fed whole."""
    whole = scan(FrameKind.NDJSON, [data], drop=False)
    assert whole[0] == data
    assert scan(FrameKind.NDJSON, pieces(data, cuts), drop=False) == whole


def without_frames(result: tuple[bytes, tuple[object, ...]]) -> tuple[object, ...]:
    out, tally = result
    return out, tally[:3] + tally[4:]  # UsageTally without "frames"


@PROPERTY
@given(sse_streams(), st.lists(st.integers(0, 3000), max_size=12), st.booleans())
def test_sse_forwards_the_input_minus_what_we_asked_for(stream, cuts, drop):
    """SSE: the bytes forwarded are the input, or, when the gateway itself asked for
    usage, the input without the usage-only chunk (and the zero usage /v1/completions
    repeats); the counts, end marker and error are those of the stream fed whole."""
    data, without_usage = stream
    whole = scan(FrameKind.SSE, [data], drop)
    assert whole[0] == (without_usage if drop else data)
    assert without_frames(scan(FrameKind.SSE, pieces(data, cuts), drop)) == without_frames(whole)


@settings(PROPERTY)
@given(sse_streams(), st.lists(st.integers(0, 3000), max_size=12), st.booleans())
def test_sse_frame_count_does_not_depend_on_the_cuts(stream, cuts, drop):
    """SSE: the frames counted (the estimate when usage never comes) are those of the
    stream fed whole."""
    data, _ = stream
    assert scan(FrameKind.SSE, pieces(data, cuts), drop) == scan(FrameKind.SSE, [data], drop)
