"""HTTP/1.1 response body framing for the upstream side, sans-IO.

h11 parses the response head; the body is then decoded here, because it is
the per-chunk hot path: a read that holds one whole chunk (the usual case
with Ollama, which flushes one frame per chunk) costs one ``find`` and one
slice. The framing rules are RFC 9112 §6.3.
"""

from __future__ import annotations

from ..errors import UpstreamProtocolError

# A chunk-size line (hex size plus extensions) longer than this is not HTTP.
MAX_CHUNK_LINE = 4096
# Trailer fields after the last chunk: we skip them, but not without end.
MAX_TRAILER_BYTES = 64 * 1024


class LengthBody:
    """A body of ``Content-Length`` bytes."""

    __slots__ = ("remaining", "overflow")

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.overflow = False  # bytes beyond the body: the connection is not reusable

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, data: bytes) -> bytes:
        if len(data) <= self.remaining:
            self.remaining -= len(data)
            return data
        self.overflow = True
        body, self.remaining = data[: self.remaining], 0
        return body

    def eof(self) -> None:
        if self.remaining:
            raise UpstreamProtocolError(
                f"backend closed the connection {self.remaining} bytes before the end of the body")


class CloseDelimitedBody:
    """A body that ends when the backend closes the connection (HTTP/1.0 style)."""

    __slots__ = ("done", "overflow")

    def __init__(self) -> None:
        self.done = False
        self.overflow = True  # never reusable

    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> None:
        self.done = True


class ChunkedBody:
    """A ``Transfer-Encoding: chunked`` body, decoded incrementally."""

    __slots__ = ("_pending", "_remaining", "_need_crlf", "_in_trailers", "_trailer_bytes",
                 "done", "overflow")

    def __init__(self) -> None:
        self._pending = b""  # an incomplete size line, CRLF or trailer line
        self._remaining = 0  # payload bytes still due in the current chunk
        self._need_crlf = False  # the CRLF after a chunk's payload
        self._in_trailers = False
        self._trailer_bytes = 0
        self.done = False
        self.overflow = False

    def feed(self, data: bytes) -> bytes:
        """Payload bytes found in ``data`` (possibly b"")."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        if self.done:
            self.overflow = self.overflow or bool(data)
            return b""
        out: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                whole = pos == 0 and take == end  # the usual case: no copy
                out.append(data if whole else data[pos:pos + take])
                pos += take
                self._remaining -= take
                self._need_crlf = not self._remaining
                continue
            if end - pos < 2:
                self._pending = data[pos:]
                break
            if self._need_crlf:
                if data[pos:pos + 2] != b"\r\n":
                    raise UpstreamProtocolError("backend sent a chunk without its CRLF")
                pos += 2
                self._need_crlf = False
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_CHUNK_LINE:
                    raise UpstreamProtocolError("backend sent an over-long chunk line")
                self._pending = data[pos:]
                break
            line = data[pos:eol]
            pos = eol + 2
            if self._in_trailers:
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > MAX_TRAILER_BYTES:
                    raise UpstreamProtocolError("backend sent too many trailer bytes")
                if not line:
                    self.done = True
                    self.overflow = pos < end
                    break
                continue
            self._remaining = _chunk_size(line)
            if not self._remaining:
                self._in_trailers = True
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def eof(self) -> None:
        if not self.done:
            raise UpstreamProtocolError("backend closed the connection mid-body (incomplete chunked body)")


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip()
    if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
        raise UpstreamProtocolError(f"backend sent a bad chunk size line: {line[:40]!r}")
    return int(size, 16)


Body = LengthBody | CloseDelimitedBody | ChunkedBody


def body_reader(method: str, status: int, headers: list[tuple[bytes, bytes]]) -> Body:
    """How the response body of ``status`` to ``method`` is framed (RFC 9112 §6.3)."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return LengthBody(0)
    length: bytes | None = None
    for name, value in headers:
        if name == b"transfer-encoding":
            if value.lower().rsplit(b",", 1)[-1].strip() == b"chunked":
                return ChunkedBody()
            return CloseDelimitedBody()
        if name == b"content-length":
            length = value
    if length is not None:
        return LengthBody(int(length))  # h11 validated it
    return CloseDelimitedBody()
