"""custom_load agent: poll each backend's load report and feed it to the balancing policy.

How this works: every backend of a pool with an `[agent]` table runs (or sits next to) a tiny HTTP agent
answering `GET <path>` with a JSON object such as `{"cpu": 0.4, "mem": 0.7}`. `AgentPoller.start()` spawns
one task per backend that polls it every `AgentConfig.interval` seconds (+-10 % jitter, first poll at a
random offset within one interval) and stores the result with `pool.set_state(name, load=value)`.

Where the agent lives: the backend's own `BackendConfig.agent` if set, else the backend host on
`AgentConfig.port`, else the backend host and port themselves.

The load is the maximum of the numeric `cpu`, `mem` and `load` fields present, each a fraction (0.4 means
40 %), clamped to [0, 1]. Any failure (refused, timeout, non-2xx status, bad JSON, oversized body) sets the
load to None (unknown), is counted and shown in `snapshot()`, and never marks the backend down: liveness is
the health checker's job, not the agent's. No exception escapes a poll task: unexpected errors are logged at
warning on the "halb.health" logger, counted, and polling continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from halb.config_model import AgentConfig, HostPort
from halb.pool import Pool

log = logging.getLogger("halb.health")

LOAD_FIELDS = ("cpu", "mem", "load")
MAX_BODY = 64 * 1024
MAX_HEAD = 16 * 1024
POLL_JITTER = 0.1
USER_AGENT = "halb-agent/1"


def parse_load_report(body: bytes) -> float:
    """Load in [0, 1] from a JSON report: the max of its numeric cpu/mem/load fields, clamped.

    Raises ValueError (with a message fit for the admin API) for anything that is not a JSON object with at
    least one of those fields, for a field that is not a finite number, and for booleans.
    """
    try:
        data = json.loads(body)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"load report is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"load report must be a JSON object, got {type(data).__name__}")
    values: list[float] = []
    for key in LOAD_FIELDS:
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"load report field {key!r} must be a number, got {json.dumps(value)[:40]}")
        if not math.isfinite(value):
            raise ValueError(f"load report field {key!r} must be finite, got {value}")
        values.append(float(value))
    if not values:
        raise ValueError(f"load report has none of the fields {', '.join(LOAD_FIELDS)}")
    return min(max(max(values), 0.0), 1.0)


class AgentError(Exception):
    """One failed poll; the message is the detail shown in the snapshot."""


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise AgentError("bad chunked encoding") from None
            if size == 0:
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise AgentError(f"response body over {MAX_BODY} bytes")
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
    length = headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise AgentError("bad Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise AgentError(f"response body over {MAX_BODY} bytes")
        return await reader.readexactly(n)
    body = bytearray()  # close-delimited
    while len(body) <= MAX_BODY:
        chunk = await reader.read(MAX_BODY + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    raise AgentError(f"response body over {MAX_BODY} bytes")


async def fetch_load(addr: HostPort, path: str, timeout: float) -> float:
    """GET http://addr/path and parse the report; raises AgentError (or ValueError) on any failure."""
    if any(c in path for c in "\r\n\0 "):
        raise AgentError("bad agent path: space or control character")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(addr.host, addr.port, limit=MAX_HEAD)
            writer.write(
                (
                    f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n"
                    f"User-Agent: {USER_AGENT}\r\nAccept: application/json\r\n\r\n"
                ).encode("latin-1", "replace")
            )
            await writer.drain()
            status_line = await reader.readuntil(b"\n")
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise AgentError("bad status line")
            status = int(parts[1])
            headers: dict[str, str] = {}
            while True:
                line = await reader.readuntil(b"\n")
                if line in (b"\r\n", b"\n"):
                    break
                name, sep, value = line.decode("latin-1").partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if not 200 <= status <= 299:
                raise AgentError(f"status {status}")
            body = await _read_body(reader, headers)
        return parse_load_report(body)
    except (AgentError, ValueError):
        raise
    except TimeoutError:  # before OSError: TimeoutError is an OSError
        raise AgentError(f"timeout after {timeout:g}s") from None
    except ConnectionRefusedError:
        raise AgentError("connect refused") from None
    except asyncio.IncompleteReadError:
        raise AgentError("connection closed mid-response") from None
    except asyncio.LimitOverrunError:
        raise AgentError("response head line too long") from None
    except OSError as exc:
        raise AgentError(f"{'i/o error' if writer else 'connect failed'}: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 0.5)


@dataclass
class _AgentState:
    name: str
    addr: HostPort
    load: float | None = None
    last_detail: str = "not polled yet"
    last_poll_at: float | None = None
    last_ok_at: float | None = None
    polls_total: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0


class AgentPoller:
    def __init__(
        self,
        pool: Pool,
        agent_config: AgentConfig,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.config = agent_config
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.errors_total = 0  # unexpected exceptions caught in poll tasks
        self._states: dict[str, _AgentState] = {}
        for b in pool.config.backends:
            addr = b.agent or HostPort(b.address.host, agent_config.port or b.address.port)
            self._states[b.name] = _AgentState(b.name, addr)
        self._tasks: set[asyncio.Task[None]] = set()

    def agent_address(self, backend_name: str) -> HostPort | None:
        st = self._states.get(backend_name)
        return st.addr if st is not None else None

    def start(self) -> None:
        """Spawn one poll task per backend (needs a running event loop). Idempotent."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        for name in self._states:
            task = loop.create_task(self._poll_loop(name), name=f"halb-agent:{self.pool.name}:{name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel and await every poll task."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _poll_loop(self, name: str) -> None:
        interval = self.config.interval
        delay = self.rng.uniform(0.0, interval)
        while True:
            await asyncio.sleep(delay)
            try:
                await self.poll_once(name)
            except Exception:
                self.errors_total += 1
                log.warning(
                    "pool %s backend %s: agent poll failed unexpectedly", self.pool.name, name, exc_info=True
                )
            delay = interval * (1.0 + self.rng.uniform(-POLL_JITTER, POLL_JITTER))

    async def poll_once(self, name: str) -> float | None:
        """Poll one backend's agent now and apply the result; returns the load (None on failure)."""
        st = self._states[name]
        load: float | None
        try:
            load = await fetch_load(st.addr, self.config.path, self.config.timeout)
            detail = f"load {load:.3f}"
        except (AgentError, ValueError) as exc:
            load, detail = None, str(exc)
        except Exception as exc:  # anything else is still just a failed poll
            load, detail = None, f"agent error: {type(exc).__name__}: {exc}"
        now = self.clock()
        st.polls_total += 1
        st.last_poll_at = now
        st.last_detail = detail
        if load is None:
            st.failures_total += 1
            st.consecutive_failures += 1
            if st.consecutive_failures == 1:
                log.warning(
                    "pool %s backend %s: agent %s: %s (load unknown)", self.pool.name, name, st.addr, detail
                )
        else:
            if st.consecutive_failures:
                log.info("pool %s backend %s: agent %s answers again", self.pool.name, name, st.addr)
            st.consecutive_failures = 0
            st.last_ok_at = now
        st.load = load
        backend = self.pool.get(name)
        if backend is not None and backend.load != load:
            self.pool.set_state(name, load=load)
        return load

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per backend: agent address, current load, last result, counters."""
        return {
            name: {
                "agent": str(st.addr),
                "load": st.load,
                "last_detail": st.last_detail,
                "last_poll_at": st.last_poll_at,
                "last_ok_at": st.last_ok_at,
                "polls_total": st.polls_total,
                "failures_total": st.failures_total,
                "consecutive_failures": st.consecutive_failures,
            }
            for name, st in self._states.items()
        }
