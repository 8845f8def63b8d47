"""Tests for halb.vrrp.codec: round trips, a scapy-checked vector, every rejection reason, fuzzing."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halb.errors import ProtocolError
from halb.vrrp.codec import (
    REJECT_REASONS,
    Advert,
    ChecksumMode,
    DecodeError,
    ReceivedAdvert,
    decode,
    encode,
    internet_checksum,
    vrrp_checksum,
)

SRC = "192.168.1.10"
GROUP = "224.0.0.18"

# IP(src="192.168.1.10", dst="224.0.0.18", ttl=255, proto=112)
#   / VRRPv3(vrid=51, priority=100, adv=100, addrlist=["192.168.1.100", "10.0.0.1"])
# as built by scapy 2.8.0 (checksum 0xfc12 includes the IPv4 pseudo-header). Re-checked live below.
SCAPY_VECTOR = bytes.fromhex("4500002400010000ff7019a4c0a8010ae0000012313364020064fc12c0a801640a000001")
VECTOR_ADVERT = Advert(
    vrid=51, priority=100, max_advert_interval_cs=100, addresses=("192.168.1.100", "10.0.0.1")
)
# Same message with the RFC 9568 (message-only) checksum; 0x9e58 == scapy.utils.checksum(message).
VECTOR_RFC9568_CHECKSUM = 0x9E58


def ipv4(
    payload: bytes,
    *,
    src: str = SRC,
    dst: str = GROUP,
    ttl: int = 255,
    proto: int = 112,
    ihl: int = 5,
    version: int = 4,
    total_length: int | None = None,
    options: bytes = b"",
) -> bytes:
    """A raw IPv4 datagram as a raw socket would deliver it (header checksum left 0: nobody checks it)."""
    header_len = 20 + len(options)
    length = header_len + len(payload) if total_length is None else total_length
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (version << 4) | ihl,
        0xC0,
        length,
        1,
        0,
        ttl,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + options + payload


def packet(advert: Advert = VECTOR_ADVERT, mode: ChecksumMode = "pseudo_header", **ip_kwargs: Any) -> bytes:
    src = str(ip_kwargs.get("src", SRC))
    dst = str(ip_kwargs.get("dst", GROUP))
    return ipv4(encode(advert, src, dst, checksum_mode=mode), **ip_kwargs)


def reason_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)
    return info.value.reason


# --------------------------------------------------------------------------- round trip and vectors


@pytest.mark.parametrize("mode", ["pseudo_header", "rfc9568"])
@pytest.mark.parametrize(
    "advert",
    [
        VECTOR_ADVERT,
        Advert(vrid=1, priority=255, max_advert_interval_cs=1, addresses=("10.1.2.3",)),
        Advert(vrid=255, priority=0, max_advert_interval_cs=4095, addresses=()),
        Advert(
            vrid=7, priority=1, max_advert_interval_cs=10, addresses=tuple(f"10.0.{i}.1" for i in range(20))
        ),
    ],
)
def test_round_trip(advert: Advert, mode: ChecksumMode) -> None:
    received = decode(packet(advert, mode), checksum_mode=mode)
    assert received == ReceivedAdvert(advert=advert, src_ip=SRC, dst_ip=GROUP)


ipv4_strings = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
adverts = st.builds(
    Advert,
    vrid=st.integers(1, 255),
    priority=st.integers(0, 255),
    max_advert_interval_cs=st.integers(0, 4095),
    addresses=st.lists(ipv4_strings, max_size=20).map(tuple),
)


@given(advert=adverts, src=ipv4_strings, dst=ipv4_strings, mode=st.sampled_from(["pseudo_header", "rfc9568"]))
def test_round_trip_property(advert: Advert, src: str, dst: str, mode: ChecksumMode) -> None:
    data = ipv4(encode(advert, src, dst, checksum_mode=mode), src=src, dst=dst)
    received = decode(data, expected_vrid=advert.vrid, checksum_mode=mode)
    assert received == ReceivedAdvert(advert, src, dst)


def test_known_vector_decodes_and_re_encodes() -> None:
    received = decode(SCAPY_VECTOR, expected_vrid=51)
    assert received.advert == VECTOR_ADVERT
    assert received.advert.max_advert_interval == 1.0
    assert (received.src_ip, received.dst_ip) == (SRC, GROUP)
    assert encode(VECTOR_ADVERT, SRC) == SCAPY_VECTOR[20:]


def test_known_vector_rfc9568_checksum() -> None:
    message = encode(VECTOR_ADVERT, SRC, checksum_mode="rfc9568")
    assert struct.unpack("!H", message[6:8])[0] == VECTOR_RFC9568_CHECKSUM
    assert message[:6] + message[8:] == SCAPY_VECTOR[20:26] + SCAPY_VECTOR[28:]
    # src/dst do not enter the RFC 9568 form
    assert encode(VECTOR_ADVERT, "10.9.9.9", "10.8.8.8", checksum_mode="rfc9568") == message


def test_cross_check_against_scapy() -> None:
    from scapy.layers.inet import IP
    from scapy.layers.vrrp import VRRPv3
    from scapy.utils import checksum as scapy_checksum

    for advert, src, dst in [
        (VECTOR_ADVERT, SRC, GROUP),
        (
            Advert(vrid=200, priority=254, max_advert_interval_cs=10, addresses=("172.16.0.1",)),
            "172.16.0.2",
            GROUP,
        ),
        # unicast: keepalived sums the real destination, and so does scapy
        (Advert(vrid=9, priority=1, max_advert_interval_cs=4095, addresses=()), "10.0.0.1", "10.0.0.2"),
    ]:
        built = bytes(
            IP(src=src, dst=dst, ttl=255, proto=112)
            / VRRPv3(
                vrid=advert.vrid,
                priority=advert.priority,
                adv=advert.max_advert_interval_cs,
                addrlist=list(advert.addresses),
            )
        )
        ours = encode(advert, src, dst)
        assert built[20:] == ours  # same header, addresses and pseudo-header checksum
        assert decode(built, expected_vrid=advert.vrid) == ReceivedAdvert(advert, src, dst)
        # scapy parses our bytes to the same fields (it only picks VRRPv3 for messages of 16+ bytes)
        parsed = IP(ipv4(ours, src=src, dst=dst)).payload
        if len(ours) < 16:
            parsed = VRRPv3(bytes(parsed))
        assert (parsed.vrid, parsed.priority, parsed.adv, parsed.ipcount) == (
            advert.vrid,
            advert.priority,
            advert.max_advert_interval_cs,
            len(advert.addresses),
        )
        if len(ours) >= 16:
            assert isinstance(parsed, VRRPv3)
            assert list(parsed.addrlist) == list(advert.addresses)
        assert parsed.chksum == struct.unpack("!H", ours[6:8])[0]
        # the rfc9568 form is the plain Internet checksum of the message, as scapy's checksum() computes
        zeroed = ours[:6] + b"\x00\x00" + ours[8:]
        rfc9568 = encode(advert, src, dst, checksum_mode="rfc9568")
        assert struct.unpack("!H", rfc9568[6:8])[0] == scapy_checksum(zeroed)


def test_internet_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3 example: one's complement sum 0xddf2, so the checksum is 0x220d.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert internet_checksum(b"\x01") == ~0x0100 & 0xFFFF  # odd length is zero padded


def test_vrrp_checksum_is_zero_over_a_valid_message() -> None:
    message = encode(VECTOR_ADVERT, SRC)
    assert vrrp_checksum(message, SRC, GROUP, "pseudo_header") == 0
    assert vrrp_checksum(message, SRC, GROUP, "rfc9568") != 0


def test_negative_zero_checksum_is_accepted() -> None:
    """0x0000 and 0xFFFF are the same one's complement value; a verifying sum accepts both."""
    # Find an advert whose computed rfc9568 checksum is 0x0000, then send 0xFFFF instead.
    for priority in range(256):
        for vrid in range(1, 256):
            message = encode(Advert(vrid, priority, 100), SRC, checksum_mode="rfc9568")
            if message[6:8] == b"\x00\x00":
                alt = message[:6] + b"\xff\xff" + message[8:]
                assert decode(ipv4(alt), checksum_mode="rfc9568").advert == Advert(vrid, priority, 100)
                return
    pytest.fail("no advert with a zero checksum found")  # pragma: no cover


def test_reserved_bits_ignored_on_receive_and_zero_on_send() -> None:
    message = bytearray(encode(VECTOR_ADVERT, SRC, checksum_mode="rfc9568"))
    assert message[4] >> 4 == 0
    message[4] |= 0xF0
    message[6:8] = b"\x00\x00"
    message[6:8] = struct.pack("!H", internet_checksum(bytes(message)))
    assert decode(ipv4(bytes(message)), checksum_mode="rfc9568").advert == VECTOR_ADVERT


def test_ip_options_are_skipped() -> None:
    data = ipv4(encode(VECTOR_ADVERT, SRC), ihl=6, options=b"\x94\x04\x00\x00")  # router alert
    assert decode(data).advert == VECTOR_ADVERT


# --------------------------------------------------------------------------- rejections


def test_reject_reasons_are_the_documented_set() -> None:
    assert frozenset({"ttl", "version", "type", "vrid", "checksum", "truncated", "length", "protocol"}) == (
        REJECT_REASONS
    )


def test_decode_error_is_a_protocol_error_with_reason() -> None:
    err = DecodeError("ttl", "TTL 64")
    assert isinstance(err, ProtocolError)
    assert err.reason == "ttl"
    assert "TTL 64" in str(err)


def _with_vrrp_bytes(changes: dict[int, int], *, mode: ChecksumMode = "pseudo_header") -> bytes:
    """The vector with some VRRP bytes replaced and the checksum recomputed, so only the change fails."""
    message = bytearray(encode(VECTOR_ADVERT, SRC, checksum_mode=mode))
    for index, value in changes.items():
        message[index] = value
    message[6:8] = b"\x00\x00"
    message[6:8] = struct.pack("!H", vrrp_checksum(bytes(message), SRC, GROUP, mode))
    return ipv4(bytes(message))


@pytest.mark.parametrize(
    ("data", "kwargs", "reason"),
    [
        pytest.param(packet(ttl=254), {}, "ttl", id="ttl-254"),
        pytest.param(packet(ttl=1), {}, "ttl", id="ttl-1"),
        pytest.param(_with_vrrp_bytes({0: 0x21}), {}, "version", id="version-2"),
        pytest.param(_with_vrrp_bytes({0: 0x41}), {}, "version", id="version-4"),
        pytest.param(_with_vrrp_bytes({0: 0x32}), {}, "type", id="type-2"),
        pytest.param(_with_vrrp_bytes({0: 0x30}), {}, "type", id="type-0"),
        pytest.param(packet(), {"expected_vrid": 52}, "vrid", id="vrid-mismatch"),
        pytest.param(_with_vrrp_bytes({1: 0}), {}, "vrid", id="vrid-0"),
        pytest.param(
            ipv4(SCAPY_VECTOR[20:26] + b"\x00\x00" + SCAPY_VECTOR[28:]), {}, "checksum", id="checksum-zeroed"
        ),
        pytest.param(packet(), {"checksum_mode": "rfc9568"}, "checksum", id="pseudo-header-read-as-rfc9568"),
        pytest.param(packet(mode="rfc9568"), {}, "checksum", id="rfc9568-read-as-pseudo-header"),
        pytest.param(
            ipv4(encode(VECTOR_ADVERT, SRC), src="192.168.1.11"), {}, "checksum", id="spoofed-source"
        ),
        pytest.param(b"", {}, "truncated", id="empty"),
        pytest.param(SCAPY_VECTOR[:19], {}, "truncated", id="short-ip-header"),
        pytest.param(SCAPY_VECTOR[:27], {}, "truncated", id="cut-vrrp-header"),
        pytest.param(SCAPY_VECTOR[:-4], {}, "truncated", id="cut-address"),
        pytest.param(ipv4(encode(VECTOR_ADVERT, SRC)[:7]), {}, "truncated", id="short-vrrp-header"),
        pytest.param(_with_vrrp_bytes({3: 3}), {}, "truncated", id="count-too-high"),
        pytest.param(packet(ihl=15), {}, "truncated", id="ihl-beyond-data"),
        pytest.param(_with_vrrp_bytes({3: 1}), {}, "length", id="count-too-low"),
        pytest.param(SCAPY_VECTOR + b"\x00\x00", {}, "length", id="bytes-after-total-length"),
        pytest.param(packet(total_length=16), {}, "length", id="total-length-below-header"),
        pytest.param(packet(ihl=4), {}, "length", id="ihl-4"),
        pytest.param(packet(proto=51), {}, "protocol", id="ah"),
        pytest.param(packet(proto=17), {}, "protocol", id="udp"),
        pytest.param(packet(version=6), {}, "protocol", id="ip-version-6"),
    ],
)
def test_rejections(data: bytes, kwargs: dict[str, object], reason: str) -> None:
    assert reason_of(data, **kwargs) == reason


def test_total_length_longer_than_data_is_truncated() -> None:
    data = bytearray(SCAPY_VECTOR)
    data[2:4] = struct.pack("!H", len(SCAPY_VECTOR) + 4)
    assert reason_of(bytes(data)) == "truncated"


def test_ttl_is_checked_before_vrrp_fields() -> None:
    assert reason_of(ipv4(b"\x21" + bytes(7), ttl=64)) == "ttl"


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError):
        decode(SCAPY_VECTOR, checksum_mode="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode(VECTOR_ADVERT, SRC, checksum_mode="nope")  # type: ignore[arg-type]
    bad_fields: list[dict[str, object]] = [
        {"vrid": 256},
        {"priority": -1},
        {"max_advert_interval_cs": 4096},
        {"addresses": ("300.1.1.1",)},
        {"addresses": ("::1",)},
        {"version": 16},
        {"priority": True},
    ]
    for bad in bad_fields:
        fields: dict[str, object] = {"vrid": 1, "priority": 100, "max_advert_interval_cs": 100, **bad}
        with pytest.raises(ValueError):
            Advert(**fields)  # type: ignore[arg-type]


def test_advert_addresses_list_becomes_tuple() -> None:
    advert = Advert(1, 100, 100, ["10.0.0.1"])  # type: ignore[arg-type]
    assert advert.addresses == ("10.0.0.1",)
    hash(advert)


# --------------------------------------------------------------------------- fuzzing


def _decode_or_reason(data: bytes, **kwargs: Any) -> None:
    try:
        received = decode(data, **kwargs)
    except DecodeError as err:
        assert err.reason in REJECT_REASONS
    else:
        assert isinstance(received, ReceivedAdvert)


@settings(max_examples=500)
@given(data=st.binary(max_size=120), mode=st.sampled_from(["pseudo_header", "rfc9568"]))
def test_random_bytes_only_raise_decode_error(data: bytes, mode: str) -> None:
    _decode_or_reason(data, checksum_mode=mode)


@settings(max_examples=500)
@given(
    payload=st.binary(max_size=64),
    ttl=st.sampled_from([255, 254, 0]),
    proto=st.sampled_from([112, 112, 51]),
    expected_vrid=st.none() | st.integers(0, 255),
)
def test_random_vrrp_payload_only_raises_decode_error(
    payload: bytes, ttl: int, proto: int, expected_vrid: int | None
) -> None:
    _decode_or_reason(ipv4(payload, ttl=ttl, proto=proto), expected_vrid=expected_vrid)


@settings(max_examples=500)
@given(
    advert=adverts,
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(0, 200),
)
def test_mutated_valid_packets_only_raise_decode_error(
    advert: Advert, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(packet(advert))
    for index, value in edits:
        if index < len(data):
            data[index] = value
    if cut is not None:
        del data[cut:]
    _decode_or_reason(bytes(data))
