"""Per-listener counters the admin API reads (`ProxyServer.stats()`).

How this works: plain mutable objects the proxy increments inline on its hot path (attribute and dict
increments only); `as_dict()` makes a JSON-ready snapshot. Dict-valued counters (`responses` by status
class, `bad_requests` by reason, `rejected` by limit) become one Prometheus series per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _classes() -> dict[str, int]:
    return dict.fromkeys(_STATUS_CLASSES, 0)


@dataclass
class HttpListenerStats:
    requests_total: int = 0
    inline_total: int = 0  # of which answered from the protocol callbacks (no task switch)
    responses: dict[str, int] = field(default_factory=_classes)  # by status class, incl. proxy-made ones
    bad_requests: dict[str, int] = field(default_factory=dict)  # by ProtocolError reason
    client_connections_active: int = 0
    client_connections_total: int = 0
    in_flight: int = 0  # requests between head received and response finished
    connect_failures_total: int = 0
    retries_total: int = 0  # extra backends tried after a failed connect
    reconnects_total: int = 0  # pooled connection found dead, request resent on a fresh one
    no_backend_total: int = 0  # answered 503
    backend_errors_total: int = 0  # backend failed mid-exchange (502) or timed out (504)
    backend_timeouts_total: int = 0  # of which: no response head within the pool's timeout (504)
    client_aborts_total: int = 0  # client closed, reset or stalled in the middle of a request
    bytes_in: int = 0  # from clients
    bytes_out: int = 0  # to clients
    # Limits (halb.proxy.limits): connections refused by limit name; requests queued for a backend slot.
    rejected: dict[str, int] = field(default_factory=dict)
    queued: int = 0  # waiting in the pool's maxconn queue right now
    queued_total: int = 0
    queue_timeouts_total: int = 0  # waited queue_timeout: 503
    queue_full_total: int = 0  # maxqueue already waiting: 503 at once
    tunnels_active: int = 0  # WebSocket connections relayed as byte tunnels right now (after a 101)
    tunnels_total: int = 0

    def count_response(self, status: int) -> None:
        key = _STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]
        self.responses[key] += 1

    def count_bad_request(self, reason: str) -> None:
        self.bad_requests[reason] = self.bad_requests.get(reason, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": "http",
            "requests_total": self.requests_total,
            "inline_total": self.inline_total,
            "responses": dict(self.responses),
            "bad_requests": dict(self.bad_requests),
            "client_connections_active": self.client_connections_active,
            "client_connections_total": self.client_connections_total,
            "in_flight": self.in_flight,
            "connect_failures_total": self.connect_failures_total,
            "retries_total": self.retries_total,
            "reconnects_total": self.reconnects_total,
            "no_backend_total": self.no_backend_total,
            "backend_errors_total": self.backend_errors_total,
            "backend_timeouts_total": self.backend_timeouts_total,
            "client_aborts_total": self.client_aborts_total,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected": dict(self.rejected),
            "queued": self.queued,
            "queued_total": self.queued_total,
            "queue_timeouts_total": self.queue_timeouts_total,
            "queue_full_total": self.queue_full_total,
            "tunnels_active": self.tunnels_active,
            "tunnels_total": self.tunnels_total,
        }


@dataclass
class TcpListenerStats:
    connections_active: int = 0
    connections_total: int = 0
    connect_failures_total: int = 0
    retries_total: int = 0
    no_backend_total: int = 0  # client connections closed because no backend was available
    idle_timeouts_total: int = 0
    bytes_in: int = 0  # client -> backend
    bytes_out: int = 0  # backend -> client
    rejected: dict[str, int] = field(default_factory=dict)  # connections refused, by limit name
    queued: int = 0
    queued_total: int = 0
    queue_timeouts_total: int = 0
    queue_full_total: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": "tcp",
            "connections_active": self.connections_active,
            "connections_total": self.connections_total,
            "connect_failures_total": self.connect_failures_total,
            "retries_total": self.retries_total,
            "no_backend_total": self.no_backend_total,
            "idle_timeouts_total": self.idle_timeouts_total,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected": dict(self.rejected),
            "queued": self.queued,
            "queued_total": self.queued_total,
            "queue_timeouts_total": self.queue_timeouts_total,
            "queue_full_total": self.queue_full_total,
        }
