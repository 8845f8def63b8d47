"""keepalived in a lab namespace, for the lab tests: write its config, start it, read its state, stop it.

How this works: `KeepalivedNode(namespace, priority=...)` makes a private temporary directory (mode 0755:
keepalived's `enable_script_security` refuses scripts under a directory others may write) holding
`keepalived.conf` (VRRPv3, one `vrrp_instance`, `state BACKUP`, the VIP as /32 on eth0), a `notify`
script that appends "<time> INSTANCE <name> <STATE> <priority>" to `states`, keepalived's log and its pid
files. `start()` checks the config with `keepalived --config-test`, then runs

    ip netns exec NS keepalived --dont-fork --log-console --no-syslog --vrrp --dont-respawn -f CONF ...

in a new session (so its pid is its process group, which also holds keepalived's VRRP child).
`state()` is keepalived's own last word from the notify script; `close()` sends SIGTERM to the group
(keepalived then removes its VIPs), SIGKILL after 5 s, SIGKILLs anything left in the group, and removes
the directory. Nothing is shared with any other keepalived: every node has its own directory and pid
files, and keepalived never runs outside the namespace it was given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CONFIG = """\
global_defs {{
    router_id {router_id}
    vrrp_version 3
    script_user root
    enable_script_security
}}
vrrp_instance {instance} {{
    state BACKUP
    interface {interface}
    virtual_router_id {vrid}
    priority {priority}
    advert_int {advert}
    virtual_ipaddress {{
        {vip}/32 dev {interface}
    }}
    notify {notify}
}}
"""

NOTIFY = """\
#!/bin/sh
# keepalived runs: notify INSTANCE <name> <MASTER|BACKUP|FAULT|STOP> <priority>
echo "$(date +%s.%N) $1 $2 $3 $4" >> {states}
"""


def keepalived_config(
    instance: str,
    vrid: int,
    priority: int,
    advert: float,
    vip: str,
    notify: str,
    interface: str = "eth0",
    router_id: str = "halb_lab",
) -> str:
    """The text of a one-instance VRRPv3 keepalived.conf (pure)."""
    return CONFIG.format(
        router_id=router_id,
        instance=instance,
        interface=interface,
        vrid=vrid,
        priority=priority,
        advert=f"{advert:g}",
        vip=vip,
        notify=notify,
    )


class KeepalivedNode:
    """One keepalived (VRRP only) in one namespace, with every file of it in a private directory."""

    def __init__(
        self,
        namespace: str,
        priority: int,
        vip: str,
        vrid: int = 51,
        advert: float = 1.0,
        instance: str = "VI_HALB",
    ) -> None:
        self.namespace = namespace
        self.dir = Path(tempfile.mkdtemp(prefix="halb-keepalived-"))
        os.chmod(self.dir, 0o755)
        self.states = self.dir / "states"
        self.log = self.dir / "keepalived.log"
        notify = self.dir / "notify.sh"
        notify.write_text(NOTIFY.format(states=self.states))
        notify.chmod(0o755)
        self.conf = self.dir / "keepalived.conf"
        self.conf.write_text(keepalived_config(instance, vrid, priority, advert, vip, str(notify)))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("keepalived") is None:
            raise RuntimeError("keepalived is not installed (scripts/setup installs it)")
        check = subprocess.run(
            ["keepalived", "--config-test", "-f", str(self.conf)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"keepalived rejects {self.conf}: {check.stderr.strip()}")
        argv = [
            "ip", "netns", "exec", self.namespace,
            "keepalived", "--dont-fork", "--log-console", "--no-syslog", "--vrrp", "--dont-respawn",
            "-f", str(self.conf), "-p", str(self.dir / "keepalived.pid"), "-r", str(self.dir / "vrrp.pid"),
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def state_lines(self) -> list[list[str]]:
        try:
            return [line.split() for line in self.states.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def state(self) -> str | None:
        """keepalived's last notified state (MASTER, BACKUP, FAULT, STOP), None before the first one."""
        lines = self.state_lines()
        return lines[-1][3] if lines and len(lines[-1]) > 3 else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        """Stop keepalived however it is (SIGTERM, then SIGKILL), then remove every file of it."""
        try:
            if self.proc is not None:
                stop_group(self.proc)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace`; then SIGKILL anything left in the group."""
    with contextlib.suppress(ProcessLookupError):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(grace)
    group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    for pid in group.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
