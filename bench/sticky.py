#!/usr/bin/env python3
"""halb throughput with cookie stickiness on vs off, side by side: req/s, p99, and the ratio on/off.

How this works: the script starts nginx (a fast backend answering a small fixed body), one redis-server,
and two halb nodes (`halb serve`, one proxy worker each) in front of that nginx: "off" has a plain pool,
"on" has the same pool with `sticky = { mode = "cookie" }` and a `[state]` pointing at the Redis. Both
halb nodes are pinned with `taskset` to the same core (`--proxy-cpu`); wrk, nginx and Redis share the
other (`--client-cpu`), so what is compared is the proxy core's work per request. One session is started
on "on" first; wrk then sends its cookie with every request (`Cookie: HALBSID=...`) to both nodes, so on
"on" every request is an existing session: one GETEX (which also slides the TTL) per request, then the
backend it names -- and since a worker reuses a mapping for `sticky.cache` (1 s) before asking Redis
again, a hot session costs one GETEX per second, not per request. Two more rows show the other regimes:
"many sessions" rotates `--sessions` (20000) cookies, each seen about once per 1.5 s, so nearly every
request misses the worker's cache and asks Redis; "new session per request" sends no cookie, so every
request starts a session (the policy's choice, an id minted to hash there, one SET). Cells alternate
for `--rounds` rounds after a warm-up; the median run of each is kept. HTTP keep-alive throughout.

Usage: `python bench/sticky.py` (about 1 minute), `--quick` (a ~15 s smoke run), `--json FILE`. Every
process runs in its own session and is killed at exit, also on errors and Ctrl-C. Traffic: 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

# Shared with the HAProxy benchmark (this directory is on sys.path when run as `python bench/sticky.py`).
from run import Processes, _version, cpu_seconds, free_port, machine, parse_wrk, start_nginx, wait_http


@dataclass
class Run:
    name: str  # "off" | "on" | "on-many" | "on-new"
    rps: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    non_2xx: int = 0
    cpu_pct: float = 0.0  # the halb node's CPU (control process + worker), % of one core


def halb_conf(name: str, admin: int, listen: int, backend: int, redis_port: int | None) -> str:
    text = f"""
[node]
name = "{name}"
admin = "127.0.0.1:{admin}"
workers = 1

[[listeners]]
name = "http"
bind = "127.0.0.1:{listen}"
pool = "nginx"
backlog = 4096

[pools.nginx]
backends = [{{ name = "nginx", address = "127.0.0.1:{backend}" }}]
health = {{ kind = "tcp", interval = 5.0, timeout = 1.0 }}
"""
    if redis_port is not None:
        text = (
            text.replace("health = {", 'sticky = { mode = "cookie" }\nhealth = {')
            + f'\n[state]\nurl = "redis://127.0.0.1:{redis_port}/0"\n'
        )
    return text


def wrk(args: argparse.Namespace, port: int, duration: float, cookie: str | Path | None) -> list[str]:
    cmd = ["taskset", "-c", str(args.client_cpu), "wrk", "-t1", f"-c{args.connections}", f"-d{duration:g}s"]
    cmd.append("--latency")
    if isinstance(cookie, Path):
        cmd += ["-s", str(cookie)]
    elif cookie:
        cmd += ["-H", f"Cookie: HALBSID={cookie}"]
    return [*cmd, f"http://127.0.0.1:{port}/"]


def measure(args: argparse.Namespace, run: Run, port: int, pid: int, cookie: str | Path | None) -> Run:
    cmd = wrk(args, port, args.duration, cookie)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.duration + 60)
    run.cpu_pct = 100.0 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    run.rps, run.p99_ms, run.errors, run.non_2xx = parse_wrk(done.stdout)
    print(
        f"  {run.name:7} {run.rps:9.0f} req/s  p99 {run.p99_ms:6.2f} ms  halb cpu {run.cpu_pct:5.1f}%",
        file=sys.stderr,
        flush=True,
    )
    return run


async def _sessions(port: int, n: int, conns: int = 20) -> list[str]:
    import asyncio

    out: list[str] = []

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = int(re.search(r"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                out.append(re.search(r"(?i)set-cookie: HALBSID=([^;\r]+)", head).group(1))  # type: ignore[union-attr]
        finally:
            writer.close()

    await asyncio.gather(*(one(n // conns) for _ in range(conns)))
    return out


def many_sessions_script(tmp: Path, port: int, n: int) -> Path:
    """A wrk Lua script that sends the cookies of n sessions in turn."""
    import asyncio

    ids = asyncio.run(_sessions(port, n))
    path = tmp / "sessions.lua"
    path.write_text(
        "local ids = {" + ",".join(f'"{i}"' for i in ids) + "}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        "  if i > #ids then i = 1 end\n"
        '  return wrk.format(nil, nil, {["Cookie"] = "HALBSID=" .. ids[i]})\n'
        "end\n"
    )
    return path


def new_session(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
        cookie = response.headers["Set-Cookie"]
    if not cookie:
        raise RuntimeError("the sticky node issued no session cookie")
    return str(cookie.split(";", 1)[0].split("=", 1)[1])


def median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rps)[len(runs) // 2]


def bench(args: argparse.Namespace) -> dict[str, Run]:
    for tool in ("nginx", "wrk", "taskset", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found (apt-get install nginx-light wrk redis-server)")
    with tempfile.TemporaryDirectory(prefix="halb-sticky-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp)
        try:
            client = ["taskset", "-c", str(args.client_cpu)]
            backend = start_nginx(procs, tmp, args.client_cpu)
            redis_port = free_port()
            redis_args = [
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            procs.start("redis", [*client, "redis-server", *redis_args, "--dir", str(tmp)])
            nodes: dict[str, tuple[int, int]] = {}  # name -> (listen port, pid)
            for name, with_redis in (("off", None), ("on", redis_port)):
                admin, listen = free_port(), free_port()
                path = tmp / f"{name}.toml"
                path.write_text(halb_conf(name, admin, listen, backend, with_redis))
                cmd = ["taskset", "-c", str(args.proxy_cpu), sys.executable, "-m", "halb", "serve", str(path)]
                proc = procs.start(f"halb-{name}", cmd)
                wait_http(f"http://127.0.0.1:{admin}/healthz", proc)
                nodes[name] = (listen, proc.pid)
            cookie = new_session(nodes["on"][0])
            script = many_sessions_script(tmp, nodes["on"][0], args.sessions)
            cells: dict[str, tuple[tuple[int, int], str | Path | None]] = {
                "off": (nodes["off"], cookie),
                "on": (nodes["on"], cookie),
                "on-many": (nodes["on"], script),
                "on-new": (nodes["on"], None),
            }
            if args.warmup > 0:
                for (port, _pid), c in cells.values():
                    subprocess.run(wrk(args, port, args.warmup, c), capture_output=True, check=False)
            runs: dict[str, list[Run]] = {name: [] for name in cells}
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds}:", file=sys.stderr)
                for name, ((port, pid), c) in cells.items():
                    runs[name].append(measure(args, Run(name), port, pid, c))
            return {name: median(r) for name, r in runs.items()}
        finally:
            procs.close()


def cost(run: Run) -> float:
    """halb CPU microseconds per request."""
    return run.cpu_pct / 100 / run.rps * 1e6 if run.rps else 0.0


def table(results: dict[str, Run], info: dict[str, str], command: str) -> str:
    off = results["off"].rps or 1.0
    off_cost = cost(results["off"]) or 1.0
    labels = {
        "off": "sticky off (plain pool)",
        "on": "sticky on, existing session",
        "on-many": "sticky on, many sessions (cache misses)",
        "on-new": "sticky on, new session per request",
    }
    lines = [f"# halb cookie stickiness on vs off ({info['date']})", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if k != "date"]
    lines += [f"- command: `{command}`", ""]
    lines += [
        "| cell | req/s | p99 ms | halb CPU | halb CPU/request | errors | req/s vs off | CPU/req off/this |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {labels[name]} | {r.rps:.0f} | {r.p99_ms:.2f} | {r.cpu_pct:.0f}% | {cost(r):.1f} us "
            f"| {r.errors + r.non_2xx} | {r.rps / off:.2f}x | {off_cost / (cost(r) or 1.0):.2f}x |"
        )
    lines += [
        "",
        "req/s vs off: the throughput ratio (goal >= 0.8x for an existing session). CPU/req off/this: halb's",
        "CPU time per request, off over this cell: the throughput ratio a CPU-bound proxy core would show,",
        "and the steadier figure when the client core or other load is the bottleneck (halb CPU < 100%).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=20000, help="sessions of the many-sessions row")
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1 if (os.cpu_count() or 1) > 1 else 0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~15 s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds = 2.0, 0.5, 1
    info = machine({"redis": _version(["redis-server", "--version"], r"\bv=(\S+)")})
    results = bench(args)
    command = shlex.join(["python", "bench/sticky.py", *(argv if argv is not None else sys.argv[1:])])
    print(table(results, info, command))
    if args.json:
        doc = {"machine": info, "command": command, "results": {k: asdict(v) for k, v in results.items()}}
        doc["ratio_on_off"] = results["on"].rps / (results["off"].rps or 1.0)
        doc["cpu_ratio_on_off"] = cost(results["off"]) / (cost(results["on"]) or 1.0)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
