"""``GET /admin``: the web console, one page of HTML, CSS and vanilla JS shipped in
``console/`` beside this module (package data, read with ``importlib.resources`` so
that it is found inside the zipapp too). The files need no key: the page asks for
one and calls the JSON API with it, so what it shows follows the key's role.

Served with a strict Content-Security-Policy (``default-src 'self'``: no inline
script or style, nothing from elsewhere), no framing, no referrer, no sniffing, and
an ETag (``If-None-Match`` answers 304)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from ..http.messages import Request
from ..http.responder import Responder

FOLDER = "console"
# Path → (file in FOLDER, content type).
FILES: Mapping[str, tuple[str, bytes]] = {
    "/admin": ("index.html", b"text/html; charset=utf-8"),
    "/admin/console.css": ("console.css", b"text/css; charset=utf-8"),
    "/admin/console.js": ("console.js", b"text/javascript; charset=utf-8"),
}

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", b"default-src 'self'; base-uri 'none'; form-action 'self'; "
                                 b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: bytes
    etag: bytes  # quoted, as the header carries it


@cache
def asset(path: str) -> Asset:
    """The file served at ``path`` (one of ``FILES``), read once."""
    name, content_type = FILES[path]
    body = resources.files(__package__).joinpath(FOLDER).joinpath(name).read_bytes()
    return Asset(body, content_type, b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"')


def _matches(if_none_match: bytes, etag: bytes) -> bool:
    tags = {t.strip().removeprefix(b"W/") for t in if_none_match.split(b",")}
    return b"*" in tags or etag in tags


async def serve(request: Request, responder: Responder, params: Mapping[str, str]) -> None:
    """The dispatch-table handler of every path in ``FILES``."""
    file = asset(request.path)
    headers = [*SECURITY_HEADERS, (b"etag", file.etag), (b"cache-control", b"no-cache")]
    if_none_match = request.header(b"if-none-match")
    if if_none_match is not None and _matches(if_none_match, file.etag):
        # no body, and the length is the file's (RFC 9110 8.6), not 0: a cache keeps it whole
        await responder.start(304, headers, length=len(file.body))
        await responder.end()
        return
    await responder.respond(200, [(b"content-type", file.content_type), *headers], file.body)
