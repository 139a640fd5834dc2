"""The upstream body decoders, fed in every piece size, and the framing rules."""

from __future__ import annotations

import pytest

from ollama_proxy.errors import UpstreamProtocolError
from ollama_proxy.http.bodies import ChunkedBody, CloseDelimitedBody, LengthBody, body_reader

CHUNKED = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"


def feed_all(body, data: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(data), size):
        out += body.feed(data[i:i + size])
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 1000])
def test_chunked_decodes_across_any_split(size):
    """Payload comes out whole however the reads cut sizes, CRLFs and trailers."""
    body = ChunkedBody()
    assert feed_all(body, CHUNKED, size) == b"hello 0123456789"
    assert body.done and not body.overflow


def test_chunked_one_chunk_per_read_is_not_copied():
    """The common case (one whole chunk payload in a read) returns the payload."""
    body = ChunkedBody()
    assert body.feed(b"5\r\n") == b""
    data = b"hello"
    assert body.feed(data) is data


def test_chunked_bytes_after_end_mark_overflow():
    """Bytes after the last chunk mean the connection must not be reused."""
    body = ChunkedBody()
    body.feed(b"0\r\n\r\nextra")
    assert body.done and body.overflow


@pytest.mark.parametrize("data", [b"zz\r\n", b"5\r\nhelloXX", b"-1\r\n", b"1" * 5000],
                         ids=["not-hex", "no-crlf", "negative", "endless-size-line"])
def test_chunked_garbage_is_a_protocol_error(data):
    """Bad framing raises UpstreamProtocolError (502), never hangs or grows."""
    with pytest.raises(UpstreamProtocolError):
        ChunkedBody().feed(data)


def test_chunked_eof_before_end_is_an_error():
    """A connection closed mid-body is a broken response."""
    body = ChunkedBody()
    body.feed(b"5\r\nhel")
    with pytest.raises(UpstreamProtocolError):
        body.eof()


def test_length_body():
    """Content-Length: exactly that many bytes; more is overflow, fewer at EOF an error."""
    body = LengthBody(5)
    assert feed_all(body, b"hello", 2) == b"hello" and body.done and not body.overflow
    body = LengthBody(3)
    assert body.feed(b"abcdef") == b"abc" and body.overflow
    body = LengthBody(3)
    body.feed(b"a")
    with pytest.raises(UpstreamProtocolError):
        body.eof()


def test_close_delimited_body_ends_at_eof():
    """Without length or chunking, the body runs to EOF and is never reused."""
    body = CloseDelimitedBody()
    assert body.feed(b"abc") == b"abc" and not body.done
    body.eof()
    assert body.done and body.overflow


@pytest.mark.parametrize(("method", "status", "headers", "kind"), [
    ("HEAD", 200, [(b"content-length", b"10")], LengthBody),
    ("GET", 204, [], LengthBody),
    ("GET", 304, [], LengthBody),
    ("POST", 200, [(b"transfer-encoding", b"chunked")], ChunkedBody),
    ("POST", 200, [(b"transfer-encoding", b"gzip, chunked")], ChunkedBody),
    ("POST", 200, [(b"content-length", b"7")], LengthBody),
    ("POST", 200, [], CloseDelimitedBody),
])
def test_framing_rules(method, status, headers, kind):
    """RFC 9112 §6.3: HEAD/204/304 have no body; chunked wins over length; else to EOF."""
    assert isinstance(body_reader(method, status, headers), kind)
    if kind is LengthBody and (method == "HEAD" or status in (204, 304)):
        assert body_reader(method, status, headers).done
