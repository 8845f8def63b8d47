"""Sticky sessions across a VIP failover, and the lab's Redis killed under load. Needs root.

How this works: one lab per module (`--lbs 2 --witness --backends 3 --advert-interval 0.1`); the generator
(halb.cluster_config) gives every balancer `[state] url = "redis://10.99.0.200:6379/0"` and cookie
stickiness on the pool. 200 clients in the client namespace (asyncio, in a thread that joined the
namespace) each start a cookie session through the VIP, then keep requesting with their cookie on fresh
connections while the test SIGKILLs the VIP holder (lb1): after lb2 has taken the VIP over, every
session must still reach its backend (the mapping is in Redis, and the ids hash to their backends).
Then the lab's Redis is SIGKILLed under the same load: no 5xx, the balancers say "degraded", and after
`halb lab start redis` they recover by themselves. Last, a second lab with `--sentinel` (a replica redis2
and a Sentinel host; the balancers' [state] names the Sentinel): the master is SIGKILLed under load, the
Sentinel promotes redis2, and the balancers follow it without a restart. Figures go to the run's summary.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from halb.lab.netns import in_netns
from tests.conftest import report
from tests.lab.test_lab import Lab, running_lab, wait_for

pytestmark = pytest.mark.lab

PREFIX = f"hs{os.getpid() % 1000}"
SENTINEL_PREFIX = f"hz{os.getpid() % 1000}"
SENTINEL = "10.99.0.210"
REDIS2 = "10.99.0.201"
VIP = "10.99.0.100"
LB1, LB2 = "10.99.0.11", "10.99.0.12"
CLIENTS = 200


def holders(lab: Lab) -> list[str]:
    return list(lab.status()["vip_holders"])


def store_state(lab: Lab, address: str) -> str:
    code, body = lab.get(address, 9901, "/status")
    assert code == 200
    return str(json.loads(body)["state"]["state"])


# --- the clients (they run inside the client namespace) ----------------------------------------------------
def sentinel_view(lab: Lab) -> tuple[str, list[dict[str, str]]]:
    """(the master's address, its replicas) as the lab's Sentinel sees them (asked from the client)."""

    def ask() -> tuple[str, list[dict[str, str]]]:
        import redis

        with redis.Redis(host=SENTINEL, port=26379, socket_timeout=1, decode_responses=True) as c:
            master = c.sentinel_get_master_addr_by_name("halb")
            return str(master[0]), list(c.sentinel_slaves("halb"))

    return in_netns(lab.ns("client"), ask)


async def http_get(host: str, cookie: str | None, timeout: float = 1.0) -> tuple[int, str, str | None]:
    """(status, body, new session id) of one GET on a fresh connection."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, 80), 0.3)
    try:
        extra = f"Cookie: HALBSID={cookie}\r\n" if cookie else ""
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    new = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "set-cookie":
            new = value.strip().split(";", 1)[0].split("=", 1)[1]
    return int(lines[0].split()[1]), body.decode().strip(), new


@dataclass
class Clients:
    """CLIENTS sessions through the VIP and a loop that keeps using them, stoppable from another thread."""

    lab: Lab
    sessions: dict[str, str] = field(default_factory=dict)  # session id -> backend
    # (monotonic time, session id, status or 0 for a failed exchange, body)
    results: list[tuple[float, str, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start_sessions(self) -> None:
        async def main() -> None:
            replies = await asyncio.gather(*(http_get(VIP, None) for _ in range(CLIENTS)))
            for status, body, sid in replies:
                assert status == 200 and sid is not None
                self.sessions[sid] = body

        in_netns(self.lab.ns("client"), asyncio.run, main())
        assert len(self.sessions) == CLIENTS

    async def _loop(self, sid: str) -> None:
        while not self.stop.is_set():
            try:
                status, body, _ = await http_get(VIP, sid)
            except (OSError, TimeoutError, IndexError, ValueError):
                status, body = 0, ""
            self.results.append((time.monotonic(), sid, status, body))
            await asyncio.sleep(0.2)

    def run_in_background(self) -> None:
        async def main() -> None:
            await asyncio.gather(*(self._loop(sid) for sid in self.sessions))

        self.stop.clear()
        self.results = []
        self.thread = threading.Thread(
            target=in_netns, args=(self.lab.ns("client"), asyncio.run, main()), kwargs={"timeout": 300}
        )
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
            assert not self.thread.is_alive()

    def after(self, t: float) -> list[tuple[float, str, int, str]]:
        return [r for r in self.results if r[0] >= t]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(PREFIX, "--witness", "--backends", "3", "--advert-interval", "0.1") as running:
        wait_for(lambda: holders(running) == ["lb1"], timeout=5, what="lb1 to hold the VIP")
        yield running


@pytest.fixture(scope="module")
def clients(lab: Lab) -> Clients:
    c = Clients(lab)
    c.start_sessions()
    return c


@pytest.fixture
def settled(lab: Lab, clients: Clients) -> Iterator[None]:
    """After each test on the shared lab: clients stopped, lb1 and redis running, lb1 holding the VIP."""
    yield
    clients.halt()
    for host in ("lb1", "redis"):
        if lab.host_state(host) == "stopped":
            lab("start", host)
    wait_for(lambda: holders(lab) == ["lb1"], timeout=10, what="lb1 to hold the VIP again")


@pytest.mark.usefixtures("settled")
def test_sessions_survive_the_vip_holder_dying(lab: Lab, clients: Clients) -> None:
    assert set(clients.sessions.values()) == {"web1", "web2", "web3"}  # the policy spread them
    clients.run_in_background()
    time.sleep(1.0)
    killed = time.monotonic()
    lab("kill", "lb1")
    wait_for(lambda: holders(lab) == ["lb2"], timeout=5, what="lb2 to take the VIP")
    took_over = time.monotonic()
    time.sleep(1.5)  # every client made several requests through lb2
    clients.halt()
    after = clients.after(took_over + 0.3)  # (the client's ARP entry follows lb2's GARP)
    answered = {sid for _, sid, status, _ in after if status == 200}
    wrong = {sid for _, sid, status, body in after if status == 200 and body != clients.sessions[sid]}
    kept = len(answered - wrong)
    statuses = Counter(status for _, _, status, _ in clients.results)
    gap = [r for r in clients.results if killed <= r[0] < took_over + 0.3 and r[2] != 200]
    report(
        "sticky sessions across a VIP failover (lab)",
        f"{kept}/{CLIENTS} sessions still on their backend after lb1 was SIGKILLed and lb2 took the VIP "
        f"(seen on lb2 {took_over - killed:.2f}s after the kill); {len(after)} requests after; "
        f"failed in the gap: {len(gap)}; 5xx in total: {sum(n for s, n in statuses.items() if s >= 500)}",
    )
    assert answered == set(clients.sessions)  # every client got through lb2
    assert kept == CLIENTS  # goal 100%
    assert not any(s >= 500 for s in statuses)


@pytest.mark.usefixtures("settled")
def test_lab_redis_killed_under_load(lab: Lab, clients: Clients) -> None:
    clients.run_in_background()
    time.sleep(1.0)
    killed = time.monotonic()
    lab("kill", "redis")
    wait_for(lambda: store_state(lab, LB1) == "degraded", timeout=5, what="lb1 to say degraded")
    degraded_after = time.monotonic() - killed
    time.sleep(1.0)
    restarted = time.monotonic()
    lab("start", "redis")
    wait_for(lambda: store_state(lab, LB1) == "ok", timeout=10, what="lb1 to recover")
    recovered_after = time.monotonic() - restarted
    time.sleep(0.5)
    clients.halt()
    statuses = Counter(status for _, _, status, _ in clients.results)
    landed = sum(body == clients.sessions[sid] for _, sid, status, body in clients.results if status == 200)
    during = [r for r in clients.results if killed <= r[0] < restarted]
    report(
        "lab redis killed under load",
        f"{len(clients.results)} requests ({len(during)} while Redis was down): statuses {dict(statuses)}; "
        f"{landed / max(1, statuses[200]):.1%} on their backend; lb1 said degraded {degraded_after:.2f}s "
        f"after the kill, ok {recovered_after:.2f}s after the restart",
    )
    assert set(statuses) == {200}  # no 5xx, no failed exchange
    assert landed == statuses[200]
    # lb2 carries no traffic (the VIP is on lb1): only its own store probe, on the circuit breaker's
    # backed-off schedule, finds Redis back, so it may take longer than lb1; it must get there alone.
    wait_for(lambda: store_state(lab, LB2) == "ok", timeout=10, what="lb2 to recover")


def test_sentinel_failover_in_the_lab_under_load() -> None:
    with running_lab(SENTINEL_PREFIX, "--sentinel", "--advert-interval", "0.1") as lab:
        wait_for(lambda: holders(lab) == ["lb1"], timeout=5, what="lb1 to hold the VIP")

        def replica_known() -> bool:
            _, replicas = sentinel_view(lab)
            return any(r["ip"] == REDIS2 and r["master-link-status"] == "ok" for r in replicas)

        wait_for(replica_known, timeout=20, what="the sentinel to see redis2 in sync")
        clients = Clients(lab)
        clients.start_sessions()
        time.sleep(0.3)  # (replication of the last mappings)
        clients.run_in_background()
        try:
            time.sleep(1.0)
            killed = time.monotonic()
            lab("kill", "redis")
            wait_for(
                lambda: sentinel_view(lab)[0] == REDIS2, timeout=15, what="the sentinel to promote redis2"
            )
            promoted = time.monotonic() - killed
            for lb in (LB1, "10.99.0.12"):
                wait_for(lambda a=lb: store_state(lab, a) == "ok", timeout=15, what=f"{lb} to follow")
            followed = time.monotonic() - killed
            time.sleep(1.0)
        finally:
            clients.halt()
        statuses = Counter(status for _, _, status, _ in clients.results)
        landed = sum(
            body == clients.sessions[sid] for _, sid, status, body in clients.results if status == 200
        )
        report(
            "sentinel failover in the lab",
            f"master (redis) SIGKILLed under load: redis2 promoted {promoted:.2f}s after, both balancers ok "
            f"{followed:.2f}s after (no restart); {len(clients.results)} requests: {dict(statuses)}, "
            f"{landed / max(1, statuses[200]):.1%} on their backend",
        )
        assert set(statuses) == {200}
        assert landed == statuses[200]
        code, body = lab.get(LB1, 9901, "/status")
        assert code == 200 and json.loads(body)["state"]["backend"] == "sentinel"
