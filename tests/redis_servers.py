"""redis-server / redis-sentinel processes for tests: started on free loopback ports, always stopped.

How this works: `RedisServers` starts `redis-server` (and `redis-sentinel`) processes with no persistence
on free 127.0.0.1 ports; each `RedisProcess` can be killed (SIGKILL: the port refuses), stopped (SIGSTOP:
a black hole), continued and started again on the same port. `cleanup()` stops them all, pass or fail.
The fixtures built on these (`redis_url`, `redis_servers`, `sentinel_topology`) are in tests/conftest.py,
so the state tests, the integration tests and the benchmark helpers share them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.waiting import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def sync_client(port: int) -> redis.Redis:
    """A plain synchronous client for test setup and inspection (not the code under test)."""
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
    )


@dataclass
class RedisProcess:
    port: int
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log_file = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(self.args, stdout=log_file, stderr=subprocess.STDOUT)
        finally:
            log_file.close()
        deadline = time.monotonic() + 10
        while not redis_ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.args[0]} exited {self.proc.returncode}: {self.log_path.read_text()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.args[0]} on port {self.port} did not answer PING")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL and reap: the port refuses connections from now on."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a black hole)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


def _missing(what: str) -> None:
    """A missing Redis is a failure, never a skip: scripts/setup (the README's test command) installs it."""
    pytest.fail(what, pytrace=False)


class RedisServers:
    """redis-server / redis-sentinel processes on free loopback ports, all gone at cleanup()."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[RedisProcess] = []

    def server(self, *extra: str) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            _missing("redis-server not installed (apt-get install -y redis-server)")
        port = free_port()
        workdir = self.tmp / f"redis-{port}"
        workdir.mkdir(exist_ok=True)
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
            *extra,
        ]  # fmt: skip
        rp = RedisProcess(port, args, self.tmp / f"redis-{port}.log")
        self.procs.append(rp)
        rp.start()
        return rp

    def sentinel(self, master_port: int, service: str, down_after_ms: int = 400) -> RedisProcess:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            _missing("redis-sentinel not installed (apt-get install -y redis-sentinel)")
        port = free_port()
        conf = self.tmp / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.tmp}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} 4000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        rp = RedisProcess(port, [binary, str(conf)], self.tmp / f"sentinel-{port}.log")
        self.procs.append(rp)
        rp.start()
        return rp

    def cleanup(self) -> None:
        for rp in self.procs:
            rp.cleanup()


@dataclass
class SentinelTopology:
    master: RedisProcess
    replica: RedisProcess
    sentinels: list[RedisProcess]
    service: str

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def role(self, rp: RedisProcess) -> str:
        with sync_client(rp.port) as c:
            return str(c.execute_command("ROLE")[0])

    def master_port(self) -> int:
        """The master's port as the first sentinel currently sees it."""
        with sync_client(self.sentinels[0].port) as c:
            return int(c.sentinel_get_master_addr_by_name(self.service)[1])


def make_sentinel_topology(servers: RedisServers, service: str = "halbtest") -> SentinelTopology:
    """A master, one replica and one sentinel (quorum 1, down-after 400 ms), all on loopback.

    One sentinel keeps setup fast: several only need seconds of hello messages to find each other first;
    the client side of "several sentinels" is covered by giving the store a dead sentinel address too."""
    master = servers.server("--repl-diskless-sync-delay", "0")  # Redis 7 waits 5 s by default
    replica = servers.server("--replicaof", "127.0.0.1", str(master.port))
    with sync_client(replica.port) as c:
        wait_for(lambda: c.info("replication")["master_link_status"] == "up", 15, "replica in sync")
    sentinels = [servers.sentinel(master.port, service)]
    topo = SentinelTopology(master, replica, sentinels, service)

    def sentinels_ready() -> bool:
        for s in sentinels:
            with sync_client(s.port) as c:
                if c.sentinel_master(service)["num-other-sentinels"] != len(sentinels) - 1:
                    return False
                replicas = c.sentinel_slaves(service)
                if not any(
                    r["port"] == replica.port and not r["is_sdown"] and r["master-link-status"] == "ok"
                    for r in replicas
                ):
                    return False
        return True

    wait_for(sentinels_ready, 20, "sentinels see the replica and each other")
    return topo
