"""The VRRP driver: sockets, the timer, the VIP port and the notify hook around the pure ``VrrpMachine``.

How this works
==============

One :class:`VrrpDriver` runs one VRRPv3 instance (the ``[vrrp]`` table) inside the control process's
asyncio loop (plain asyncio: pyroute2's netlink does not run under uvloop).

**Sockets** (:class:`RawVrrpSocket`): one raw socket ``AF_INET, SOCK_RAW, 112`` bound to the interface
(``SO_BINDTODEVICE``). Multicast mode joins 224.0.0.18 on the interface (``IP_ADD_MEMBERSHIP`` with an
``ip_mreqn`` carrying the ifindex) and sends there with ``IP_MULTICAST_IF`` (same ``ip_mreqn``),
``IP_MULTICAST_TTL`` 255 and ``IP_MULTICAST_LOOP`` off; unicast mode (``unicast_peers``) sends one copy to
each peer with ``IP_TTL`` 255 and accepts adverts from those peers only. Every send carries an
``IP_PKTINFO`` control message whose ``ipi_spec_dst`` is the primary address, so the kernel's IPv4
source is exactly the address the pseudo-header checksum was computed with (a VIP on the same
interface can never become the source). TOS is 0xc0 (internetwork control), as keepalived sends.

**Receiving**: ``loop.add_reader`` drains the socket; each datagram goes through ``codec.decode``.
Every rejection is counted in ``rx_errors[reason]`` (the codec's reasons plus ``peer`` for a unicast
advert from an address that is not a configured peer); our own packets (source == primary address) are
counted in ``rx_own`` and ignored. Nothing raises out of the receive path: an unexpected exception is
logged and counted as ``rx_errors["internal"]``.

**Timer**: exactly one ``loop.call_later`` handle, re-armed at ``machine.next_deadline()`` after every
event (advert, timer, priority change, start, stop). Times come from the injected ``clock``
(``time.monotonic``).

**Actions** returned by the machine are queued and applied by one task, strictly in order:
``SendAdvert`` -> encode and send (counted in ``adverts_sent``); ``AddVips`` -> ``VipPort.add``;
``SendGarp`` -> (re)start the GARP schedule (``garp.repeat`` rounds ``garp.interval`` apart, then one
round every ``garp.refresh`` seconds while MASTER; a round is a gratuitous ARP request and reply per
VIP); ``RemoveVips`` -> stop the GARP schedule, ``VipPort.remove``; ``StateChanged`` -> log, count
``transitions``, queue the notify hook. Failures of a VIP operation are logged and counted
(``vip_errors``) but do not stop the instance.

**Tracking** (:class:`halb.vrrp.tracking.Tracking`): :meth:`VrrpDriver.set_check` is how the composition
root reports "pool has a backend" / "listener answers" / "the interface's link is up"; the effective
priority goes to ``machine.set_priority``. FAULT (``weight = 0`` and a check fails, or the link is down)
is ``machine.shutdown`` until the checks are fine again, then ``machine.startup``.

**Notify hook** (:class:`NotifyRunner`): on every transition the ``notify`` executable runs as
``notify INSTANCE <name> <MASTER|BACKUP|FAULT|STOP> <priority>`` -- the arguments keepalived's ``notify``
script gets, so keepalived scripts work unchanged. Runs are queued and executed one at a time in the
background, each bounded by a timeout (then killed); failures are logged and counted, never fatal.

**The VIP lease** (``[cluster]``, :mod:`halb.vrrp.lease_gate`): the VIP port is then a
``LeasedVipPort`` whose ``add``/``send_garp`` raise :class:`~halb.vrrp.lease_gate.LeaseRequired` unless
the lease allows the action at that instant; the driver counts those (``adds_deferred``,
``garps_suppressed``) instead of logging errors. ``advert_gate`` (set by the ``LeaseGuard``) is asked
before every advert with a non-zero priority; False skips it (``adverts_suppressed``); an advert queued
while MASTER is also skipped when the machine is no longer MASTER by the time it is sent.
:meth:`VrrpDriver.resign` (lease lost: priority-0 advert, VIPs removed, BACKUP) and
:meth:`VrrpDriver.reclaim_vips` (lease granted while MASTER: AddVips + the GARP rounds) are how the guard
acts on the driver.

**Stop** (:meth:`VrrpDriver.stop`, the SIGTERM path): ``machine.shutdown`` -> a MASTER sends a priority-0
advert (a backup takes over after Skew_Time instead of Master_Down_Interval) and drops its VIPs; then
every configured VIP is removed once more (idempotent), the socket is closed, and the STOP notify is
given a moment to run.

Public surface for other tools: ``VrrpDriver(settings, vip_port)``, ``await start()``, ``await stop()``,
``set_check(name, ok)``, ``snapshot()`` (the status dict), ``state`` / ``priority`` / ``vips_held()``,
``add_listener(callback)`` (called with each :class:`Transition`), and for tests without sockets:
``transport=`` (anything with ``send(payload, dst)``), ``datagram_received(bytes)``, ``on_timer()`` and
``await settle()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from halb.config_model import VrrpSettings
from halb.vrrp.codec import (
    IPPROTO_VRRP,
    REJECT_REASONS,
    VRRP_MULTICAST_GROUP,
    VRRP_TTL,
    ChecksumMode,
    DecodeError,
    decode,
    encode,
)
from halb.vrrp.lease_gate import LeaseRequired
from halb.vrrp.machine import (
    Action,
    AddVips,
    RemoveVips,
    SendAdvert,
    SendGarp,
    State,
    StateChanged,
    VrrpConfig,
    VrrpMachine,
)
from halb.vrrp.tracking import Tracking
from halb.vrrp.vip import VipError, VipPort, interface_ipv4_addresses, split_vip

log = logging.getLogger("halb.vrrp")

__all__ = [
    "RX_ERROR_REASONS",
    "NotifyRunner",
    "RawVrrpSocket",
    "Transition",
    "VrrpDriver",
    "VrrpTransport",
]

IP_PKTINFO: Final = 8  # linux/in.h; not exported by Python's socket module
IP_MULTICAST_ALL: Final = 49
IPTOS_PREC_INTERNETCONTROL: Final = 0xC0
RX_ERROR_REASONS: Final = (*sorted(REJECT_REASONS), "peer", "internal")
NOTIFY_TIMEOUT: Final = 10.0
STOP_NOTIFY_WAIT: Final = 2.0


class VrrpTransport(Protocol):
    """Where adverts go. :class:`RawVrrpSocket` is the real one; tests pass a list-backed fake."""

    def send(self, payload: bytes, dst: str) -> None: ...

    def close(self) -> None: ...


class RawVrrpSocket:
    """The raw IP protocol 112 socket of one instance; see the module docstring for every option."""

    def __init__(self, interface: str, primary_ip: str, multicast: bool = True) -> None:
        self.interface = interface
        self.ifindex = socket.if_nametoindex(interface)  # OSError if there is no such interface
        primary = socket.inet_aton(primary_ip)
        group = socket.inet_aton(VRRP_MULTICAST_GROUP)
        mreqn = struct.pack("=4s4si", group, primary, self.ifindex)
        self._pktinfo = struct.pack("=I4s4s", self.ifindex, primary, b"\0\0\0\0")
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_VRRP)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, VRRP_TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, IPTOS_PREC_INTERNETCONTROL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, VRRP_TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            with contextlib.suppress(OSError):  # only the groups this socket joined
                sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            if multicast:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, payload: bytes, dst: str) -> None:
        self.sock.sendmsg([payload], [(socket.IPPROTO_IP, IP_PKTINFO, self._pktinfo)], 0, (dst, 0))

    def recv(self) -> bytes | None:
        """One datagram (IPv4 header included), or None when nothing is waiting."""
        try:
            return self.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return None

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Transition:
    """A state change as the outside world sees it (for notify hooks, logs and listeners)."""

    old: str
    new: str  # MASTER | BACKUP | FAULT | STOP
    reason: str
    priority: int
    at: float  # clock time


class NotifyRunner:
    """Runs ``path INSTANCE <name> <STATE> <priority>`` per transition, one at a time, in the background."""

    def __init__(self, path: str | None, instance: str, timeout: float = NOTIFY_TIMEOUT) -> None:
        self.path = path
        self.instance = instance
        self.timeout = timeout
        self.runs = 0
        self.failures = 0
        self.last_error: str | None = None
        self._queue: deque[tuple[str, int]] = deque()
        self._running = False
        self._task: asyncio.Task[None] | None = None

    def submit(self, state: str, priority: int) -> None:
        """Queue one run (needs a running loop; does nothing without a configured path)."""
        if self.path is None:
            return
        self._queue.append((state, priority))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="halb-vrrp-notify")

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._running

    async def _drain(self) -> None:
        while self._queue:
            state, priority = self._queue.popleft()
            self._running = True
            try:
                await self._run(state, priority)
            finally:
                self._running = False

    async def _run(self, state: str, priority: int) -> None:
        assert self.path is not None
        argv = [self.path, "INSTANCE", self.instance, state, str(priority)]
        self.runs += 1
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            self._failed(f"cannot run {self.path}: {exc}")
            return
        try:
            code = await asyncio.wait_for(proc.wait(), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._failed(f"{self.path} {state}: killed after {self.timeout:g}s")
            return
        if code != 0:
            self._failed(f"{self.path} {state}: exit status {code}")

    def _failed(self, message: str) -> None:
        self.failures += 1
        self.last_error = message
        log.warning("vrrp notify failed: %s", message)

    async def close(self, wait: float) -> None:
        """Give queued and running hooks up to ``wait`` seconds, then cancel (a running one is killed)."""
        task = self._task
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), wait)
        if not task.done():
            self._queue.clear()
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class _Queued:
    action: Action
    label: str = ""  # StateChanged: the outside state name at the time of the event
    old_label: str = ""
    priority: int = 0


class VrrpDriver:
    """One VRRP instance at run time; see the module docstring."""

    def __init__(
        self,
        settings: VrrpSettings,
        vip_port: VipPort,
        *,
        primary_ip: str | None = None,
        transport: VrrpTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        notify_timeout: float = NOTIFY_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.vip_port = vip_port
        self.clock = clock
        self.name = settings.instance_name
        self.primary_ip = primary_ip or settings.primary_ip
        self.tracking = Tracking(settings.priority, settings.track.weight)
        self.notify = NotifyRunner(settings.notify, self.name, notify_timeout)
        self._transport = transport
        self._owns_transport = transport is None
        self._reader_fd: int | None = None
        self._machine: VrrpMachine | None = None
        self._vip_forms = {split_vip(v)[0]: v for v in settings.virtual_ips}
        self._destinations = settings.unicast_peers or (VRRP_MULTICAST_GROUP,)
        self._peers = frozenset(settings.unicast_peers)
        self._queue: deque[_Queued] = deque()
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._garp_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[Callable[[Transition], None]] = []
        self._label = "INIT"
        self._started = False
        self._stopped = False
        # counters
        self.adverts_sent = 0
        self.adverts_received = 0
        self.tx_errors = 0
        self.rx_own = 0
        self.rx_errors: dict[str, int] = dict.fromkeys(RX_ERROR_REASONS, 0)
        self.vip_errors = 0
        self.garp_rounds = 0
        self.garp_errors = 0
        self.transitions = 0
        self.last_advert: tuple[float, str, int] | None = None  # (clock time, source, priority)
        self.last_transition: Transition | None = None
        self.last_vip_error: str | None = None
        # the VIP lease (halb.vrrp.lease_gate): refused master actions, and the advert gate
        self.advert_gate: Callable[[], bool] | None = None
        self.adds_deferred = 0
        self.garps_suppressed = 0
        self.adverts_suppressed = 0

    # ----------------------------------------------------------------- read-only view
    @property
    def machine(self) -> VrrpMachine | None:
        return self._machine

    @property
    def state(self) -> str:
        """MASTER | BACKUP | FAULT | STOP | INIT (not started yet)."""
        return self._label

    @property
    def priority(self) -> int:
        """The effective (tracked) priority."""
        return self.tracking.effective_priority

    def vips_held(self) -> list[str]:
        """Held VIPs as plain addresses, in configured order."""
        held = {split_vip(v)[0] for v in self.vip_port.held()}
        return [a for a in self._vip_forms if a in held]

    def add_listener(self, callback: Callable[[Transition], None]) -> None:
        """Call ``callback(transition)`` on every state change (exceptions are logged and ignored)."""
        self._listeners.append(callback)

    def snapshot(self) -> dict[str, Any]:
        """The instance as it appears in the node's status document under ``vrrp.instances``."""
        now = self.clock()
        machine = self._machine
        last = None
        if self.last_advert is not None:
            at, source, priority = self.last_advert
            last = {"at_seconds_ago": round(now - at, 3), "source": source, "priority": priority}
        master_ip = None
        if machine is not None:
            if machine.state is State.MASTER:
                master_ip = self.primary_ip
            elif machine.state is State.BACKUP:
                master_ip = machine.master_ip
        return {
            "name": self.name,
            "vrid": self.settings.vrid,
            "interface": self.settings.interface,
            "state": self.state,
            "priority": self.priority,
            "base_priority": self.settings.priority,
            "advertised_priority": machine.priority if machine is not None else None,
            "vips_held": self.vips_held(),
            "virtual_ips": list(self.settings.virtual_ips),
            "primary_ip": self.primary_ip,
            "mode": "unicast" if self.settings.unicast_peers else "multicast",
            "peers": list(self.settings.unicast_peers),
            "master_ip": master_ip,
            "advert_interval": self.settings.advert_interval,
            "master_down_interval": round(machine.master_down_interval, 4) if machine else None,
            "last_advert": last,
            "adverts_sent": self.adverts_sent,
            "adverts_received": self.adverts_received,
            "rx_errors": dict(self.rx_errors),
            "rx_own": self.rx_own,
            "tx_errors": self.tx_errors,
            "vip_errors": self.vip_errors,
            "last_vip_error": self.last_vip_error,
            "garp_rounds": self.garp_rounds,
            "garp_errors": self.garp_errors,
            "lease": {
                "adds_deferred": self.adds_deferred,
                "garps_suppressed": self.garps_suppressed,
                "adverts_suppressed": self.adverts_suppressed,
            },
            "transitions": self.transitions,
            "last_transition": (
                {
                    "from": self.last_transition.old,
                    "to": self.last_transition.new,
                    "reason": self.last_transition.reason,
                    "at_seconds_ago": round(now - self.last_transition.at, 3),
                }
                if self.last_transition is not None
                else None
            ),
            "tracking": {
                "weight": self.tracking.weight,
                "failing": self.tracking.failing,
                "checks": self.tracking.checks,
            },
            "notify": {
                "path": self.settings.notify,
                "runs": self.notify.runs,
                "failures": self.notify.failures,
                "last_error": self.notify.last_error,
            },
        }

    # ----------------------------------------------------------------- life cycle
    async def start(self) -> None:
        """Resolve the primary address, open the socket, start the machine (BACKUP, or MASTER if owner)."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        if self.primary_ip is None:
            self.primary_ip = await self._find_primary_ip()
        config = VrrpConfig(
            vrid=self.settings.vrid,
            priority=self.settings.priority,
            primary_ip=self.primary_ip,
            virtual_ips=self.settings.vip_addresses,
            advert_interval=self.settings.advert_interval,
            preempt=self.settings.preempt,
            preempt_delay=self.settings.preempt_delay,
        )
        machine = VrrpMachine(config)
        if self._transport is None:
            raw = RawVrrpSocket(self.settings.interface, self.primary_ip, not self.settings.unicast_peers)
            self._transport = raw
            self._reader_fd = raw.fileno()
            self._loop.add_reader(self._reader_fd, self._on_readable)
        self._machine = machine
        self._started = True
        self._worker = self._loop.create_task(self._apply_loop(), name=f"halb-vrrp-{self.name}")
        now = self.clock()
        if self.tracking.effective_priority != self.settings.priority:
            machine.set_priority(now, self.tracking.effective_priority)
        peers = self.settings.unicast_peers
        log.warning(
            "vrrp %s: starting on %s (vrid %d, priority %d, primary %s, %s, advert every %.2fs, VIPs %s)",
            self.name,
            self.settings.interface,
            self.settings.vrid,
            self.tracking.effective_priority,
            self.primary_ip,
            f"unicast to {', '.join(peers)}" if peers else "multicast",
            self.settings.advert_interval,
            ", ".join(self.settings.virtual_ips),
        )
        if self.tracking.fault:
            self._enter_label("FAULT", "tracking", now)
            return
        self._feed(machine.startup(now))

    async def stop(self, timeout: float = 5.0) -> None:
        """Resign (priority-0 advert if MASTER), drop every VIP, close the socket. Idempotent."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        machine = self._machine
        assert machine is not None
        now = self.clock()
        actions = machine.shutdown(now)
        self._feed(actions, stopping=True)
        if not any(isinstance(a, StateChanged) for a in actions):
            # FAULT (already resigned): still tell the hook and the listeners that we stop
            self._enter_label("STOP", "shutdown", now)
        self._cancel_timer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settle(), timeout)
        await self._cancel_garp()
        try:
            await self.vip_port.remove(list(self.settings.virtual_ips))
        except (VipError, OSError) as exc:
            self._vip_failed(f"remove on stop: {exc}")
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._reader_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = None
        if self._transport is not None and self._owns_transport:
            self._transport.close()
        close = getattr(self.vip_port, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
        await self.notify.close(min(timeout, STOP_NOTIFY_WAIT))
        log.warning("vrrp %s: stopped", self.name)

    async def settle(self) -> None:
        """Wait until every queued action has been applied (tests; stop)."""
        if self._idle is None:
            return
        while self._queue or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    # ----------------------------------------------------------------- inputs
    def set_check(self, check: str, ok: bool, *, fault: bool = False) -> None:
        """Tracking input from the composition root: ``check`` (e.g. "pool:app") is fine or not. With
        ``fault`` a failing check means FAULT whatever ``track.weight`` (the interface's link)."""
        was_fault = self.tracking.fault
        if not self.tracking.set(check, ok, fault=fault):
            return
        failing = ", ".join(self.tracking.failing) or "nothing"
        log.warning(
            "vrrp %s: tracking: %s (failing: %s); %s",
            self.name,
            "can serve" if self.tracking.ok else "cannot serve",
            failing,
            "FAULT" if self.tracking.fault else f"priority {self.tracking.effective_priority}",
        )
        machine = self._machine
        if machine is None or self._stopped:
            return  # applied at start
        now = self.clock()
        if self.tracking.fault:
            if not was_fault:
                actions = machine.shutdown(now)
                self._feed(actions, fault=True)
                if not any(isinstance(a, StateChanged) for a in actions):
                    self._enter_label("FAULT", "tracking", now)
            return
        self._feed(machine.set_priority(now, self.tracking.effective_priority))
        if was_fault:
            self._feed(machine.startup(now))

    def resign(self, reason: str) -> bool:
        """Leave MASTER now but keep running as BACKUP (priority-0 advert, VIPs removed); see
        ``VrrpMachine.resign``. False (nothing done) unless MASTER."""
        machine = self._machine
        if machine is None or self._stopped or machine.state is not State.MASTER:
            return False
        log.warning("vrrp %s: resigning as MASTER: %s", self.name, reason)
        self._feed(machine.resign(self.clock()))
        return True

    def reclaim_vips(self) -> bool:
        """While MASTER: add the VIPs and start the GARP rounds again (after the lease was granted, or
        an add that failed). False (nothing done) unless MASTER."""
        machine = self._machine
        if machine is None or self._stopped or machine.state is not State.MASTER:
            return False
        vips = tuple(self.settings.vip_addresses)
        self._feed([AddVips(vips), SendGarp(vips)])
        return True

    def datagram_received(self, data: bytes) -> None:
        """One IPv4 datagram from the raw socket. Never raises."""
        try:
            self._datagram(data)
        except Exception:
            self.rx_errors["internal"] += 1
            log.exception("vrrp %s: unexpected error handling a packet", self.name)

    def on_timer(self) -> None:
        """The timer expired (or a test says so). Never raises."""
        self._timer = None
        machine = self._machine
        if machine is None or self._stopped:
            return
        try:
            self._feed(machine.timer_fired(self.clock()))
        except Exception:
            log.exception("vrrp %s: unexpected error in the timer", self.name)
            self._arm()

    # ----------------------------------------------------------------- internals
    async def _find_primary_ip(self) -> str:
        vips = set(self._vip_forms)
        addresses = await interface_ipv4_addresses(self.settings.interface)
        for address, _ in addresses:
            if address not in vips and not ipaddress.IPv4Address(address).is_link_local:
                return address
        for address, _ in addresses:
            if address not in vips:
                return address
        raise VipError(
            f"interface {self.settings.interface} has no IPv4 address of its own to send adverts from "
            "(set vrrp.primary_ip or add one)"
        )

    def _on_readable(self) -> None:
        transport = self._transport
        if not isinstance(transport, RawVrrpSocket):
            return
        for _ in range(64):  # bounded: let other callbacks run under a flood
            try:
                data = transport.recv()
            except OSError as exc:
                self.rx_errors["internal"] += 1
                log.warning("vrrp %s: receive failed: %s", self.name, exc)
                return
            if data is None:
                return
            self.datagram_received(data)

    def _datagram(self, data: bytes) -> None:
        machine = self._machine
        if machine is None or self._stopped:
            return
        try:
            received = decode(data, expected_vrid=self.settings.vrid, checksum_mode=self._checksum_mode)
        except DecodeError as exc:
            self.rx_errors[exc.reason] = self.rx_errors.get(exc.reason, 0) + 1
            log.debug("vrrp %s: dropped a packet: %s", self.name, exc)
            return
        if received.src_ip == self.primary_ip:
            self.rx_own += 1
            return
        if self._peers and received.src_ip not in self._peers:
            self.rx_errors["peer"] += 1
            log.debug("vrrp %s: advert from %s, not a unicast peer", self.name, received.src_ip)
            return
        now = self.clock()
        self.adverts_received += 1
        self.last_advert = (now, received.src_ip, received.advert.priority)
        self._feed(machine.advert_received(now, received.advert, received.src_ip))

    @property
    def _checksum_mode(self) -> ChecksumMode:
        return cast(ChecksumMode, self.settings.checksum_mode)

    def _feed(self, actions: Sequence[Action], *, stopping: bool = False, fault: bool = False) -> None:
        """Queue the machine's actions (in order) and re-arm the timer."""
        machine = self._machine
        priority = machine.priority if machine is not None else self.settings.priority
        for action in actions:
            item = _Queued(action, priority=priority)
            if isinstance(action, StateChanged):
                item.old_label = self._label
                item.label = self._outside_label(action.new, stopping=stopping, fault=fault)
                self._label = item.label
            self._queue.append(item)
        if self._queue and self._wake is not None and self._idle is not None:
            self._idle.clear()
            self._wake.set()
        if not self._stopped:
            self._arm()

    @staticmethod
    def _outside_label(state: State, *, stopping: bool, fault: bool) -> str:
        if state is State.MASTER:
            return "MASTER"
        if state is State.BACKUP:
            return "BACKUP"
        if fault and not stopping:
            return "FAULT"
        return "STOP"

    def _enter_label(self, label: str, reason: str, now: float) -> None:
        """A state change the machine does not see (FAULT before start, STOP from FAULT)."""
        if label == self._label:
            return
        old, self._label = self._label, label
        self._transitioned(Transition(old, label, reason, self.tracking.effective_priority, now))

    def _arm(self) -> None:
        self._cancel_timer()
        machine = self._machine
        if machine is None or self._loop is None:
            return
        deadline = machine.next_deadline()
        if deadline is None:
            return
        self._timer = self._loop.call_later(max(0.0, deadline - self.clock()), self.on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _apply_loop(self) -> None:
        assert self._wake is not None and self._idle is not None
        while True:
            while self._queue:
                item = self._queue.popleft()
                try:
                    await self._apply(item)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("vrrp %s: applying %s failed", self.name, type(item.action).__name__)
            self._idle.set()
            self._wake.clear()
            await self._wake.wait()

    async def _apply(self, item: _Queued) -> None:
        action = item.action
        if isinstance(action, SendAdvert):
            if action.priority > 0:
                if self.advert_gate is not None and not self.advert_gate():
                    self.adverts_suppressed += 1
                    return
                machine = self._machine
                if machine is None or machine.state is not State.MASTER:
                    return  # queued while MASTER, stale now (resigned or stopped since)
            self._send_advert(action)
        elif isinstance(action, AddVips):
            try:
                await self.vip_port.add(self._forms(action.addresses))
            except LeaseRequired as exc:
                self.adds_deferred += 1
                log.info("vrrp %s: VIPs not added yet: %s", self.name, exc)
            except (VipError, OSError) as exc:
                self._vip_failed(f"add: {exc}")
        elif isinstance(action, SendGarp):
            await self._cancel_garp()
            if self.settings.garp.repeat > 0 or self.settings.garp.refresh > 0:
                self._garp_task = asyncio.get_running_loop().create_task(
                    self._garp_schedule(tuple(action.addresses)), name=f"halb-vrrp-garp-{self.name}"
                )
        elif isinstance(action, RemoveVips):
            await self._cancel_garp()
            try:
                await self.vip_port.remove(self._forms(action.addresses))
            except (VipError, OSError) as exc:
                self._vip_failed(f"remove: {exc}")
        elif isinstance(action, StateChanged):
            self._transitioned(
                Transition(item.old_label, item.label, str(action.reason), item.priority, self.clock())
            )

    def _forms(self, addresses: Sequence[str]) -> list[str]:
        return [self._vip_forms.get(a, f"{a}/32") for a in addresses]

    def _send_advert(self, action: SendAdvert) -> None:
        transport = self._transport
        if transport is None or self.primary_ip is None:
            return
        for dst in self._destinations:
            payload = encode(action.advert, self.primary_ip, dst, self._checksum_mode)
            try:
                transport.send(payload, dst)
            except OSError as exc:
                self.tx_errors += 1
                log.warning("vrrp %s: sending an advert to %s failed: %s", self.name, dst, exc)
                continue
            self.adverts_sent += 1

    def _vip_failed(self, message: str) -> None:
        self.vip_errors += 1
        self.last_vip_error = message
        log.error("vrrp %s: VIP %s", self.name, message)

    async def _garp_schedule(self, addresses: tuple[str, ...]) -> None:
        garp = self.settings.garp
        for i in range(garp.repeat):
            if i:
                await asyncio.sleep(garp.interval)
            await self._garp_round(addresses)
        if garp.refresh > 0:
            while True:
                await asyncio.sleep(garp.refresh)
                await self._garp_round(addresses)

    async def _garp_round(self, addresses: tuple[str, ...]) -> None:
        try:
            await self.vip_port.send_garp(list(addresses))
            self.garp_rounds += 1
        except LeaseRequired as exc:
            self.garps_suppressed += 1
            log.info("vrrp %s: GARP suppressed: %s", self.name, exc)
        except (VipError, OSError) as exc:
            self.garp_errors += 1
            log.warning("vrrp %s: GARP failed: %s", self.name, exc)

    async def _cancel_garp(self) -> None:
        task, self._garp_task = self._garp_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _transitioned(self, transition: Transition) -> None:
        self.transitions += 1
        self.last_transition = transition
        log.warning(
            "vrrp %s: %s -> %s (%s), priority %d, VIPs %s",
            self.name,
            transition.old,
            transition.new,
            transition.reason,
            transition.priority,
            ", ".join(self.vips_held()) or "none held",
        )
        with contextlib.suppress(RuntimeError):  # no running loop: unit tests driving it synchronously
            self.notify.submit(transition.new, transition.priority)
        for callback in self._listeners:
            try:
                callback(transition)
            except Exception:
                log.exception("vrrp %s: transition listener failed", self.name)
