"""The state layer as the control process reports it: `/status` "state", `/metrics` series, `halb status`.

How this works: every proxy worker puts its `StateRuntime.stats()` in its periodic stats message (its
store's `StoreStatus`, its sticky decisions by source, its rate-limit counters). The control process
keeps the last message per worker, and the counters of workers that died in `retired` (`retire()`), so
totals never go backwards. `aggregate()` merges them into the status document's "state" object:

    {"backend": "redis" | "sentinel" | "none", "target": "redis://10.99.0.200:6379/0",
     "state": "ok" | "degraded" | "local" | "unknown", "degraded_workers": 1, "workers": [...],
     "errors_total": .., "fallback_decisions_total": .., "last_error": "..", "since": ..,
     "sticky": {pool: {"cache": .., "store": .., "new": .., "rehomed": .., "fallback": ..,
                       "cookies_issued": .., "retry_rehomed": .., "unkeyed": .., "mint_misses": ..}},
     "ratelimits": {rule: {"allowed": .., "limited": .., "local": ..}}}

"degraded" as soon as one worker's store is degraded (that worker is deciding locally); "local" when
there is no `[state]` (rate limits are per node by configuration); "unknown" before the first report.
`metrics()` turns it into Prometheus families and `render()` into the line `halb status` prints.
Pure functions over plain dicts: nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from rich.text import Text

from halb.config_model import Config

STORE_COUNTERS = ("errors_total", "fallback_decisions_total")


def add_counts(into: dict[str, Any], counts: dict[str, Any]) -> None:
    """Add the numeric values of `counts` into `into` key by key (also used by halb.workers)."""
    for key, value in counts.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value


def retire(into: dict[str, Any], doc: dict[str, Any] | None) -> None:
    """Add a dead worker's counters to `into` (kept by the supervisor)."""
    if not doc:
        return
    store = doc.get("store") or {}
    add_counts(into.setdefault("store", {}), {k: store.get(k, 0) for k in STORE_COUNTERS})
    for name, counts in doc.get("sticky", {}).items():
        add_counts(into.setdefault("sticky", {}).setdefault(name, {}), counts)
    for name, counts in doc.get("ratelimits", {}).items():
        add_counts(into.setdefault("ratelimits", {}).setdefault(name, {}), counts)


def aggregate(
    config: Config, reports: Iterable[tuple[int, dict[str, Any]]], retired: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The "state" object of /status; None when the node has neither [state] nor [ratelimits]."""
    if config.state is None and not config.ratelimits:
        return None
    retired = retired or {}
    state = config.state
    doc: dict[str, Any] = {
        "backend": ("sentinel" if state.sentinels else "redis") if state is not None else "none",
        "target": state.target if state is not None else "",
        "state": "local" if state is None else "unknown",
        "degraded_workers": 0,
        "since": None,
        "last_error": "",
        "workers": [],
        "sticky": {},
        "ratelimits": {},
    }
    for key in STORE_COUNTERS:
        doc[key] = retired.get("store", {}).get(key, 0)
    for name, counts in retired.get("sticky", {}).items():
        add_counts(doc["sticky"].setdefault(name, {}), counts)
    for name, counts in retired.get("ratelimits", {}).items():
        add_counts(doc["ratelimits"].setdefault(name, {}), counts)
    seen = 0
    for index, report in sorted(reports, key=lambda r: r[0]):
        store = report.get("store")
        for name, counts in report.get("sticky", {}).items():
            add_counts(doc["sticky"].setdefault(name, {}), counts)
        for name, counts in report.get("ratelimits", {}).items():
            add_counts(doc["ratelimits"].setdefault(name, {}), counts)
        if not store:
            continue
        seen += 1
        for key in STORE_COUNTERS:
            doc[key] += store.get(key, 0)
        doc["workers"].append({"index": index, **store})
        if store.get("last_error"):
            doc["last_error"] = store["last_error"]
        if store.get("state") == "degraded":
            doc["degraded_workers"] += 1
            since = store.get("since")
            if since is not None and (doc["since"] is None or since < doc["since"]):
                doc["since"] = since  # the earliest: how long the node has been (partly) degraded
    if state is not None and seen:
        doc["state"] = "degraded" if doc["degraded_workers"] else "ok"
        if not doc["degraded_workers"]:
            doc["since"] = max((w.get("since") or 0.0) for w in doc["workers"])
    return doc


# --- /metrics -----------------------------------------------------------------------------------------------
def metrics(node: str, doc: dict[str, Any] | None) -> Iterator[Metric]:
    if not doc:
        return
    degraded = GaugeMetricFamily(
        "halb_state_degraded",
        "1 while the shared store (Redis) is unreachable from at least one worker: stickiness by "
        "consistent hash, rate limits per node",
        labels=["node", "backend"],
    )
    degraded.add_metric([node, doc["backend"]], 1 if doc["state"] == "degraded" else 0)
    workers = GaugeMetricFamily(
        "halb_state_degraded_workers", "Workers whose store is degraded", labels=["node"]
    )
    workers.add_metric([node], doc["degraded_workers"])
    errors = CounterMetricFamily("halb_state_errors", "Store calls that failed", labels=["node"])
    errors.add_metric([node], doc["errors_total"])
    fallback = CounterMetricFamily(
        "halb_state_fallback_decisions",
        "Sticky/rate-limit decisions taken without the store (consistent hash, per-node buckets)",
        labels=["node"],
    )
    fallback.add_metric([node], doc["fallback_decisions_total"])
    sticky = CounterMetricFamily(
        "halb_sticky_decisions",
        "Sticky-session decisions by source (cache, store, new, rehomed, fallback)",
        labels=["node", "pool", "source"],
    )
    cookies = CounterMetricFamily(
        "halb_sticky_cookies_issued", "Session cookies issued", labels=["node", "pool"]
    )
    rehomed = CounterMetricFamily(
        "halb_sticky_retry_rehomed",
        "Sessions moved to another backend by a connect retry",
        labels=["node", "pool"],
    )
    for pool, counts in sorted(doc["sticky"].items()):
        for source in ("cache", "store", "new", "rehomed", "fallback"):
            sticky.add_metric([node, pool, source], counts.get(source, 0))
        cookies.add_metric([node, pool], counts.get("cookies_issued", 0))
        rehomed.add_metric([node, pool], counts.get("retry_rehomed", 0))
    limited = CounterMetricFamily(
        "halb_ratelimit_requests",
        "Requests checked by a rate-limit rule, by result (allowed, limited = answered 429)",
        labels=["node", "rule", "result"],
    )
    local = CounterMetricFamily(
        "halb_ratelimit_local_decisions",
        "Rate-limit decisions taken by this node's own buckets (store unavailable or not configured)",
        labels=["node", "rule"],
    )
    for rule, counts in sorted(doc["ratelimits"].items()):
        limited.add_metric([node, rule, "allowed"], counts.get("allowed", 0))
        limited.add_metric([node, rule, "limited"], counts.get("limited", 0))
        local.add_metric([node, rule], counts.get("local", 0))
    yield from (degraded, workers, errors, fallback, sticky, cookies, rehomed, limited, local)


# --- halb status ------------------------------------------------------------------------------------------
def render(doc: dict[str, Any]) -> Text:
    """One line: the store, its state (DEGRADED in bold red), and the sticky / 429 counts."""
    state = doc.get("state", "unknown")
    line = Text.assemble(("store ", "dim"), (str(doc.get("backend")), "bold"))
    if doc.get("target"):
        line.append(f" {doc['target']}")
    line.append("  ")
    if state == "degraded":
        n, total = doc.get("degraded_workers", 0), len(doc.get("workers", []))
        since = doc.get("since")
        when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}" if since else ""
        line.append(f"DEGRADED ({n}/{total} workers){when}", style="bold red")
        line.append(": sticky by consistent hash, rate limits per node", style="red")
        if doc.get("last_error"):
            line.append(f"; last error: {doc['last_error']}", style="dim")
    elif state == "ok":
        line.append("ok", style="green")
    elif state == "local":
        line.append("no [state]: rate limits per node", style="yellow")
    else:
        line.append(state, style="yellow")
    decisions: dict[str, int] = {}
    for counts in doc.get("sticky", {}).values():
        add_counts(decisions, counts)
    if decisions:
        parts = [f"{decisions.get(k, 0)} {k}" for k in ("cache", "store", "new", "rehomed", "fallback")]
        line.append("  sticky ", style="dim")
        line.append(", ".join(parts))
    limited = sum(c.get("limited", 0) for c in doc.get("ratelimits", {}).values())
    if doc.get("ratelimits"):
        line.append("  429s ", style="dim")
        line.append(str(limited))
    if doc.get("fallback_decisions_total"):
        line.append("  fallback decisions ", style="dim")
        line.append(str(doc["fallback_decisions_total"]))
    return line
