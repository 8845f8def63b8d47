"""Start, signal and inspect the lab's services, each a detached process inside its host's namespace.

How this works: a service is started as `ip netns exec NS <argv>` (ip joins the namespace and execs the
command, so the pid we get is the service itself) in a new session, so its pid is also its process-group
id and signals go to the whole group (`halb serve` and its proxy workers, which also die with their
parent). stdout and stderr are appended to `<run dir>/<host>.log`. The lab CLI exits right after starting
them; the services are never its children for long, so everything here works from the recorded pid alone.

A pid can be reused after its process is gone, so a record also keeps the process's start time (field 22
of /proc/<pid>/stat) and nothing is signalled unless both still match. A zombie counts as gone.

Balancers are the exception to "the pid is the service itself": each runs under `halb.lab.supervise`,
which starts `halb serve` in a session of its own, writes its pid to `<run dir>/<host>.pid` and, once
serve has ended (SIGKILL included), runs `halb vip release CONFIG` -- the lab's stand-in for systemd's
ExecStopPost. The record's pid is `halb serve` (so kill/stop/freeze hit serve and its workers, never the
supervisor) and `supervisor_pid` the supervisor; `kill` and `stop` return only after the supervisor has
finished the release, and `start` waits for a previous supervisor before starting a new one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from halb.lab.netns import LabError
from halb.lab.state import LabState, ProcessRecord
from halb.lab.topology import REDIS_PORT, Host

TERM_GRACE = 3.0
PID_FILE_TIMEOUT = 10.0
RELEASE_TIMEOUT = 10.0  # how long a supervisor may take to release the VIPs after its service ended


def service_argv(host: Host, config_path: Path | None) -> list[str] | None:
    """The command that runs `host`'s service, or None for hosts without one (the client)."""
    if host.role in ("lb", "witness"):
        if config_path is None:
            raise LabError(f"{host.name} has no node config")
        return [sys.executable, "-m", "halb", "serve", str(config_path), "--log-level", "INFO"]
    if host.role == "web":
        return [sys.executable, "-m", "halb", "demo-backend", host.name, "--listen", "0.0.0.0:80"]
    if host.role == "redis":
        # a replica (the lab's --sentinel: redis2) starts from its config file (replicaof ...)
        conf = [str(config_path)] if config_path is not None else []
        return [
            "redis-server", *conf, "--bind", host.address, "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
    if host.role == "sentinel":
        if config_path is None:
            raise LabError(f"{host.name} has no sentinel config")
        return ["redis-sentinel", str(config_path)]  # (sentinel rewrites it: it lives in the run dir)
    return None


# --- /proc ---------------------------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None if there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) is in parentheses and may contain spaces or ')'
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def is_ours(record: ProcessRecord) -> bool:
    """True while the recorded process exists, is not a zombie, and is the one we started."""
    if record.pid is None:
        return False
    stat = proc_stat(record.pid)
    if stat is None or stat[0] in ("Z", "X", "x"):
        return False
    return record.starttime is None or stat[1] == record.starttime


def supervisor_of(record: ProcessRecord) -> ProcessRecord | None:
    """The supervisor of a supervised service, as a record of its own (None for unsupervised ones)."""
    if record.supervisor_pid is None:
        return None
    return ProcessRecord(
        host=f"{record.host} (supervisor)",
        argv=[],
        log=record.log,
        pid=record.supervisor_pid,
        starttime=record.supervisor_starttime,
    )


def wait_supervisor(record: ProcessRecord, timeout: float = RELEASE_TIMEOUT) -> None:
    """Wait until the supervisor has run its post-stop release and exited (SIGKILL it after `timeout`)."""
    supervisor = supervisor_of(record)
    if supervisor is None or not wait_gone([supervisor], timeout):
        return
    signal_group(supervisor, signal.SIGKILL)
    wait_gone([supervisor], 2.0)


def run_state(record: ProcessRecord | None) -> str:
    """One of "running", "frozen" (SIGSTOPped: state T) or "stopped"."""
    if record is None or not is_ours(record):
        return "stopped"
    stat = proc_stat(record.pid)  # type: ignore[arg-type]
    return "frozen" if stat is not None and stat[0] in ("T", "t") else "running"


# --- start and signal ---------------------------------------------------------------------------------
def start(state: LabState, host: Host) -> ProcessRecord:
    """Start `host`'s service detached; the record is saved before and after the start."""
    config = state.configs.get(host.name)
    argv = service_argv(host, Path(config) if config else None)
    if argv is None:
        raise LabError(f"{host.name} ({host.role}) runs no service")
    old = state.processes.get(host.name)
    if old is not None and is_ours(old):
        raise LabError(f"{host.name} is already running (pid {old.pid})")
    if old is not None:
        wait_supervisor(old)  # a previous supervisor may still be releasing the VIPs
    log_path = state.log_path(host.name)
    pid_file = state.dir / f"{host.name}.pid"
    if host.role == "lb":
        pid_file.unlink(missing_ok=True)
        config = state.configs[host.name]
        argv = [
            sys.executable, "-m", "halb.lab.supervise", "--pid-file", str(pid_file), "--release", config,
            "--", *argv,
        ]  # fmt: skip
    record = ProcessRecord(host=host.name, argv=argv, log=str(log_path))
    state.processes[host.name] = record
    state.save()  # record, then create: a crash from here on leaves a trace for `down`
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd=state.dir,
        )
    stat = proc_stat(proc.pid)
    record.pid = proc.pid
    record.starttime = stat[1] if stat else -1  # -1: gone before we looked; never matches a later pid
    record.started_at = time.time()
    if host.role == "lb":
        record.supervisor_pid, record.supervisor_starttime = record.pid, record.starttime
        state.save()  # the supervisor is known before we wait for it
        record.pid, record.starttime = _read_pid_file(pid_file, proc)
    state.save()
    return record


def _read_pid_file(path: Path, supervisor: subprocess.Popen[bytes]) -> tuple[int, int]:
    """(pid, starttime) of the supervised service, once the supervisor has written them."""
    deadline = time.monotonic() + PID_FILE_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid_text, starttime_text = path.read_text().split()
            return int(pid_text), int(starttime_text)
        if supervisor.poll() is not None:
            raise LabError(f"the supervisor exited ({supervisor.returncode}) before starting the service")
        time.sleep(0.01)
    raise LabError(f"the supervisor wrote no pid file {path} within {PID_FILE_TIMEOUT:.0f}s")


def signal_group(record: ProcessRecord, sig: signal.Signals) -> bool:
    """Send `sig` to the service's process group; False if the process is gone."""
    if not is_ours(record):
        return False
    assert record.pid is not None
    try:
        os.killpg(record.pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(records: Iterable[ProcessRecord], timeout: float) -> list[ProcessRecord]:
    """Wait until every process is gone; returns the ones still there after `timeout`."""
    pending = [r for r in records if is_ours(r)]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        time.sleep(0.02)
        pending = [r for r in pending if is_ours(r)]
    return pending


def kill(record: ProcessRecord, timeout: float = 5.0) -> bool:
    """SIGKILL the process group and wait for it to go (and for its supervisor's release)."""
    if not signal_group(record, signal.SIGKILL):
        return False
    if wait_gone([record], timeout):
        raise LabError(f"{record.host} (pid {record.pid}) survived SIGKILL for {timeout:.0f}s")
    wait_supervisor(record)
    return True


def stop(records: Iterable[ProcessRecord], grace: float = TERM_GRACE) -> None:
    """SIGTERM each group (and SIGCONT, so a frozen one can act on it), SIGKILL what is left after `grace`."""
    records = list(records)
    for record in records:
        if signal_group(record, signal.SIGTERM):
            signal_group(record, signal.SIGCONT)
    for record in wait_gone(records, grace):
        signal_group(record, signal.SIGKILL)
    left = wait_gone(records, 5.0)
    if left:
        raise LabError(f"could not stop: {', '.join(f'{r.host} (pid {r.pid})' for r in left)}")
    for record in records:
        wait_supervisor(record)


def kill_pids(pids: Iterable[int]) -> None:
    """SIGKILL plain pids (strays found in a lab namespace); missing ones are fine."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def log_tail(record: ProcessRecord, lines: int = 15) -> str:
    try:
        text = Path(record.log).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
