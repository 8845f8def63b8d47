"""The PROXY protocol header, byte for byte against the specification's layout."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from halb.proxy.proxy_protocol import V2_SIGNATURE, proxy_header


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
