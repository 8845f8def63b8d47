"""The lab's memory on disk: what was created, so that `down` can undo it even after a crash.

How this works: each lab has a run directory `/run/halb-lab/<prefix>/` (tmpfs: gone after a reboot, like
the namespaces themselves) holding `state.json`, the generated node configs and one log per service. The
rule is *record, then create*: a namespace is appended to `namespaces` and the file saved before
`ip netns add` runs, a process's command line is saved before it is started and its pid right after, the
nft table is flagged before it is made. So after a crash at any point the file names a superset of what
exists, and `down` deletes the lot, tolerating whatever was never made. Saves are atomic (write a temp file,
then rename). `HALB_LAB_RUN` moves the root directory (for tests of this module).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from halb.lab.topology import Topology

STATE_FILE = "state.json"


def run_root() -> Path:
    return Path(os.environ.get("HALB_LAB_RUN", "/run/halb-lab"))


def run_dir(prefix: str) -> Path:
    return run_root() / prefix


@dataclass
class ProcessRecord:
    host: str
    argv: list[str]
    log: str
    pid: int | None = None
    starttime: int | None = None  # field 22 of /proc/<pid>/stat: tells our process from a reused pid
    started_at: float | None = None
    # balancers run under `halb.lab.supervise` (it releases the VIPs after `halb serve` ends, however it
    # ends); `pid` is then halb serve itself and these name the supervisor
    supervisor_pid: int | None = None
    supervisor_starttime: int | None = None


@dataclass
class LabState:
    prefix: str
    topology: Topology
    created_at: float = field(default_factory=time.time)
    namespaces: list[str] = field(default_factory=list)
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    nft_table: bool = False
    partitions: list[dict[str, list[str]]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # how `up` was called (e.g. vrrp)

    @property
    def dir(self) -> Path:
        return run_dir(self.prefix)

    @property
    def path(self) -> Path:
        return self.dir / STATE_FILE

    def log_path(self, host: str) -> Path:
        return self.dir / f"{host}.log"

    def config_path(self, host: str) -> Path:
        return self.dir / f"{host}.toml"

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "created_at": self.created_at,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.created_at)),
            "topology": self.topology.to_dict(),
            "namespaces": self.namespaces,
            "processes": {name: asdict(p) for name, p in self.processes.items()},
            "configs": self.configs,
            "nft_table": self.nft_table,
            "partitions": self.partitions,
            "options": self.options,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabState:
        return cls(
            prefix=data["prefix"],
            topology=Topology.from_dict(data["topology"]),
            created_at=data.get("created_at", 0.0),
            namespaces=list(data.get("namespaces", [])),
            processes={k: ProcessRecord(**v) for k, v in data.get("processes", {}).items()},
            configs=dict(data.get("configs", {})),
            nft_table=bool(data.get("nft_table", False)),
            partitions=list(data.get("partitions", [])),
            options=dict(data.get("options", {})),
        )

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, self.path)


def load(prefix: str) -> LabState | None:
    """The lab's state, or None if there is no (readable) state file."""
    path = run_dir(prefix) / STATE_FILE
    try:
        return LabState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a torn or foreign file: `down` falls back to sweeping by name


def remove_run_dir(prefix: str) -> None:
    shutil.rmtree(run_dir(prefix), ignore_errors=True)
    with contextlib.suppress(OSError):
        run_root().rmdir()  # only if no other lab is left
