"""Which client addresses a listener accepts: `allow` and `deny` lists of networks.

How this works: a `SourceAcl` holds the listener's `allow` and `deny` networks (CIDR or single
addresses, IPv4 and IPv6). `permits(ip)` is False when the address is in a `deny` network, or when
`allow` is not empty and the address is in none of its networks; `deny` wins over `allow` (so
`allow = ["10.0.0.0/8"]` with `deny = ["10.6.6.0/24"]` shuts one subnet out of a private range). An
IPv4 client seen through a dual-stack socket (`::ffff:a.b.c.d`) is matched as the IPv4 address. The
listener's gate (halb.proxy.limits) asks first, at accept, before any byte is read or any TLS work is
done: a refused connection is closed without an answer and counted as `rejected["denied"]` (HAProxy's
`tcp-request connection reject`). Verdicts are cached per address, so the common case costs one dict
lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CACHE_LIMIT = 65536  # distinct addresses remembered; beyond that the cache starts over


class SourceAcl:
    __slots__ = ("_cache", "allow", "deny")

    def __init__(self, allow: Sequence[Network] = (), deny: Sequence[Network] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self._cache: dict[str, bool] = {}

    def permits(self, ip: str) -> bool:
        verdict = self._cache.get(ip)
        if verdict is None:
            verdict = self._judge(ip)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[ip] = verdict
        return verdict

    def _judge(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False  # not an IP address (no peer address): nothing can vouch for it
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.deny):
            return False
        return not self.allow or any(address in net for net in self.allow)


def parse_network(value: str) -> Network:
    """ "10.0.0.0/8", "192.0.2.7" (one address) or "2001:db8::/32"; ValueError saying what is wrong."""
    try:
        return ipaddress.ip_network(value, strict=False)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not an IP address or network (like 10.0.0.0/8)") from None


def parse_networks(values: Sequence[str]) -> list[Network]:
    """A list of `parse_network` values; the ValueError names the bad entry's index."""
    networks: list[Network] = []
    for i, value in enumerate(values):
        try:
            networks.append(parse_network(value))
        except ValueError as exc:
            raise ValueError(f"[{i}]: {exc}") from None
    return networks
