"""The shared HTTP message values, sans-IO."""

from __future__ import annotations

import re

import h11
import pytest

from ollama_proxy.http.messages import (
    Request,
    complaint,
    find_header,
    head_size,
    host_port,
    http_date,
    path_of_head,
)


def test_find_header_takes_the_first_value_of_a_lower_case_name():
    """Header names are lower-case (h11's); a repeated header gives its first value."""
    headers = [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")]
    assert find_header(headers, b"x-a") == b"1"
    assert find_header(headers, b"x-c") is None


@pytest.mark.parametrize(("host", "port", "written"), [
    ("127.0.0.1", 8080, "127.0.0.1:8080"),
    ("gpu1", 80, "gpu1:80"),
    ("::1", 8080, "[::1]:8080"),
    ("fe80::1", None, "[fe80::1]"),
    ("example.com", None, "example.com"),
])
def test_host_port_brackets_an_ipv6_literal(host, port, written):
    """An IPv6 address's colons never read as the port's."""
    assert host_port(host, port) == written


@pytest.mark.parametrize(("start", "path"), [
    (b"GET /v1/models?x=1 HTTP/1.1\r\nHost : x\r\n", "/v1/models"),
    (b"POST /api/chat HTTP/1.1\nHost", "/api/chat"),
    (b"GARBAGE\r\n\r\n", "/"),
    (b"", "/"),
])
def test_the_path_of_a_head_that_could_not_be_parsed(start, path):
    """A malformed head's errors speak its path's dialect, found in its first bytes."""
    assert path_of_head(start) == path


def test_a_complaint_never_echoes_the_bytes_h11_quotes():
    """What h11 says is wrong, without the client's raw bytes."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"GET / HTTP/1.1\r\nHost : secret\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError) as info:
        connection.next_event()
    assert "secret" in str(info.value) and "secret" not in complaint(info.value)
    assert complaint(ValueError("")) == "malformed data"


def test_head_size_counts_the_target_and_every_header_line():
    assert head_size(b"/x", [(b"host", b"a"), (b"x-b", b"cd")]) == 2 + (4 + 1 + 4) + (3 + 2 + 4)


def test_the_date_header_is_an_imf_fixdate():
    """RFC 9110's preferred format, GMT."""
    assert re.fullmatch(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT", http_date())


async def test_a_body_is_read_once_and_only_when_asked():
    """read_body calls the reader on its first call only; a body-less request has none."""
    calls = []

    async def reader() -> bytearray:
        calls.append(1)
        return bytearray(b"hello")

    request = Request(method="POST", target="/a?b", path="/a", query="b", headers=[],
                      body=b"", client="127.0.0.1", _unread=reader)
    assert calls == []
    assert await request.read_body() == b"hello"
    assert await request.read_body() == b"hello" and calls == [1]
    empty = Request(method="GET", target="/", path="/", query="", headers=[], body=b"",
                    client="127.0.0.1")
    assert await empty.read_body() == b""
