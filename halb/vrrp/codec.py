"""VRRPv3 advertisement codec for IPv4 (RFC 5798 / RFC 9568 section 5), pure Python.

``encode`` builds the VRRP message only (the kernel writes the IPv4 header: the driver sends it on a raw
socket with IP protocol 112, TTL 255, to 224.0.0.18). ``decode`` takes what a raw IPv4 socket delivers
(IPv4 header included), validates it and returns the advert together with the sender's source address,
which the state machine needs for the equal-priority tie-break. Every rejection raises
:class:`DecodeError` whose ``reason`` is one token of :data:`REJECT_REASONS`, so the driver can count
drops by reason; no other exception escapes ``decode`` for any byte input.

Wire format (RFC 5798 section 5.1/5.2, unchanged in RFC 9568)::

    0                   1                   2                   3
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
   |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
   |(rsvd) |     Max Adver Int     |          Checksum             |
   |                       IPv4 Address(es)                        |

Checksum: the two forms, and where each comes from
--------------------------------------------------

``checksum_mode="pseudo_header"`` (default): the 16-bit one's complement of the one's complement sum
of a 12-byte IPv4 pseudo-header -- source address, destination address, a zero byte, protocol 112 and
the 16-bit VRRP message length -- followed by the VRRP message (version field to last address) with the
checksum field zeroed. This is RFC 5798 section 5.2.8 read literally ("the entire VRRP message ...
and a 'pseudo-header'") and it is what keepalived does by default: ``vrrp_in_chk()`` in
keepalived/vrrp/vrrp.c builds an ``ipv4_phdr`` {src = ip->saddr, dst = ip->daddr, zero, proto =
IPPROTO_VRRP, len = htons(vrrppkt_len)} and runs ``in_csum`` over it and then over the VRRP header and
addresses. Scapy's ``VRRPv3.post_build`` does the same (``in4_chksum(112, IP-underlayer, payload)``),
as do Wireshark's default and FRR's default (``checksum-with-ipv4-pseudoheader``, FRR PR #12390).

``checksum_mode="rfc9568"``: the plain Internet checksum (RFC 1071) of the VRRP message alone, no
pseudo-header, exactly as VRRPv2 (RFC 3768) did. RFC 9568 (which obsoletes RFC 5798) section 5.2.8
settles the ambiguity this way: "For the IPv4 address family, the checksum calculation only includes
the VRRP message starting with the Version field and ending after the last IPv4 address"; for IPv6 it
still prepends the RFC 8200 pseudo-header. Cisco has always used this form. keepalived produces it only
when ``v3_checksum_as_v2`` is configured (added by keepalived PR #2234; its ChangeLog says "keepalived
has always included a pseudo-header in the VRRPv3 IPv4 checksum ... The default action of including
the pseudo-header in the checksum remains unchanged"; keepalived issue #2324 asking to make the
RFC 9568 form the default was still open in the copy read). So: ``pseudo_header`` talks to default
keepalived; ``rfc9568`` talks to keepalived with ``v3_checksum_as_v2`` and to RFC 9568 / Cisco peers.
Both ends of a virtual router must use the same mode; a mismatch shows up as ``"checksum"`` drops.

Unicast note: keepalived puts the packet's real destination in the pseudo-header (so a unicast advert
is summed with the peer's address; pass it as ``dst_ip``). keepalived releases before the fix for
keepalived issue #642 always summed with 224.0.0.18 even for unicast; keepalived's
``old_unicast_checksum`` option (field ``unicast_chksum_compat``) reproduces that. This codec does not: for
such a peer pass ``dst_ip="224.0.0.18"`` to :func:`encode` and expect ``"checksum"`` drops on receive.

Checks made by :func:`decode`, in order (first failure wins):

==============  ===============================================================================
reason          when
==============  ===============================================================================
``truncated``   fewer bytes than the IPv4 header, its IHL, its Total Length, the 8-byte VRRP
                header or the announced address count need
``protocol``    not IPv4 (version nibble != 4) or IP protocol != 112
``length``      IHL < 5, Total Length shorter than the datagram received or than the header,
                or more VRRP bytes than 8 + 4 * count (keepalived rejects both mismatches)
``ttl``         IP TTL != 255 (RFC 5798 section 7.1, "MUST verify that the IP TTL is 255")
``version``     VRRP version != 3
``type``        VRRP type != 1 (ADVERTISEMENT)
``vrid``        VRID 0 (not a valid VRID), or not ``expected_vrid`` when one is given
``checksum``    the checksum in the selected ``checksum_mode`` does not verify
==============  ===============================================================================

Not checked here (the kernel did it, or it is the state machine's business): the IPv4 header checksum,
fragments (the kernel reassembles before a raw socket sees a datagram), whether the addresses match the
configured VIPs (RFC "MAY"), the advertised interval.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal, get_args

from halb.errors import ProtocolError

__all__ = [
    "IPPROTO_VRRP",
    "REJECT_REASONS",
    "VRRP_MULTICAST_GROUP",
    "VRRP_TTL",
    "Advert",
    "ChecksumMode",
    "DecodeError",
    "ReceivedAdvert",
    "RejectReason",
    "decode",
    "encode",
    "internet_checksum",
    "vrrp_checksum",
]

IPPROTO_VRRP: Final = 112
VRRP_MULTICAST_GROUP: Final = "224.0.0.18"
VRRP_TTL: Final = 255
VRRP_VERSION: Final = 3
VRRP_TYPE_ADVERTISEMENT: Final = 1

ChecksumMode = Literal["pseudo_header", "rfc9568"]
RejectReason = Literal["ttl", "version", "type", "vrid", "checksum", "truncated", "length", "protocol"]
REJECT_REASONS: Final[frozenset[str]] = frozenset(get_args(RejectReason))
_CHECKSUM_MODES: Final[frozenset[str]] = frozenset(get_args(ChecksumMode))

_HEADER = struct.Struct("!BBBBHH")  # vers|type, vrid, priority, count, rsvd|max_adver_int, checksum
_PSEUDO = struct.Struct("!4s4sBBH")  # src, dst, zero, protocol, length
_IPV4_MIN_HEADER: Final = 20
_MAX_ADVER_INT_CS: Final = 0x0FFF


class DecodeError(ProtocolError):
    """A received packet is not a valid VRRPv3 advertisement for us.

    ``reason`` is one of :data:`REJECT_REASONS` (stable, for counters); ``detail`` is for logs.
    """

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        if reason not in REJECT_REASONS:  # pragma: no cover - programming error
            raise AssertionError(f"unknown reject reason {reason!r}")
        self.detail = detail
        super().__init__(
            f"VRRP packet rejected: {reason}" + (f" ({detail})" if detail else ""), reason=reason
        )


@dataclass(frozen=True, slots=True)
class Advert:
    """One VRRPv3 advertisement (RFC 5798 section 5.2).

    ``max_advert_interval_cs`` is the 12-bit Max Adver Int in centiseconds (100 = 1 s). ``addresses``
    are dotted-quad IPv4 strings. ``version``/``type`` default to 3/1; other values are accepted only
    so that tests can build packets the decoder must reject.
    """

    vrid: int
    priority: int
    max_advert_interval_cs: int
    addresses: tuple[str, ...] = ()
    version: int = VRRP_VERSION
    type: int = VRRP_TYPE_ADVERTISEMENT

    def __post_init__(self) -> None:
        if not isinstance(self.addresses, tuple):
            object.__setattr__(self, "addresses", tuple(self.addresses))
        _check_range("vrid", self.vrid, 0, 255)
        _check_range("priority", self.priority, 0, 255)
        _check_range("max_advert_interval_cs", self.max_advert_interval_cs, 0, _MAX_ADVER_INT_CS)
        _check_range("version", self.version, 0, 15)
        _check_range("type", self.type, 0, 15)
        if len(self.addresses) > 255:
            raise ValueError(f"at most 255 addresses fit in an advert, got {len(self.addresses)}")
        for address in self.addresses:
            ipaddress.IPv4Address(address)  # raises ValueError (AddressValueError) if malformed

    @property
    def max_advert_interval(self) -> float:
        """Max Adver Int in seconds."""
        return self.max_advert_interval_cs / 100


@dataclass(frozen=True, slots=True)
class ReceivedAdvert:
    """What :func:`decode` returns: the advert and the IPv4 source/destination it came with.

    ``src_ip`` is the sender's primary address, used by the state machine's tie-break.
    """

    advert: Advert
    src_ip: str
    dst_ip: str


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")


def _check_mode(checksum_mode: str) -> None:
    if checksum_mode not in _CHECKSUM_MODES:
        raise ValueError(f"checksum_mode must be one of {sorted(_CHECKSUM_MODES)}, got {checksum_mode!r}")


def internet_checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum: one's complement of the one's complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def vrrp_checksum(message: bytes, src_ip: str, dst_ip: str, checksum_mode: ChecksumMode) -> int:
    """Checksum of a VRRPv3 message in the given mode; see the module docstring.

    With the checksum field zeroed this is the value to send; over a message as received (checksum field
    filled in) it is 0 when the checksum verifies.
    """
    _check_mode(checksum_mode)
    if checksum_mode == "rfc9568":
        return internet_checksum(message)
    pseudo = _PSEUDO.pack(
        ipaddress.IPv4Address(src_ip).packed,
        ipaddress.IPv4Address(dst_ip).packed,
        0,
        IPPROTO_VRRP,
        len(message),
    )
    return internet_checksum(pseudo + message)


def encode(
    advert: Advert,
    src_ip: str,
    dst_ip: str = VRRP_MULTICAST_GROUP,
    checksum_mode: ChecksumMode = "pseudo_header",
) -> bytes:
    """Return the VRRP message (no IP header) for ``advert`` sent from ``src_ip`` to ``dst_ip``.

    ``src_ip``/``dst_ip`` only enter the checksum in ``pseudo_header`` mode, and must then be exactly the
    addresses the kernel puts in the IPv4 header.
    """
    _check_mode(checksum_mode)
    head = bytes(
        _HEADER.pack(
            (advert.version << 4) | advert.type,
            advert.vrid,
            advert.priority,
            len(advert.addresses),
            advert.max_advert_interval_cs & _MAX_ADVER_INT_CS,  # the 4 reserved bits are sent as zero
            0,
        )
    )
    body = b"".join(ipaddress.IPv4Address(a).packed for a in advert.addresses)
    message = head + body
    checksum = vrrp_checksum(message, src_ip, dst_ip, checksum_mode)
    return message[:6] + struct.pack("!H", checksum) + message[8:]


def decode(
    ip_packet: bytes,
    *,
    expected_vrid: int | None = None,
    checksum_mode: ChecksumMode = "pseudo_header",
) -> ReceivedAdvert:
    """Parse and validate one IPv4 datagram (header included) as a VRRPv3 advertisement.

    Raises :class:`DecodeError` (and nothing else) for any byte string that is not a valid advert; see the
    module docstring for the checks and their order. A bad ``checksum_mode`` argument is a programming
    error and raises ``ValueError`` before any byte is looked at.
    """
    _check_mode(checksum_mode)
    data = bytes(ip_packet)
    if len(data) < _IPV4_MIN_HEADER:
        raise DecodeError("truncated", f"{len(data)} bytes, an IPv4 header needs 20")
    version_ihl, ttl, protocol = data[0], data[8], data[9]
    if version_ihl >> 4 != 4:
        raise DecodeError("protocol", f"IP version {version_ihl >> 4}")
    header_len = (version_ihl & 0x0F) * 4
    if header_len < _IPV4_MIN_HEADER:
        raise DecodeError("length", f"IHL {header_len} bytes")
    if header_len > len(data):
        raise DecodeError("truncated", f"IHL {header_len} bytes, got {len(data)}")
    (total_len,) = struct.unpack_from("!H", data, 2)
    if total_len > len(data):
        raise DecodeError("truncated", f"IP total length {total_len}, got {len(data)}")
    if total_len < len(data) or total_len < header_len:
        raise DecodeError("length", f"IP total length {total_len}, got {len(data)}, IHL {header_len}")
    if protocol != IPPROTO_VRRP:
        raise DecodeError("protocol", f"IP protocol {protocol}")
    if ttl != VRRP_TTL:
        raise DecodeError("ttl", f"TTL {ttl}")
    src_ip = str(ipaddress.IPv4Address(data[12:16]))
    dst_ip = str(ipaddress.IPv4Address(data[16:20]))

    message = data[header_len:total_len]
    if len(message) < _HEADER.size:
        raise DecodeError("truncated", f"VRRP message {len(message)} bytes, header needs 8")
    vers_type, vrid, priority, count, adver_int, received_checksum = _HEADER.unpack_from(message)
    if vers_type >> 4 != VRRP_VERSION:
        raise DecodeError("version", f"VRRP version {vers_type >> 4}")
    if vers_type & 0x0F != VRRP_TYPE_ADVERTISEMENT:
        raise DecodeError("type", f"VRRP type {vers_type & 0x0F}")
    if vrid == 0 or (expected_vrid is not None and vrid != expected_vrid):
        raise DecodeError("vrid", f"VRID {vrid}, expected {expected_vrid}")
    expected_len = _HEADER.size + 4 * count
    if len(message) < expected_len:
        raise DecodeError("truncated", f"{count} addresses need {expected_len} bytes, got {len(message)}")
    if len(message) > expected_len:
        raise DecodeError("length", f"{count} addresses need {expected_len} bytes, got {len(message)}")
    # Summing the message as received (checksum field included) must give zero; unlike recomputing and
    # comparing, this accepts both one's-complement zeros (0x0000 / 0xFFFF), as keepalived's in_csum does.
    if vrrp_checksum(message, src_ip, dst_ip, checksum_mode) != 0:
        raise DecodeError("checksum", f"{checksum_mode} checksum 0x{received_checksum:04x} does not verify")

    addresses = tuple(
        str(ipaddress.IPv4Address(message[offset : offset + 4]))
        for offset in range(_HEADER.size, expected_len, 4)
    )
    advert = Advert(
        vrid=vrid,
        priority=priority,
        max_advert_interval_cs=adver_int & _MAX_ADVER_INT_CS,  # reserved bits ignored on receive
        addresses=addresses,
    )
    return ReceivedAdvert(advert=advert, src_ip=src_ip, dst_ip=dst_ip)
