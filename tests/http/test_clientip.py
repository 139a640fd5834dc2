"""Client addresses as pure decisions: allow/deny (deny wins) and X-Forwarded-For
read only from trusted proxies, from the right."""

from __future__ import annotations

import ipaddress

import pytest

from ollama_proxy.http.clientip import AddressPolicy, parse_address


def nets(text: str) -> tuple:
    return tuple(ipaddress.ip_network(n) for n in text.split())


@pytest.mark.parametrize(("allow", "deny", "client", "admitted"), [
    ("", "", "203.0.113.9", True),
    ("10.0.0.0/8", "", "10.1.2.3", True),
    ("10.0.0.0/8", "", "192.168.1.1", False),
    ("10.0.0.0/8", "10.6.0.0/16", "10.6.1.1", False),  # deny wins
    ("", "10.6.0.0/16", "10.7.1.1", True),
    ("::1/128", "", "::1", True),
    ("127.0.0.0/8", "", "::ffff:127.0.0.1", True),  # IPv4-mapped is IPv4
    ("10.0.0.0/8", "", "unknown", False),  # no known address: not in an allow list
    ("", "10.0.0.0/8", "unknown", True),
])
def test_allow_and_deny(allow, deny, client, admitted):
    """An empty allow list admits all; deny wins; an unknown address passes only a deny list."""
    assert AddressPolicy(nets(allow), nets(deny)).admits(client) is admitted


TRUSTED = AddressPolicy(trusted_proxies=nets("10.0.0.0/24 192.168.5.5"))


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("10.0.0.2", [b"203.0.113.9"], "203.0.113.9"),
    ("10.0.0.2", [b"1.1.1.1, 203.0.113.9"], "203.0.113.9"),  # the left is the client's own claim
    ("10.0.0.2", [b"203.0.113.9, 192.168.5.5"], "203.0.113.9"),  # trusted hops skipped
    ("10.0.0.2", [b"203.0.113.9", b"192.168.5.5"], "203.0.113.9"),  # several headers, in order
    ("10.0.0.2", [b"10.0.0.7, 10.0.0.8"], "10.0.0.7"),  # all trusted: the first
    ("10.0.0.2", [b"<script>"], "unknown"),  # never echoed
    ("10.0.0.2", [b" , "], "10.0.0.2"),
    ("10.0.0.2", [], "10.0.0.2"),
    ("203.0.113.50", [b"10.9.9.9"], "203.0.113.50"),  # not a trusted peer: the header is ignored
    ("10.0.0.2", [b"[2001:db8::1]"], "2001:db8::1"),
])
def test_client_behind_trusted_proxies(peer, forwarded, client):
    """Only a trusted peer's X-Forwarded-For counts, read from the right."""
    assert TRUSTED.client_of(peer, forwarded) == client


def test_parse_address():
    """IPv4-mapped IPv6 becomes IPv4; brackets and spaces are tolerated; junk is None."""
    assert str(parse_address(" ::ffff:10.0.0.1 ")) == "10.0.0.1"
    assert str(parse_address("[::1]")) == "::1"
    assert parse_address("example.com") is None
