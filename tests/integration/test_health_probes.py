"""Probes, HealthChecker and AgentPoller against real asyncio servers on 127.0.0.1 ephemeral ports.

Every server is an async context manager and every checker/poller is stopped in a `finally`, so nothing
leaks when an assertion fails. Waiting is done by polling a condition against a deadline, never by fixed
sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from halb.config_model import AgentConfig, BackendConfig, HealthConfig, HostPort, PoolConfig
from halb.health.agent import AgentPoller
from halb.health.checker import HealthChecker
from halb.health.probes import http_probe, tcp_probe
from halb.health.tracker import SLOWSTART_FLOOR, Transition
from halb.pool import Pool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(10)]

LOCALHOST = "127.0.0.1"


def run(coro: Coroutine[Any, Any, None], limit: float = 5.0) -> None:
    asyncio.run(asyncio.wait_for(coro, limit))


class Server:
    """A tiny HTTP-ish server: reads one request head, then answers `response` (None = never answers)."""

    def __init__(self, response: bytes | None, close_without_answer: bool = False) -> None:
        self.response = response
        self.close_without_answer = close_without_answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._release = asyncio.Event()

    async def start(self, port: int = 0) -> Server:
        self._release = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, LOCALHOST, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            if self.close_without_answer:
                return
            with contextlib.suppress(Exception):
                self.requests.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0))
            if self.response is None:
                await self._release.wait()
                return
            writer.write(self.response)
            with contextlib.suppress(Exception):
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)
            self._handlers.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._release.set()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=1.0)
            self._server = None

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def http_response(status: int, body: bytes = b"ok", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    return head.encode() + body


async def wait_for(cond: Callable[[], bool], timeout: float = 2.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def make_pool(port: int, health: HealthConfig, slowstart: float = 0.0, **backend: Any) -> Pool:
    cfg = PoolConfig(
        name="web",
        backends=(BackendConfig(name="b1", address=HostPort(LOCALHOST, port), **backend),),
        algorithm="round_robin",
        health=health,
        slowstart=slowstart,
    )
    return Pool(cfg)


# --- probes ---------------------------------------------------------------------------------------------


def test_tcp_probe_open_and_closed(closed_port: int) -> None:
    async def main() -> None:
        async with Server(http_response(200)) as srv:
            ok = await tcp_probe(LOCALHOST, srv.port, 1.0)
            assert ok.ok and ok.detail == "connected" and 0 <= ok.duration < 1.0
        refused = await tcp_probe(LOCALHOST, closed_port, 1.0)
        assert not refused.ok and refused.detail == "connect refused"

    run(main())


def test_http_probe_200_and_request_shape() -> None:
    async def main() -> None:
        async with Server(http_response(200)) as srv:
            result = await http_probe(LOCALHOST, srv.port, "/healthz", 1.0, "app.example", (200, 399))
            assert result.ok and result.detail == "status 200"
            request = srv.requests[0].decode()
            assert request.startswith("GET /healthz HTTP/1.1\r\n")
            assert "\r\nHost: app.example\r\n" in request
            assert "\r\nConnection: close\r\n" in request
            assert "\r\nUser-Agent: halb-health/1\r\n" in request
            # default Host header: the backend address
            await http_probe(LOCALHOST, srv.port, "/", 1.0, "", (200, 399))
            assert f"\r\nHost: {LOCALHOST}:{srv.port}\r\n" in srv.requests[1].decode()

    run(main())


def test_http_probe_500_and_expect_range() -> None:
    async def main() -> None:
        async with Server(http_response(500)) as srv:
            bad = await http_probe(LOCALHOST, srv.port, "/", 1.0, "", (200, 399))
            assert not bad.ok and bad.detail == "status 500"
            inverted = await http_probe(LOCALHOST, srv.port, "/", 1.0, "", (500, 599))
            assert inverted.ok and inverted.detail == "status 500"
            exact = await http_probe(LOCALHOST, srv.port, "/", 1.0, "", (500, 500))
            assert exact.ok

    run(main())


def test_http_probe_hanging_server_times_out() -> None:
    async def main() -> None:
        async with Server(None) as srv:
            started = time.monotonic()
            result = await http_probe(LOCALHOST, srv.port, "/", 0.3, "", (200, 399))
            elapsed = time.monotonic() - started
            assert not result.ok and result.detail == "timeout after 0.3s"
            assert 0.25 <= elapsed < 1.2
            assert 0.25 <= result.duration < 1.2
            # tcp probe of the same server succeeds: it accepts connections
            assert (await tcp_probe(LOCALHOST, srv.port, 0.3)).ok

    run(main())


def test_http_probe_closed_port_and_garbage(closed_port: int) -> None:
    async def main() -> None:
        refused = await http_probe(LOCALHOST, closed_port, "/", 1.0, "", (200, 399))
        assert not refused.ok and refused.detail == "connect refused"
        async with Server(b"garbage here\r\n\r\n") as srv:
            garbage = await http_probe(LOCALHOST, srv.port, "/", 1.0, "", (200, 399))
            assert not garbage.ok and garbage.detail == "bad status line"
        async with Server(b"HTTP/1.1 2") as srv:  # truncated, then EOF
            partial = await http_probe(LOCALHOST, srv.port, "/", 1.0, "", (200, 399))
            assert not partial.ok and partial.detail == "bad status line"
        async with Server(None, close_without_answer=True) as srv:
            closed = await http_probe(LOCALHOST, srv.port, "/", 1.0, "", (200, 399))
            assert not closed.ok and closed.detail in (
                "connection closed before status line",
                "connection reset",
            )

    run(main())


def test_probes_reject_header_injection() -> None:
    async def main() -> None:
        result = await http_probe(LOCALHOST, 1, "/x\r\nEvil: 1", 1.0, "", (200, 399))
        assert not result.ok and "bad probe request" in result.detail

    run(main())


# --- HealthChecker --------------------------------------------------------------------------------------


FAST_HTTP = HealthConfig(kind="http", path="/healthz", interval=0.05, timeout=0.3, rise=2, fall=2)


def test_checker_marks_down_when_server_stops_and_up_when_it_returns() -> None:
    async def main() -> None:
        srv = await Server(http_response(200)).start()
        pool = make_pool(srv.port, FAST_HTTP)
        backend = pool.backends[0]
        seen: list[tuple[str, str, Transition]] = []
        checker = HealthChecker(pool, on_transition=lambda p, b, t: seen.append((p, b, t)))
        try:
            checker.start()
            await wait_for(lambda: checker.snapshot()["b1"]["consecutive_successes"] >= 2, what="probes")
            assert backend.healthy and seen == []
            assert checker.snapshot()["b1"]["last_detail"] == "status 200"

            await srv.close()
            await wait_for(lambda: not backend.healthy, what="backend down")
            assert [(p, b, t.up) for p, b, t in seen] == [("web", "b1", False)]
            assert "connect refused" in seen[0][2].reason
            snap = checker.snapshot()["b1"]
            assert snap["state"] == "down" and snap["consecutive_failures"] >= 2
            assert snap["last_detail"] == "connect refused" and snap["last_change"] is not None
            assert pool.healthy_count == 0

            await srv.start(port=srv.port)
            await wait_for(lambda: backend.healthy, what="backend up")
            assert [t.up for _, _, t in seen] == [False, True]
            assert checker.snapshot()["b1"]["state"] == "up"
            assert backend.slowstart_factor == 1.0  # slowstart = 0
        finally:
            await checker.stop()
            await srv.close()
        assert checker.errors_total == 0

    run(main())


def test_checker_http_500_is_down_and_initial_down_rises() -> None:
    async def main() -> None:
        async with Server(http_response(500)) as bad, Server(http_response(200)) as good:
            health = HealthConfig(kind="http", interval=0.05, timeout=0.3, rise=2, fall=2, initial="down")
            cfg = PoolConfig(
                name="p",
                backends=(
                    BackendConfig("bad", HostPort(LOCALHOST, bad.port)),
                    BackendConfig("good", HostPort(LOCALHOST, good.port)),
                ),
                health=health,
            )
            pool = Pool(cfg)
            assert pool.healthy_count == 0
            checker = HealthChecker(pool)
            try:
                checker.start()
                await wait_for(lambda: pool.get("good").healthy, what="good up")  # type: ignore[union-attr]
                await wait_for(lambda: checker.snapshot()["bad"]["checks_total"] >= 3, what="bad probed")
                assert not pool.get("bad").healthy  # type: ignore[union-attr]
                assert checker.snapshot()["bad"]["last_detail"] == "status 500"
            finally:
                await checker.stop()

    run(main())


def test_checker_passive_failures_and_slowstart_ramp() -> None:
    async def main() -> None:
        async with Server(http_response(200)) as srv:
            health = HealthConfig(kind="tcp", interval=0.05, timeout=0.3, rise=2, fall=3)
            pool = make_pool(srv.port, health, slowstart=0.4)
            backend = pool.backends[0]
            checker = HealthChecker(pool)
            try:
                checker.start()
                # passive failures count toward fall: 3 in a row mark it down before a probe can intervene
                for _ in range(3):
                    checker.report_passive_failure("b1")
                assert not backend.healthy
                assert checker.snapshot()["b1"]["passive_failures_total"] == 3
                checker.report_passive_failure("nope")  # unknown names are ignored
                # probes succeed (server is up), so it comes back and ramps up
                await wait_for(lambda: backend.healthy, what="backend up")
                assert SLOWSTART_FLOOR <= backend.slowstart_factor < 1.0
                factors = [backend.slowstart_factor]
                deadline = time.monotonic() + 2.0
                while backend.slowstart_factor < 1.0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                    factors.append(backend.slowstart_factor)
                assert backend.slowstart_factor == 1.0
                assert factors == sorted(factors)
                assert len(set(factors)) >= 5  # several intermediate steps were pushed
            finally:
                await checker.stop()
            assert checker.errors_total == 0

    run(main())


def test_checker_kind_none_never_probes() -> None:
    async def main() -> None:
        pool = make_pool(1, HealthConfig(kind="none", initial="down"))
        checker = HealthChecker(pool)
        try:
            checker.start()
            for _ in range(5):
                checker.report_passive_failure("b1")
            await asyncio.sleep(0)
            assert pool.backends[0].healthy
            snap = checker.snapshot()["b1"]
            assert snap["state"] == "up" and snap["checks_total"] == 0
        finally:
            await checker.stop()

    run(main())


def test_checker_callback_errors_are_contained(closed_port: int) -> None:
    def boom(pool: str, backend: str, transition: Transition) -> None:
        raise RuntimeError("callback bug")

    async def main() -> None:
        pool = make_pool(closed_port, HealthConfig(kind="tcp", interval=0.05, timeout=0.3, rise=1, fall=1))
        checker = HealthChecker(pool, on_transition=boom)
        try:
            checker.start()
            await wait_for(lambda: not pool.backends[0].healthy, what="down")
            assert checker.errors_total == 1
        finally:
            await checker.stop()

    run(main())


# --- AgentPoller ----------------------------------------------------------------------------------------


def test_agent_poller_sets_load_and_none_when_agent_absent() -> None:
    async def main() -> None:
        agent = await Server(http_response(200, b'{"cpu": 0.4, "mem": 0.7}')).start()
        pool = make_pool(9, HealthConfig(kind="none"))  # backend port irrelevant: agent has its own port
        backend = pool.backends[0]
        poller = AgentPoller(pool, AgentConfig(path="/load", port=agent.port, interval=0.05, timeout=0.3))
        try:
            poller.start()
            await wait_for(lambda: backend.load is not None, what="load reported")
            assert backend.load == pytest.approx(0.7)
            assert agent.requests[0].startswith(b"GET /load HTTP/1.1\r\n")
            snap = poller.snapshot()["b1"]
            assert snap["agent"] == f"{LOCALHOST}:{agent.port}" and snap["failures_total"] == 0

            await agent.close()
            await wait_for(lambda: backend.load is None, what="load unknown")
            snap = poller.snapshot()["b1"]
            assert snap["failures_total"] >= 1 and snap["last_detail"] == "connect refused"
            assert backend.healthy  # the agent never marks a backend down
        finally:
            await poller.stop()
            await agent.close()
        assert poller.errors_total == 0

    run(main())


@pytest.mark.parametrize(
    ("response", "expected", "detail"),
    [
        (http_response(200, b'{"load": 0.25}'), 0.25, "load 0.250"),
        (
            b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{"cpu":\r\n5\r\n 0.6}\r\n0\r\n\r\n',
            0.6,
            "load 0.600",
        ),
        (b'HTTP/1.0 200 OK\r\n\r\n{"mem": 0.9}', 0.9, "load 0.900"),  # close-delimited body
        (http_response(404, b"nope"), None, "status 404"),
        (http_response(200, b"<html>"), None, "not valid JSON"),
        (http_response(200, b"[1]"), None, "must be a JSON object"),
        (None, None, "timeout after 0.3s"),
    ],
)
def test_agent_poll_once_results(response: bytes | None, expected: float | None, detail: str) -> None:
    async def main() -> None:
        async with Server(response) as agent:
            pool = make_pool(9, HealthConfig(kind="none"), agent=HostPort(LOCALHOST, agent.port))
            pool.set_state("b1", load=0.5)
            poller = AgentPoller(pool, AgentConfig(port=1, timeout=0.3))  # per-backend agent wins
            assert poller.agent_address("b1") == HostPort(LOCALHOST, agent.port)
            load = await poller.poll_once("b1")
            snap = poller.snapshot()["b1"]
            if expected is None:
                assert load is None and pool.backends[0].load is None
                assert snap["consecutive_failures"] == 1
            else:
                assert load == pytest.approx(expected) and pool.backends[0].load == pytest.approx(expected)
            assert detail in snap["last_detail"]
            assert pool.backends[0].healthy

    run(main())


def test_agent_address_defaults_to_backend_address() -> None:
    pool = make_pool(8080, HealthConfig(kind="none"))
    assert AgentPoller(pool, AgentConfig()).agent_address("b1") == HostPort(LOCALHOST, 8080)
    assert AgentPoller(pool, AgentConfig(port=5555)).agent_address("b1") == HostPort(LOCALHOST, 5555)
