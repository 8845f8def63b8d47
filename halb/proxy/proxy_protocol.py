"""The PROXY protocol: the header a TCP backend gets first, so it sees the real client (HAProxy's
send-proxy), and the header a listener with `accept_proxy` reads first (HAProxy's accept-proxy).

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

Reading (`accept_proxy`): `parse_proxy_header()` takes the first bytes of a connection and returns the
header's length and the source address it names, or None while incomplete; a malformed header raises
ProtocolError. Both versions are accepted (told apart by the first bytes). `UNKNOWN` (v1), a `LOCAL`
command (v2, e.g. the front proxy's own health checks) or an address family other than TCP over
IPv4/IPv6 name no source: the connection's own peer address is used. `read_proxy_header()` reads exactly
the header from a non-blocking socket (the bytes after it stay in the socket for whoever serves the
connection, TLS included), within a deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

from halb.errors import ProtocolError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT  # (the raw TCP relay's accepted sockets stay blocking)
V1_MAX = 107  # the longest v1 line, CRLF included
V2_MAX = 16 + 65535


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


def parse_proxy_header(data: bytes) -> tuple[int, tuple[str, int] | None] | None:
    """(header length, source address or None) from a connection's first bytes; None: more bytes are
    needed. Raises ProtocolError (status 400, reason "proxy_header") for anything else."""
    if data[:1] == b"P":
        if b"PROXY "[: len(data)] != data[:6]:
            raise _bad("not a PROXY protocol header")
        end = data.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(data) >= V1_MAX:
                raise _bad("PROXY v1 line too long")
            return None
        return end + 2, _v1_source(data[6:end])
    if data[:1] == b"\r":
        if not V2_SIGNATURE.startswith(data[:12]):
            raise _bad("not a PROXY protocol header")
        if len(data) < 16:
            return None
        version_command, family, length = struct.unpack_from("!BBH", data, 12)
        if version_command >> 4 != 2 or version_command & 0x0F > 1:
            raise _bad("unsupported PROXY v2 version or command")
        if len(data) < 16 + length:
            return None
        if version_command & 0x0F == 0:  # LOCAL: the front proxy's own connection
            return 16 + length, None
        return 16 + length, _v2_source(family, data[16 : 16 + length])
    if data:
        raise _bad("not a PROXY protocol header")
    return None


def _v1_source(fields: bytes) -> tuple[str, int] | None:
    parts = fields.split(b" ")
    if parts[0] == b"UNKNOWN":
        return None
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise _bad("malformed PROXY v1 line")
    try:
        src = ipaddress.ip_address(parts[1].decode("ascii"))
        ipaddress.ip_address(parts[2].decode("ascii"))
        ports = [int(p) for p in parts[3:5] if p.isdigit() and (p == b"0" or not p.startswith(b"0"))]
    except ValueError:
        raise _bad("malformed PROXY v1 address") from None
    if (
        len(ports) != 2
        or not all(0 <= p <= 65535 for p in ports)
        or src.version != (4 if parts[0] == b"TCP4" else 6)
    ):
        raise _bad("malformed PROXY v1 address")
    return str(src), ports[0]


def _v2_source(family: int, addresses: bytes) -> tuple[str, int] | None:
    if family == 0x11 and len(addresses) >= 12:  # TCP over IPv4
        return str(ipaddress.IPv4Address(addresses[:4])), struct.unpack_from("!H", addresses, 8)[0]
    if family == 0x21 and len(addresses) >= 36:  # TCP over IPv6
        return str(ipaddress.IPv6Address(addresses[:16])), struct.unpack_from("!H", addresses, 32)[0]
    if family in (0x11, 0x21):
        raise _bad("PROXY v2 addresses too short")
    return None  # UNSPEC, UDP, unix sockets: no usable source


def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, 400, "proxy_header")


async def read_proxy_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float
) -> tuple[str, int] | None:
    """Read exactly the PROXY header from `sock` (every call says MSG_DONTWAIT; readiness comes from the
    loop): -> the source it names (None: use the peer address). Raises ProtocolError when it is
    malformed or the peer closes, TimeoutError when it is not complete by `deadline` (loop time)."""
    got = b""
    while True:
        try:
            peek = sock.recv(V2_MAX if got[:1] == b"\r" else V1_MAX, _PEEK)
        except (BlockingIOError, InterruptedError):
            peek = None
        if peek is not None:
            if not peek:
                raise ProtocolError("connection closed before its PROXY header", 400, "proxy_header")
            data = got + peek
            parsed = parse_proxy_header(data)
            # Take what belongs to the header: all of it when complete, else what was seen so far (an
            # incomplete header has not ended yet, so every byte seen is part of it).
            take = parsed[0] - len(got) if parsed is not None else len(peek)
            got += sock.recv(take, socket.MSG_DONTWAIT)  # (there: it was just peeked)
            if parsed is not None:
                return parsed[1]
        await _readable(loop, sock, deadline)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock, lambda: ready.done() or ready.set_result(None))
    timer = loop.call_at(deadline, lambda: ready.done() or ready.set_exception(TimeoutError()))
    try:
        await ready
    finally:
        timer.cancel()
        loop.remove_reader(sock)
