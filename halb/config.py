"""Load and validate a halb TOML configuration before anything starts.

How this works: `load(path)` reads the file with `tomllib` and walks it with a small `Reader` that knows the
key path it is at ("pools.app.backends[1].address"), so every error names the file, the key and the problem
(`ConfigError`). Unknown keys are errors too (a typo must not silently fall back to a default). The result is
the frozen dataclasses of `halb.config_model`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from halb.config_model import (
    AgentConfig,
    BackendConfig,
    ClusterSettings,
    Config,
    GarpConfig,
    HealthConfig,
    HostPort,
    ListenerConfig,
    NodeConfig,
    PoolConfig,
    RouteConfig,
    TlsConfig,
    TrackConfig,
    VrrpSettings,
)
from halb.config_state import (
    check_references,
    listener_ratelimits,
    parse_ratelimits,
    parse_state,
    parse_sticky,
)
from halb.errors import ConfigError
from halb.proxy.source_acl import parse_network


def _algorithms() -> list[str]:
    from halb.balancing.base import policy_names

    return policy_names()


def parse_host_port(text: str) -> HostPort:
    """Parse "host:port" or "[v6]:port". Raises ValueError with a human message."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected a string HOST:PORT")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT")
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"port {port!r} in {text!r} is not a number") from None
    if not 0 < port_number < 65536:
        raise ValueError(f"port {port_number} in {text!r} is outside 1..65535")
    return HostPort(host, port_number)


class Reader:
    """A table of the TOML document plus the key path that leads to it."""

    def __init__(self, source: str, path: str, table: Any) -> None:
        self.source = source
        self.path = path
        if not isinstance(table, dict):
            self.fail("", f"expected a table, got {type(table).__name__}")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, problem: str) -> None:
        raise ConfigError(self.source, self.key(name) if name else self.path, problem)

    def has(self, name: str) -> bool:
        return name in self.table

    def raw(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.table.get(name, default)

    def str(self, name: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.raw(name, default)
        if value is None:
            self.fail(name, "is required")
        if not isinstance(value, str):
            self.fail(name, f"expected a string, got {value!r}")
        if choices and value not in choices:
            self.fail(name, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value

    def int(self, name: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        value = self.raw(name, default)
        if value is None:
            self.fail(name, "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"expected an integer, got {value!r}")
        self._range(name, value, lo, hi)
        return value

    def float(
        self, name: str, default: float | None = None, lo: float | None = None, hi: float | None = None
    ) -> float:
        value = self.raw(name, default)
        if value is None:
            self.fail(name, "is required")
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, f"expected a number of seconds, got {value!r}")
        self._range(name, value, lo, hi)
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.fail(name, f"expected true or false, got {value!r}")
        return value

    def str_list(self, name: str) -> list[str]:
        value = self.raw(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(name, f"expected an array of strings, got {value!r}")
        return list(value)

    def host_port(self, name: str, default: str | None = None) -> HostPort:
        value = self.str(name, default)
        try:
            return parse_host_port(value)
        except ValueError as exc:
            self.fail(name, str(exc))
            raise  # unreachable

    def sub(self, name: str, required: bool = False) -> Reader | None:
        value = self.raw(name)
        if value is None:
            if required:
                self.fail(name, "is required")
            return None
        return Reader(self.source, self.key(name), value)

    def items(self, name: str) -> Iterator[Reader]:
        value = self.raw(name, [])
        if not isinstance(value, list):
            self.fail(name, "expected an array of tables")
        for i, item in enumerate(value):
            yield Reader(self.source, f"{self.key(name)}[{i}]", item)

    def _range(self, name: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo:
            self.fail(name, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            self.fail(name, f"must be <= {hi}, got {value}")

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            self.fail(unknown[0], "unknown key (check the spelling; see docs/configuration.md)")


def _node(r: Reader) -> NodeConfig:
    node = NodeConfig(
        name=r.str("name"),
        admin=r.host_port("admin", "127.0.0.1:9901"),
        workers=r.int("workers", 1, lo=1, hi=64),
        drain_timeout=r.float("drain_timeout", 10.0, lo=0),
        maxconn=r.int("maxconn", 0, lo=0, hi=10_000_000),
        access_log=_access_log(r),
    )
    r.done()
    return node


def _access_log(r: Reader) -> str:
    """`access_log`: "" (none), "-" (standard output) or an absolute path in an existing directory."""
    path = r.str("access_log", "")
    if path in ("", "-"):
        return path
    if not os.path.isabs(path):
        r.fail("access_log", f'must be an absolute path or "-", got {path!r}')
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        r.fail("access_log", f"directory {directory} does not exist")
    if os.path.isdir(path):
        r.fail("access_log", f"{path} is a directory")
    return path


def _listener(r: Reader) -> ListenerConfig:
    d = {f.name: f.default for f in fields(ListenerConfig)}
    listener = ListenerConfig(
        name=r.str("name"),
        bind=r.host_port("bind"),
        pool=r.str("pool"),
        mode=r.str("mode", "http", choices=("http", "tcp")),
        client_timeout=r.float("client_timeout", d["client_timeout"], lo=0.001),
        header_timeout=r.float("header_timeout", d["header_timeout"], lo=0.001),
        tunnel_timeout=r.float("tunnel_timeout", d["tunnel_timeout"], lo=0.001),
        redirect_to_https=r.bool("redirect_to_https", False),
        https_port=r.int("https_port", 443, lo=1, hi=65535),
        max_header_bytes=r.int("max_header_bytes", d["max_header_bytes"], lo=1024, hi=1 << 20),
        max_request_line=r.int("max_request_line", d["max_request_line"], lo=256, hi=1 << 20),
        backlog=r.int("backlog", d["backlog"], lo=1, hi=65535),
        maxconn=r.int("maxconn", 0, lo=0, hi=10_000_000),
        maxconn_per_ip=r.int("maxconn_per_ip", 0, lo=0, hi=10_000_000),
        allow=_networks(r, "allow"),
        deny=_networks(r, "deny"),
        accept_proxy=r.bool("accept_proxy", False),
        tls=_tls(r.sub("tls")),
        ratelimits=listener_ratelimits(r),  # [state]/[ratelimits] keys: halb.config_state
        routes=tuple(_route(route) for route in r.items("routes")),
        response_headers=_response_headers(r.sub("response_headers")),
    )
    r.done()
    return listener


_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Response headers the proxy writes itself: framing, hop-by-hop, and the request id.
_PROXY_OWNED = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
    | {"content-length", "x-request-id"}
)


def _response_headers(r: Reader | None) -> tuple[tuple[str, str], ...]:
    """`response_headers = { "Strict-Transport-Security" = "max-age=63072000" }`"""
    if r is None:
        return ()
    headers = []
    for name in list(r.table):
        value = r.str(name)
        if not _TOKEN.match(name):
            r.fail(name, "is not a valid header name")
        if name.lower() in _PROXY_OWNED:
            r.fail(name, "is set by the proxy itself (framing, hop-by-hop or the request id)")
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F or ord(c) > 0xFF for c in value):
            r.fail(name, "the value has a control character or a character outside Latin-1")
        headers.append((name, value.strip(" \t")))
    r.done()
    return tuple(headers)


_ROUTE_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")


def _route(r: Reader) -> RouteConfig:
    """`routes = [{ host = "api.example.com", path_prefix = "/v1/", pool = "api" }, ...]`"""
    route = RouteConfig(
        pool=r.str("pool"),
        host=r.str("host", ""),
        path_prefix=r.str("path_prefix", ""),
    )
    if route.host and not _ROUTE_HOST.match(route.host):
        r.fail("host", f'{route.host!r} is not a host name, "*.DOMAIN" or [IPv6] (no port, no scheme)')
    if route.path_prefix and not route.path_prefix.startswith("/"):
        r.fail("path_prefix", f"must start with /, got {route.path_prefix!r}")
    if route.path_prefix and any(c <= " " or c == "\x7f" for c in route.path_prefix):
        r.fail("path_prefix", f"{route.path_prefix!r} has a space or control character")
    if not route.host and not route.path_prefix:
        r.fail("", "a route needs host, path_prefix or both (the listener's pool takes everything else)")
    r.done()
    return route


def _networks(r: Reader, name: str) -> tuple[str, ...]:
    """`allow` / `deny`: addresses or networks ("10.0.0.0/8", "192.0.2.7", "2001:db8::/32")."""
    values = r.str_list(name)
    for i, value in enumerate(values):
        try:
            parse_network(value)
        except ValueError as exc:
            r.fail(f"{name}[{i}]", str(exc))
    return tuple(values)


_TLS_VERSIONS = ("1.2", "1.3")


def _tls(r: Reader | None) -> TlsConfig | None:
    """`tls = { cert, key, min_version, ciphers }`: the files are loaded here, so a wrong path, an
    unreadable file or a key that does not match the certificate stops `halb check` / `halb serve`."""
    if r is None:
        return None
    tls = TlsConfig(
        cert=r.str("cert"),
        key=r.str("key"),
        min_version=r.str("min_version", "1.2", choices=_TLS_VERSIONS),
        ciphers=r.str("ciphers", ""),
    )
    for key in ("cert", "key"):
        path = getattr(tls, key)
        if not os.path.isabs(path):
            r.fail(key, f"must be an absolute path, got {path!r}")
        if not os.path.isfile(path):
            r.fail(key, f"{path} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            r.fail(key, f"{path} is not readable")
    from halb.proxy.tls import TlsError, server_context  # (ssl is only imported when TLS is used)

    try:
        server_context(tls)
    except TlsError as exc:
        r.fail(exc.key, exc.problem)
    r.done()
    return tls


def _expect_status(r: Reader, name: str) -> tuple[int, int]:
    value = r.raw(name, "200-399")
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"{value}-{value}"
    if isinstance(value, str):
        lo_s, _, hi_s = value.partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s or lo_s)
        except ValueError:
            lo, hi = 0, 0
        if 100 <= lo <= hi <= 599:
            return (lo, hi)
    r.fail(name, f'expected a status or a range like "200-399", got {value!r}')
    raise AssertionError


def _health(r: Reader | None) -> HealthConfig:
    d = HealthConfig()
    if r is None:
        return d
    health = HealthConfig(
        kind=r.str("kind", d.kind, choices=("tcp", "http", "none")),
        path=r.str("path", d.path),
        host=r.str("host", d.host),
        expect_status=_expect_status(r, "expect_status"),
        interval=r.float("interval", d.interval, lo=0.01),
        timeout=r.float("timeout", d.timeout, lo=0.001),
        rise=r.int("rise", d.rise, lo=1, hi=1000),
        fall=r.int("fall", d.fall, lo=1, hi=1000),
        jitter=r.float("jitter", d.jitter, lo=0, hi=0.5),
        initial=r.str("initial", d.initial, choices=("up", "down")),
    )
    if not health.path.startswith("/"):
        r.fail("path", f"must start with '/', got {health.path!r}")
    for key, value in (("path", health.path), ("host", health.host)):
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value):
            r.fail(key, f"must not contain spaces or control characters, got {value!r}")
    if health.timeout > health.interval:
        r.fail("timeout", f"({health.timeout}) must not exceed interval ({health.interval})")
    r.done()
    return health


def _agent(r: Reader | None) -> AgentConfig | None:
    if r is None:
        return None
    d = AgentConfig()
    port = r.raw("port")
    if port is not None:
        port = r.int("port", lo=1, hi=65535)
    path = r.str("path", d.path)
    if not path.startswith("/") or any(ch.isspace() or ord(ch) < 32 for ch in path):
        r.fail("path", f"must start with '/' and contain no spaces or control characters, got {path!r}")
    agent = AgentConfig(
        path=path,
        port=port,
        interval=r.float("interval", d.interval, lo=0.01),
        timeout=r.float("timeout", d.timeout, lo=0.001),
    )
    r.done()
    return agent


def _backend(r: Reader) -> BackendConfig:
    agent = r.host_port("agent") if r.has("agent") else None
    backend = BackendConfig(
        name=r.str("name"),
        address=r.host_port("address"),
        weight=r.int("weight", 1, lo=0, hi=256),
        agent=agent,
        draining=r.bool("draining", False),
        maxconn=r.int("maxconn", lo=0, hi=10_000_000) if r.has("maxconn") else None,
        backup=r.bool("backup", False),
    )
    r.done()
    return backend


def _hash_key(r: Reader) -> str:
    value = r.str("hash_key", "client_ip")
    kind, _, arg = value.partition(":")
    if value in ("client_ip", "path") or (kind in ("header", "cookie") and arg):
        return value
    r.fail("hash_key", f'must be "client_ip", "path", "header:NAME" or "cookie:NAME", got {value!r}')
    raise AssertionError


def _pool(name: str, r: Reader) -> PoolConfig:
    algorithms = tuple(_algorithms())
    backends: list[BackendConfig] = []
    seen: dict[str, str] = {}
    for b in r.items("backends"):
        backend = _backend(b)
        if backend.name in seen:
            b.fail("name", f"duplicate backend name {backend.name!r} (also at {seen[backend.name]})")
        seen[backend.name] = b.path
        backends.append(backend)
    if not backends:
        r.fail("backends", "a pool needs at least one backend")
    if all(b.backup for b in backends):
        r.fail("backends", "every backend is a backup: at least one must not be")
    pool = PoolConfig(
        name=name,
        backends=tuple(backends),
        algorithm=r.str("algorithm", "round_robin", choices=algorithms),
        health=_health(r.sub("health")),
        agent=_agent(r.sub("agent")),
        slowstart=r.float("slowstart", 0.0, lo=0),
        retries=r.int("retries", 2, lo=0, hi=16),
        connect_timeout=r.float("connect_timeout", 2.0, lo=0.001),
        timeout=r.float("timeout", 30.0, lo=0.001),
        hash_key=_hash_key(r),
        maxconn=r.int("maxconn", 0, lo=0, hi=10_000_000),
        maxqueue=r.int("maxqueue", 1024, lo=0, hi=10_000_000),
        queue_timeout=r.float("queue_timeout", lo=0.001) if r.has("queue_timeout") else None,
        sticky=parse_sticky(r.sub("sticky")),
        send_proxy=r.str("send_proxy", "", choices=("", "v1", "v2")),
    )
    r.done()
    return pool


# --- [vrrp] ------------------------------------------------------------------------------------------
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # IFNAMSIZ - 1, no '/' and no whitespace
_INSTANCE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _ipv4(r: Reader, name: str, text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        r.fail(name, f"{text!r} is not an IPv4 address (A.B.C.D)")
        raise AssertionError from None


def _virtual_ips(r: Reader) -> tuple[str, ...]:
    """Each entry is A.B.C.D or A.B.C.D/len; without a length it is /32, like keepalived's."""
    out: list[str] = []
    seen: set[ipaddress.IPv4Address] = set()
    for i, text in enumerate(r.str_list("virtual_ips")):
        key = f"virtual_ips[{i}]"
        address_text, sep, length_text = text.partition("/")
        address = _ipv4(r, key, address_text.strip())
        length = 32
        if sep:
            if not length_text.isdigit() or not 1 <= int(length_text) <= 32:
                r.fail(key, f"{text!r}: the prefix length must be 1..32")
            length = int(length_text)
        if address.is_multicast or address.is_unspecified or address.is_loopback:
            r.fail(key, f"{text!r} cannot be a virtual address")
        if address in seen:
            r.fail(key, f"{address} is listed twice")
        seen.add(address)
        out.append(f"{address}/{length}")
    if not out:
        r.fail("virtual_ips", "at least one virtual address is required")
    if len(out) > 255:
        r.fail("virtual_ips", f"at most 255 addresses fit in a VRRP advert, got {len(out)}")
    return tuple(out)


def _garp(r: Reader | None) -> GarpConfig:
    d = GarpConfig()
    if r is None:
        return d
    garp = GarpConfig(
        repeat=r.int("repeat", d.repeat, lo=0, hi=100),
        interval=r.float("interval", d.interval, lo=0, hi=60),
        refresh=r.float("refresh", d.refresh, lo=0, hi=86400),
    )
    r.done()
    return garp


def _track(r: Reader | None) -> TrackConfig:
    d = TrackConfig()
    if r is None:
        return d
    track = TrackConfig(
        weight=r.int("weight", d.weight, lo=0, hi=254),
        listeners=r.bool("listeners", d.listeners),
        pools=r.bool("pools", d.pools),
        interface=r.bool("interface", d.interface),
    )
    r.done()
    return track


def _notify(r: Reader) -> str | None:
    if not r.has("notify"):
        return None
    path = r.str("notify")
    if not os.path.isabs(path):
        r.fail("notify", f"must be an absolute path, got {path!r}")
    if not os.path.isfile(path):
        r.fail("notify", f"{path} does not exist or is not a file")
    if not os.access(path, os.X_OK):
        r.fail("notify", f"{path} is not executable")
    return path


def _vrrp(r: Reader | None) -> VrrpSettings | None:
    if r is None:
        return None
    d = VrrpSettings(interface="", vrid=1)
    interface = r.str("interface")
    if not _IFNAME.match(interface):
        r.fail("interface", f"{interface!r} is not an interface name (1-15 characters, no '/' or spaces)")
    vrid = r.int("vrid", lo=1, hi=255)
    name = r.str("name", "")
    if name and not _INSTANCE_NAME.match(name):
        r.fail("name", f"{name!r}: use 1-64 letters, digits, '_', '-', '.' or ':'")
    interval = r.float("advert_interval", d.advert_interval, lo=0.01, hi=40.95)
    if not math.isclose(round(interval * 100) / 100, interval, abs_tol=1e-9):
        r.fail("advert_interval", f"must be a whole number of centiseconds (the wire unit), got {interval}")
    primary_ip = None
    if r.has("primary_ip"):
        primary_ip = str(_ipv4(r, "primary_ip", r.str("primary_ip")))
    peers: list[str] = []
    for i, text in enumerate(r.str_list("unicast_peers")):
        key = f"unicast_peers[{i}]"
        peer = str(_ipv4(r, key, text.strip()))
        if peer in peers:
            r.fail(key, f"{peer} is listed twice")
        if peer == primary_ip:
            r.fail(key, f"{peer} is this node's own primary_ip")
        peers.append(peer)
    virtual_ips = _virtual_ips(r)
    vrrp = VrrpSettings(
        interface=interface,
        vrid=vrid,
        priority=r.int("priority", d.priority, lo=1, hi=255),
        advert_interval=round(interval * 100) / 100,
        preempt=r.bool("preempt", d.preempt),
        preempt_delay=r.float("preempt_delay", d.preempt_delay, lo=0, hi=1000),
        virtual_ips=virtual_ips,
        unicast_peers=tuple(peers),
        primary_ip=primary_ip,
        checksum_mode=r.str("checksum_mode", d.checksum_mode, choices=("pseudo_header", "rfc9568")),
        garp=_garp(r.sub("garp")),
        track=_track(r.sub("track")),
        notify=_notify(r),
        name=name,
    )
    if primary_ip is not None and primary_ip in vrrp.vip_addresses:
        r.fail("primary_ip", f"{primary_ip} is also one of virtual_ips")
    for peer in peers:
        if peer in vrrp.vip_addresses:
            r.fail("unicast_peers", f"{peer} is also one of virtual_ips")
    r.done()
    return vrrp


# --- [cluster] -----------------------------------------------------------------------------------------
MIN_SECRET = 16  # characters of cluster.secret and cluster.token


def _ip_host_port(r: Reader, key: str, text: str) -> HostPort:
    """HOST:PORT whose host is an IP literal (pysyncobj names nodes by this exact string)."""
    try:
        hp = parse_host_port(text)
    except ValueError as exc:
        r.fail(key, str(exc))
        raise AssertionError from None
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        r.fail(key, f"{text!r}: the host must be an IP address (Raft members are named by IP:PORT)")
    return hp


def _cluster(r: Reader | None) -> ClusterSettings | None:
    if r is None:
        return None
    d = ClusterSettings(address=HostPort("", 0), peers=(), secret="", token="")
    address = _ip_host_port(r, "address", r.str("address"))
    peers: list[HostPort] = []
    for i, text in enumerate(r.str_list("peers")):
        key = f"peers[{i}]"
        peer = _ip_host_port(r, key, text.strip())
        if peer == address:
            r.fail(key, f"{peer} is this node's own cluster.address")
        if peer in peers:
            r.fail(key, f"{peer} is listed twice")
        peers.append(peer)
    secret = r.str("secret")
    if len(secret) < MIN_SECRET:
        r.fail("secret", f"must be at least {MIN_SECRET} characters (it keys the Raft transport encryption)")
    token = r.str("token")
    if len(token) < MIN_SECRET:
        r.fail("token", f"must be at least {MIN_SECRET} characters (it guards the mutating admin API)")
    if token == secret:
        r.fail("token", "must differ from cluster.secret (operators get the token, never the secret)")
    admin_peers: list[HostPort] = []
    for i, text in enumerate(r.str_list("admin_peers")):
        try:
            admin_peers.append(parse_host_port(text.strip()))
        except ValueError as exc:
            r.fail(f"admin_peers[{i}]", str(exc))
    data_dir = r.str("data_dir")
    if not os.path.isabs(data_dir):
        r.fail("data_dir", f"must be an absolute path, got {data_dir!r}")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        r.fail("data_dir", f"{data_dir} exists and is not a directory")
    cluster = ClusterSettings(
        address=address,
        peers=tuple(peers),
        secret=secret,
        token=token,
        data_dir=data_dir,
        role=r.str("role", d.role, choices=("balancer", "witness")),
        lease_duration=r.float("lease_duration", d.lease_duration, lo=1.0, hi=60.0),
        vip_lease=r.bool("vip_lease", d.vip_lease),
        admin_peers=tuple(admin_peers),
    )
    r.done()
    return cluster


def parse(document: dict[str, Any], source: str = "<config>") -> Config:
    """Validate an already-decoded TOML document."""
    top = Reader(source, "", document)
    node_reader = top.sub("node", required=True)
    assert node_reader is not None
    node = _node(node_reader)
    cluster = _cluster(top.sub("cluster"))
    witness = cluster is not None and cluster.is_witness
    if witness:
        for key in ("listeners", "pools", "vrrp", "state", "ratelimits"):
            if top.has(key):
                top.fail(
                    key, 'not allowed with cluster.role = "witness" (a witness runs no proxy, holds no VIP)'
                )

    pools: dict[str, PoolConfig] = {}
    pools_reader = top.sub("pools", required=not witness)
    if pools_reader is not None:
        for name in list(pools_reader.table):
            pool_reader = pools_reader.sub(name)
            assert pool_reader is not None
            pools[name] = _pool(name, pool_reader)
        pools_reader.done()

    listeners: list[ListenerConfig] = []
    names: set[str] = set()
    binds: dict[HostPort, str] = {}
    for lr in top.items("listeners"):
        listener = _listener(lr)
        if listener.name in names:
            lr.fail("name", f"duplicate listener name {listener.name!r}")
        if listener.bind in binds:
            lr.fail("bind", f"{listener.bind} is already bound by listener {binds[listener.bind]!r}")
        pool_keys = [("pool", listener.pool)]
        pool_keys += [(f"routes[{j}].pool", route.pool) for j, route in enumerate(listener.routes)]
        for key, pool_name in pool_keys:
            if pool_name not in pools:
                lr.fail(key, f"no pool named {pool_name!r} (pools: {', '.join(sorted(pools)) or 'none'})")
            if listener.mode == "http" and pools[pool_name].send_proxy:
                lr.fail(
                    key,
                    f"pool {pool_name!r} has send_proxy, which only TCP listeners can use "
                    "(an HTTP listener tells its backends in X-Forwarded-For)",
                )
        if listener.response_headers and listener.mode != "http":
            lr.fail("response_headers", 'HTTP listeners only (mode = "http")')
        if listener.routes and listener.mode != "http":
            lr.fail("routes", 'routes choose a pool by host and path: HTTP listeners only (mode = "http")')
        if listener.routes and listener.redirect_to_https:
            lr.fail("routes", "a redirect_to_https listener sends every request away: it has no routes")
        if listener.bind == node.admin:
            lr.fail("bind", f"{listener.bind} is also node.admin")
        if listener.redirect_to_https and (listener.mode != "http" or listener.tls is not None):
            lr.fail("redirect_to_https", "is for plain HTTP listeners (it sends their clients to https://)")
        if cluster is not None and listener.bind == cluster.address:
            lr.fail("bind", f"{listener.bind} is also cluster.address")
        names.add(listener.name)
        binds[listener.bind] = listener.name
        listeners.append(listener)
    vrrp = _vrrp(top.sub("vrrp"))
    state = parse_state(top.sub("state"))
    ratelimits = parse_ratelimits(top.sub("ratelimits"))
    top.done()
    check_references(lambda key, problem: top.fail(key, problem), listeners, pools, state, ratelimits)
    _check_addresses(source, node, listeners)
    if cluster is not None and cluster.address == node.admin:
        raise ConfigError(source, "cluster.address", f"{cluster.address} is also node.admin")
    return Config(
        source=source,
        node=node,
        listeners=tuple(listeners),
        pools=pools,
        vrrp=vrrp,
        cluster=cluster,
        state=state,
        ratelimits=ratelimits,
    )


def _check_addresses(source: str, node: NodeConfig, listeners: list[ListenerConfig]) -> None:
    for key, hp in [("node.admin", node.admin)] + [
        (f"listeners[{i}].bind", listener.bind) for i, listener in enumerate(listeners)
    ]:
        try:
            ipaddress.ip_address(hp.host)
        except ValueError:
            if hp.host not in ("localhost", "*", ""):
                raise ConfigError(source, key, f"{hp.host!r} is not an IP address") from None


def load(path: str | Path) -> Config:
    """Read and validate a TOML file. Raises ConfigError naming the file, key and problem."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"TOML syntax error: {exc}") from None
    return parse(document, source)
