"""The PROXY protocol header, byte for byte against the specification's layout."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest

from halb.errors import ProtocolError
from halb.proxy.proxy_protocol import V2_SIGNATURE, parse_proxy_header, proxy_header


def test_v1_is_one_text_line() -> None:
    assert proxy_header("v1", ("192.0.2.7", 51234), ("198.51.100.1", 443)) == (
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n"
    )
    assert proxy_header("v1", ("2001:db8::7", 40000), ("2001:db8::1", 8443)) == (
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 8443\r\n"
    )


def test_v2_ipv4() -> None:
    header = proxy_header("v2", ("192.0.2.7", 51234), ("198.51.100.1", 443))
    assert header[:12] == V2_SIGNATURE == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
    assert header[12] == 0x21  # version 2, command PROXY
    assert header[13] == 0x11  # AF_INET, STREAM
    assert struct.unpack("!H", header[14:16]) == (12,)
    assert header[16:20] == bytes([192, 0, 2, 7]) and header[20:24] == bytes([198, 51, 100, 1])
    assert struct.unpack("!HH", header[24:28]) == (51234, 443)
    assert len(header) == 28


def test_v2_ipv6_and_mixed_families() -> None:
    header = proxy_header("v2", ("2001:db8::7", 40000), ("2001:db8::1", 8443))
    assert header[13] == 0x21 and struct.unpack("!H", header[14:16]) == (36,) and len(header) == 52
    # an IPv4 client reaching an IPv6 socket address: both sides written as IPv6 (v4-mapped)
    mixed = proxy_header("v1", ("192.0.2.7", 1), ("2001:db8::1", 2))
    assert mixed == f"PROXY TCP6 {ipaddress.IPv6Address('::ffff:192.0.2.7')} 2001:db8::1 1 2\r\n".encode()


def test_unknown_version() -> None:
    with pytest.raises(ValueError, match="unknown PROXY protocol version"):
        proxy_header("v3", ("192.0.2.7", 1), ("192.0.2.8", 2))


# --- reading (accept_proxy) --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("client", "local"),
    [(("192.0.2.7", 51234), ("198.51.100.1", 443)), (("2001:db8::7", 40000), ("2001:db8::1", 8443))],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_what_send_proxy_writes_accept_proxy_reads(version: str, client: tuple[str, int], local: Any) -> None:
    header = proxy_header(version, client, local)
    assert parse_proxy_header(header + b"GET / HTTP/1.1\r\n") == (len(header), client)
    for cut in range(len(header)):  # any prefix: more bytes needed, never an error
        assert parse_proxy_header(header[:cut]) is None


def test_unknown_and_local_name_no_source() -> None:
    assert parse_proxy_header(b"PROXY UNKNOWN\r\nrest") == (15, None)
    assert parse_proxy_header(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == (35, None)
    local = V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])  # LOCAL, UNSPEC, no addresses
    assert parse_proxy_header(local + b"x") == (16, None)
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216)  # AF_UNIX: no source
    assert parse_proxy_header(unix) == (232, None)
    tlv = proxy_header("v2", ("192.0.2.7", 1), ("192.0.2.1", 2))
    tlv = tlv[:14] + struct.pack("!H", 12 + 7) + tlv[16:] + bytes([0x04, 0, 4]) + b"abcd"  # a TLV after them
    assert parse_proxy_header(tlv) == (16 + 19, ("192.0.2.7", 1))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",  # no header at all
        b"PROXYTCP4",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51234\r\n",  # a field missing
        b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",  # family and address disagree
        b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 443\r\n",  # port out of range
        b"PROXY TCP4 192.0.2.7 198.51.100.1 012 443\r\n",  # leading zero
        b"PROXY TCP5 192.0.2.7 198.51.100.1 1 2\r\n",
        b"PROXY " + b"1" * 120,  # no CRLF within 107 bytes
        V2_SIGNATURE[:11] + b"X",  # a broken signature
        V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12),  # version 3
        V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12),  # command 2
        V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4),  # IPv4 addresses cut short
    ],
)
def test_a_malformed_header_is_an_error(data: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_proxy_header(data)
    assert caught.value.reason == "proxy_header" and caught.value.status == 400
