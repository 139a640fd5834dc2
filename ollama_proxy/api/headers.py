"""Which headers cross the gateway, in each direction. Pure functions."""

from __future__ import annotations

# RFC 9110 §7.6.1 hop-by-hop headers, plus the framing we redo ourselves.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
    b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Never forwarded upstream: our credentials, the browser's Origin (Ollama
# answers an unknown Origin with 403), our own framing and expectations, and
# Accept-Encoding: a compressed answer would hide its usage from the scanner.
_NOT_UPSTREAM = HOP_BY_HOP | {
    b"host", b"content-length", b"authorization", b"x-api-key", b"origin", b"expect",
    b"accept-encoding",
}
_NOT_DOWNSTREAM = HOP_BY_HOP | {b"content-length", b"date", b"x-request-id"}
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers the sender named in ``Connection`` are hop-by-hop too."""
    names: set[bytes] = set()
    for key, value in headers:
        if key == b"connection":
            names.update(t.strip().lower() for t in value.split(b","))
    return names


def upstream_request_headers(
    client_headers: list[tuple[bytes, bytes]],
    *,
    host: bytes,
    body_length: int,
    api_key: str | None,
    request_id: bytes,
) -> list[tuple[bytes, bytes]]:
    """Client headers as forwarded: Host rewritten, secrets and hop-by-hop dropped."""
    dropped = _NOT_UPSTREAM | _connection_tokens(client_headers) | {b"x-request-id"}
    headers = [(b"host", host)]
    headers.extend((k, v) for k, v in client_headers if k not in dropped)
    headers.append((b"content-length", str(body_length).encode()))
    headers.append((b"x-request-id", request_id))
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode()))
    return headers


def client_response_headers(
    upstream_headers: list[tuple[bytes, bytes]], *, streaming: bool, request_id: bytes
) -> list[tuple[bytes, bytes]]:
    """Backend headers as relayed: our framing, our request id, no buffering on streams."""
    dropped = _NOT_DOWNSTREAM | _connection_tokens(upstream_headers)
    if streaming:
        dropped = dropped | {b"cache-control", b"x-accel-buffering"}
    headers = [(k, v) for k, v in upstream_headers if k not in dropped]
    if streaming:
        headers.extend(_STREAM_HEADERS)
    headers.append((b"x-request-id", request_id))
    return headers
