"""The validated configuration, as frozen dataclasses. `halb.config` builds these from TOML.

Every field has the meaning and default a HAProxy/keepalived user would expect; times are in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    name: str
    admin: HostPort = HostPort("127.0.0.1", 9901)
    workers: int = 1
    drain_timeout: float = 10.0  # SIGTERM: how long in-flight requests may take before the node exits
    # HAProxy's global maxconn: client connections of the whole node (each worker takes its share,
    # rounded up). 0 = automatic: what the open-file limit allows (each connection needs 2 descriptors).
    maxconn: int = 0
    # One line per HTTP request / TCP connection (halb.proxy.access_log): an absolute file path, "-" for
    # standard output, "" for none. Reopened on SIGHUP (logrotate).
    access_log: str = ""


@dataclass(frozen=True)
class TlsConfig:
    """TLS termination on a listener: `tls = { cert = "...", key = "..." }`. Reloaded on SIGHUP."""

    cert: str  # PEM certificate chain (leaf first), absolute path
    key: str  # PEM private key, absolute path
    min_version: str = "1.2"  # "1.2" | "1.3"
    ciphers: str = ""  # OpenSSL cipher list for TLS 1.2; "" = modern defaults (ECDHE + AEAD only)


@dataclass(frozen=True)
class RouteConfig:
    """An HTTP listener's route (content switching): requests matching `host` and/or `path_prefix` go to
    `pool` instead of the listener's own pool (halb.proxy.routes)."""

    pool: str
    host: str = ""  # "api.example.com" (case-insensitive, port ignored) or "*.example.com"; "" = any
    path_prefix: str = ""  # the raw path starts with this, e.g. "/api/"; "" = any


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: HostPort
    pool: str
    mode: str = "http"  # "http" | "tcp"
    client_timeout: float = 60.0  # idle keep-alive (HTTP) / idle connection (TCP) timeout
    header_timeout: float = 10.0  # a request head must be complete within this (slowloris defence)
    tunnel_timeout: float = 3600.0  # idle WebSocket tunnel (HTTP mode, after 101): HAProxy's timeout tunnel
    # HTTP listeners: answer every request with a redirect to https://HOST[:https_port]/TARGET (the plain
    # port of a site served over TLS); no backend is asked
    redirect_to_https: bool = False
    https_port: int = 443
    max_header_bytes: int = 32768  # whole request head
    max_request_line: int = 8192
    backlog: int = 1024
    maxconn: int = 0  # client connections of this listener (HAProxy's frontend maxconn); 0 = no limit
    maxconn_per_ip: int = 0  # client connections from one source address; 0 = no limit
    # Client networks accepted (empty: all) and refused (wins over allow), checked at accept
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    # Every connection starts with a PROXY protocol header (v1 or v2) from a proxy in front (HAProxy's
    # accept-proxy): the client address it names is used everywhere except allow/deny, which see the peer
    accept_proxy: bool = False
    tls: TlsConfig | None = None  # terminate TLS on this listener; backends get plain HTTP/TCP
    ratelimits: tuple[str, ...] = ()  # names of [ratelimits.NAME] rules, checked in order (HTTP only)
    routes: tuple[RouteConfig, ...] = ()  # HTTP: first match sends a request to another pool
    # HTTP: (name, value) set on every response from a backend, replacing the backend's own (e.g. HSTS)
    response_headers: tuple[tuple[str, str], ...] = ()

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool this listener sends to: its own, then its routes' (each once)."""
        return tuple(dict.fromkeys((self.pool, *(route.pool for route in self.routes))))


@dataclass(frozen=True)
class HealthConfig:
    kind: str = "tcp"  # "tcp" | "http" | "none"
    path: str = "/healthz"
    host: str = ""  # Host header for HTTP probes; default the backend address
    expect_status: tuple[int, int] = (200, 399)  # inclusive range of statuses that count as success
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 5
    fall: int = 3
    jitter: float = 0.1  # each interval is randomised by +-jitter*interval
    initial: str = "up"  # state before the first probe: "up" | "down"


@dataclass(frozen=True)
class AgentConfig:
    """custom_load: each backend reports its load on an HTTP endpoint returning {"cpu": 0.4, "mem": 0.7}."""

    path: str = "/load"
    port: int | None = None  # default: the backend's own port
    interval: float = 1.0
    timeout: float = 0.5


@dataclass(frozen=True)
class BackendConfig:
    name: str
    address: HostPort
    weight: int = 1
    agent: HostPort | None = None  # custom_load agent address; default from the pool's [agent] table
    draining: bool = False
    maxconn: int | None = None  # concurrent requests (HTTP) / connections (TCP); None = the pool's maxconn
    backup: bool = False  # only used while no other backend of the pool is available (HAProxy's `backup`)


@dataclass(frozen=True)
class StickyConfig:
    """`sticky = {...}` on a pool: which backend a session goes to is kept in the shared store ([state]).

    mode "cookie": halb issues an opaque session id in cookie `name`; "source_ip": the client address is the
    session; "header": the value of request header `name` is (requests without it are not sticky).
    `ttl` is the mapping's idle lifetime in the store (it slides on every request). The cookie attributes
    (path, domain, secure, httponly, samesite) only matter in cookie mode.
    """

    mode: str = "cookie"  # "cookie" | "source_ip" | "header"
    name: str = "HALBSID"  # cookie name (cookie mode) or header name (header mode)
    ttl: float = 1800.0
    path: str = "/"
    domain: str = ""
    secure: bool = False
    httponly: bool = True
    samesite: str = "Lax"  # "Lax" | "Strict" | "None" | "" (attribute left out)
    # Seconds a worker reuses a session's mapping before asking the store again (0 = every request).
    cache: float = 1.0


@dataclass(frozen=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    algorithm: str = "round_robin"
    health: HealthConfig = field(default_factory=HealthConfig)
    agent: AgentConfig | None = None
    slowstart: float = 0.0  # seconds over which a recovered backend's share ramps up
    retries: int = 2  # extra backends tried when a connect fails (never after bytes went upstream)
    connect_timeout: float = 2.0
    timeout: float = 30.0  # backend must send the response head (HTTP) within this
    # ip_hash/consistent_hash key: "client_ip" | "header:NAME" | "cookie:NAME" | "path"
    hash_key: str = "client_ip"
    # HAProxy's server maxconn / maxqueue / timeout queue: each backend serves at most `maxconn` requests
    # (HTTP) or connections (TCP) at once (0 = no limit; a backend's own `maxconn` wins); the others wait
    # in a FIFO queue of at most `maxqueue` for up to `queue_timeout` (None = connect_timeout), then 503.
    maxconn: int = 0
    maxqueue: int = 1024
    queue_timeout: float | None = None
    sticky: StickyConfig | None = None  # sticky sessions (HTTP listeners; needs [state])
    # PROXY protocol header ("v1" | "v2") first on every backend connection (HAProxy's send-proxy);
    # "" = none. TCP listeners only (HTTP tells backends in X-Forwarded-For).
    send_proxy: str = ""

    @property
    def effective_queue_timeout(self) -> float:
        return self.connect_timeout if self.queue_timeout is None else self.queue_timeout


@dataclass(frozen=True)
class GarpConfig:
    """Gratuitous ARP after taking the VIPs over (keepalived's garp_master_repeat/refresh)."""

    repeat: int = 5  # rounds right after becoming MASTER (each round: one ARP request + one ARP reply)
    interval: float = 0.2  # seconds between those rounds
    refresh: float = 0.0  # while MASTER, one more round every `refresh` seconds; 0 = off


@dataclass(frozen=True)
class TrackConfig:
    """keepalived-style tracking: while this node cannot serve, advertise `priority - weight` (min 1).

    `weight` must exceed the priority gap to the next node for that node to take over (150 vs 140 needs
    weight > 10). `weight = 0` means keepalived's FAULT instead: the instance resigns (priority-0 advert,
    VIPs dropped) until it can serve again.
    """

    weight: int = 50
    listeners: bool = True  # a local TCP connect to each listener must succeed
    pools: bool = True  # every pool a listener sends to (its own, its routes') must have an available backend
    interface: bool = True  # the VRRP interface's link must be up (else FAULT, whatever the weight)


@dataclass(frozen=True)
class VrrpSettings:
    """The optional `[vrrp]` table: one VRRPv3 instance on one interface (see halb.vrrp)."""

    interface: str
    vrid: int
    priority: int = 100
    advert_interval: float = 1.0
    preempt: bool = True
    preempt_delay: float = 0.0
    virtual_ips: tuple[str, ...] = ()  # normalised "A.B.C.D/len" (no length in the file means /32)
    unicast_peers: tuple[str, ...] = ()  # empty: multicast to 224.0.0.18
    primary_ip: str | None = None  # default: the interface's first IPv4 address at start
    checksum_mode: str = "pseudo_header"  # "pseudo_header" (keepalived default) | "rfc9568"
    garp: GarpConfig = field(default_factory=GarpConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    notify: str | None = None  # executable run as: notify INSTANCE <name> MASTER|BACKUP|FAULT|STOP <prio>
    name: str = ""  # instance name for logs, status and notify; default "VI_<vrid>"

    @property
    def instance_name(self) -> str:
        return self.name or f"VI_{self.vrid}"

    @property
    def vip_addresses(self) -> tuple[str, ...]:
        """The virtual addresses without their prefix length (what adverts and GARP carry)."""
        return tuple(v.split("/", 1)[0] for v in self.virtual_ips)


@dataclass(frozen=True)
class ClusterSettings:
    """The optional `[cluster]` table: Raft membership, shared configuration and the VIP lease (halb.cluster).

    `secret` and `token` are kept out of repr() so they never reach a log line.
    """

    address: HostPort  # this node's Raft address: bound, and the name the peers know it by
    peers: tuple[HostPort, ...]  # the other members' Raft addresses (witness included)
    secret: str = field(repr=False)  # pysyncobj transport encryption; a node with another one cannot join
    token: str = field(repr=False)  # `Authorization: Bearer <token>` for mutating admin API calls
    data_dir: str = ""  # Raft journal + full dump (absolute path)
    role: str = "balancer"  # "balancer" | "witness" (votes in Raft; no proxy, no VIP)
    lease_duration: float = 2.0  # VIP lease, seconds (see docs/quorum.md)
    vip_lease: bool = True  # a balancer holds the [vrrp] VIPs only with the lease (docs/quorum.md)
    admin_peers: tuple[HostPort, ...] = ()  # other members' admin APIs: `halb vip release` releases there

    @property
    def is_witness(self) -> bool:
        return self.role == "witness"


@dataclass(frozen=True)
class StateConfig:
    """The optional `[state]` table: the Redis that holds sticky sessions and rate-limit buckets.

    Exactly one of `url` and `sentinels`. The fields mirror `halb.state.redis_store.RedisSettings` (which
    documents the timeouts, the retry policy and the circuit breaker); `ping_interval` is how often each
    worker pings the store (drives recovery while no request comes). Secrets stay out of repr().
    """

    url: str = field(default="", repr=False)  # redis://[:password@]host:port/db | rediss://... | unix://...
    sentinels: tuple[HostPort, ...] = ()
    service_name: str = "mymaster"
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    db: int = 0  # Sentinel mode (with url: the URL's path)
    connect_timeout: float = 0.1
    socket_timeout: float = 0.1
    call_timeout: float = 0.25
    retries: int = 1
    backoff_base: float = 0.005
    backoff_cap: float = 0.025
    max_connections: int = 64
    failure_threshold: int = 2
    open_min: float = 0.5
    open_max: float = 2.0
    sentinel_check_interval: float = 1.0
    key_prefix: str = "halb:"
    ping_interval: float = 1.0

    @property
    def target(self) -> str:
        """Where the store is, for status pages (no password)."""
        if self.sentinels:
            return f"sentinel {self.service_name} via {', '.join(str(s) for s in self.sentinels)}"
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"


@dataclass(frozen=True)
class RateLimitTierConfig:
    """A tier of a rate-limit rule: its own rate and burst for the listed keys."""

    name: str
    rate: float
    burst: float
    keys: tuple[str, ...]


@dataclass(frozen=True)
class RateLimitConfig:
    """`[ratelimits.NAME]`: one rate-limit rule, referenced by listeners (`ratelimits = ["NAME"]`).

    `key`: "client_ip", "header:NAME" (requests without the header are counted by client IP) or
    "path_prefix" (one bucket per entry of `paths`). `paths`: the rule applies only to requests whose path
    starts with one of these ([] = every request). Counted cluster-wide in [state]'s Redis; while it is
    unreachable (or without [state]) each node counts alone, with rate and burst scaled by `local_share`.
    """

    name: str
    rate: float  # requests per second
    burst: float  # token bucket capacity / leaky bucket queue length (>= 1)
    algorithm: str = "token_bucket"  # "token_bucket" | "leaky_bucket"
    key: str = "client_ip"
    paths: tuple[str, ...] = ()
    tiers: tuple[RateLimitTierConfig, ...] = ()
    local_share: float = 1.0


@dataclass(frozen=True)
class Config:
    source: str  # the file it came from, for messages
    node: NodeConfig
    listeners: tuple[ListenerConfig, ...]
    pools: dict[str, PoolConfig]
    vrrp: VrrpSettings | None = None  # the optional [vrrp] table
    cluster: ClusterSettings | None = None  # the optional [cluster] table
    state: StateConfig | None = None  # the optional [state] table (Redis)
    ratelimits: dict[str, RateLimitConfig] = field(default_factory=dict)  # [ratelimits.NAME]
