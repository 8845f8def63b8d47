"""The PROXY protocol header a TCP backend gets first, so it sees the real client (HAProxy's send-proxy).

How this works: a backend behind a TCP-mode proxy sees the proxy's address as its peer. With
`send_proxy = "v1"` or `"v2"` on a pool, each new backend connection starts with a header that names
the client's address and port and the address and port the client connected to (the listener), as
specified by HAProxy's PROXY protocol (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt):
version 1 is one text line, `PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\\r\\n`; version 2 is binary:
a 12-byte signature, version/command `0x21` (v2, PROXY), family/protocol `0x11` (TCP over IPv4) or
`0x21` (TCP over IPv6), the length of the addresses, then source address, destination address, source
port and destination port in network order. `proxy_header()` is pure; the TCP proxy writes its result
before any client byte. (HTTP listeners tell the backend in X-Forwarded-For instead, and share backend
connections between clients, so a pool with `send_proxy` may only serve TCP listeners.)
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """The header for a connection from `client` (address, port) to `local` (the listener's side)."""
    src = ipaddress.ip_address(client[0])
    dst = ipaddress.ip_address(local[0])
    if src.version != dst.version:  # an IPv4 client on an IPv6 socket shows as ::ffff:a.b.c.d
        src, dst = _mapped(src), _mapped(dst)
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {client[1]} {local[1]}\r\n".encode()
    if version == "v2":
        family = 0x11 if src.version == 4 else 0x21
        addresses = src.packed + dst.packed + struct.pack("!HH", client[1], local[1])
        return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(addresses)) + addresses
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def _mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return (
        address if isinstance(address, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{address}")
    )
