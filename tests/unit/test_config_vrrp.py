"""The `[vrrp]` table: defaults, every key, and errors that name the file, the key path and the problem."""

from __future__ import annotations

import os
import stat
import textwrap
import tomllib
from pathlib import Path

import pytest

from halb.cluster_config import BackendSpec, ClusterSpec, NodeSpec, node_config
from halb.config import load, parse
from halb.config_model import GarpConfig, TrackConfig
from halb.errors import ConfigError

BASE = """
[node]
name = "lb1"

[[listeners]]
name = "web"
bind = "0.0.0.0:8080"
pool = "app"

[pools.app]
backends = [{ name = "a", address = "127.0.0.1:9001" }]
"""


def write(tmp_path: Path, vrrp: str) -> Path:
    path = tmp_path / "halb.toml"
    path.write_text(BASE + "\n[vrrp]\n" + textwrap.dedent(vrrp))
    return path


def error_for(tmp_path: Path, vrrp: str) -> ConfigError:
    path = write(tmp_path, vrrp)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.file == str(path)
    return info.value


MINIMAL = """
interface = "eth0"
vrid = 51
virtual_ips = ["10.0.0.100"]
"""


def test_no_vrrp_table_means_none(tmp_path: Path) -> None:
    path = tmp_path / "halb.toml"
    path.write_text(BASE)
    assert load(path).vrrp is None


def test_minimal_table_gets_keepalived_like_defaults(tmp_path: Path) -> None:
    vrrp = load(write(tmp_path, MINIMAL)).vrrp
    assert vrrp is not None
    assert (vrrp.interface, vrrp.vrid, vrrp.priority) == ("eth0", 51, 100)
    assert (vrrp.advert_interval, vrrp.preempt, vrrp.preempt_delay) == (1.0, True, 0.0)
    assert vrrp.virtual_ips == ("10.0.0.100/32",)  # no length: /32, like keepalived
    assert vrrp.vip_addresses == ("10.0.0.100",)
    assert vrrp.unicast_peers == ()
    assert vrrp.primary_ip is None
    assert vrrp.checksum_mode == "pseudo_header"
    assert vrrp.garp == GarpConfig(repeat=5, interval=0.2, refresh=0.0)
    assert vrrp.track == TrackConfig(weight=50, listeners=True, pools=True, interface=True)
    assert vrrp.notify is None
    assert vrrp.instance_name == "VI_51"


def test_every_key(tmp_path: Path) -> None:
    script = tmp_path / "notify.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    vrrp = load(
        write(
            tmp_path,
            f"""
            interface = "eth1"
            vrid = 7
            name = "front"
            priority = 255
            advert_interval = 0.1
            preempt = false
            preempt_delay = 30
            virtual_ips = ["192.168.56.100/24", "192.168.56.101"]
            unicast_peers = ["192.168.56.12", "192.168.56.13"]
            primary_ip = "192.168.56.11"
            checksum_mode = "rfc9568"
            garp = {{ repeat = 3, interval = 0.5, refresh = 60 }}
            track = {{ weight = 20, listeners = false, pools = true, interface = false }}
            notify = "{script}"
            """,
        )
    ).vrrp
    assert vrrp is not None
    assert (vrrp.interface, vrrp.vrid, vrrp.instance_name, vrrp.priority) == ("eth1", 7, "front", 255)
    assert (vrrp.advert_interval, vrrp.preempt, vrrp.preempt_delay) == (0.1, False, 30.0)
    assert vrrp.virtual_ips == ("192.168.56.100/24", "192.168.56.101/32")
    assert vrrp.unicast_peers == ("192.168.56.12", "192.168.56.13")
    assert vrrp.primary_ip == "192.168.56.11"
    assert vrrp.checksum_mode == "rfc9568"
    assert vrrp.garp == GarpConfig(repeat=3, interval=0.5, refresh=60.0)
    assert vrrp.track == TrackConfig(weight=20, listeners=False, pools=True, interface=False)
    assert vrrp.notify == str(script)


@pytest.mark.parametrize(
    ("vrrp", "key", "problem"),
    [
        ('vrid = 1\nvirtual_ips = ["10.0.0.1"]', "vrrp.interface", "is required"),
        ('interface = "eth0"\nvirtual_ips = ["10.0.0.1"]', "vrrp.vrid", "is required"),
        ('interface = "a/b"\nvrid = 1\nvirtual_ips = ["10.0.0.1"]', "vrrp.interface", "not an interface"),
        ('interface = "x234567890123456"\nvrid = 1\nvirtual_ips = ["10.0.0.1"]', "vrrp.interface", "1-15"),
        (MINIMAL.replace("vrid = 51", "vrid = 0"), "vrrp.vrid", ">= 1"),
        (MINIMAL.replace("vrid = 51", "vrid = 256"), "vrrp.vrid", "<= 255"),
        (MINIMAL + "priority = 0", "vrrp.priority", ">= 1"),
        (MINIMAL + "priority = 256", "vrrp.priority", "<= 255"),
        (MINIMAL + 'priority = "high"', "vrrp.priority", "expected an integer"),
        (MINIMAL + "advert_interval = 0.001", "vrrp.advert_interval", ">= 0.01"),
        (MINIMAL + "advert_interval = 41", "vrrp.advert_interval", "<= 40.95"),
        (MINIMAL + "advert_interval = 0.015", "vrrp.advert_interval", "whole number of centiseconds"),
        (MINIMAL + 'preempt = "yes"', "vrrp.preempt", "expected true or false"),
        (MINIMAL + "preempt_delay = -1", "vrrp.preempt_delay", ">= 0"),
        (MINIMAL + "preempt_delay = 1001", "vrrp.preempt_delay", "<= 1000"),
        (MINIMAL.replace('["10.0.0.100"]', "[]"), "vrrp.virtual_ips", "at least one"),
        (MINIMAL.replace('["10.0.0.100"]', '"10.0.0.100"'), "vrrp.virtual_ips", "array of strings"),
        (MINIMAL.replace('["10.0.0.100"]', '["10.0.0.1", "10.0.0.x"]'), "vrrp.virtual_ips[1]", "IPv4"),
        (MINIMAL.replace('["10.0.0.100"]', '["fd00::1"]'), "vrrp.virtual_ips[0]", "IPv4"),
        (MINIMAL.replace('["10.0.0.100"]', '["10.0.0.1/33"]'), "vrrp.virtual_ips[0]", "1..32"),
        (MINIMAL.replace('["10.0.0.100"]', '["10.0.0.1/x"]'), "vrrp.virtual_ips[0]", "1..32"),
        (MINIMAL.replace('["10.0.0.100"]', '["224.0.0.18"]'), "vrrp.virtual_ips[0]", "cannot be"),
        (
            MINIMAL.replace('["10.0.0.100"]', '["10.0.0.1", "10.0.0.1/24"]'),
            "vrrp.virtual_ips[1]",
            "listed twice",
        ),
        (MINIMAL + 'unicast_peers = ["10.0.0.2", "nope"]', "vrrp.unicast_peers[1]", "IPv4"),
        (MINIMAL + 'unicast_peers = ["10.0.0.2", "10.0.0.2"]', "vrrp.unicast_peers[1]", "listed twice"),
        (
            MINIMAL + 'primary_ip = "10.0.0.2"\nunicast_peers = ["10.0.0.2"]',
            "vrrp.unicast_peers[0]",
            "own primary_ip",
        ),
        (MINIMAL + 'unicast_peers = ["10.0.0.100"]', "vrrp.unicast_peers", "also one of virtual_ips"),
        (MINIMAL + 'primary_ip = "10.0.0"', "vrrp.primary_ip", "IPv4"),
        (MINIMAL + 'primary_ip = "10.0.0.100"', "vrrp.primary_ip", "also one of virtual_ips"),
        (MINIMAL + 'checksum_mode = "v2"', "vrrp.checksum_mode", "must be one of"),
        (MINIMAL + "garp = { repeat = -1 }", "vrrp.garp.repeat", ">= 0"),
        (MINIMAL + "garp = { interval = -0.1 }", "vrrp.garp.interval", ">= 0"),
        (MINIMAL + "garp = { refresh = -5 }", "vrrp.garp.refresh", ">= 0"),
        (MINIMAL + "garp = { count = 3 }", "vrrp.garp.count", "unknown key"),
        (MINIMAL + "garp = 3", "vrrp.garp", "expected a table"),
        (MINIMAL + "track = { weight = 255 }", "vrrp.track.weight", "<= 254"),
        (MINIMAL + "track = { weight = -10 }", "vrrp.track.weight", ">= 0"),
        (MINIMAL + 'track = { pools = "yes" }', "vrrp.track.pools", "true or false"),
        (MINIMAL + "track = { scripts = [] }", "vrrp.track.scripts", "unknown key"),
        (MINIMAL + 'notify = "notify.sh"', "vrrp.notify", "absolute path"),
        (MINIMAL + 'notify = "/nonexistent/halb-notify"', "vrrp.notify", "does not exist"),
        (MINIMAL + 'name = "has space"', "vrrp.name", "letters, digits"),
        (MINIMAL + "advert_int = 1", "vrrp.advert_int", "unknown key"),
    ],
)
def test_errors_name_the_key_and_the_problem(tmp_path: Path, vrrp: str, key: str, problem: str) -> None:
    error = error_for(tmp_path, vrrp)
    assert error.key == key, str(error)
    assert problem in error.problem, str(error)
    assert str(error).startswith(f"{tmp_path / 'halb.toml'}: {key}: ")


def test_notify_must_be_executable(tmp_path: Path) -> None:
    script = tmp_path / "notify.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    if os.geteuid() == 0:
        # root may execute anything with an x bit; a file with none is still refused
        assert not script.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    error = error_for(tmp_path, MINIMAL + f'notify = "{script}"')
    assert (error.key, error.problem) == ("vrrp.notify", f"{script} is not executable")
    error = error_for(tmp_path, MINIMAL + f'notify = "{tmp_path}"')
    assert "not a file" in error.problem


def test_vrrp_must_be_a_table(tmp_path: Path) -> None:
    path = tmp_path / "halb.toml"
    path.write_text('vrrp = "on"\n' + BASE)
    with pytest.raises(ConfigError, match="vrrp: expected a table"):
        load(path)


def test_advert_interval_is_normalised_to_centiseconds(tmp_path: Path) -> None:
    vrrp = load(write(tmp_path, MINIMAL + "advert_interval = 40.95")).vrrp
    assert vrrp is not None and vrrp.advert_interval == 40.95
    vrrp = load(write(tmp_path, MINIMAL + "advert_interval = 3")).vrrp
    assert vrrp is not None and vrrp.advert_interval == 3.0


def test_generated_cluster_configs_carry_a_loadable_vrrp_table() -> None:
    spec = ClusterSpec(
        lbs=(NodeSpec("lb1", "10.99.0.11"), NodeSpec("lb2", "10.99.0.12")),
        backends=(BackendSpec("web1", "10.99.0.51"),),
        vip="10.99.0.100",
        advert_interval=0.1,
    )
    for name, priority in (("lb1", 150), ("lb2", 140)):
        vrrp = parse(tomllib.loads(node_config(spec, name)), name).vrrp
        assert vrrp is not None
        assert (vrrp.interface, vrrp.vrid, vrrp.priority) == ("eth0", 51, priority)
        assert vrrp.advert_interval == 0.1
        assert vrrp.virtual_ips == ("10.99.0.100/32",)
        assert vrrp.track.weight > 150 - 140  # the tracking weight beats the priority gap
