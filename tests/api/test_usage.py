"""StreamScanner and the whole-body scan: usage found in every dialect, bytes
forwarded unchanged (or minus only what the proxy itself asked for), fed in
pieces of every size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollama_proxy.api.framing import FrameKind
from ollama_proxy.api.usage import (
    MAX_REPORTED_NS,
    MAX_REPORTED_TOKENS,
    StreamScanner,
    estimate_prompt_tokens,
    scan_whole_body,
)

NATIVE_CHAT = (
    b'{"model":"llama3.2","created_at":"2026-08-21T10:05:00.1Z","message":{"role":"assistant","content":"Hi"},"done":false}\n'
    b'{"model":"llama3.2","created_at":"2026-08-21T10:05:00.2Z","message":{"role":"assistant","content":" there"},"done":false}\n'
    b'{"model":"llama3.2","created_at":"2026-08-21T10:05:00.9Z","message":{"role":"assistant","content":""},"done":true,'
    b'"done_reason":"stop","total_duration":800000000,"prompt_eval_count":26,"eval_count":2}\n'
)
# omitempty: a cached prompt may leave prompt_eval_count out entirely.
NATIVE_MISSING = (
    b'{"model":"m","response":"a","done":false}\n'
    b'{"model":"m","response":"","done":true,"done_reason":"stop","eval_count":1}\n'
)
NATIVE_ERROR = (
    b'{"model":"m","response":"The","done":false}\n'
    b'{"error":"an error was encountered while running the model"}\n'
)
OPENAI_CHUNK = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\n\n'
OPENAI_FINISH = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
OPENAI_USAGE = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":26,"completion_tokens":2,"total_tokens":28}}\n\n'
DONE = b"data: [DONE]\n\n"
OPENAI_STREAM = OPENAI_CHUNK % b"Hi" + OPENAI_CHUNK % b" there" + OPENAI_FINISH + OPENAI_USAGE + DONE
ZERO = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
COMPLETIONS_STREAM = (
    b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":"a","index":0,"finish_reason":null}]' + ZERO + b'}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":"","index":0,"finish_reason":"stop"}]' + ZERO + b'}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n'
    + DONE
)
# llama.cpp puts usage on the last chunk that still has choices.
LLAMACPP_STREAM = (
    OPENAI_CHUNK % b"x"
    + b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10},"timings":{}}\n\n'
    + DONE
)

# llama-cpp-python (JSON with spaces): a role-only first chunk, one chunk per token, an
# empty finish chunk, no usage even when asked for it.
PY_ID = b'"id": "chatcmpl-0e", "model": "tiny", "created": 1795823390, "object": "chat.completion.chunk"'
PY_CHAT = (
    b'data: {' + PY_ID + b', "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": null, "finish_reason": null}]}\r\n\r\n'
    + b"".join(b'data: {' + PY_ID + b', "choices": [{"index": 0, "delta": {"content": "%s"}, "logprobs": null, "finish_reason": null}]}\r\n\r\n' % t
               for t in (b"a", b" ", b'\\"'))
    + b'data: {' + PY_ID + b', "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}]}\r\n\r\n'
    + b"data: [DONE]\r\n\r\n"
)
PY_COMPLETION = (
    b"".join(b'data: {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "%s", "index": 0, "logprobs": null, "finish_reason": null}]}\r\n\r\n' % t
             for t in (b",", b" s"))
    + b'data: {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "length"}]}\r\n\r\n'
    + b"data: [DONE]\r\n\r\n"
)
# Ollama's OpenAI layer on a thinking model: reasoning frames carry an empty "content".
OLLAMA_REASONING = (
    b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":"Hm"},"finish_reason":null}]}\n\n'
    + OPENAI_CHUNK % b"Hi" + OPENAI_FINISH + DONE
)
# A tool call streamed in pieces (vLLM): the name chunk has empty arguments and null content.
TOOL_CALL = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","index":0,"function":{"name":"f","arguments":""}}]},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\": 1}"}}]},"finish_reason":null}]}\n\n'
    + OPENAI_FINISH + DONE
)
# A native thinking stream: thinking frames, content frames, then the stats frame.
NATIVE_THINKING = (
    b'{"model":"m","message":{"role":"assistant","content":"","thinking":"Hm"},"done":false}\n'
    b'{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}\n'
    b'{"model":"m","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"eval_count":2}\n'
)
# Text that mentions a field: escaped quotes never look like one.
MENTION = OPENAI_CHUNK % b'say \\"content\\":\\"x\\"'


def run(kind, data, size, drop=False):
    scanner = StreamScanner(kind, drop_usage_chunk=drop)
    out = b""
    for i in range(0, len(data), size):
        out += scanner.feed(data[i:i + size])
    out += scanner.finish()
    return out, scanner.tally


SIZES = [1, 2, 3, 7, 64, 100000]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("kind", "data", "prompt", "completion", "finished"), [
    (FrameKind.NDJSON, NATIVE_CHAT, 26, 2, True),
    (FrameKind.NDJSON, NATIVE_MISSING, 0, 1, True),
    (FrameKind.SSE, OPENAI_STREAM, 26, 2, True),
    (FrameKind.SSE, OPENAI_STREAM.replace(b"\n", b"\r\n"), 26, 2, True),
    (FrameKind.SSE, COMPLETIONS_STREAM, 5, 1, True),
    (FrameKind.SSE, LLAMACPP_STREAM, 9, 1, True),
])
def test_usage_found_and_bytes_unchanged(kind, data, prompt, completion, finished, size):
    """Exact counts from the final frame / last usage object; output == input."""
    out, tally = run(kind, data, size)
    assert out == data
    assert (tally.prompt_tokens, tally.completion_tokens) == (prompt, completion)
    assert tally.exact and tally.finished == finished
    assert tally.error is None


@pytest.mark.parametrize("size", SIZES)
def test_injected_usage_chunk_is_removed(size):
    """When the proxy asked for usage, the usage-only chunk never reaches the client."""
    out, tally = run(FrameKind.SSE, OPENAI_STREAM, size, drop=True)
    assert out == OPENAI_CHUNK % b"Hi" + OPENAI_CHUNK % b" there" + OPENAI_FINISH + DONE
    assert (tally.prompt_tokens, tally.completion_tokens) == (26, 2)


@pytest.mark.parametrize("size", SIZES)
def test_injected_completions_usage_is_removed_everywhere(size):
    """/v1/completions' zero usage on every chunk is stripped too, rest byte-exact."""
    out, tally = run(FrameKind.SSE, COMPLETIONS_STREAM, size, drop=True)
    assert ZERO not in out and b'"choices":[]' not in out
    assert out.endswith(b'"finish_reason":"stop"}]}\n\n' + DONE)
    assert (tally.prompt_tokens, tally.completion_tokens) == (5, 1)


def test_usage_chunk_kept_when_client_asked():
    """Without injection, the usage chunk is the client's and stays."""
    out, _ = run(FrameKind.SSE, OPENAI_STREAM, 5, drop=False)
    assert OPENAI_USAGE in out


@pytest.mark.parametrize("size", SIZES)
def test_native_midstream_error_is_seen(size):
    """An in-band {"error"} line is recorded; no counts, not finished."""
    out, tally = run(FrameKind.NDJSON, NATIVE_ERROR, size)
    assert out == NATIVE_ERROR
    assert tally.error == "an error was encountered while running the model"
    assert not tally.finished and not tally.exact
    assert tally.frames == 1  # the token line; the error line is no token


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("kind", "data", "frames", "finished"), [
    (FrameKind.SSE, PY_CHAT, 3, True),  # 5 chunks: role-only and finish chunks are no tokens
    (FrameKind.SSE, PY_COMPLETION, 2, True),  # the empty finish chunk is no token
    (FrameKind.SSE, OPENAI_STREAM, 2, True),  # the usage-only chunk and [DONE]: none
    (FrameKind.SSE, COMPLETIONS_STREAM, 1, True),
    (FrameKind.SSE, OLLAMA_REASONING, 2, True),  # a reasoning frame is a token
    (FrameKind.SSE, TOOL_CALL, 1, True),  # arguments are tokens, an empty name chunk not
    (FrameKind.SSE, MENTION + DONE, 1, True),
    (FrameKind.NDJSON, NATIVE_CHAT, 2, True),  # the done frame is no token
    (FrameKind.NDJSON, NATIVE_THINKING, 2, True),
    (FrameKind.NDJSON, NATIVE_ERROR, 1, False),  # the error line is no token
    (FrameKind.NDJSON, NATIVE_CHAT.split(b"\n", 1)[0], 1, False),  # cut: no newline, still one
])
def test_only_content_bearing_frames_count(kind, data, frames, finished, size):
    """The estimate counts frames that carry generated text, whatever the dialect and
    however the bytes are cut; the bytes go through unchanged."""
    out, tally = run(kind, data, size)
    assert out == data
    assert (tally.frames, tally.finished) == (frames, finished)


def test_silent_backend_stream_is_estimated_from_its_tokens():
    """llama-cpp-python reports no usage: 3 tokens in 5 chunks estimate 3, not 5."""
    _, tally = run(FrameKind.SSE, PY_CHAT, 64)
    assert not tally.exact
    tally.estimate(40)
    assert (tally.prompt_tokens, tally.completion_tokens) == (40, 3)


@pytest.mark.parametrize(("body", "prompt", "completion"), [
    (b'{"usage":{"prompt_tokens":%d,"completion_tokens":2}}' % 2**63, MAX_REPORTED_TOKENS, 2),
    (b'{"usage":{"prompt_tokens":3,"completion_tokens":%d}}' % 10**30, 3, MAX_REPORTED_TOKENS),
    (b'{"done":true,"prompt_eval_count":%d,"eval_count":%d}' % (2**64, 2**63),
     MAX_REPORTED_TOKENS, MAX_REPORTED_TOKENS),
])
def test_out_of_range_counts_are_clamped_and_flagged(body, prompt, completion, caplog):
    """A backend's count beyond a billion (SQLite refuses 2**63) is cut to the bound,
    flagged, and logged."""
    tally = scan_whole_body(body)
    assert (tally.prompt_tokens, tally.completion_tokens) == (prompt, completion)
    assert tally.clamped
    assert "counted as 1000000000" in caplog.text


def test_counts_at_the_bound_are_believed():
    """A count of exactly the bound is a count, not a clamp."""
    tally = scan_whole_body(b'{"usage":{"prompt_tokens":%d,"completion_tokens":1}}'
                            % MAX_REPORTED_TOKENS)
    assert (tally.prompt_tokens, tally.exact, tally.clamped) == (MAX_REPORTED_TOKENS, True, False)


@pytest.mark.parametrize("size", SIZES)
def test_capture_keeps_the_frames_within_its_bound(size):
    """With a capture bound the frames are kept as relayed; past it, given up."""
    scanner = StreamScanner(FrameKind.SSE, capture_bytes=len(PY_CHAT))
    for i in range(0, len(PY_CHAT), size):
        scanner.feed(PY_CHAT[i:i + size])
    scanner.finish()
    assert b"".join(scanner.captured) == PY_CHAT
    short = StreamScanner(FrameKind.SSE, capture_bytes=len(PY_CHAT) - 1)
    assert short.feed(PY_CHAT) == PY_CHAT and short.captured is None
    assert StreamScanner(FrameKind.SSE).captured is None  # off unless asked for


def test_cut_stream_estimates_from_frames():
    """A stream cut before its final frame is estimated from relayed frames."""
    scanner = StreamScanner(FrameKind.NDJSON)
    scanner.feed(NATIVE_CHAT.split(b"\n", 2)[0] + b"\n" + NATIVE_CHAT.split(b"\n", 2)[1] + b"\n")
    tally = scanner.tally
    tally.estimate(7)
    assert (tally.prompt_tokens, tally.completion_tokens, tally.exact) == (7, 2, False)


def test_partial_last_frame_held_back():
    """Half a line is not forwarded until its newline comes (or the stream ends)."""
    scanner = StreamScanner(FrameKind.NDJSON)
    assert scanner.feed(b'{"response":"a","done":false}\n{"resp') == b'{"response":"a","done":false}\n'
    assert scanner.finish() == b'{"resp'


def test_garbage_and_giant_lines_pass_through():
    """Non-JSON lines and over-long lines go through untouched, counts stay sane."""
    data = b"not json\n" + b'{"error": ' + b"x" * 5000 + b"\n" + NATIVE_CHAT
    scanner = StreamScanner(FrameKind.NDJSON, max_frame_bytes=1000)
    out = b"".join(scanner.feed(data[i:i + 300]) for i in range(0, len(data), 300)) + scanner.finish()
    assert out == data
    assert (scanner.tally.prompt_tokens, scanner.tally.completion_tokens) == (26, 2)


@pytest.mark.parametrize(("body", "prompt", "completion", "exact"), [
    (b'{"model":"m","response":"hi","done":true,"prompt_eval_count":3,"eval_count":4}', 3, 4, True),
    (b'{"model":"m","embeddings":[[0.1]],"prompt_eval_count":8}', 8, 0, True),
    (b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}', 8, 0, True),
    (b'{"choices":[],"usage":{"prompt_tokens":26,"completion_tokens":3,"total_tokens":29}}\n', 26, 3, True),
    (b'{"embedding":[0.1,0.2]}', 0, 0, False),  # legacy /api/embeddings: no counts
    (b"garbage", 0, 0, False),
])
def test_whole_body_usage(body, prompt, completion, exact):
    """Non-streamed replies of both dialects give their counts."""
    tally = scan_whole_body(body)
    assert (tally.prompt_tokens, tally.completion_tokens, tally.exact) == (prompt, completion, exact)


# Ollama's final generate frame with every timing (docs/api.md's example).
NATIVE_TIMED = (
    b'{"model":"qwen3:4b","created_at":"2026-08-21T10:02:03.0417Z","response":"Hel","done":false}\n'
    b'{"model":"qwen3:4b","created_at":"2026-08-21T10:02:04.5Z","response":"","done":true,"done_reason":"stop",'
    b'"context":[151644,872,198],"total_duration":1520000000,"load_duration":31000000,'
    b'"prompt_eval_count":12,"prompt_eval_duration":40000000,"eval_count":57,"eval_duration":1400000000}\n'
)
NONE4 = (None, None, None, None)


def timings(tally):
    return (tally.total_ns, tally.load_ns, tally.prompt_eval_ns, tally.eval_ns)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("kind", "data", "expected"), [
    (FrameKind.NDJSON, NATIVE_TIMED, (1520000000, 31000000, 40000000, 1400000000)),
    # omitempty: the timings left out of a final frame that has some are zeros
    (FrameKind.NDJSON, NATIVE_CHAT, (800000000, 0, 0, 0)),
    (FrameKind.NDJSON, NATIVE_MISSING, NONE4),  # no timings at all: not reported
    (FrameKind.NDJSON, NATIVE_THINKING, NONE4),
    (FrameKind.NDJSON, NATIVE_ERROR, NONE4),  # no final frame
    (FrameKind.NDJSON, NATIVE_TIMED.split(b"\n")[0] + b"\n", NONE4),  # cut before it
    (FrameKind.SSE, OPENAI_STREAM, NONE4),  # the OpenAI dialect has no timings
    (FrameKind.SSE, LLAMACPP_STREAM, NONE4),
    (FrameKind.SSE, COMPLETIONS_STREAM, NONE4),
])
def test_timings_of_a_stream(kind, data, expected, size):
    """Ollama's timings come from the final frame alone, however the bytes are cut;
    a stream without them (another dialect, no final frame) leaves them None."""
    out, tally = run(kind, data, size)
    assert out == data
    assert timings(tally) == expected


@pytest.mark.parametrize(("body", "expected"), [
    (NATIVE_TIMED.split(b"\n")[1], (1520000000, 31000000, 40000000, 1400000000)),
    # /api/embed: total and load only; it has no evaluation timings to leave out
    (b'{"model":"m","embeddings":[[0.1]],"total_duration":14143917,"load_duration":1019500,'
     b'"prompt_eval_count":8}', (14143917, 1019500, None, None)),
    (b'{"model":"m","embeddings":[[0.1]],"total_duration":5,"prompt_eval_count":8}',
     (5, 0, None, None)),
    (b'{"model":"m","embeddings":[[0.1]],"prompt_eval_count":8}', NONE4),
    (b'{"model":"m","response":"","done":true,"done_reason":"load"}', NONE4),  # load only
    (b'{"embedding":[0.1,0.2]}', NONE4),  # legacy /api/embeddings
    (b'{"choices":[],"usage":{"prompt_tokens":26,"completion_tokens":3}}', NONE4),
    # an OpenAI reply that happens to carry the keys: only the native dialect has timings
    (b'{"usage":{"prompt_tokens":1,"completion_tokens":1},"total_duration":5}', NONE4),
    (b'{"error":"model not found"}', NONE4),
    (b"garbage", NONE4),
])
def test_timings_of_a_whole_reply(body, expected):
    """Non-streamed replies: the native ones give their timings, others none."""
    assert timings(scan_whole_body(body)) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (b"0", 0),
    (b"1", 1),
    (b"%d" % MAX_REPORTED_NS, MAX_REPORTED_NS),  # the bound is believed
    (b"-1", None),  # not a duration: nothing invented
    (b"true", None),
    (b"false", None),
    (b"1.5e9", None),
    (b"1000.0", None),
    (b'"1000"', None),
    (b"null", None),
    (b"[1]", None),
    (b'{"ns":1}', None),
])
def test_bad_timings_are_left_out(value, expected):
    """A timing is a whole number of ns >= 0; anything else is None (the others of the
    frame are still read), and the counts stay exact."""
    tally = scan_whole_body(b'{"done":true,"eval_count":3,"load_duration":7,"eval_duration":'
                            + value + b"}")
    assert timings(tally) == (0, 7, 0, expected)
    assert (tally.completion_tokens, tally.exact, tally.clamped) == (3, True, False)


@pytest.mark.parametrize("value", [MAX_REPORTED_NS + 1, 2**63, 2**64, 10**40])
def test_absurd_timings_are_clamped(value, caplog):
    """A timing beyond a day (SQLite refuses 2**63) is cut to the bound and logged; the
    counts are not marked estimated by it."""
    tally = scan_whole_body(b'{"done":true,"eval_count":3,"total_duration":%d}' % value)
    assert timings(tally) == (MAX_REPORTED_NS, 0, 0, 0)
    assert not tally.clamped
    assert f"kept as {MAX_REPORTED_NS}" in caplog.text


def test_estimate_prompt_tokens():
    """Prompt estimate: about four characters a token over prompt/messages/input."""
    assert estimate_prompt_tokens({"prompt": "x" * 40}) == 10
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": "x" * 8},
                                                {"role": "user", "content": [{"type": "text", "text": "y" * 4}]}]}) == 3
    assert estimate_prompt_tokens({"input": ["abcd", "efgh"]}) == 2
    assert estimate_prompt_tokens(None) == 0


# Frames of every dialect, with how many tokens each carries.
_SSE_FRAMES = [
    (OPENAI_CHUNK % b"Hi", 1), (OPENAI_FINISH, 0), (OPENAI_USAGE, 0), (MENTION, 1),
    (PY_CHAT.split(b"\r\n\r\n")[0] + b"\r\n\r\n", 0),  # role-only
    (PY_CHAT.split(b"\r\n\r\n")[1] + b"\r\n\r\n", 1),
    (b": keep-alive\n\n", 0), (b'data: {"error":{"message":"x"}}\n\n', 0),
]
_NDJSON_FRAMES = [(line + b"\n", int(b'"done":true' not in line))
                  for line in NATIVE_CHAT.splitlines() + NATIVE_THINKING.splitlines()]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_cut_of_any_stream_forwards_it_and_counts_its_tokens(data):
    """Property: whatever the frames and wherever the pieces are cut, the bytes go
    through unchanged and the estimate is the number of frames that carry text."""
    kind, pool = data.draw(st.sampled_from([(FrameKind.SSE, _SSE_FRAMES),
                                            (FrameKind.NDJSON, _NDJSON_FRAMES)]))
    frames = data.draw(st.lists(st.sampled_from(pool), max_size=12))
    stream = b"".join(frame for frame, _ in frames) + (DONE if kind is FrameKind.SSE else b"")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    scanner = StreamScanner(kind)
    out = b"".join(scanner.feed(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)]))
    out += scanner.finish()
    assert out == stream
    assert scanner.tally.frames == sum(tokens for _, tokens in frames)
