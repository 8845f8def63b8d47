#!/usr/bin/env python3
"""Profile halb's proxy worker under wrk load with py-spy: where does one request's CPU time go?

How this works: like `bench/run.py` it starts nginx and one halb node (one worker, pinned to
`--proxy-cpu`), then runs wrk on one cell (`--cell http-keep-alive`, `http-new-conn`, `tcp-keep-alive`
or `tcp-new-conn`) while `py-spy record` samples the worker process (with `--native`, C frames of uvloop
are shown too). It prints the functions with the most samples, by own time ("self") and including their
callees ("total"), and keeps the raw collapsed stacks (`--out`, flamegraph.pl / speedscope can read it).
Needs `pip install py-spy`. Every process it starts is killed at exit.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Processes, _tree, start_halb, start_nginx, wrk_command  # the sibling script


def summarize(collapsed: str, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    out = [f"{samples} samples"]
    for title, counter in (("self", own), ("total", total)):
        out.append(f"\n-- top {top} by {title} --")
        for frame, count in counter.most_common(top):
            out.append(f"{100 * count / max(samples, 1):6.1f}%  {frame}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cell", default="http-keep-alive", help="http|tcp - keep-alive|new-conn (default http-keep-alive)"
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--proxy-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--native", action="store_true", help="include C frames (slower sampling)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="/tmp/halb-profile.txt", help="collapsed stacks go here")
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        raise SystemExit("profile: py-spy not found (pip install py-spy)")
    mode, _, pattern = args.cell.partition("-")
    with tempfile.TemporaryDirectory(prefix="halb-profile-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp)
        try:
            backend_port = start_nginx(procs, tmp, args.client_cpu)
            halb, http_port, tcp_port, _admin = start_halb(procs, tmp, args.proxy_cpu, backend_port)
            workers = [p for p in _tree(halb.pid) if p != halb.pid]
            if not workers:
                raise SystemExit("profile: no worker process found")
            port = http_port if mode == "http" else tcp_port
            wrk = procs.start(
                "wrk", wrk_command(args.client_cpu, port, pattern, args.duration + 2, args.connections)
            )
            time.sleep(1.0)
            spy = [
                "py-spy", "record", "--pid", str(workers[0]), "--duration", str(int(args.duration)),
                "--rate", "500", "--format", "raw", "--output", args.out, "--nonblocking",
            ]  # fmt: skip
            if args.native:
                spy.append("--native")
            subprocess.run(spy, check=True, capture_output=True, timeout=args.duration + 60)
            wrk.wait(timeout=args.duration + 30)
            print((tmp / "wrk.log").read_text())
        finally:
            procs.close()
    print(summarize(Path(args.out).read_text(), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
