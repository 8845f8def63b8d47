"""Fakes shared by the VRRP driver and VIP lease tests: a fake clock, a fake transport, advert packets,
VrrpSettings with test defaults, a driver rig (fake transport and clock, no sockets), and a Raft member
that applies commands to one ClusterState."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from halb.cluster.keeper import LeaseKeeper
from halb.cluster.raft import Applied, CommandFailed
from halb.cluster.state import ClusterState
from halb.config_model import GarpConfig, VrrpSettings
from halb.vrrp.codec import Advert, decode, encode
from halb.vrrp.driver import VrrpDriver
from halb.vrrp.vip import VipPort

T = TypeVar("T")
ME, PEER, OTHER = "10.0.0.11", "10.0.0.12", "10.0.0.13"
VIP = "10.0.0.100"
GROUP = "224.0.0.18"


def run(coro: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro())  # type: ignore[arg-type]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str]] = []
        self.closed = False

    def send(self, payload: bytes, dst: str) -> None:
        self.sent.append((payload, dst))

    def close(self) -> None:
        self.closed = True

    def adverts(self, src: str = ME) -> list[tuple[Advert, str]]:
        """Every advert sent, decoded as a peer would (checksum verified against src/dst)."""
        return [(decode(ip_packet(p, src, dst)).advert, dst) for p, dst in self.sent]


def ip_packet(payload: bytes, src: str, dst: str = GROUP, ttl: int = 255, proto: int = 112) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0xC0,
        20 + len(payload),
        0,
        0,
        ttl,
        proto,
        0,
        bytes(int(x) for x in src.split(".")),
        bytes(int(x) for x in dst.split(".")),
    )
    return header + payload


def advert_from(src: str, priority: int, vrid: int = 51, interval_cs: int = 100, dst: str = GROUP) -> bytes:
    return ip_packet(encode(Advert(vrid, priority, interval_cs, (VIP,)), src, dst), src, dst)


def settings(**overrides: Any) -> VrrpSettings:
    values: dict[str, Any] = {
        "interface": "eth0",
        "vrid": 51,
        "priority": 150,
        "advert_interval": 1.0,
        "virtual_ips": (f"{VIP}/32",),
        "garp": GarpConfig(repeat=2, interval=0.01),
    }
    values.update(overrides)
    return VrrpSettings(**values)


class DriverRig:
    """A VrrpDriver on `port` with a fake transport and a fake clock (starting at 1000.0)."""

    def __init__(self, port: VipPort, **overrides: Any) -> None:
        self.clock = Clock()
        self.transport = FakeTransport()
        self.driver = VrrpDriver(
            settings(**overrides), port, primary_ip=ME, transport=self.transport, clock=self.clock
        )

    async def start(self) -> None:
        await self.driver.start()
        await self.driver.settle()

    async def fire(self) -> None:
        """Advance the fake clock to the machine's deadline and fire the timer."""
        machine = self.driver.machine
        assert machine is not None
        deadline = machine.next_deadline()
        assert deadline is not None
        self.clock.now = deadline
        self.driver.on_timer()
        await self.driver.settle()

    async def receive(self, packet: bytes, advance: float = 0.1) -> None:
        self.clock.now += advance
        self.driver.datagram_received(packet)
        await self.driver.settle()


class RaftMember:
    """A Raft member on one ClusterState, answering after `delay` seconds (or failing while `down`)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.state = ClusterState()
        self.down = False
        self.keepers: list[LeaseKeeper] = []

    async def submit(self, command: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        await asyncio.sleep(self.delay)
        if self.down:
            raise CommandFailed("no Raft leader")
        result = self.state.apply(command)
        event = Applied(command, result, None, {"vip": self.state.lease("vip") or {}}, {})
        for keeper in self.keepers:
            keeper.on_applied(event)
        return result
