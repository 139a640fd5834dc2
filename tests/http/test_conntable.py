"""The connection caps as bookkeeping, sans-IO: who is evicted to make room (the
longest idle, of the same address for the per-address cap), who is refused, and
how addresses are counted."""

from __future__ import annotations

import pytest

from ollama_proxy.app import connection_cap
from ollama_proxy.http.conntable import ConnectionTable, address_key


@pytest.mark.parametrize(("peer", "key"), [
    ("10.0.0.1", "10.0.0.1"),
    ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped: the IPv4 address
    ("2001:db8:1:2:aaaa::1", "2001:0db8:0001:0002::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:0db8:0001:0002::/64"),  # the same subscriber's block
    ("?", "?"),
])
def test_address_key(peer, key):
    """IPv4 per address, IPv6 per /64."""
    assert address_key(peer) == key


def test_the_longest_idle_makes_room_and_a_busy_one_never():
    """Past max_connections the first idle goes; a connection that served a request is
    the newest idle; with every connection busy the newcomer is refused."""
    table: ConnectionTable[str] = ConnectionTable(3, 100)
    for name in "abc":
        assert table.admit(name, f"10.0.0.{ord(name)}") == (True, [])
    table.busy("a")
    table.idle("a")  # served a request: now the newest idle
    assert table.admit("d", "10.0.0.100") == (True, ["b"])
    assert "b" not in table and len(table) == 3
    for name in "acd":
        table.busy(name)
    assert table.admit("e", "10.0.0.101") == (False, [])
    assert len(table) == 3 and "e" not in table


def test_one_address_evicts_its_own_longest_idle():
    """Past max_per_address, the address's own oldest idle goes, not another's; an
    exempt address (a trusted proxy) has no per-address cap."""
    table: ConnectionTable[str] = ConnectionTable(100, 2, exempt=lambda peer: peer == "10.9.9.9")
    table.admit("other", "10.0.0.2")
    table.admit("a1", "10.0.0.1")
    table.admit("a2", "10.0.0.1")
    assert table.admit("a3", "10.0.0.1") == (True, ["a1"])
    table.busy("a2")
    table.busy("a3")
    assert table.admit("a4", "10.0.0.1") == (False, [])
    for n in range(5):
        assert table.admit(f"p{n}", "10.9.9.9") == (True, [])


def test_an_ipv6_block_is_one_address():
    """Two addresses of one /64 share its cap."""
    table: ConnectionTable[str] = ConnectionTable(100, 1)
    table.admit("x", "2001:db8::1")
    assert table.admit("y", "2001:db8::2") == (True, ["x"])


def test_removed_connections_are_forgotten():
    """Removing is idempotent; a removed connection going idle is ignored."""
    table: ConnectionTable[str] = ConnectionTable(1, 1)
    table.admit("a", "10.0.0.1")
    table.remove("a")
    table.remove("a")
    table.idle("a")
    assert len(table) == 0
    assert table.admit("b", "10.0.0.1") == (True, [])


@pytest.mark.parametrize(("nofile", "pools", "cap"), [
    (256, 1024, 96),  # ulimit -n 256: half of what is left for clients, half for backends
    (20000, 1024, 16384),  # more than enough descriptors: the memory-minded ceiling
    (4096, 100, 3932),  # small pools take only what they may hold
    (64, 0, 16),
    (None, 0, 1024),  # no limits to read (not Unix)
])
def test_the_default_connection_cap_follows_the_open_file_limit(nofile, pools, cap):
    """max_connections left empty: the descriptors after a reserve and the backends."""
    assert connection_cap(nofile, pools) == cap
