"""api/headers.py: which headers cross the gateway, in each direction, as tables of
(headers in, headers out). h11 hands names over in lower case, so the tables do too."""

from __future__ import annotations

import pytest

from ollama_proxy.api.headers import HOP_BY_HOP, client_response_headers, upstream_request_headers

RID = b"rid-1"


def upstream(client: list[tuple[bytes, bytes]], api_key: str | None = None,
             body_length: int = 0) -> list[tuple[bytes, bytes]]:
    return upstream_request_headers(client, host=b"backend:11434", body_length=body_length,
                                    api_key=api_key, request_id=RID)


@pytest.mark.parametrize(("client", "kept"), [
    ([], []),
    ([(b"content-type", b"application/json"), (b"user-agent", b"ollama-python"),
      (b"x-custom", b"1")],
     [(b"content-type", b"application/json"), (b"user-agent", b"ollama-python"),
      (b"x-custom", b"1")]),
    # the client's Host, credentials, Origin, framing, expectations and encodings stay here
    ([(b"host", b"gateway:8080"), (b"authorization", b"Bearer op-x"), (b"x-api-key", b"op-x"),
      (b"origin", b"http://evil"), (b"content-length", b"99"), (b"expect", b"100-continue"),
      (b"accept-encoding", b"gzip"), (b"x-request-id", b"theirs")], []),
    # hop-by-hop, and whatever the client's Connection header names
    ([(b"connection", b"keep-alive, X-Trace"), (b"keep-alive", b"timeout=5"),
      (b"x-trace", b"1"), (b"transfer-encoding", b"chunked"), (b"te", b"trailers"),
      (b"upgrade", b"h2c"), (b"proxy-authorization", b"Basic x"), (b"accept", b"*/*")],
     [(b"accept", b"*/*")]),
])
def test_upstream_request_headers(client, kept):
    """Our Host first, the client's own headers in order, then our length and request id."""
    assert upstream(client, body_length=12) == [
        (b"host", b"backend:11434"), *kept, (b"content-length", b"12"), (b"x-request-id", RID)]


@pytest.mark.parametrize(("api_key", "last"), [
    (None, (b"x-request-id", RID)),
    ("", (b"x-request-id", RID)),
    ("sk-backend", (b"authorization", b"Bearer sk-backend")),
])
def test_the_backends_own_key_replaces_the_clients(api_key, last):
    """A backend's configured key is sent as Bearer; the caller's gateway key never is."""
    headers = upstream([(b"authorization", b"Bearer op-caller")], api_key=api_key)
    assert headers[-1] == last
    assert [v for k, v in headers if k == b"authorization"] == (
        [b"Bearer sk-backend"] if api_key else [])


@pytest.mark.parametrize(("backend", "streaming", "relayed"), [
    ([(b"content-type", b"application/json"), (b"x-ratelimit-limit-requests", b"5")], False,
     [(b"content-type", b"application/json"), (b"x-ratelimit-limit-requests", b"5")]),
    # our framing, our Date and our request id replace the backend's
    ([(b"content-length", b"10"), (b"date", b"Mon"), (b"x-request-id", b"theirs"),
      (b"transfer-encoding", b"chunked"), (b"connection", b"close"),
      (b"server", b"ollama")], False,
     [(b"server", b"ollama")]),
    ([(b"connection", b"x-hop"), (b"x-hop", b"1"), (b"cache-control", b"max-age=5")], False,
     [(b"cache-control", b"max-age=5")]),
    # a stream: never cached or buffered by a proxy in between, whatever the backend said
    ([(b"content-type", b"application/x-ndjson"), (b"cache-control", b"max-age=5"),
      (b"x-accel-buffering", b"yes")], True,
     [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"),
      (b"x-accel-buffering", b"no")]),
])
def test_client_response_headers(backend, streaming, relayed):
    """The backend's headers in order, less hop-by-hop and framing; our request id last."""
    assert client_response_headers(backend, streaming=streaming, request_id=RID) == [
        *relayed, (b"x-request-id", RID)]


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_no_hop_by_hop_header_crosses_either_way(name):
    """RFC 9110's hop-by-hop headers end at the gateway in both directions."""
    pair = [(name, b"x")]
    assert name not in dict(upstream(pair))
    for streaming in (False, True):
        relayed = client_response_headers(pair, streaming=streaming, request_id=RID)
        assert name not in dict(relayed)
