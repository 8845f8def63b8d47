"""A tiny service supervisor for the lab: run a service, and when it ends run `halb vip release CONFIG`.

How this works: the lab starts each balancer as

    ip netns exec <ns> python -m halb.lab.supervise --pid-file F --release CFG -- python -m halb serve CFG ...

The supervisor starts the service in a session of its own (so the service's pid is its process-group id,
and `halb lab kill lb1` SIGKILLs `halb serve` and its proxy workers but not the supervisor), writes
"<pid> <starttime>" of the service to F (the lab records that pid as the node's), waits for the service to
end -- however it ends, SIGKILL included -- and then runs `halb vip release CFG` in-process (same code as
the CLI command, imported while the service runs so the release takes milliseconds, not an interpreter
start). That is exactly what systemd's `ExecStopPost=halb vip release CFG` does on a real host: a killed
node never keeps answering ARP for a VIP a peer has taken over. With the VIP lease ([cluster]) the release
also closes and deletes the node's nft fence and has a live member release the node's lease (bounded by
~1.5 s), so the next VRRP master takes the VIP over at once instead of after the lease's expiry. The
supervisor then exits with the service's status (128 + signal number when it was killed by a signal).

SIGTERM/SIGINT/SIGHUP sent to the supervisor are passed on to the service's process group.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _starttime(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(text[text.rindex(")") + 2 :].split()[19])


def _say(message: str) -> None:
    sys.stdout.write(f"--- {time.strftime('%H:%M:%S')} supervisor: {message}\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halb.lab.supervise")
    parser.add_argument("--pid-file", required=True, help="where to write '<service pid> <starttime>'")
    parser.add_argument("--release", metavar="CONFIG", help="run `halb vip release CONFIG` afterwards")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the service's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no service command given (after --)")

    child = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL)
    pid_file = Path(args.pid_file)
    tmp = pid_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{child.pid} {_starttime(child.pid)}\n")
    os.replace(tmp, pid_file)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    release = None
    if args.release:
        import pyroute2  # noqa: F401  (imported now, while the service runs, so the release is fast)

        import halb.cluster.handoff
        import halb.vrrp.fence  # noqa: F401
        from halb.cli import main as halb_main

        def release() -> None:
            with contextlib.suppress(SystemExit):
                halb_main(["vip", "release", args.release], standalone_mode=False)

    code = child.wait()
    status = code if code >= 0 else 128 - code
    _say(f"service pid {child.pid} exited ({'signal ' + str(-code) if code < 0 else 'status ' + str(code)})")
    if release is not None:
        started = time.monotonic()
        try:
            release()
        except Exception as exc:
            _say(f"halb vip release failed: {exc}")
        else:
            _say(f"halb vip release done in {time.monotonic() - started:.3f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
