"""Watching a running lab from inside its namespaces: who holds the VIP, who answers for it, who served.

How this works
==============

An :class:`Observer` runs three things against a lab (``with Observer(prefix) as obs: ...``):

**The VIP sampler** (one thread, in the root namespace). Every ``interval`` (50 ms) it reads, for each
balancer, straight from that balancer's namespace:

* ``holds``: is the VIP on one of its interfaces? One ``RTM_GETADDR`` dump on a netlink socket that was
  opened by a thread which had joined the namespace (a socket stays in the namespace it was made in, so
  the sampler thread itself never switches). A dump costs ~0.1 ms.
* ``fence``: the node's nftables fence (``halb.vrrp.fence``: tables ``halb_fence`` whose set
  ``lease_vips`` holds the VIP, with a timeout, only while the node's lease is live; the kernel drops the
  VIP's traffic and ARP otherwise), read through libnftables (``ctypes``, ``list ruleset`` in JSON; the
  context's netlink socket is made inside the namespace, like the address socket): ``None`` when the
  namespace has no nftables table at all, ``True`` ("open") when the VIP is an element of a set there,
  ``False`` ("closed") otherwise -- an element whose timeout ran out is gone from the set. ~0.2 ms.
* ``answers``: would its kernel answer for the VIP *right now*? An ARP probe (RFC 5227: sender address
  0.0.0.0, a made-up locally administered sender MAC) is sent from the client namespace to each
  balancer's MAC, asking for the VIP; a reply from that MAC within the tick counts. The kernel of a
  frozen node still answers ARP (it does not need the process), so this shows what the fence changes.
  The replies go to the made-up MAC, which the client's kernel drops as "other host": the probes never
  touch the client's own ARP cache, so they do not steer the traffic.

Each tick becomes a :class:`Tick` (tick number, time, one :class:`NodeView` per balancer). Ticks are
scheduled at ``t0 + n * interval``; a tick that starts more than half an interval late is counted in
``late_ticks`` (and the figures report the largest spacing seen).

**A sniffer** (one thread, an ``AF_PACKET`` socket on the client's ``eth0``) records every frame that
matters for the VIP, with the sender's MAC: gratuitous ARPs for the VIP (sender = target = VIP: a
"GARP"), ARP replies for it (to the client, or to the probes), and TCP SYN-ACKs from VIP:80 (which
balancer accepted a connection).

**A traffic generator** (one thread that joined the client namespace, running its own asyncio loop):
``rate`` GETs per second to ``http://VIP/``, each on a fresh connection started on schedule whatever
happened to the previous ones, a ``connect_timeout`` and a total ``timeout``. Each :class:`Request`
records start, end, success, the backend (the body) and the client port; the balancer that accepted it
is the sender MAC of the SYN-ACK the sniffer saw for that port (halb's proxy adds no header naming
itself, and the client's ARP entry is only a guess at the time).

All times are ``time.monotonic()`` (CLOCK_MONOTONIC is shared by every network namespace). The
analysis helpers below the classes are pure: they take the recorded ticks, frames and requests.
Nothing here changes anything in the lab (the probes are the only packets it sends, and only inside
the lab's own namespaces); every thread and socket ends with :meth:`Observer.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from halb.lab import control, netns
from halb.lab.netns import LabError
from halb.lab.state import LabState
from halb.lab.topology import HOST_IF, LISTEN_PORT

INTERVAL = 0.05
PROBE_MAC = bytes.fromhex("02a1b0000001")  # locally administered: no real interface has it
ETH_P_ALL, ETH_P_ARP, ETH_P_IP = 0x0003, 0x0806, 0x0800
PACKET_OUTGOING = 4


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


# --- reading a namespace: addresses (netlink) and the nftables fence (libnftables) ----------------------
RTM_NEWADDR, RTM_GETADDR, NLMSG_DONE, NLMSG_ERROR = 20, 22, 3, 2
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2


def _netlink_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.bind((0, 0))
    sock.settimeout(1.0)
    return sock


def parse_addresses(data: bytes) -> tuple[list[str], bool]:
    """(IPv4 addresses in the RTM_NEWADDR messages of one netlink datagram, whether the dump is done)."""
    found: list[str] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return found, True
        if kind == RTM_NEWADDR:
            at = offset + 16 + 8  # nlmsghdr, ifaddrmsg
            while at + 4 <= offset + length:
                rta_len, rta_type = struct.unpack_from("=HH", data, at)
                if rta_len < 4:
                    break
                if rta_type in (IFA_ADDRESS, IFA_LOCAL) and rta_len == 8:
                    found.append(socket.inet_ntoa(data[at + 4 : at + 8]))
                at += (rta_len + 3) & ~3
        offset += (length + 3) & ~3
    return found, False


class AddressReader:
    """IPv4 addresses of one namespace, by a netlink dump on a socket made inside it."""

    def __init__(self, namespace: str) -> None:
        self.sock: socket.socket = netns.in_netns(namespace, _netlink_socket)
        self._seq = 0

    def addresses(self) -> set[str]:
        self._seq += 1
        request = struct.pack("=IHHII", 16 + 8, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0)
        self.sock.send(request + struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0))
        found: set[str] = set()
        while True:
            addresses, done = parse_addresses(self.sock.recv(65536))
            found.update(addresses)
            if done:
                return found

    def close(self) -> None:
        self.sock.close()


class _Nft:
    """The few libnftables calls the fence reader needs (what python3-nftables wraps, via ctypes)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib = lib


_NFT: _Nft | None = None
NFT_CTX_OUTPUT_JSON = 1 << 4


class FenceReader:
    """The VIP's membership in the nftables sets of one namespace (libnftables, context made inside it)."""

    def __init__(self, namespace: str) -> None:
        global _NFT
        if _NFT is None:
            _NFT = _Nft()
        self.nft = _NFT

        def make() -> int:
            ctx = self.nft.lib.nft_ctx_new(0)
            self.nft.lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
            self.nft.lib.nft_ctx_buffer_output(ctx)
            self.nft.lib.nft_ctx_buffer_error(ctx)
            return int(ctx)

        self.ctx: int | None = netns.in_netns(namespace, make)

    def ruleset(self) -> list[dict[str, Any]]:
        if self.ctx is None or self.nft.lib.nft_run_cmd_from_buffer(self.ctx, b"list ruleset") != 0:
            return []
        raw = self.nft.lib.nft_ctx_get_output_buffer(self.ctx) or b"{}"
        with contextlib.suppress(ValueError):
            return list(json.loads(raw).get("nftables", []))
        return []

    def read(self, vip: str) -> tuple[bool, tuple[str, ...]]:
        """(any nftables table exists, the "table/set" names whose elements include the VIP)."""
        return fence_of(self.ruleset(), vip)

    def close(self) -> None:
        if self.ctx is not None:
            self.nft.lib.nft_ctx_free(self.ctx)
            self.ctx = None


def _element_values(elem: Any) -> Iterable[str]:
    """The plain values of one JSON set element ("1.2.3.4", {"elem": {"val": ...}}, {"prefix": ...})."""
    if isinstance(elem, str):
        yield elem
    elif isinstance(elem, dict):
        if "elem" in elem:
            yield from _element_values(elem["elem"].get("val"))
        elif "prefix" in elem:
            yield f"{elem['prefix'].get('addr')}/{elem['prefix'].get('len')}"
        elif "val" in elem:
            yield from _element_values(elem["val"])
    elif isinstance(elem, list):
        for item in elem:
            yield from _element_values(item)


def fence_of(ruleset: Sequence[dict[str, Any]], vip: str) -> tuple[bool, tuple[str, ...]]:
    """(any table in the ruleset, "table/set" names holding `vip`) from `nft -j list ruleset` (pure)."""
    tables = any("table" in item for item in ruleset)
    holding = []
    for item in ruleset:
        found = item.get("set") or item.get("map")
        if not found:
            continue
        values = set(_element_values(found.get("elem", [])))
        if vip in values or f"{vip}/32" in values:
            holding.append(f"{found.get('table')}/{found.get('name')}")
    return tables, tuple(sorted(holding))


# --- what the sampler records ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeView:
    holds: bool  # the VIP is on one of the namespace's interfaces
    answers: bool  # its kernel answered the ARP probe for the VIP sent at this tick
    nft: bool = False  # the namespace has an nftables table
    fence_sets: tuple[str, ...] = ()  # the sets in which the VIP is an element right now

    @property
    def fence(self) -> bool | None:
        """None: no nftables in the namespace; True: the fence is open (the VIP is in a set: the kernel
        lets its traffic and ARP through); False: closed."""
        return None if not self.nft else bool(self.fence_sets)


@dataclass(frozen=True)
class Tick:
    n: int
    at: float
    nodes: dict[str, NodeView]

    @property
    def holders(self) -> tuple[str, ...]:
        return tuple(name for name, view in self.nodes.items() if view.holds)

    @property
    def answering(self) -> tuple[str, ...]:
        return tuple(name for name, view in self.nodes.items() if view.answers)


@dataclass(frozen=True)
class Frame:
    """A frame about the VIP seen by the client: kind garp | arp-reply | probe-reply | synack."""

    at: float
    kind: str
    mac: str  # the Ethernet sender
    port: int | None = None  # synack: the client's port


@dataclass
class Request:
    seq: int
    start: float
    end: float = 0.0
    ok: bool = False
    body: str = ""
    error: str = ""
    port: int | None = None
    lb: str | None = None  # filled in by `Observer.requests()` from the SYN-ACK's sender


# --- the sniffer -------------------------------------------------------------------------------------------
def _packet_socket() -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((HOST_IF, ETH_P_ALL))
    sock.settimeout(0.1)
    return sock


def classify(frame: bytes, vip: bytes, port: int = LISTEN_PORT) -> tuple[str, str, int | None] | None:
    """(kind, sender MAC, client port) of a frame about the VIP, None for any other frame (pure)."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    src = mac_text(frame[6:12])
    if ethertype == ETH_P_ARP and len(frame) >= 42:
        op = struct.unpack_from("!H", frame, 20)[0]
        spa, tpa = frame[28:32], frame[38:42]
        if spa != vip:
            return None
        if tpa == vip:
            return "garp", src, None
        if op == 2:
            return ("probe-reply" if frame[0:6] == PROBE_MAC else "arp-reply"), src, None
        return None
    if ethertype == ETH_P_IP and len(frame) >= 34 + 14:
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != socket.IPPROTO_TCP or frame[26:30] != vip or len(frame) < 14 + ihl + 14:
            return None
        sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
        flags = frame[14 + ihl + 13]
        if sport == port and flags & 0x12 == 0x12:
            return "synack", src, dport
    return None


def arp_probe(dst_mac: bytes, vip: bytes) -> bytes:
    """An ARP probe for `vip` (sender 0.0.0.0, PROBE_MAC), unicast to `dst_mac`, padded to 60 bytes."""
    ether = dst_mac + PROBE_MAC + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + PROBE_MAC + bytes(4) + bytes(6) + vip
    return (ether + arp).ljust(60, b"\0")


# --- the traffic generator ---------------------------------------------------------------------------------
async def _get(
    host: str, port: int, connect_timeout: float, timeout: float, record: Request
) -> None:  # one GET on a fresh connection, filling `record`
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
    except TimeoutError:
        record.error = "connect timeout"
        return
    except OSError as exc:
        record.error = f"connect: {exc.strerror or exc}"
        return
    with contextlib.suppress(OSError, IndexError, TypeError):
        record.port = int(writer.get_extra_info("sockname")[1])
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), max(0.001, timeout - (time.monotonic() - started)))
    except TimeoutError:
        record.error = "timeout"
        return
    except OSError as exc:
        record.error = f"io: {exc.strerror or exc}"
        return
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    words = head.split(b"\r\n", 1)[0].split()
    status = int(words[1]) if len(words) >= 2 and words[1].isdigit() else 0
    record.ok = 200 <= status < 300
    record.body = body.decode(errors="replace").strip()[:40]
    record.error = "" if record.ok else (f"HTTP {status}" if status else "no response")


# --- the observer ------------------------------------------------------------------------------------------
class Observer:
    """Sampler + sniffer (+ traffic when `rate` > 0) on a running lab; see the module docstring."""

    def __init__(
        self,
        prefix: str,
        rate: float = 0.0,
        interval: float = INTERVAL,
        connect_timeout: float = 0.25,
        timeout: float = 1.0,
        lbs: Sequence[str] | None = None,
    ) -> None:
        st: LabState = control.lab_state(prefix)
        topo = st.topology
        self.prefix, self.vip, self.interval = prefix, topo.vip, interval
        self._vip_raw = socket.inet_aton(topo.vip)
        self.rate, self.connect_timeout, self.timeout = rate, connect_timeout, timeout
        self.lbs = list(lbs) if lbs is not None else [h.name for h in topo.by_role("lb")]
        self.client_ns = topo.host("client").namespace
        self.macs: dict[str, str] = {}  # lb name -> MAC of its eth0
        for name in self.lbs:
            found = netns.link_mac(topo.host(name).namespace)
            if found is None:
                raise LabError(f"{name} has no {HOST_IF}")
            self.macs[name] = found
        self.by_mac = {mac: name for name, mac in self.macs.items()}
        self.ticks: list[Tick] = []
        self.frames: list[Frame] = []
        self.marks: list[tuple[float, str]] = []
        self.late_ticks = 0
        self.max_spacing = 0.0
        self._requests: list[Request] = []
        self._replies: list[Frame] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._readers: dict[str, tuple[AddressReader, FenceReader]] = {}
        self._packet: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._errors: list[str] = []
        try:
            for name in self.lbs:
                ns = topo.host(name).namespace
                self._readers[name] = (AddressReader(ns), FenceReader(ns))
            self._packet = netns.in_netns(self.client_ns, _packet_socket)
        except BaseException:
            self.close()
            raise

    # --- life cycle --------------------------------------------------------------------------------------
    def __enter__(self) -> Observer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._spawn(self._sniff, "observe-sniffer")
        self._spawn(self._sample, "observe-sampler")
        if self.rate > 0:
            self._spawn(self._traffic, "observe-traffic")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                target()
            except Exception as exc:
                self._errors.append(f"{name}: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=run, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def close(self) -> None:
        """Stop every thread, close every socket and nft context (idempotent)."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)
        for thread in self._threads:
            thread.join(self.timeout + 3.0)
        self._threads = []
        for reader, fence in self._readers.values():
            reader.close()
            fence.close()
        self._readers = {}
        if self._packet is not None:
            self._packet.close()
            self._packet = None

    @property
    def errors(self) -> list[str]:
        return list(self._errors)

    def mark(self, label: str) -> float:
        """Note an event (kill, partition...) on the timeline; returns its time."""
        at = time.monotonic()
        with self._lock:
            self.marks.append((at, label))
        return at

    # --- the threads -------------------------------------------------------------------------------------
    def _sample(self) -> None:
        assert self._packet is not None
        probes = {name: arp_probe(bytes.fromhex(mac.replace(":", "")), self._vip_raw) for name, mac in
                  self.macs.items()}  # fmt: skip
        pending: list[tuple[int, float, dict[str, tuple[bool, bool, tuple[str, ...]]]]] = []
        n = 0
        last = None
        while not self._stop.is_set():
            due = self.t0 + n * self.interval
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
                now = time.monotonic()
            if now - due > self.interval / 2:
                self.late_ticks += 1
            if last is not None:
                self.max_spacing = max(self.max_spacing, now - last)
            last = now
            for probe in probes.values():
                with contextlib.suppress(OSError):
                    self._packet.send(probe)
            views: dict[str, tuple[bool, bool, tuple[str, ...]]] = {}
            for name, (reader, fence) in self._readers.items():
                holds = self.vip in reader.addresses()
                tables, sets = fence.read(self.vip)
                views[name] = (holds, tables, sets)
            pending.append((n, now, views))
            # a tick is final once the next one starts: its probe replies had a whole interval to arrive
            self._settle(pending[:-1])
            del pending[:-1]
            n = max(n + 1, int((time.monotonic() - self.t0) / self.interval) + 1)
        # the last tick is dropped: the sniffer stops with the sampler, so its probe replies may be missing

    def _settle(self, ticks: list[tuple[int, float, dict[str, tuple[bool, bool, tuple[str, ...]]]]]) -> None:
        for n, at, views in ticks:
            with self._lock:
                self._replies = [f for f in self._replies if f.at >= at]  # ticks settle in order
                replies = {f.mac for f in self._replies if f.at < at + self.interval}
            nodes = {
                name: NodeView(holds, self.macs[name] in replies, tables, sets)
                for name, (holds, tables, sets) in views.items()
            }
            with self._lock:
                self.ticks.append(Tick(n, at, nodes))

    def _sniff(self) -> None:
        assert self._packet is not None
        sock = self._packet
        while not self._stop.is_set():
            try:
                data, address = sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            if address[2] == PACKET_OUTGOING:
                continue
            found = classify(data, self._vip_raw)
            if found is not None:
                frame = Frame(at, *found)
                with self._lock:
                    self.frames.append(frame)
                    if frame.kind == "probe-reply":
                        self._replies.append(frame)

    def _traffic(self) -> None:
        netns.join_netns(self.client_ns)
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._traffic_main())
        finally:
            self._loop = None
            loop.close()

    async def _traffic_main(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        seq = 0
        while not self._stop.is_set():
            due = self.t0 + seq / self.rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if self._stop.is_set():
                break
            record = Request(seq, time.monotonic())
            with self._lock:
                self._requests.append(record)

            async def one(record: Request = record) -> None:
                await _get(self.vip, LISTEN_PORT, self.connect_timeout, self.timeout, record)
                record.end = time.monotonic()

            task = asyncio.get_running_loop().create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            seq += 1
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout + 0.5)
        for task in tasks:
            task.cancel()

    # --- reading the records (thread-safe copies) --------------------------------------------------------
    def timeline(self, since: float | None = None, until: float | None = None) -> list[Tick]:
        with self._lock:
            ticks = list(self.ticks)
        return [t for t in ticks if (since is None or t.at >= since) and (until is None or t.at <= until)]

    def frames_of(self, kind: str, since: float | None = None, mac: str | None = None) -> list[Frame]:
        with self._lock:
            frames = list(self.frames)
        return [
            f for f in frames
            if f.kind == kind and (since is None or f.at >= since) and (mac is None or f.mac == mac)
        ]  # fmt: skip

    def requests(self, settled: bool = True) -> list[Request]:
        """The requests (with `settled`, only those that ended), each with the balancer that accepted it."""
        with self._lock:
            records = [r for r in self._requests if r.end or not settled]
            synacks = [f for f in self.frames if f.kind == "synack"]
        by_port: dict[int, list[Frame]] = {}
        for frame in synacks:
            if frame.port is not None:
                by_port.setdefault(frame.port, []).append(frame)
        for r in records:
            if r.port is not None and r.lb is None:
                for frame in by_port.get(r.port, []):
                    # the sniffer stamps a frame when its thread gets to it: maybe after the request ended
                    if r.start <= frame.at <= (r.end or frame.at) + 0.5:
                        r.lb = self.by_mac.get(frame.mac, frame.mac)
                        break
        return records

    def wait_tick(self, after: float, timeout: float = 2.0) -> Tick:
        """The first tick taken after `after` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            ticks = self.timeline(since=after)
            if ticks:
                return ticks[0]
            if time.monotonic() > deadline:
                raise LabError(f"the sampler took no tick within {timeout}s: {self._errors}")
            time.sleep(self.interval / 5)

    def wait_until(self, predicate: Callable[[Tick], bool], after: float, timeout: float) -> Tick | None:
        """The first tick after `after` for which `predicate` holds, waiting up to `timeout`; else None."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            ticks = self.timeline(since=after)
            for tick in ticks[seen:]:
                if predicate(tick):
                    return tick
            seen = len(ticks)
            if time.monotonic() > deadline:
                return None
            time.sleep(self.interval / 5)

    def wait_ok(self, after: float, timeout: float) -> Request | None:
        """The first successful request started at or after `after` (by end time), waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            found = first_ok(self.requests(), after)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)


# --- pure analysis -----------------------------------------------------------------------------------------
def first_ok(requests: Sequence[Request], after: float) -> Request | None:
    """The earliest-ending successful request that started at or after `after`."""
    return min((r for r in requests if r.ok and r.start >= after), key=lambda r: r.end, default=None)


@dataclass(frozen=True)
class Run:
    """Consecutive ticks with the same value: [start, end) in seconds, the value, the tick count."""

    start: float
    end: float
    value: tuple[str, ...]
    ticks: int

    @property
    def duration(self) -> float:
        return self.end - self.start


def runs(
    ticks: Sequence[Tick], key: Callable[[Tick], tuple[str, ...]], interval: float = INTERVAL
) -> list[Run]:
    """Run-length encoding of key(tick) over the timeline (a run ends where the next one starts)."""
    out: list[Run] = []
    for i, tick in enumerate(ticks):
        value = key(tick)
        end = ticks[i + 1].at if i + 1 < len(ticks) else tick.at + interval
        if out and out[-1].value == value:
            last = out[-1]
            out[-1] = Run(last.start, end, value, last.ticks + 1)
        else:
            out.append(Run(tick.at, end, value, 1))
    return out


def holders_key(tick: Tick) -> tuple[str, ...]:
    return tick.holders


def answering_key(tick: Tick) -> tuple[str, ...]:
    return tick.answering


def describe(
    ticks: Sequence[Tick], origin: float, key: Callable[[Tick], tuple[str, ...]] = holders_key
) -> str:
    """A timeline as text, times relative to `origin`: "-0.20..1.85 lb1 | 1.85..2.40 - | 2.40.. lb2"."""
    parts = []
    for r in runs(ticks, key):
        parts.append(f"{r.start - origin:.2f}..{r.end - origin:.2f} {'+'.join(r.value) or '-'}")
    return " | ".join(parts)


@dataclass
class Figures:
    """What a stretch of timeline shows (all durations in seconds)."""

    ticks: int = 0
    span: float = 0.0
    max_holders: int = 0
    max_answering: int = 0
    two_holders: int = 0  # ticks with more than one holder
    two_answering: int = 0  # ticks with more than one balancer answering ARP for the VIP
    gaps: list[float] = field(default_factory=list)  # runs with nobody holding the VIP
    first_two_holders: float | None = None  # after the origin

    def to_dict(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "span": round(self.span, 3),
            "max_holders": self.max_holders,
            "max_answering": self.max_answering,
            "two_holders": self.two_holders,
            "two_answering": self.two_answering,
            "gaps": [round(g, 3) for g in self.gaps],
            "first_two_holders": None if self.first_two_holders is None else round(self.first_two_holders, 3),
        }


def figures(ticks: Sequence[Tick], origin: float | None = None) -> Figures:
    if not ticks:
        return Figures()
    origin = ticks[0].at if origin is None else origin
    two = [t for t in ticks if len(t.holders) > 1]
    return Figures(
        ticks=len(ticks),
        span=ticks[-1].at - ticks[0].at,
        max_holders=max(len(t.holders) for t in ticks),
        max_answering=max(len(t.answering) for t in ticks),
        two_holders=len(two),
        two_answering=sum(1 for t in ticks if len(t.answering) > 1),
        gaps=[r.duration for r in runs(ticks, holders_key) if not r.value],
        first_two_holders=two[0].at - origin if two else None,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation (q=0.5: the median)."""
    if not values:
        raise ValueError("no values")
    if q == 0.5:
        return float(statistics.median(values))
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
