"""VRRPv3 (RFC 5798 / RFC 9568) for IPv4: a pure codec and a pure state machine.

Neither module opens sockets or reads clocks; the driver (elsewhere) owns the raw socket, the timer and
the interface addresses, and carries out the actions the machine returns.
"""

from halb.vrrp.codec import (
    IPPROTO_VRRP,
    REJECT_REASONS,
    VRRP_MULTICAST_GROUP,
    VRRP_TTL,
    Advert,
    ChecksumMode,
    DecodeError,
    ReceivedAdvert,
    RejectReason,
    decode,
    encode,
    internet_checksum,
    vrrp_checksum,
)
from halb.vrrp.machine import (
    Action,
    AddVips,
    RemoveVips,
    SendAdvert,
    SendGarp,
    State,
    StateChanged,
    TransitionReason,
    VrrpConfig,
    VrrpMachine,
)

__all__ = [
    "IPPROTO_VRRP",
    "REJECT_REASONS",
    "VRRP_MULTICAST_GROUP",
    "VRRP_TTL",
    "Action",
    "AddVips",
    "Advert",
    "ChecksumMode",
    "DecodeError",
    "ReceivedAdvert",
    "RejectReason",
    "RemoveVips",
    "SendAdvert",
    "SendGarp",
    "State",
    "StateChanged",
    "TransitionReason",
    "VrrpConfig",
    "VrrpMachine",
    "decode",
    "encode",
    "internet_checksum",
    "vrrp_checksum",
]
