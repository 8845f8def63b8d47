"""Sticky sessions and rate limits across two real `halb serve` processes on loopback sharing one real Redis.

How this works: node A and node B (one proxy worker each) front the same three demo backends and point
their `[state]` at one redis-server (tests/redis_servers.py, a free loopback port). A session started
through A reaching its backend through B is the failover property without VRRP (after a VIP move, the
other node serves the same cookies). Then: a down backend's sessions move and the mapping follows on both
nodes; draining (through the cluster API, so both nodes have Raft here) keeps existing sessions and takes
no new ones; one rate-limit budget for A+B, 429 with Retry-After; Redis frozen, killed and restarted under
load (zero 5xx, sessions still land by consistent hashing, status degraded, automatic recovery); and a
Sentinel failover under load. Figures go to the run's summary (`report`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Processes, free_port, report
from tests.integration.replies import Reply, read_reply
from tests.redis_servers import RedisProcess, RedisServers, SentinelTopology, sync_client
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SECRET = "sticky-integration-secret-0123"
TOKEN = "sticky-integration-token-0123"
STATE_TIMING = "call_timeout = 0.25\nping_interval = 0.2\nopen_min = 0.2\nopen_max = 1.0\n"


# --- a small HTTP/1.1 client (asyncio, keep-alive) ---------------------------------------------------------
class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str = "/", cookie: str | None = None) -> Reply:
        started = time.monotonic()
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        extra = f"Cookie: HALBSID={cookie}\r\n" if cookie else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())
        try:
            reply = await read_reply(reader, started)
        except BaseException:
            self.close()
            raise
        if reply.headers.get("connection", "").lower() == "close":
            self.close()
        return reply

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].transport.abort()
            self.streams = None


async def fetch(port: int, path: str = "/", cookie: str | None = None) -> Reply:
    conn = Conn(port)
    try:
        return await conn.get(path, cookie)
    finally:
        conn.close()


def get_json(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


# --- two nodes, three backends, one Redis -------------------------------------------------------------------
@dataclass
class Rig:
    processes: Processes
    tmp_path: Path
    state: str  # the [state] table's body
    cluster: bool = False
    names: tuple[str, ...] = ("A", "B")
    webs: dict[str, int] = field(default_factory=lambda: {f"web{i}": free_port() for i in (1, 2, 3)})
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.admin = {n: free_port() for n in self.names}
        self.listen = {n: free_port() for n in self.names}
        self.raft = {n: free_port() for n in self.names}

    def config(self, name: str) -> str:
        backends = ", ".join(f'{{ name = "{w}", address = "127.0.0.1:{p}" }}' for w, p in self.webs.items())
        text = f"""
[node]
name = "{name}"
admin = "127.0.0.1:{self.admin[name]}"
drain_timeout = 1.0

[[listeners]]
name = "web"
bind = "127.0.0.1:{self.listen[name]}"
pool = "app"
ratelimits = ["api"]

[pools.app]
backends = [{backends}]
health = {{ kind = "http", path = "/healthz", interval = 0.2, timeout = 0.15, rise = 1, fall = 1 }}
sticky = {{ mode = "cookie", ttl = 600 }}

[state]
{self.state}
[ratelimits.api]
paths = ["/api/"]
rate = 1
burst = 10
"""
        if self.cluster:
            peers = ", ".join(f'"127.0.0.1:{self.raft[n]}"' for n in self.names if n != name)
            text += f"""
[cluster]
address = "127.0.0.1:{self.raft[name]}"
peers = [{peers}]
secret = "{SECRET}"
token = "{TOKEN}"
data_dir = "{self.tmp_path / "raft" / name}"
"""
        return text

    def start(self) -> Rig:
        for web, port in self.webs.items():
            self.procs[web] = self.processes.backend(web, port)
        for name in self.names:
            path = self.tmp_path / f"{name}.toml"
            path.write_text(self.config(name))
            self.procs[name] = self.processes.start("serve", str(path), "--log-level", "INFO", log_name=name)
        for name in self.names:
            wait_for(lambda n=name: self.healthy(n), 30, f"node {name} healthy")
        return self

    def healthy(self, name: str) -> bool:
        if self.procs[name].poll() is not None:
            raise AssertionError(f"node {name} exited: {self.log(name)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin[name]}/healthz", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    def status(self, name: str) -> dict[str, Any]:
        return get_json(self.admin[name], "/status")

    def metrics(self, name: str) -> str:
        return (
            urllib.request.urlopen(f"http://127.0.0.1:{self.admin[name]}/metrics", timeout=2).read().decode()
        )

    def halb_status(self, name: str, columns: int) -> str:
        """What `halb status` prints for node `name` on a terminal `columns` wide."""
        return subprocess.run(
            ["python", "-m", "halb", "status", "--admin", f"127.0.0.1:{self.admin[name]}"],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "COLUMNS": str(columns)},
        ).stdout

    def store_state(self, name: str) -> str:
        return str(self.status(name)["state"]["state"])

    def backend_up(self, name: str, web: str) -> bool:
        (pool,) = self.status(name)["pools"]
        return bool(next(b for b in pool["backends"] if b["name"] == web)["healthy"])

    def kill_web(self, web: str) -> None:
        os.killpg(self.procs[web].pid, signal.SIGKILL)
        self.procs[web].wait(5)

    def start_web(self, web: str) -> None:
        self.procs[web] = self.processes.backend(web, self.webs[web])

    def log(self, name: str) -> str:
        return Path(self.procs[name].log_path).read_text()  # type: ignore[attr-defined]

    def port(self, name: str) -> int:
        return self.listen[name]

    async def sessions(self, n: int, through: str = "A") -> dict[str, str]:
        """n new cookie sessions started through one node: {session id: backend}."""
        out = {}
        for _ in range(n):
            reply = await fetch(self.port(through))
            assert reply.status == 200 and reply.cookie is not None
            out[reply.cookie] = reply.backend
        return out


def redis_state(server: RedisProcess) -> str:
    return f'url = "{server.url}"\n{STATE_TIMING}'


@pytest.fixture
def rig(processes: Processes, redis_servers: RedisServers, tmp_path: Path) -> Rig:
    redis = redis_servers.server()
    r = Rig(processes, tmp_path, redis_state(redis))
    r.redis = redis  # type: ignore[attr-defined]
    return r.start()


# --- tests ------------------------------------------------------------------------------------------------
def test_a_session_started_on_a_reaches_its_backend_through_b(rig: Rig) -> None:
    async def main() -> None:
        sessions = await rig.sessions(60, through="A")
        assert set(sessions.values()) == {"web1", "web2", "web3"}  # new sessions spread by the policy
        b = Conn(rig.port("B"))
        same = sum([(await b.get(cookie=sid)).backend == web for sid, web in sessions.items()])
        b.close()
        report(
            "sticky sessions", f"started on node A, served by node B: {same}/{len(sessions)} on their backend"
        )
        assert same == len(sessions)

    asyncio.run(main())
    with sync_client(rig.redis.port) as c:  # type: ignore[attr-defined]
        keys = c.keys("halb:s:app:*")
        assert len(keys) == 60
        assert 590 <= c.ttl(keys[0]) <= 600  # the TTL slides on use


def test_a_down_backends_sessions_move_and_the_mapping_follows(rig: Rig) -> None:
    async def main() -> None:
        sessions = await rig.sessions(30, through="A")
        on_web1 = [sid for sid, web in sessions.items() if web == "web1"]
        assert on_web1
        rig.kill_web("web1")
        for name in rig.names:
            wait_for(lambda n=name: not rig.backend_up(n, "web1"), 5, f"{name} sees web1 down")
        moved = {sid: (await fetch(rig.port("A"), cookie=sid)).backend for sid in on_web1}
        assert all(web in ("web2", "web3") for web in moved.values())
        rig.start_web("web1")  # back up: the moved sessions stay where they moved
        for name in rig.names:
            wait_for(lambda n=name: rig.backend_up(n, "web1"), 5, f"{name} sees web1 up")
        through_b = {sid: (await fetch(rig.port("B"), cookie=sid)).backend for sid in on_web1}
        assert through_b == moved  # the mapping followed, in Redis, for both nodes
        others = {sid: web for sid, web in sessions.items() if web != "web1"}
        assert {sid: (await fetch(rig.port("B"), cookie=sid)).backend for sid in others} == others
        report("sticky sessions", f"web1 down: {len(on_web1)} sessions moved, mapping followed on node B")

    asyncio.run(main())


def test_draining_keeps_existing_sessions_and_takes_no_new_ones(
    processes: Processes, redis_servers: RedisServers, tmp_path: Path
) -> None:
    rig = Rig(processes, tmp_path, redis_state(redis_servers.server()), cluster=True).start()

    async def main() -> None:
        sessions = await rig.sessions(12, through="A")
        on_web2 = [sid for sid, web in sessions.items() if web == "web2"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{rig.admin['B']}/api/pools/app/backends/web2",
            data=json.dumps({"draining": True}).encode(),
            method="PUT",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

        def drained(name: str) -> bool:
            (pool,) = rig.status(name)["pools"]
            return bool(next(b for b in pool["backends"] if b["name"] == "web2")["draining"])

        for name in rig.names:
            wait_for(lambda n=name: drained(n), 10, f"{name} drains web2")
        await asyncio.sleep(0.2)  # the workers got the new state
        for name in rig.names:
            for sid in on_web2:
                assert (await fetch(rig.port(name), cookie=sid)).backend == "web2"  # existing sessions stay
        fresh = [(await fetch(rig.port(n))).backend for n in rig.names for _ in range(10)]
        assert "web2" not in fresh and set(fresh) == {"web1", "web3"}  # no new sessions

    asyncio.run(main())


def test_one_rate_limit_budget_for_both_nodes(rig: Rig) -> None:
    async def main() -> None:
        a, b = Conn(rig.port("A")), Conn(rig.port("B"))
        started = time.monotonic()
        replies = []
        for _ in range(20):
            replies.append(await a.get("/api/x"))
            replies.append(await b.get("/api/x"))
        elapsed = time.monotonic() - started
        a.close()
        b.close()
        allowed = sum(r.status == 200 for r in replies)
        refused = [r for r in replies if r.status == 429]
        assert allowed + len(refused) == 40
        budget = 10 + elapsed * 1  # burst 10 + 1/s, shared: per-node buckets would allow ~20
        assert 10 <= allowed <= budget + 1
        assert all(r.headers.get("retry-after") == "1" for r in refused)
        assert 'rate limit "api" exceeded' in refused[0].body
        assert (await fetch(rig.port("A"), "/other")).status == 200  # /api/ only
        report(
            "rate limits",
            f"token bucket 1/s burst 10 across 2 nodes: {allowed}/40 allowed in {elapsed:.2f}s, "
            f"{len(refused)} x 429 with Retry-After",
        )

    asyncio.run(main())
    time.sleep(0.4)  # a stats report
    counts = [rig.status(n)["state"]["ratelimits"]["api"] for n in rig.names]
    assert sum(c["limited"] for c in counts) >= 20 and all(c["local"] == 0 for c in counts)
    metrics = rig.metrics("A")
    assert 'halb_ratelimit_requests_total{node="A",result="limited",rule="api"}' in metrics


# --- Redis failures under load ------------------------------------------------------------------------------
@dataclass
class Load:
    """Clients looping over known sessions through both nodes, recording every answer."""

    rig: Rig
    sessions: dict[str, str]
    clients: int = 8
    results: list[tuple[float, int, bool, float]] = field(default_factory=list)  # (t, status, landed, secs)
    errors: list[str] = field(default_factory=list)
    stop: bool = False

    async def client(self, index: int) -> None:
        items = list(self.sessions.items())
        conns = [Conn(self.rig.port(n)) for n in self.rig.names]
        i = index
        while not self.stop:
            sid, web = items[i % len(items)]
            conn = conns[i % 2]
            i += 1
            try:
                reply = await conn.get(cookie=sid)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.errors.append(repr(exc))
                await asyncio.sleep(0.01)
                continue
            self.results.append((time.monotonic(), reply.status, reply.backend == web, reply.seconds))
        for conn in conns:
            conn.close()

    async def run(self, script: Any) -> None:
        tasks = [asyncio.create_task(self.client(i)) for i in range(self.clients)]
        try:
            await script()
        finally:
            self.stop = True
            await asyncio.gather(*tasks)

    def window(self, start: float, end: float) -> list[tuple[float, int, bool, float]]:
        return [r for r in self.results if start <= r[0] < end]


def summary(rows: list[tuple[float, int, bool, float]]) -> str:
    if not rows:
        return "no requests"
    landed = sum(r[2] for r in rows)
    secs = sorted(r[3] for r in rows)
    p99 = secs[min(len(secs) - 1, int(len(secs) * 0.99))]
    return (
        f"{len(rows)} requests, {landed / len(rows):.1%} on their backend, "
        f"p99 {p99 * 1000:.1f} ms, max {secs[-1] * 1000:.0f} ms"
    )


def test_redis_frozen_killed_and_restarted_under_load(rig: Rig) -> None:
    redis: RedisProcess = rig.redis  # type: ignore[attr-defined]
    marks: dict[str, float] = {}
    states: dict[str, list[str]] = {}

    async def main() -> None:
        sessions = await rig.sessions(40, through="A")
        sessions.update(await rig.sessions(40, through="B"))
        load = Load(rig, sessions)

        async def script() -> None:
            loop = asyncio.get_running_loop()

            def status_of_both() -> list[str]:
                return [rig.store_state(n) for n in rig.names]

            await asyncio.sleep(1.0)
            marks["stop"] = time.monotonic()
            redis.stop()  # SIGSTOP: connections hang, nothing answers (the worst case)
            await asyncio.sleep(1.5)
            states["frozen"] = await loop.run_in_executor(None, status_of_both)
            redis.cont()
            marks["cont"] = time.monotonic()
            await asyncio.sleep(1.5)
            marks["kill"] = time.monotonic()
            redis.kill()  # SIGKILL: the port refuses
            await asyncio.sleep(1.5)
            states["killed"] = await loop.run_in_executor(None, status_of_both)
            marks["restart"] = time.monotonic()
            await loop.run_in_executor(None, redis.start)  # same port, empty: every mapping is gone
            started = time.monotonic()
            while await loop.run_in_executor(None, status_of_both) != ["ok", "ok"]:
                assert time.monotonic() - started < 10, "no recovery"
                await asyncio.sleep(0.05)
            marks["recovered"] = time.monotonic()
            await asyncio.sleep(1.0)
            marks["end"] = time.monotonic()

        await load.run(script)
        rows = load.results
        assert not load.errors, load.errors[:5]
        statuses = Counter(r[1] for r in rows)
        assert set(statuses) == {200}, statuses  # zero 5xx (and nothing else either)
        frozen = load.window(marks["stop"], marks["cont"])
        killed = load.window(marks["kill"], marks["restart"])
        after = load.window(marks["recovered"], marks["end"])
        # No request waits on a frozen Redis longer than call_timeout (0.25 s) plus the proxying.
        assert max(r[3] for r in frozen) < 0.25 + 0.25
        # Sessions still land: the minted ids hash to their backend, so the ring agrees with the store.
        for rows_ in (frozen, killed, after):
            assert rows_ and sum(r[2] for r in rows_) / len(rows_) >= 0.99
        report("redis down under load", f"SIGSTOP 1.5 s: {summary(frozen)}")
        report("redis down under load", f"SIGKILL 1.5 s: {summary(killed)}")
        report(
            "redis down under load",
            f"restarted empty: status ok {marks['recovered'] - marks['restart']:.2f}s after the restart; "
            f"then {summary(after)}; total {len(rows)} requests, 0 x 5xx",
        )

    asyncio.run(main())
    assert states["frozen"] == ["degraded", "degraded"] and states["killed"] == ["degraded", "degraded"]
    doc = rig.status("A")["state"]
    assert doc["fallback_decisions_total"] > 0 and doc["errors_total"] > 0
    metrics = rig.metrics("A")
    assert 'halb_state_degraded{backend="redis",node="A"} 0.0' in metrics
    out = rig.halb_status("B", 200)
    assert "store redis" in out and " ok " in out


def test_halb_status_says_degraded(rig: Rig) -> None:
    asyncio.run(rig.sessions(3))
    rig.redis.kill()  # type: ignore[attr-defined]
    asyncio.run(rig.sessions(3))  # requests notice at once; the ping notices within ping_interval
    wait_for(lambda: rig.store_state("A") == "degraded", 5, "A degraded")
    out = rig.halb_status("A", 250)
    assert "DEGRADED (1/1 workers)" in out and "sticky by consistent hash, rate limits per node" in out
    metrics = rig.metrics("A")
    assert 'halb_state_degraded{backend="redis",node="A"} 1.0' in metrics


def test_sentinel_failover_under_load(
    processes: Processes, redis_servers: RedisServers, sentinel_topology: SentinelTopology, tmp_path: Path
) -> None:
    topo = sentinel_topology
    sentinels = ", ".join(f'"127.0.0.1:{p}"' for _, p in topo.addresses)
    state = f'sentinels = [{sentinels}]\nservice_name = "{topo.service}"\n{STATE_TIMING}'
    rig = Rig(processes, tmp_path, state).start()
    marks: dict[str, float] = {}

    async def main() -> None:
        sessions = await rig.sessions(30, through="A")
        sessions.update(await rig.sessions(30, through="B"))
        await asyncio.sleep(0.3)  # replication of the last writes
        load = Load(rig, sessions)

        async def script() -> None:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(1.0)
            marks["kill"] = time.monotonic()
            topo.master.kill()
            started = time.monotonic()
            while await loop.run_in_executor(None, topo.master_port) != topo.replica.port:
                assert time.monotonic() - started < 15, "no sentinel failover"
                await asyncio.sleep(0.05)
            marks["promoted"] = time.monotonic()
            while [await loop.run_in_executor(None, rig.store_state, n) for n in rig.names] != ["ok", "ok"]:
                assert time.monotonic() - started < 20, "halb did not follow the failover"
                await asyncio.sleep(0.05)
            marks["followed"] = time.monotonic()
            await asyncio.sleep(1.0)
            marks["end"] = time.monotonic()

        await load.run(script)
        assert not load.errors, load.errors[:5]
        assert {r[1] for r in load.results} == {200}  # zero 5xx through the failover
        after = load.window(marks["followed"], marks["end"])
        assert after and sum(r[2] for r in after) == len(after)
        with sync_client(topo.replica.port) as c:  # the new master took the writes
            assert len(c.keys("halb:s:app:*")) >= 55
        report(
            "sentinel failover under load (loopback)",
            f"master SIGKILLed: promoted after {marks['promoted'] - marks['kill']:.2f}s, both nodes ok again "
            f"{marks['followed'] - marks['kill']:.2f}s after the kill; {summary(load.results)}; 0 x 5xx",
        )

    asyncio.run(main())


def test_metrics_and_status_show_sticky_decisions(rig: Rig) -> None:
    async def main() -> None:
        sessions = await rig.sessions(5)
        for sid in sessions:
            await fetch(rig.port("B"), cookie=sid)

    asyncio.run(main())
    time.sleep(0.4)
    a, b = rig.status("A")["state"], rig.status("B")["state"]
    assert a["sticky"]["app"]["new"] == 5 and a["sticky"]["app"]["cookies_issued"] == 5
    assert b["sticky"]["app"]["store"] == 5
    assert (a["backend"], a["state"], a["degraded_workers"]) == ("redis", "ok", 0)
    assert a["target"] == rig.redis.url  # type: ignore[attr-defined]
    metrics = rig.metrics("B")
    assert 'halb_sticky_decisions_total{node="B",pool="app",source="store"} 5.0' in metrics
