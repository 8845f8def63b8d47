#!/usr/bin/env python3
"""Two (or more) halb code trees side by side: did a change make the proxy faster?

How this works: one nginx (the backend, on `--client-cpu`) and one halb node per tree, all pinned to
`--proxy-cpu` (an idle node costs nothing measurable). Each tree runs from its own checkout through
`PYTHONPATH`, with the working directory set outside any checkout (`python -m halb` would otherwise import
the `halb/` of the current directory, whatever `PYTHONPATH` says). Then `--rounds` times, for each tree in
turn: a 1 s wrk warm-up and a `--duration` s wrk run of `--pattern` (keep-alive or new-conn) against its
HTTP listener (`--mode tcp`: its TCP listener; `--mode https`: an HTTP listener with `tls`, a throw-away
ECDSA P-256 certificate, wrk speaking TLS; `--access-log N`: the N-th tree writes an access log, so
`python bench/ab.py . . --access-log 1` measures what logging costs; `--python` once per tree runs each
with that interpreter, so `python bench/ab.py . . --python /tmp/other-venv/bin/python --python
.venv/bin/python` compares two interpreters on the same code). It prints each tree's runs and
their median. Alternating the trees round by round is what makes small differences visible on a machine
whose speed drifts: the absolute figures move by about ±5% between runs here, the order of two trees
measured side by side much less.

Usage: `python bench/ab.py /tmp/before /path/to/halb --pattern keep-alive --rounds 3`
(`git worktree add /tmp/before HEAD~1` makes a tree of the previous commit). Every process it starts is
killed at exit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Processes, free_port, parse_wrk, start_halb, start_nginx, wrk_command  # the sibling script

ROOT = Path(__file__).resolve().parent.parent


def https_listener(tmp: Path) -> tuple[str, int]:
    """A TLS listener's TOML (for `start_halb(extra=...)`) with a fresh certificate, and its port."""
    sys.path.insert(0, str(ROOT))
    from tests.certs import make_cert  # (the test suite's certificate maker: cryptography, no CLI)

    cert, key = make_cert(tmp, "bench")
    port = free_port()
    listener = f"""
[[listeners]]
name = "https"
bind = "127.0.0.1:{port}"
mode = "http"
pool = "nginx"
backlog = 4096
tls = {{ cert = "{cert}", key = "{key}" }}
"""
    return listener, port


def measure(cmd: list[str], tree: Path) -> float:
    """req/s of one wrk run; a run that failed or got error answers is no measurement (RuntimeError)."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    rps, _p99, errors, non_2xx = parse_wrk(done.stdout)
    if non_2xx:
        raise RuntimeError(f"{tree}: {non_2xx} answers were not 2xx/3xx:\n{done.stdout}")
    if errors:
        print(f"ab: {tree}: {errors} socket errors in one run", file=sys.stderr)
    return rps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="checkouts of halb to compare (directories with halb/)")
    parser.add_argument("--pattern", default="keep-alive", choices=("keep-alive", "new-conn"))
    parser.add_argument("--mode", default="http", choices=("http", "tcp", "https"))
    parser.add_argument(
        "--access-log",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="the N-th tree (from 0) writes an access log (to a file in its temporary directory)",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="PATH",
        help="once per tree, in order: the interpreter (a virtualenv's python) that runs it",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--proxy-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    args = parser.parse_args(argv)
    trees = [Path(t).resolve() for t in args.trees]
    for tree in trees:
        if not (tree / "halb" / "__init__.py").is_file():
            raise SystemExit(f"ab: {tree} has no halb/ package")
    if args.python and len(args.python) != len(trees):
        raise SystemExit(f"ab: {len(args.python)} --python for {len(trees)} trees (give one per tree)")
    # (absolute, not resolved: a virtualenv's python is a symlink to the base interpreter)
    pythons = [os.path.abspath(p) for p in args.python] or [sys.executable] * len(trees)
    results: list[list[float]] = [[] for _ in trees]  # by position: the same tree twice is an A/A run
    with tempfile.TemporaryDirectory(prefix="halb-ab-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp)
        try:
            backend_port = start_nginx(procs, tmp, args.client_cpu)
            ports: list[int] = []
            for i, tree in enumerate(trees):
                node_dir = tmp / f"tree{i}"
                node_dir.mkdir()
                extra, https_port = https_listener(node_dir) if args.mode == "https" else ("", 0)
                node_extra = f'access_log = "{node_dir / "access.log"}"' if i in args.access_log else ""
                _, http_port, tcp_port, _ = start_halb(
                    procs, node_dir, args.proxy_cpu, backend_port, extra, node_extra, tree, pythons[i]
                )
                ports.append({"http": http_port, "tcp": tcp_port, "https": https_port}[args.mode])
            for _ in range(args.rounds):
                for i, port in enumerate(ports):
                    scheme = "https" if args.mode == "https" else "http"
                    warm = wrk_command(args.client_cpu, port, args.pattern, 1.0, args.connections, scheme)
                    subprocess.run(warm, capture_output=True, check=False)
                    cmd = wrk_command(
                        args.client_cpu, port, args.pattern, args.duration, args.connections, scheme
                    )
                    results[i].append(measure(cmd, trees[i]))
        finally:
            procs.close()
    what = f"{args.mode} {args.pattern}, {args.rounds} rounds of {args.duration:g} s"
    print(f"{what}, {args.connections} connections")
    for i, (tree, runs) in enumerate(zip(trees, results, strict=True)):
        runs_text = ", ".join(f"{r:,.0f}" for r in runs)
        logging = "  (access log on)" if i in args.access_log else ""
        python = f"  ({pythons[i]})" if args.python else ""
        print(f"{statistics.median(runs):>10,.0f} req/s (median)  {tree}{python}{logging}  [{runs_text}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
