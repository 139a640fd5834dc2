"""FrameBuffer and the SSE/NDJSON helpers, fed every way a stream can be cut."""

from __future__ import annotations

import pytest

from ollama_proxy.api.framing import FrameBuffer, FrameKind, ndjson_lines, sse_data, sse_events

NDJSON = b'{"a":1}\n{"b":2}\n{"c":3}\n'
SSE_LF = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
SSE_CRLF = SSE_LF.replace(b"\n", b"\r\n")
SSE_MULTI = b": comment\n\nevent: x\ndata: line1\ndata: line2\n\n"


def feed_in_pieces(buf: FrameBuffer, data: bytes, size: int) -> list[bytes]:
    out = []
    for i in range(0, len(data), size):
        region = buf.feed(data[i:i + size])
        if region:
            out.append(region)
    return out


@pytest.mark.parametrize(("kind", "data"), [
    (FrameKind.NDJSON, NDJSON), (FrameKind.SSE, SSE_LF), (FrameKind.SSE, SSE_CRLF),
    (FrameKind.SSE, SSE_MULTI),
])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 1000])
def test_regions_are_whole_frames_and_bytes_unchanged(kind, data, size):
    """Cut anywhere, released regions end on frame boundaries and join to the input."""
    buf = FrameBuffer(kind)
    regions = feed_in_pieces(buf, data, size)
    assert b"".join(regions) == data
    assert buf.flush() == b""
    ends = (b"\n",) if kind is FrameKind.NDJSON else (b"\n\n", b"\r\n\r\n")
    assert all(r.endswith(ends) for r in regions)


def test_partial_frame_is_held_until_its_end():
    """A line without its newline is held back, then released whole."""
    buf = FrameBuffer(FrameKind.NDJSON)
    assert buf.feed(b'{"a":1}\n{"b"') == b'{"a":1}\n'
    assert buf.feed(b':2}\n') == b'{"b":2}\n'


def test_flush_returns_unterminated_tail():
    """At EOF the incomplete last frame comes out of flush()."""
    buf = FrameBuffer(FrameKind.SSE)
    assert buf.feed(b"data: x\n\ndata: y") == b"data: x\n\n"
    assert buf.flush() == b"data: y"
    assert buf.flush() == b""


def test_giant_frame_is_released_not_held_forever():
    """A frame over the cap is passed on as it is before its end, memory stays bounded."""
    buf = FrameBuffer(FrameKind.NDJSON, max_frame_bytes=100)
    early = b"".join(feed_in_pieces(buf, b"x" * 250, 30))
    assert early == b"x" * len(early) and len(early) >= 250 - 100  # at most the cap held back
    rest = b"".join(feed_in_pieces(buf, b"\n" + b'{"a":1}\n', 30))
    assert early + rest == b"x" * 250 + b"\n" + b'{"a":1}\n'
    assert buf.flush() == b""


def test_sse_boundary_split_across_feeds():
    """A blank line split between two reads (\\r\\n | \\r\\n) is still found."""
    buf = FrameBuffer(FrameKind.SSE)
    assert buf.feed(b"data: a\r\n\r") == b""
    assert buf.feed(b"\n") == b"data: a\r\n\r\n"


def test_sse_events_and_data():
    """Events are split at blank lines; data fields are joined with newlines."""
    spans = list(sse_events(SSE_MULTI))
    events = [SSE_MULTI[a:b] for a, b in spans]
    assert events == [b": comment\n\n", b"event: x\ndata: line1\ndata: line2\n\n"]
    assert sse_data(events[0]) is None
    assert sse_data(events[1]) == b"line1\nline2"
    assert sse_data(b"data:nospace\r\n\r\n") == b"nospace"


def test_ndjson_lines_skip_blank():
    """Blank lines are not frames."""
    assert list(ndjson_lines(b'{"a":1}\n\n{"b":2}\n')) == [b'{"a":1}', b'{"b":2}']


def test_garbage_passes_through():
    """Bytes that are not JSON still pass through unchanged; framing does not judge."""
    buf = FrameBuffer(FrameKind.NDJSON)
    data = b"\x00\xff garbage\nmore\n"
    assert b"".join(feed_in_pieces(buf, data, 3)) == data
