"""HTTP message values that the server, the upstream client and the handlers share,
sans-IO: the request a handler gets, header lookup, the ``Date`` value, the JSON
content type, ``host:port`` as a URL or a ``Host`` header writes it, and what to
say about a head that is too big or malformed."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Awaitable, Callable, Iterable

# The content type of every JSON document the gateway writes.
JSON_TYPE = b"application/json; charset=utf-8"

Headers = list[tuple[bytes, bytes]]  # names lower-case, as h11 gives and takes them


def find_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def host_port(host: str, port: int | None) -> str:
    """``host:port``, an IPv6 literal in brackets (its colons would read as the port's);
    without a port, the host alone (bracketed all the same)."""
    if ":" in host:
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def head_size(target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of a request head as sent, near enough to hold it to a cap."""
    return len(target) + sum(len(k) + len(v) + 4 for k, v in headers)


def path_of_head(start: bytes) -> str:
    """The path in the first bytes of a request head that could not be parsed (its
    errors speak that path's dialect); "/" when there is none."""
    line = re.split(rb"\r?\n", start, maxsplit=1)[0]
    parts = line.split(b" ")
    if len(parts) < 2:
        return "/"
    return parts[1].decode("latin-1").partition("?")[0]


def complaint(exc: Exception) -> str:
    """h11's complaint about a message without the raw bytes it quotes (never echoed
    to the client)."""
    return re.split(r":\s*(?:bytearray\()?b['\"]", str(exc), maxsplit=1)[0] or "malformed data"


_date_second = -1
_date_value = b""


def http_date() -> bytes:
    """The ``Date`` header value, rebuilt at most once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = formatdate(now, usegmt=True).encode()
    return _date_value


@dataclass(slots=True)
class Request:
    """A request whose head arrived; its body is read by ``read_body``."""

    method: str
    target: str
    path: str
    query: str
    headers: Headers
    body: bytes | bytearray  # b"" until read_body
    client: str  # the client's address (behind a trusted proxy: from X-Forwarded-For)
    _unread: Callable[[], Awaitable[bytearray]] | None = field(default=None, repr=False)

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower-case), or None."""
        return find_header(self.headers, name)

    async def read_body(self) -> bytes | bytearray:
        """The whole body, read from the client on the first call: 413 past
        ``max_body_bytes``, 408 past ``body_timeout_s`` (or a silent gap of
        ``header_timeout_s``). Call it only once the caller is known to be
        allowed: a body never read costs nothing."""
        reader = self._unread
        if reader is not None:
            self._unread = None
            self.body = await reader()
        return self.body
