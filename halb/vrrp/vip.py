"""The VIP port: put virtual addresses on an interface, take them off, and announce them with GARP.

How this works
==============

:class:`VipPort` is the small interface the VRRP driver (``halb.vrrp.driver``) talks to; it never sees
netlink or ARP. Addresses are given in interface form, ``"A.B.C.D/len"`` (the config loader normalises a
bare ``A.B.C.D`` to ``/32``, as keepalived does); ``held()`` answers from memory (what this port last
added and has not removed), so it is cheap enough for every status request.

:class:`NetlinkVipPort` is the real one:

* **Addresses** go through pyroute2's ``AsyncIPRoute`` (pyroute2 0.9: the sync ``IPRoute`` cannot run
  inside a running loop, and the asyncio one does not run under uvloop -- the control process runs a
  plain asyncio loop for that reason; the proxy workers, which may use uvloop, never touch this). One
  short-lived netlink socket per call (about 1 ms), opened with ``groups=0`` so no event subscription
  piles up. Adding an address that is already there (NetlinkError 17, EEXIST) and removing one that is
  not (99, EADDRNOTAVAIL) both count as success: every operation is idempotent. Other netlink errors
  raise :class:`VipError`.
* **Gratuitous ARP** is built with scapy's layers only (``from scapy.layers.l2 import Ether, ARP``;
  ``import scapy.all`` would cost ~0.65 s and ~70 MB) and sent on an ``AF_PACKET`` socket bound to the
  interface, whose own MAC comes from the bound socket's address. One *round* per address is two frames
  to ff:ff:ff:ff:ff:ff: a gratuitous ARP request (op 1, sender = target = VIP) and a gratuitous ARP reply
  (op 2, sender = target = VIP, target MAC = own MAC: Linux only treats a reply as gratuitous, and so
  lets it override a fresh neighbour entry, when the target MAC equals the sender MAC). Repeating
  rounds after a takeover and the periodic refresh are the driver's schedule (``[vrrp.garp]``).

:func:`release_stale` removes the configured VIPs from an interface whatever their prefix length: the
node runs it before starting VRRP (a crashed predecessor may have left them), and ``halb vip release
CONFIG`` runs it as the service manager's ExecStopPost, so a killed node never keeps answering for a VIP.

:class:`FakeVipPort` keeps everything in memory and records every call, for unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from halb.errors import HalbError

log = logging.getLogger("halb.vrrp.vip")

__all__ = [
    "FakeVipPort",
    "NetlinkVipPort",
    "VipError",
    "VipPort",
    "build_garp_frames",
    "interface_ipv4_addresses",
    "release_stale",
    "split_vip",
]

EEXIST = 17
EADDRNOTAVAIL = 99
ETH_P_ARP = 0x0806
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"


class VipError(HalbError):
    """A VIP operation failed for a reason other than "already there" / "already gone"."""


class VipPort(Protocol):
    """What the VRRP driver needs from the host: addresses on the interface and GARP."""

    async def add(self, vips: Sequence[str]) -> None:
        """Configure ``vips`` ("A.B.C.D/len") on the interface; present ones are fine."""
        ...

    async def remove(self, vips: Sequence[str]) -> None:
        """Remove ``vips`` from the interface; absent ones are fine."""
        ...

    def held(self) -> set[str]:
        """The VIPs ("A.B.C.D/len") this port has added and not removed since."""
        ...

    async def send_garp(self, vips: Sequence[str]) -> None:
        """One round of gratuitous ARP (request + reply form) for each VIP (with or without "/len")."""
        ...


def split_vip(vip: str) -> tuple[str, int]:
    """("A.B.C.D", len) of "A.B.C.D/len"; a bare address is /32. Raises ValueError if malformed."""
    interface = ipaddress.IPv4Interface(vip)
    return str(interface.ip), interface.network.prefixlen


def preload_garp_layers() -> None:
    """Import scapy's ARP layers now (~0.15-0.27 s), at start-up, not at the first takeover.

    Imported lazily, the first GARP held the control loop ~0.27 s during a takeover (seen with tcpdump in
    the lab: a late first GARP and a failover max of 0.54 s instead of ~0.35 s at advert_interval 0.1 s).
    """
    from scapy.layers.l2 import ARP, Ether  # noqa: F401


@functools.lru_cache(maxsize=64)
def build_garp_frames(mac: str, vip: str) -> tuple[bytes, ...]:
    """The two broadcast frames of one GARP round for ``vip``: ARP request, then ARP reply (cached)."""
    from scapy.layers.l2 import ARP, Ether  # only the layers: ~0.15 s, not scapy.all's ~0.65 s

    address = split_vip(vip)[0]
    request = Ether(src=mac, dst=BROADCAST_MAC) / ARP(
        op=1, hwsrc=mac, psrc=address, hwdst="00:00:00:00:00:00", pdst=address
    )
    reply = Ether(src=mac, dst=BROADCAST_MAC) / ARP(op=2, hwsrc=mac, psrc=address, hwdst=mac, pdst=address)
    return (bytes(request), bytes(reply))


IpRouteFactory = Callable[[], Any]


def _default_iproute() -> Any:
    from pyroute2 import AsyncIPRoute

    return AsyncIPRoute(groups=0)


def _netlink_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


async def _ifindex(ipr: Any, interface: str) -> int:
    found = await ipr.link_lookup(ifname=interface)
    if not found:
        raise VipError(f"no interface named {interface!r} in this network namespace")
    return int(found[0])


def _ipv4_text(value: object) -> str | None:
    """An IFA_ADDRESS/IFA_LOCAL value as dotted text.

    pyroute2 0.9 decodes it with `socket.inet_ntop`; pysyncobj 0.3.17 replaces that function with a
    Windows-only stub when imported (halb.cluster.raft puts the real one back), and then pyroute2 handed
    back the raw attribute: 8 bytes = 2-byte length (8), 2-byte type, 4 address bytes. Both raw forms are
    decoded here too, so address listing and stale-VIP release never miss an address whatever the import
    order.
    """
    if isinstance(value, str):
        return value or None
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
        if len(raw) == 4:
            return socket.inet_ntoa(raw)
        if len(raw) == 8 and int.from_bytes(raw[:2], "little") == 8:
            return socket.inet_ntoa(raw[4:8])
    return None


async def interface_ipv4_addresses(
    interface: str, iproute: IpRouteFactory = _default_iproute
) -> list[tuple[str, int]]:
    """(address, prefix length) of every IPv4 address on ``interface``, in the kernel's order."""
    ipr = iproute()
    try:
        index = await _ifindex(ipr, interface)
        out: list[tuple[str, int]] = []
        async for message in await ipr.addr("dump", index=index, family=socket.AF_INET):
            address = _ipv4_text(message.get("IFA_LOCAL")) or _ipv4_text(message.get("IFA_ADDRESS"))
            if address and message.get("index", index) == index:
                out.append((address, int(message["prefixlen"])))
        return out
    except VipError:
        raise
    except Exception as exc:
        raise VipError(f"cannot list the addresses of {interface}: {exc}") from exc
    finally:
        ipr.close()


async def release_stale(
    interface: str, vips: Iterable[str], iproute: IpRouteFactory = _default_iproute
) -> list[str]:
    """Remove every configured VIP from ``interface``, whatever prefix length it carries there.

    Returns the removed addresses as "A.B.C.D/len" as they were found. Raises :class:`VipError` if the
    interface does not exist or netlink refuses.
    """
    wanted = {split_vip(v)[0] for v in vips}
    present = await interface_ipv4_addresses(interface, iproute)
    stale = [f"{a}/{n}" for a, n in present if a in wanted]
    if stale:
        await _change("del", interface, stale, iproute)
    return stale


async def _change(command: str, interface: str, vips: Sequence[str], iproute: IpRouteFactory) -> None:
    ok_code = EEXIST if command == "add" else EADDRNOTAVAIL
    ipr = iproute()
    try:
        index = await _ifindex(ipr, interface)
        for vip in vips:
            address, prefixlen = split_vip(vip)
            try:
                await ipr.addr(command, index=index, address=address, prefixlen=prefixlen)
            except Exception as exc:
                if _netlink_code(exc) != ok_code:
                    raise VipError(f"ip addr {command} {vip} dev {interface}: {exc}") from exc
    finally:
        ipr.close()


class NetlinkVipPort:
    """VIPs on a real interface (pyroute2) and GARP on an AF_PACKET socket; see the module docstring."""

    def __init__(self, interface: str, iproute: IpRouteFactory = _default_iproute) -> None:
        self.interface = interface
        self._iproute = iproute
        preload_garp_layers()
        self._held: set[str] = set()
        self._packet: socket.socket | None = None
        self._mac: str | None = None
        self.garp_frames_sent = 0

    async def add(self, vips: Sequence[str]) -> None:
        await _change("add", self.interface, vips, self._iproute)
        self._held.update(vips)

    async def remove(self, vips: Sequence[str]) -> None:
        try:
            await _change("del", self.interface, vips, self._iproute)
        finally:
            # Whatever happened, we no longer claim them; a failure is reported by the caller.
            self._held.difference_update(vips)

    def held(self) -> set[str]:
        return set(self._held)

    async def send_garp(self, vips: Sequence[str]) -> None:
        sock, mac = self._packet_socket()
        for vip in vips:
            for frame in build_garp_frames(mac, vip):
                try:
                    sock.send(frame)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                    sock.send(frame)
                except OSError as exc:
                    raise VipError(f"GARP for {vip} on {self.interface}: {exc}") from exc
                self.garp_frames_sent += 1

    def _packet_socket(self) -> tuple[socket.socket, str]:
        if self._packet is None or self._mac is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            try:
                sock.bind((self.interface, ETH_P_ARP))
                sock.setblocking(False)
                hwaddr = sock.getsockname()[4]
            except OSError as exc:
                sock.close()
                raise VipError(f"cannot open a packet socket on {self.interface}: {exc}") from exc
            self._packet, self._mac = sock, ":".join(f"{b:02x}" for b in hwaddr)
        return self._packet, self._mac

    @property
    def mac(self) -> str | None:
        """The interface's MAC, known after the first GARP."""
        return self._mac

    async def close(self) -> None:
        if self._packet is not None:
            with contextlib.suppress(OSError):
                self._packet.close()
            self._packet = None


class FakeVipPort:
    """In-memory :class:`VipPort` for unit tests: ``calls`` records ("add"|"remove"|"garp", vips)."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.addresses: set[str] = set()
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.fail = fail if fail is not None else set()  # operation names that raise VipError

    async def add(self, vips: Sequence[str]) -> None:
        self.calls.append(("add", tuple(vips)))
        if "add" in self.fail:
            raise VipError("fake add failure")
        self.addresses.update(vips)

    async def remove(self, vips: Sequence[str]) -> None:
        self.calls.append(("remove", tuple(vips)))
        self.addresses.difference_update(vips)
        if "remove" in self.fail:
            raise VipError("fake remove failure")

    def held(self) -> set[str]:
        return set(self.addresses)

    async def send_garp(self, vips: Sequence[str]) -> None:
        self.calls.append(("garp", tuple(vips)))
        if "garp" in self.fail:
            raise VipError("fake garp failure")

    async def close(self) -> None:
        self.calls.append(("close", ()))

    def ops(self, kind: str) -> list[tuple[str, ...]]:
        """The vips of every call of one kind, in order."""
        return [vips for op, vips in self.calls if op == kind]
