#!/usr/bin/env python3
"""halb next to HAProxy, same backend, same core budget: req/s and p99 latency in one table.

How this works: the script starts nginx (Debian's) as a fast backend answering a small fixed body, then
one halb node (`halb serve`, one worker) and one HAProxy (`nbthread 1`), each with an HTTP listener and a
TCP listener in front of that nginx. halb (control process and worker) and HAProxy are pinned with
`taskset` to the same core (`--proxy-cpu`); wrk and nginx share the other one (`--client-cpu`). Both
proxies stay up; for each cell wrk loads halb, then HAProxy right after (so both see the same machine),
`--rounds` times, for `--duration` seconds after a short warm-up; the median run is kept. Each run
reads req/s, the p99 latency and the errors from wrk, and the proxy's CPU time from /proc, so the table
shows whether the proxy's core was the bottleneck (near 100%) or the client side was, and how many
requests each proxy serves per CPU-second.

Cells: HTTP keep-alive, HTTP with a new connection per request (`Connection: close`), TCP keep-alive
(HTTP keep-alive through the TCP relay) and TCP with a new connection per request, for halb and HAProxy,
plus nginx reached directly (the ceiling). The ratio column is halb/HAProxy req/s.

Usage: `python bench/run.py` (about 2.5 minutes; `--rounds 3` for the published figures), `--quick` (a
smoke run of ~15 s that only proves the harness works), `--json FILE` to also write the results. Every
process it starts runs in its own session and is killed at exit, also on errors and Ctrl-C. Traffic goes
to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

BODY = "hello from nginx, a small fixed response body for the benchmark\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Cell:
    target: str  # "halb" | "haproxy" | "nginx"
    mode: str  # "http" | "tcp" | "direct"
    pattern: str  # "keep-alive" | "new-conn"
    rps: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    non_2xx: int = 0
    cpu_pct: float | None = None  # CPU used by the proxy process(es), % of one core


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


class Processes:
    """Every process started here runs in its own session; `close()` kills each group, whatever happened."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed below; the child keeps its copy)
        try:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


# --- process CPU accounting ------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    out = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out.extend(_tree(int(child)))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (alive ones)."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / CLK_TCK


# --- configs -------------------------------------------------------------------------------------------
def nginx_conf(tmp: Path, port: int) -> str:
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        location / {{ default_type text/plain; return 200 "{BODY.strip()}\\n"; }}
    }}
}}
"""


def haproxy_conf(http_port: int, tcp_port: int, backend_port: int) -> str:
    return f"""
global
    nbthread 1
    maxconn 8000
    log stdout format raw local0 emerg

defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    maxconn 8000

frontend fe_http
    mode http
    bind 127.0.0.1:{http_port} backlog 4096
    option http-keep-alive
    option forwardfor
    default_backend be_http

backend be_http
    mode http
    http-reuse always
    server nginx 127.0.0.1:{backend_port}

frontend fe_tcp
    mode tcp
    bind 127.0.0.1:{tcp_port} backlog 4096
    default_backend be_tcp

backend be_tcp
    mode tcp
    server nginx 127.0.0.1:{backend_port}
"""


def halb_conf(
    admin_port: int, http_port: int, tcp_port: int, backend_port: int, extra: str = "", node_extra: str = ""
) -> str:
    """`extra`: more TOML (another `[[listeners]]`) before the pool; `node_extra`: more `[node]` keys."""
    return f"""
[node]
name = "bench"
admin = "127.0.0.1:{admin_port}"
workers = 1
{node_extra}

[[listeners]]
name = "http"
bind = "127.0.0.1:{http_port}"
mode = "http"
pool = "nginx"
backlog = 4096

[[listeners]]
name = "tcp"
bind = "127.0.0.1:{tcp_port}"
mode = "tcp"
pool = "nginx"
backlog = 4096
{extra}
[pools.nginx]
backends = [{{ name = "nginx", address = "127.0.0.1:{backend_port}" }}]
health = {{ kind = "tcp", interval = 5.0, timeout = 1.0 }}
"""


# --- wrk -----------------------------------------------------------------------------------------------
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> tuple[float, float, int, int]:
    """-> (req/s, p99 ms, socket errors, non-2xx/3xx responses)"""
    rps = re.search(r"Requests/sec:\s*([\d.]+)", output)
    p99 = re.search(r"^\s*99%\s+(\S+)", output, re.MULTILINE)
    if not rps or not p99:
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        errors = sum(int(x) for x in m.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return float(rps.group(1)), _ms(p99.group(1)), errors, int(non2xx.group(1)) if non2xx else 0


def wrk_command(
    cpu: int, port: int, pattern: str, duration: float, connections: int, scheme: str = "http"
) -> list[str]:
    cmd = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    if pattern == "new-conn":
        cmd += ["-H", "Connection: close"]
    return [*cmd, f"{scheme}://127.0.0.1:{port}/"]


def run_cell(cell: Cell, port: int, pid: int | None, args: argparse.Namespace, verbose: bool = False) -> Cell:
    if args.warmup > 0:
        subprocess.run(
            wrk_command(args.client_cpu, port, cell.pattern, args.warmup, args.connections),
            capture_output=True,
            check=False,
            timeout=args.warmup + 30,
        )
    cmd = wrk_command(args.client_cpu, port, cell.pattern, args.duration, args.connections)
    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.duration + 60)
    elapsed = time.monotonic() - t0
    if pid:
        cell.cpu_pct = 100.0 * (cpu_seconds(pid) - cpu0) / elapsed
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    cell.rps, cell.p99_ms, cell.errors, cell.non_2xx = parse_wrk(done.stdout)
    if verbose:
        print(done.stdout, file=sys.stderr)
    print(
        f"  {cell.target:8} {cell.mode:6} {cell.pattern:10} {cell.rps:10.0f} req/s  p99 {cell.p99_ms:7.2f} ms"
        + (f"  cpu {cell.cpu_pct:5.1f}%" if cell.cpu_pct is not None else ""),
        file=sys.stderr,
        flush=True,
    )
    return cell


# --- machine -------------------------------------------------------------------------------------------
def _version(cmd: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    m = re.search(pattern, done.stdout + done.stderr)
    return m.group(1) if m else "?"


def machine(versions: dict[str, str]) -> dict[str, str]:
    """The machine's description for the report; `versions` (tool -> version) goes before the load."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu} ({os.cpu_count()} cores)",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        **versions,
        "load average at start": load,
    }


# --- the run -------------------------------------------------------------------------------------------
def start_nginx(procs: Processes, tmp: Path, cpu: int) -> int:
    """nginx (the backend) pinned to `cpu`, listening: -> its port."""
    port = free_port()
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, port))
    nginx = procs.start(
        "nginx", ["taskset", "-c", str(cpu), "nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")]
    )
    wait_port(port, nginx)
    return port


def start_halb(
    procs: Processes,
    tmp: Path,
    cpu: int,
    backend_port: int,
    extra: str = "",
    node_extra: str = "",
    tree: Path | None = None,
    python: str = sys.executable,
) -> tuple[subprocess.Popen[bytes], int, int, int]:
    """One halb node (`halb_conf`) pinned to `cpu`, up and healthy: -> (process, http, tcp, admin port).
    `tree`: run that checkout of halb (through PYTHONPATH, from `tmp`: `python -m halb` would otherwise
    import the `halb/` of the current directory, whatever PYTHONPATH says); `python`: with that
    interpreter (a virtualenv's, with halb's dependencies)."""
    http_port, tcp_port, admin_port = free_port(), free_port(), free_port()
    conf = halb_conf(admin_port, http_port, tcp_port, backend_port, extra, node_extra)
    (tmp / "halb.toml").write_text(conf)
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    halb = procs.start(
        f"halb-{tmp.name}",
        ["taskset", "-c", str(cpu), python, "-m", "halb", "serve", str(tmp / "halb.toml")],
        env=env,
        cwd=tmp if tree is not None else None,
    )
    wait_port(http_port, halb)
    wait_http(f"http://127.0.0.1:{admin_port}/healthz", halb)
    return halb, http_port, tcp_port, admin_port


def median_cell(runs: list[Cell]) -> Cell:
    """The run with the median req/s (its p99 and CPU come with it)."""
    ordered = sorted(runs, key=lambda c: c.rps)
    return ordered[len(ordered) // 2]


def run(args: argparse.Namespace) -> list[Cell]:
    for tool in ("nginx", "haproxy", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found (apt-get install haproxy wrk nginx-light)")
    cells: list[Cell] = []
    patterns = ["keep-alive", "new-conn"]
    with tempfile.TemporaryDirectory(prefix="halb-bench-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp)
        try:
            backend_port = start_nginx(procs, tmp, args.client_cpu)

            print("nginx directly (the ceiling):", file=sys.stderr)
            for pattern in patterns:
                runs = [run_cell(Cell("nginx", "direct", pattern), backend_port, None, args)]
                cells.append(median_cell(runs))

            # Both proxies run side by side (an idle one costs nothing); each cell is measured for halb
            # and then for HAProxy straight after, `--rounds` times, so both see the same conditions.
            halb, halb_http, halb_tcp, admin_port = start_halb(procs, tmp, args.proxy_cpu, backend_port)
            hap_http, hap_tcp = free_port(), free_port()
            (tmp / "haproxy.cfg").write_text(haproxy_conf(hap_http, hap_tcp, backend_port))
            haproxy_cmd = ["taskset", "-c", str(args.proxy_cpu), "haproxy", "-db", "-f"]
            hap = procs.start("haproxy", [*haproxy_cmd, str(tmp / "haproxy.cfg")])
            wait_port(hap_http, hap)

            targets = {
                "halb": (halb.pid, {"http": halb_http, "tcp": halb_tcp}),
                "haproxy": (hap.pid, {"http": hap_http, "tcp": hap_tcp}),
            }
            print("halb and HAProxy, cell by cell:", file=sys.stderr)
            for mode in ("http", "tcp"):
                for pattern in patterns:
                    runs: dict[str, list[Cell]] = {"halb": [], "haproxy": []}
                    for _ in range(args.rounds):
                        for target, (pid, ports) in targets.items():
                            cell = run_cell(Cell(target, mode, pattern), ports[mode], pid, args)
                            runs[target].append(cell)
                    cells.extend(median_cell(r) for r in runs.values())
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=2) as r:
                (tmp / "halb-status.json").write_bytes(r.read())
        finally:
            procs.close()
            if args.keep_logs:
                dest = Path(args.keep_logs)
                dest.mkdir(parents=True, exist_ok=True)
                for f in [*tmp.glob("*.log"), *tmp.glob("*.json")]:
                    shutil.copy(f, dest / f.name)
    return cells


def table(cells: list[Cell]) -> str:
    def find(target: str, mode: str, pattern: str) -> Cell | None:
        return next(
            (c for c in cells if (c.target, c.mode, c.pattern) == (target, mode, pattern)),
            None,
        )

    def cpu(c: Cell | None) -> str:
        return f"{c.cpu_pct:.0f}%" if c is not None and c.cpu_pct is not None else "-"

    def per_cpu(c: Cell | None) -> float:
        return c.rps / (c.cpu_pct / 100) if c is not None and c.cpu_pct else 0.0

    lines = [
        "| cell | halb req/s | halb p99 | HAProxy req/s | HAProxy p99 | halb/HAProxy "
        "| halb CPU | HAProxy CPU | halb/HAProxy per CPU-second |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in ("http", "tcp"):
        for pattern in ("keep-alive", "new-conn"):
            h, p = find("halb", mode, pattern), find("haproxy", mode, pattern)
            if h is None or p is None:
                continue
            ratio = h.rps / p.rps if p.rps else 0.0
            efficiency = per_cpu(h) / per_cpu(p) if per_cpu(p) else 0.0
            lines.append(
                f"| {mode.upper()} {pattern} | {h.rps:,.0f} | {h.p99_ms:.2f} ms | {p.rps:,.0f} | "
                f"{p.p99_ms:.2f} ms | **{ratio:.2f}x** | {cpu(h)} | {cpu(p)} | {efficiency:.2f}x |"
            )
    for pattern in ("keep-alive", "new-conn"):
        d = find("nginx", "direct", pattern)
        if d is not None:
            lines.append(
                f"| nginx direct {pattern} (ceiling) | {d.rps:,.0f} | {d.p99_ms:.2f} ms | | | | | | |"
            )
    errors = [c for c in cells if c.errors or c.non_2xx]
    if errors:
        lines.append("")
        for c in errors:
            lines.append(
                f"note: {c.target} {c.mode} {c.pattern}: {c.errors} socket errors, "
                f"{c.non_2xx} non-2xx responses"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per cell, no warm-up: a smoke run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each cell")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--rounds", type=int, default=1, help="measure each cell N times, keep the median")
    parser.add_argument("--proxy-cpu", type=int, default=1, help="core for halb and HAProxy (default 1)")
    parser.add_argument("--client-cpu", type=int, default=0, help="core for wrk and nginx (default 0)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep-logs", help="copy the processes' logs to this directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds = 1.0, 0.0, 1
    command = shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    info = machine(
        {
            "haproxy": _version(["haproxy", "-v"], r"version (\S+)"),
            "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
            "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        }
    )

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    cells = run(args)
    print()
    for key, value in info.items():
        print(f"- {key}: {value}")
    print(f"- command: `python {command}`")
    print(
        f"- wrk: 1 thread, {args.connections} connections, {args.duration:g} s per cell "
        f"(after {args.warmup:g} s warm-up), median of {args.rounds} round(s), on CPU {args.client_cpu} "
        "with nginx; "
        f"halb (1 worker) and HAProxy (nbthread 1) on CPU {args.proxy_cpu}"
    )
    print()
    print(table(cells))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": info, "command": command, "cells": [asdict(c) for c in cells]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
