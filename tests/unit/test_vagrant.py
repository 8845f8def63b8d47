"""The Vagrant cluster without a hypervisor: the Vagrantfile validates, the provisioning scripts are
shellcheck-clean, the host plan matches halb.lab.topology's, and the balancer configs that lb.sh writes
(vagrant/node-config.sh, the shared generator) are accepted by `halb.config.load`.

vagrant and shellcheck are required (scripts/setup installs both): a missing one fails the test, it
does not skip it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from halb.config import load
from halb.lab.netns import LB_SYSCTLS
from halb.lab.topology import build

ROOT = Path(__file__).resolve().parents[2]
VAGRANTFILE = ROOT / "Vagrantfile"
SCRIPTS = ROOT / "vagrant"
LB_INTERFACE = "eth1"  # what lb.sh finds on the Debian box; any name works here


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup (or apt-get install -y {name})")
    return path


def vagrant_plan() -> tuple[str, dict[str, str]]:
    """(subnet, {host: address}) as the Vagrantfile's NET and HOSTS say."""
    text = VAGRANTFILE.read_text()
    net = re.search(r'^NET = "(\d+\.\d+\.\d+)"$', text, re.M)
    hosts = re.search(r"^HOSTS = \{(.*?)\}", text, re.M | re.S)
    assert net and hosts, 'the Vagrantfile no longer has NET = "a.b.c" and HOSTS = {...}'
    table = dict(re.findall(r'"(\w+)" => (\d+)', hosts.group(1)))
    return f"{net.group(1)}.0/24", {name: f"{net.group(1)}.{n}" for name, n in table.items()}


def test_vagrantfile_validates(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot-vagrant"),  # not .vagrant/ in the repo
        "VAGRANT_CHECKPOINT_DISABLE": "1",  # no version check over the network
    }
    result = subprocess.run(
        [tool("vagrant"), "validate", "--ignore-provider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_scripts_are_shellcheck_clean() -> None:
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) >= 5, scripts
    result = subprocess.run([tool("shellcheck"), *scripts], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_vagrant_hosts_follow_the_lab_topology() -> None:
    subnet, hosts = vagrant_plan()
    lbs = sum(name.startswith("lb") for name in hosts)
    backends = sum(name.startswith("web") for name in hosts)
    topo = build(lbs=lbs, backends=backends, subnet=subnet)
    assert hosts == {h.name: h.address for h in topo.hosts}


def test_lb_provisioning_config_loads(tmp_path: Path) -> None:
    subnet, hosts = vagrant_plan()
    lbs = sorted(name for name in hosts if name.startswith("lb"))
    webs = sorted(name for name in hosts if name.startswith("web"))
    env = {
        **os.environ,
        "HALB_PYTHON": sys.executable,
        "HALB_SUBNET": subnet,
        "HALB_LBS": str(len(lbs)),
        "HALB_BACKENDS": str(len(webs)),
    }
    vip = build(lbs=len(lbs), backends=len(webs), subnet=subnet).vip
    for node in lbs:
        result = subprocess.run(
            ["bash", str(SCRIPTS / "node-config.sh"), node, LB_INTERFACE],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        path = tmp_path / f"{node}.toml"
        path.write_text(result.stdout)
        config = load(path)
        assert config.node.name == node
        assert str(config.node.admin) == f"{hosts[node]}:9901"
        assert [str(b.address) for b in config.pools["app"].backends] == [f"{hosts[w]}:80" for w in webs]
        assert config.vrrp is not None
        assert config.vrrp.interface == LB_INTERFACE
        assert config.vrrp.vip_addresses == (vip,)


def test_lb_sysctls_are_the_lab_balancers() -> None:
    text = (SCRIPTS / "lb.sh").read_text()
    written = dict(re.findall(r"^(net\.\S+) = (\S+)$", text, re.M))
    assert written == LB_SYSCTLS
