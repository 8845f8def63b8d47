"""Shared fixtures: real processes on loopback, always cleaned up."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_servers import RedisServers, SentinelTopology, make_sentinel_topology

log = logging.getLogger(__name__)

REPORT: dict[str, list[str]] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0, proc=None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class Processes:
    """Starts processes and guarantees they are gone at teardown, pass or fail."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log_name: str | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"{log_name or 'proc'}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "halb", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        self.procs.append(proc)
        return proc

    def backend(self, name: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
        proc = self.start("demo-backend", name, "--listen", f"127.0.0.1:{port}", *extra, log_name=name)
        wait_port(port, proc=proc)
        return proc

    def node(self, config_text: str, admin_port: int, name: str = "node") -> subprocess.Popen[bytes]:
        path = self.tmp_path / f"{name}.toml"
        path.write_text(config_text)
        proc = self.start("serve", str(path), "--log-level", "INFO", log_name=name)
        deadline = time.monotonic() + 20
        import urllib.request

        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"halb serve exited {proc.returncode}: {Path(proc.log_path).read_text()}")  # type: ignore[attr-defined]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=0.5) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("halb serve did not become healthy")

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.cleanup()


def report(section: str, line: str) -> None:
    """Record a measured figure; printed at the end of the run (pytest's terminal summary)."""
    REPORT.setdefault(section, []).append(line)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    for section, lines in REPORT.items():
        terminalreporter.section(section)
        for line in lines:
            terminalreporter.write_line(line)


# --- Redis: shared by tests/state and tests/integration (processes: tests/redis_servers.py) ---------
@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[RedisServers]:
    servers = RedisServers(tmp_path)
    try:
        yield servers
    finally:
        servers.cleanup()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the whole session: a container if Docker answers, else a local redis-server process."""
    container = None
    try:
        from testcontainers.community.redis import RedisContainer

        container = RedisContainer("redis:7-alpine")
        container.start()
    except Exception as exc:  # docker.errors.DockerException without an engine; ImportError without the extra
        log.info("no Docker engine (%s): using a redis-server process", type(exc).__name__)
        container = None
    if container is not None:
        try:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        finally:
            container.stop()
        return
    servers = RedisServers(tmp_path_factory.mktemp("redis"))
    try:
        yield servers.server().url
    finally:
        servers.cleanup()


@pytest.fixture
def sentinel_topology(redis_servers: RedisServers) -> SentinelTopology:
    """A master, one replica and one sentinel (quorum 1, down-after 400 ms), all on loopback."""
    return make_sentinel_topology(redis_servers)
