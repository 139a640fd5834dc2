"""Incremental NDJSON and SSE framing, sans-IO.

The relay forwards upstream bytes unchanged; these helpers only decide where
complete frames end so that a partial frame is held back until its end
arrives (an upstream that dies mid-frame must not leave half a JSON line at
the client), and split a complete region into frames when someone needs to
look inside. Searches only look at new bytes (plus the few bytes a boundary
can straddle), so a long frame arriving in many pieces is never rescanned.
"""

from __future__ import annotations

import enum
import re
from typing import Iterator


class FrameKind(enum.Enum):
    NDJSON = "ndjson"  # one JSON document per "\n"-terminated line
    SSE = "sse"  # events ended by a blank line ("\n\n", "\r\n\r\n" or "\r\r")


# An SSE event ends at a blank line; any line ending may be used (WHATWG SSE).
_SSE_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r|\n\r\n|\r\n\n")
# Longest SSE boundary minus one: how far a boundary can reach back into old bytes.
_SSE_OVERLAP = 3


def _last_boundary_end(kind: FrameKind, data: bytes, start: int) -> int:
    """Index just past the last frame boundary found at or after ``start``, or -1."""
    if kind is FrameKind.NDJSON:
        pos = data.rfind(b"\n", start)
        return pos + 1 if pos >= 0 else -1
    end = -1
    for match in _SSE_BOUNDARY.finditer(data, start):
        end = match.end()
    return end


class FrameBuffer:
    """Holds the partial last frame; releases complete frames as one region.

    ``feed`` returns the bytes that now form whole frames (possibly b"").
    A frame longer than ``max_frame_bytes`` is released early, as it is, so a
    giant line never stalls the stream or grows memory (its content is then not
    inspected as a whole).
    """

    __slots__ = ("kind", "max_frame_bytes", "_pending")

    def __init__(self, kind: FrameKind, max_frame_bytes: int = 1 << 20) -> None:
        self.kind = kind
        self.max_frame_bytes = max_frame_bytes
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        pending = self._pending
        if pending:
            start = max(0, len(pending) - _SSE_OVERLAP)
            data = pending + data
        else:
            start = 0
        end = _last_boundary_end(self.kind, data, start)
        if end == len(data):  # the usual case: upstream flushes whole frames
            self._pending = b""
            return data
        if end < 0:
            if len(data) > self.max_frame_bytes:
                self._pending = b""
                return data
            self._pending = data
            return b""
        self._pending = data[end:]
        return data[:end]

    def flush(self) -> bytes:
        """At end of stream: whatever incomplete frame is left."""
        rest, self._pending = self._pending, b""
        return rest


def ndjson_lines(region: bytes) -> Iterator[bytes]:
    """The non-empty lines of a complete NDJSON region (without "\\n")."""
    for line in region.split(b"\n"):
        if line.strip():
            yield line


def sse_events(region: bytes) -> Iterator[tuple[int, int]]:
    """Spans ``(start, end)`` of each event in a complete SSE region, boundary included."""
    start = 0
    for match in _SSE_BOUNDARY.finditer(region):
        yield start, match.end()
        start = match.end()
    if start < len(region):
        yield start, len(region)


def sse_data(event: bytes) -> bytes | None:
    """The joined ``data`` field of one SSE event, or None when it has none."""
    parts: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    if not parts:
        return None
    return b"\n".join(parts)
