"""Who the client is and whether it may connect: allow/deny lists and trusted
reverse proxies, as pure decisions on address strings.

A connection's peer address is the client, unless the peer is a trusted proxy:
then the client is the last address of ``X-Forwarded-For`` that is not itself a
trusted proxy (proxies append the address they received from, so everything to
its left was written by a party we do not trust). ``X-Forwarded-For`` from any
other peer is never read. Deny wins over allow; an empty allow list admits
every address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IpAddress | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 address as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: IpAddress | None, networks: tuple[IpNetwork, ...]) -> bool:
    return address is not None and any(address in network for network in networks)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """The ``[server]`` allow, deny and trusted_proxies lists."""

    allow: tuple[IpNetwork, ...] = ()
    deny: tuple[IpNetwork, ...] = ()
    trusted_proxies: tuple[IpNetwork, ...] = ()

    @property
    def open(self) -> bool:
        """Nothing to check: every address may connect and none is a proxy."""
        return not (self.allow or self.deny or self.trusted_proxies)

    def admits(self, client: str) -> bool:
        """Whether ``client`` may use the gateway (an unparsable address only when
        no allow list asks for a known one)."""
        if not self.allow and not self.deny:
            return True
        address = parse_address(client)
        if _within(address, self.deny):
            return False
        return not self.allow or _within(address, self.allow)

    def is_trusted_proxy(self, peer: str) -> bool:
        return bool(self.trusted_proxies) and _within(parse_address(peer), self.trusted_proxies)

    def client_of(self, peer: str, forwarded_for: list[bytes]) -> str:
        """The client behind ``peer``: from ``X-Forwarded-For`` (every header's values,
        in order) only when ``peer`` is a trusted proxy."""
        if not forwarded_for or not self.is_trusted_proxy(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for
                for hop in value.decode("latin-1").split(",") if hop.strip()]
        for hop in reversed(hops):
            address = parse_address(hop)
            if not _within(address, self.trusted_proxies):
                return _name(address)
        return _name(parse_address(hops[0])) if hops else peer


def _name(address: IpAddress | None) -> str:
    """An address as logs and the ledger write it; a forwarded hop that is no
    address is never echoed (the text comes from the client)."""
    return "unknown" if address is None else str(address)
