"""Which client connections are open and which may make room for a new one: the
connection caps as bookkeeping, sans-IO (the server closes what it is told to).

At most ``max_connections`` connections are open, and at most ``max_per_address``
from one address (an IPv6 client counts by its /64, the block one subscriber
holds; exempt addresses, the trusted proxies, have no per-address cap). A new
connection past a cap evicts the connection idle the longest (with no request in
flight; of its own address for the per-address cap), or is refused when none is.
Idle connections are kept in the order they became idle (dicts keep insertion
order), so the one to evict is found without a scan, and each request costs two
dict updates.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, Iterator, TypeVar

from .clientip import parse_address

C = TypeVar("C", bound=Hashable)


def address_key(peer: str) -> str:
    """The address a per-address cap counts ``peer`` under: itself, or its /64."""
    address = parse_address(peer)
    if address is None or address.version == 4:
        return str(address) if address is not None else peer
    return f"{address.exploded[:19]}::/64"


class ConnectionTable(Generic[C]):
    """The open connections, per address, and the idle ones in idle order."""

    def __init__(self, max_connections: int, max_per_address: int,
                 exempt: Callable[[str], bool] = lambda peer: False) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._exempt = exempt
        self._key: dict[C, str | None] = {}  # open connection -> its address key (None: exempt)
        self._per_address: dict[str, int] = {}
        self._idle: dict[C, None] = {}
        self._idle_at: dict[str, dict[C, None]] = {}

    def __len__(self) -> int:
        return len(self._key)

    def __contains__(self, conn: object) -> bool:
        return conn in self._key

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._key))

    def admit(self, conn: C, peer: str) -> tuple[bool, list[C]]:
        """Take ``conn`` (idle from now) if there is room: ``(admitted, the connections to
        close to make that room)``; when refused, nothing changed."""
        key = None if self._exempt(peer) else address_key(peer)
        evict: list[C] = []
        if key is not None and self._per_address.get(key, 0) >= self.max_per_address:
            victim = next(iter(self._idle_at.get(key, ())), None)
            if victim is None:
                return False, []
            evict.append(victim)
            self.remove(victim)  # also a place in all: the check below passes
        if len(self._key) >= self.max_connections:
            victim = next(iter(self._idle), None)
            if victim is None:
                return False, []
            evict.append(victim)
            self.remove(victim)
        self._key[conn] = key
        if key is not None:
            self._per_address[key] = self._per_address.get(key, 0) + 1
        self.idle(conn)
        return True, evict

    def idle(self, conn: C) -> None:
        """``conn`` waits for a request: the newest idle (an open one only)."""
        if conn not in self._key:
            return
        self._idle[conn] = None
        key = self._key[conn]
        if key is not None:
            self._idle_at.setdefault(key, {})[conn] = None

    def busy(self, conn: C) -> None:
        """``conn`` has a request in flight: it may not be evicted."""
        if conn not in self._idle:
            return
        del self._idle[conn]
        key = self._key[conn]
        if key is not None:
            at = self._idle_at[key]
            del at[conn]
            if not at:
                del self._idle_at[key]

    def remove(self, conn: C) -> None:
        """``conn`` is closed (or being evicted): it no longer counts."""
        self.busy(conn)
        if conn not in self._key:
            return
        key = self._key.pop(conn)
        if key is not None:
            left = self._per_address[key] - 1
            if left:
                self._per_address[key] = left
            else:
                del self._per_address[key]
