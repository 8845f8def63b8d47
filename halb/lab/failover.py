"""`halb lab failover`: SIGKILL the VIP holder under steady client traffic, N times, and time each takeover.

How this works: against a running lab (VRRP on, two balancers or more), a traffic process runs inside the
client namespace for the whole run (`halb.lab.traffic`: R requests/s to http://VIP/, each on a fresh
connection with a 0.25 s connect timeout, one JSON line per request on its stdout, read here by a thread).
Before every round the cluster must be *stable*: exactly one namespace has the VIP, that balancer says
MASTER on its admin API and no other one does (a peer without halb's admin API, such as keepalived run in
a balancer's namespace, is just not asked), and a request through the VIP has succeeded since.
Then a round:

1. a pause of a random fraction of the advert interval, so that the kill lands at a random point of the
   master's advert cycle (the backups' Master_Down_Timer was restarted by the last advert they got, so
   the takeover time depends on that phase: between 2 and 3 intervals + Skew_Time);
2. a watcher thread listens on netlink in the other balancers' namespaces for the VIP being added;
3. `control.kill(holder)` -- exactly `halb lab kill`: SIGKILL of `halb serve` and its workers (the lab's
   supervisor then releases the VIP from the dead node's interface, as systemd's ExecStopPost would);
4. wait for the first successful request *started* after the kill: **takeover** = its end - the kill.
   **failed** = the requests that failed between the kill and that answer (the ones in flight at the kill
   included). The balancer that answered is the one whose MAC the client's neighbour entry for the VIP
   holds right then (the new master's gratuitous ARP moved it), the backend is the body of the answer;
5. `control.start(holder)` (`halb lab start`), then wait until stable again *with the killed node as
   master* (it has the top priority and preempts): **restore** = start -> first good answer after that,
   and the requests that failed during the restart and the preemption are counted separately.

The analysis (`takeover_of`, `summarize`) is pure and works on the recorded samples after the round, when
every request of the round has ended. The clock is `time.monotonic()` in both processes (CLOCK_MONOTONIC is
shared by all network namespaces). The traffic process stops when its stdin closes, so it never outlives
the run; a node killed by an interrupted run is started again on the way out.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from halb.lab import control, netns
from halb.lab.netns import LabError
from halb.lab.observe import parse_addresses
from halb.lab.state import LabState
from halb.lab.topology import ADMIN_PORT, LISTEN_PORT

Echo = Callable[[str], None]
STABLE_TIMEOUT = 30.0


# --- pure: samples and their analysis --------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One request of the traffic process (times are time.monotonic())."""

    seq: int
    start: float
    end: float
    ok: bool
    body: str = ""
    error: str = ""

    @classmethod
    def from_json(cls, line: str) -> Sample | None:
        try:
            d = json.loads(line)
            start, end = float(d["start"]), float(d["end"])
            return cls(int(d["seq"]), start, end, bool(d["ok"]), str(d["body"]), str(d["error"]))
        except (ValueError, KeyError, TypeError):
            return None


def first_ok(samples: Sequence[Sample], after: float) -> Sample | None:
    """The earliest-ending successful request that started at or after `after`."""
    return min((s for s in samples if s.ok and s.start >= after), key=lambda s: s.end, default=None)


def takeover_of(samples: Sequence[Sample], killed_at: float) -> tuple[Sample | None, int]:
    """(first good answer after the kill, failed requests between the kill and that answer).

    A failed request counts when it ended after the kill and started before the answer arrived; without
    an answer every failure after the kill counts.
    """
    first = first_ok(samples, killed_at)
    until = first.end if first is not None else math.inf
    failed = sum(1 for s in samples if not s.ok and s.end >= killed_at and s.start <= until)
    return first, failed


def failed_between(samples: Sequence[Sample], after: float, until: float) -> int:
    """Failed requests that started in (after, until]."""
    return sum(1 for s in samples if not s.ok and after < s.start <= until)


@dataclass
class RoundResult:
    round: int
    killed: str
    takeover: float | None  # kill -> first good answer through the VIP (s); None: none in time
    vip_moved: float | None  # kill -> the VIP seen on another balancer's interface (s)
    failed: int  # requests that failed between the kill and the first good answer
    new_holder: str | None  # who had the VIP at the first good answer
    answered_by: str | None  # the balancer the client reached (its neighbour entry for the VIP)
    backend: str | None  # the backend that answered the first good request
    restore: float | None = None  # `start` of the killed node -> a good answer with it master again (s)
    failed_restore: int = 0  # requests that failed after the first good answer: restart and preemption


def _p50_max(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "max": None, "min": None}
    return {"p50": statistics.median(values), "max": max(values), "min": min(values)}


def summarize(rounds: Sequence[RoundResult]) -> dict[str, Any]:
    """p50/min/max of the takeover and VIP-move times and of the failed-request counts."""
    return {
        "rounds": len(rounds),
        "takeover": _p50_max([r.takeover for r in rounds if r.takeover is not None]),
        "vip_moved": _p50_max([r.vip_moved for r in rounds if r.vip_moved is not None]),
        "failed": _p50_max([float(r.failed) for r in rounds]),
        "failed_restore": _p50_max([float(r.failed_restore) for r in rounds]),
        "no_takeover": sum(1 for r in rounds if r.takeover is None),
    }


@dataclass
class FailoverReport:
    prefix: str
    vip: str
    advert_interval: float
    master_down_interval: float | None  # as the first round's backup reported it
    rate: float
    connect_timeout: float
    rounds: list[RoundResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["summary"] = summarize(self.rounds)
        return doc


# --- the traffic process -----------------------------------------------------------------------------------
class Traffic:
    """`halb.lab.traffic` inside the client namespace; its samples, collected by a reader thread."""

    def __init__(self, st: LabState, rate: float, connect_timeout: float, timeout: float) -> None:
        port = "" if LISTEN_PORT == 80 else f":{LISTEN_PORT}"
        argv = [
            "ip", "netns", "exec", st.topology.host("client").namespace,
            sys.executable, "-m", "halb.lab.traffic", "--url", f"http://{st.topology.vip}{port}/",
            "--rate", str(rate), "--connect-timeout", str(connect_timeout), "--timeout", str(timeout),
            "--stdin",
        ]  # fmt: skip
        self.samples: list[Sample] = []
        self._cond = threading.Condition()
        self._log = open(st.dir / "traffic.log", "ab")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            sample = Sample.from_json(line)
            if sample is not None:
                with self._cond:
                    self.samples.append(sample)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def snapshot(self) -> list[Sample]:
        with self._cond:
            return list(self.samples)

    def wait_ok(self, after: float, timeout: float) -> Sample | None:
        """The first good answer to a request started at or after `after`; None after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = first_ok(self.samples, after)
                if found is not None:
                    return found
                if self.proc.poll() is not None:
                    raise LabError(f"the traffic process exited ({self.proc.returncode}); see traffic.log")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.1))

    def wait_settled(self, seq: int, timeout: float) -> None:
        """Wait until every request up to number `seq` has ended (the slow failures come last)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len({s.seq for s in self.samples if s.seq <= seq}) <= seq:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return
                self._cond.wait(min(left, 0.1))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(3.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(3.0)
        self._reader.join(2.0)
        self._log.close()


# --- looking at the lab ------------------------------------------------------------------------------------
def neighbour_mac(namespace: str, address: str) -> str | None:
    """The MAC of `address` in `namespace`'s neighbour table (ARP cache), if it has one."""
    result = netns.run(["ip", "-n", namespace, "-j", "neigh", "show", address], check=False)
    with contextlib.suppress(ValueError):
        for entry in json.loads(result.stdout or "[]"):
            if "lladdr" in entry:
                return str(entry["lladdr"])
    return None


def vrrp_instances(st: LabState) -> dict[str, dict[str, Any] | None]:
    """Each balancer's VRRP instance from its admin API (asked from the client namespace); None: no answer."""
    client = st.topology.host("client").namespace

    def ask(address: str) -> dict[str, Any] | None:
        try:
            code, body = netns.http_get(address, ADMIN_PORT, "/status", 1.0)
            instances = json.loads(body)["vrrp"]["instances"] if code == 200 else []
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return instances[0] if instances else None

    return {lb.name: netns.in_netns(client, ask, lb.address) for lb in st.topology.by_role("lb")}


RTMGRP_IPV4_IFADDR = 0x10


def _netlink_addr_socket() -> socket.socket:
    """A netlink socket subscribed to IPv4 address changes (of the namespace the calling thread is in)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.bind((0, RTMGRP_IPV4_IFADDR))
    return sock


class VipWatch:
    """Notes when the VIP is first added to one of `candidates` (monotonic time, holder).

    Event-driven: one netlink socket per candidate namespace (made by a thread that joined it), subscribed
    to IPv4 address changes, so the time is when the kernel announced the address, not when a poll saw it.
    """

    def __init__(self, st: LabState, candidates: Sequence[str]) -> None:
        self._vip = st.topology.vip
        self._sockets = {
            netns.in_netns(st.topology.host(name).namespace, _netlink_addr_socket): name
            for name in candidates
        }
        self.at: float | None = None
        self.holder: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.at is None:
                readable, _, _ = select.select(list(self._sockets), [], [], 0.05)
                now = time.monotonic()
                for sock in readable:
                    if self._vip in parse_addresses(sock.recv(65536))[0] and self.at is None:
                        self.at, self.holder = now, self._sockets[sock]
        finally:
            for sock in self._sockets:
                sock.close()

    def stop(self, wait: float = 1.0) -> None:
        """Stop watching, giving an event still on its way up to `wait` seconds."""
        self._thread.join(wait)
        self._stop.set()
        self._thread.join(2.0)


def wait_stable(
    st: LabState, traffic: Traffic, expected: str | None, timeout: float = STABLE_TIMEOUT
) -> tuple[str, Sample, dict[str, dict[str, Any] | None]]:
    """Wait for one VIP holder (`expected`, if given) that alone says MASTER, and a good answer through
    the VIP since; returns (holder, that answer, the VRRP instance of each balancer, None: no answer)."""
    deadline = time.monotonic() + timeout
    since: float | None = None
    why = "not checked yet"
    while True:
        holders = control.vip_holders(st)
        instances: dict[str, dict[str, Any] | None] = {}
        if len(holders) == 1 and expected in (None, holders[0]):
            instances = vrrp_instances(st)
            states = {name: (inst or {}).get("state") for name, inst in instances.items()}
            masters = [name for name, state in states.items() if state == "MASTER"]
            if masters == holders:
                since = since if since is not None else time.monotonic()
                answer = traffic.wait_ok(since, 0.2)
                if answer is not None:
                    return holders[0], answer, instances
                why = f"{holders[0]} is MASTER, but no request through the VIP has succeeded yet"
            else:
                since = None
                why = "VRRP states " + ", ".join(f"{n}={s or 'no answer'}" for n, s in states.items())
        else:
            since = None
            who = ", ".join(holders) or "nobody"
            why = f"the VIP is held by {who}" + (f" (waiting for {expected})" if expected else "")
            if len(holders) > 1:
                why += " -- a frozen master keeps the VIP until thawed, or the balancers are partitioned"
        if time.monotonic() > deadline:
            raise LabError(f"the cluster did not become stable within {timeout:.0f}s: {why}")
        time.sleep(0.05)


# --- a run -------------------------------------------------------------------------------------------------
def run(
    prefix: str,
    rounds: int,
    rate: float = 20.0,
    connect_timeout: float = 0.25,
    timeout: float = 1.0,
    echo: Echo = lambda _: None,
    stable_timeout: float = STABLE_TIMEOUT,
    rng: random.Random | None = None,
) -> FailoverReport:
    """Kill the VIP holder `rounds` times under traffic; see the module docstring."""
    rng = rng or random.Random()
    control.require_root()
    st = control.lab_state(prefix)
    if not st.options.get("vrrp", True):
        raise LabError(f"lab {prefix} runs without VRRP (up --no-vrrp): there is no VIP to fail over")
    lbs = st.topology.by_role("lb")
    if len(lbs) < 2:
        raise LabError(f"failover needs two balancers or more; lab {prefix} has {len(lbs)}")
    if rounds < 1 or rate <= 0:
        raise LabError("--rounds must be >= 1 and --rate > 0")
    interval = float(st.options.get("advert_interval", 1.0))
    takeover_timeout = 5.0 + 10 * interval
    macs = {mac: lb.name for lb in lbs if (mac := netns.link_mac(lb.namespace)) is not None}
    client = st.topology.host("client").namespace
    report = FailoverReport(prefix, st.topology.vip, interval, None, rate, connect_timeout)
    traffic = Traffic(st, rate, connect_timeout, timeout)
    down: str | None = None  # a node this run killed and has not started again
    try:
        holder, _, instances = wait_stable(st, traffic, None, stable_timeout)
        for number in range(1, rounds + 1):
            backups = [lb.name for lb in lbs if lb.name != holder]
            if report.master_down_interval is None:
                downs = [(instances[n] or {}).get("master_down_interval") for n in backups]
                report.master_down_interval = min((d for d in downs if d is not None), default=None)
            time.sleep(rng.uniform(0.0, interval))  # kill at a random point of the advert cycle
            watch = VipWatch(st, backups)
            killed_at = time.monotonic()
            control.kill(prefix, holder)
            down = holder
            answer = traffic.wait_ok(killed_at, takeover_timeout)
            watch.stop()
            answered_by = macs.get(neighbour_mac(client, st.topology.vip) or "")
            holders_now = control.vip_holders(st)
            restarted_at = time.monotonic()
            control.start(prefix, holder)
            down = None
            back_holder, back, instances = wait_stable(st, traffic, holder, stable_timeout)
            traffic.wait_settled(back.seq, timeout + 1.0)  # the round's failures all end before the next
            samples = traffic.snapshot()
            first, failed = takeover_of(samples, killed_at)
            result = RoundResult(
                round=number,
                killed=holder,
                takeover=round(first.end - killed_at, 4) if first is not None else None,
                vip_moved=round(watch.at - killed_at, 4) if watch.at is not None else None,
                failed=failed,
                new_holder=watch.holder or (holders_now[0] if len(holders_now) == 1 else None),
                answered_by=answered_by if answer is not None else None,
                backend=first.body if first is not None else None,
                restore=round(back.end - restarted_at, 4),
                failed_restore=failed_between(samples, first.end if first else killed_at, back.end),
            )
            report.rounds.append(result)
            echo(_round_line(result))
            holder = back_holder
    finally:
        traffic.close()
        if down is not None:
            with contextlib.suppress(LabError):
                echo(f"starting {down} again (the run was interrupted after killing it)")
                control.start(prefix, down)
    return report


def _round_line(r: RoundResult) -> str:
    if r.takeover is None:
        return f"round {r.round}: killed {r.killed}: NO answer through the VIP in time ({r.failed} failed)"
    moved = f"VIP on {r.new_holder} after {r.vip_moved:.3f}s, " if r.vip_moved is not None else ""
    return (
        f"round {r.round}: killed {r.killed}: {moved}first answer after {r.takeover:.3f}s "
        f"via {r.answered_by} ({r.backend}), {r.failed} failed; {r.killed} back as master in "
        f"{r.restore:.1f}s ({r.failed_restore} failed)"
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: FailoverReport) -> Any:
    """The per-round table and the summary, as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=f"SIGKILL of the VIP holder: lab {report.prefix}, advert {report.advert_interval:g}s, "
        f"{report.rate:g} req/s",
        caption="seconds after the kill (restore: after `start`)",
        title_justify="left",
        caption_justify="left",
    )
    headers = (
        "round",
        "killed",
        "VIP\nmoved",
        "take-\nover",
        "failed",
        "answered\nby",
        "restore",
        "failed\nrestore",
    )
    for header in headers:
        table.add_column(header, justify="left" if header in ("killed", "answered\nby") else "right")
    for r in report.rounds:
        by = f"{r.answered_by or '?'}>{r.backend}" if r.takeover is not None else "none"
        table.add_row(
            str(r.round), r.killed, _fmt(r.vip_moved), _fmt(r.takeover), str(r.failed), by,
            _fmt(r.restore, 2), str(r.failed_restore),
        )  # fmt: skip
    s = summarize(report.rounds)
    mdi = report.master_down_interval
    lines = [
        f"takeover p50 {_fmt(s['takeover']['p50'])}s, max {_fmt(s['takeover']['max'])}s "
        f"(VIP moved: p50 {_fmt(s['vip_moved']['p50'])}s; master_down_interval {_fmt(mdi)}s)",
        f"failed requests p50 {_fmt(s['failed']['p50'], 1)}, max {_fmt(s['failed']['max'], 0)} "
        f"({report.rate:g} req/s, connect timeout {report.connect_timeout:g}s)",
    ]
    if s["no_takeover"]:
        lines.append(f"{s['no_takeover']} round(s) got NO answer through the VIP in time")
    return Group(table, Text("\n".join(lines)))
