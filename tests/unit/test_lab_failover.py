"""The pure parts of `halb lab failover` and the traffic client (no root, no namespaces: loopback only)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
from contextlib import redirect_stdout

from rich.console import Console

from halb.demo_backend import DemoBackend
from halb.lab import traffic
from halb.lab.failover import (
    FailoverReport,
    RoundResult,
    Sample,
    failed_between,
    first_ok,
    render,
    summarize,
    takeover_of,
)
from halb.lab.observe import RTM_NEWADDR, parse_addresses


def s(seq: int, start: float, end: float, ok: bool, body: str = "") -> Sample:
    return Sample(seq, start, end, ok, body, "" if ok else "connect timeout")


def test_sample_from_json_line() -> None:
    line = json.dumps(
        {"seq": 3, "start": 1.5, "end": 1.6, "ok": True, "status": 200, "body": "web1", "error": ""}
    )
    assert Sample.from_json(line) == Sample(3, 1.5, 1.6, True, "web1", "")
    assert Sample.from_json("not json") is None
    assert Sample.from_json('{"seq": 1}') is None


def test_takeover_counts_failures_from_the_kill_to_the_first_good_answer() -> None:
    kill = 10.0
    samples = [
        s(0, 9.90, 9.91, True),  # before the kill: not counted
        s(1, 9.95, 10.02, False),  # in flight at the kill, failed after it: counted
        s(2, 10.05, 10.30, False),  # connect timeouts during the takeover
        s(3, 10.10, 10.35, False),
        s(4, 10.11, 10.36, False),  # started before the answer, ended after it: counted
        s(5, 10.12, 10.13, True, "web2"),  # the first good answer
        s(6, 10.20, 10.21, True),
        s(7, 10.25, 10.50, False),  # after the answer: not a takeover failure
    ]
    first, failed = takeover_of(samples, kill)
    assert first is not None and first.seq == 5 and first.body == "web2"
    assert failed == 4
    assert failed_between(samples, first.end, 11.0) == 1  # only seq 7 started after the answer


def test_takeover_ignores_good_answers_to_requests_started_before_the_kill() -> None:
    samples = [s(0, 9.99, 10.01, True), s(1, 10.05, 10.30, False), s(2, 10.40, 10.41, True)]
    first, failed = takeover_of(samples, 10.0)
    assert first is not None and first.seq == 2
    assert failed == 1


def test_no_answer_at_all_counts_every_failure() -> None:
    samples = [s(0, 10.1, 10.35, False), s(1, 10.2, 10.45, False)]
    assert takeover_of(samples, 10.0) == (None, 2)
    assert first_ok(samples, 0.0) is None


def test_summary_and_render() -> None:
    rounds = [
        RoundResult(1, "lb1", 3.4, 3.3, 70, "lb2", "lb2", "web1", 4.5, 3),
        RoundResult(2, "lb1", 3.0, 2.9, 60, "lb2", "lb2", "web2", 4.4, 2),
        RoundResult(3, "lb1", None, None, 100, None, None, None, 4.6, 0),
    ]
    summary = summarize(rounds)
    assert summary["takeover"] == {"p50": 3.2, "max": 3.4, "min": 3.0}
    assert summary["failed"]["p50"] == 70 and summary["failed"]["max"] == 100
    assert summary["no_takeover"] == 1
    report = FailoverReport("halb", "10.99.0.100", 1.0, 3.4531, 20.0, 0.25, rounds)
    doc = report.to_dict()
    assert doc["rounds"][0]["answered_by"] == "lb2" and doc["summary"]["rounds"] == 3
    json.dumps(doc)
    out = io.StringIO()
    Console(file=out, width=100).print(render(report))
    text = out.getvalue()
    assert "lb2>web1" in text and "takeover p50 3.200s, max 3.400s" in text and "NO answer" in text


def _rta(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload


def test_parse_addresses_reads_the_watch_s_address_notifications() -> None:
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 2)  # ifaddrmsg
    body += _rta(1, socket.inet_aton("10.99.0.100")) + _rta(2, socket.inet_aton("10.99.0.100"))
    body += _rta(3, b"eth0\x00\x00\x00\x00")  # IFA_LABEL: ignored
    message = struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR, 0, 0, 0) + body
    deleted = struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR + 1, 0, 0, 0) + body  # RTM_DELADDR
    assert parse_addresses(message) == (["10.99.0.100", "10.99.0.100"], False)
    assert parse_addresses(deleted) == ([], False)
    assert parse_addresses(deleted + message) == (["10.99.0.100", "10.99.0.100"], False)
    assert parse_addresses(b"\x00" * 7) == ([], False)


def test_traffic_client_against_a_backend_and_a_closed_port() -> None:
    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        backend = DemoBackend("web1", "127.0.0.1", 0)
        await backend.start()
        try:
            with socket.socket() as closed:
                closed.bind(("127.0.0.1", 0))
                dead_port = closed.getsockname()[1]
            good, bad = io.StringIO(), io.StringIO()
            with redirect_stdout(good):
                await traffic.run(f"http://127.0.0.1:{backend.port}/", 200.0, 0.25, 1.0, count=4)
            with redirect_stdout(bad):
                await traffic.run(f"http://127.0.0.1:{dead_port}/", 200.0, 0.25, 1.0, count=2)
        finally:
            await backend.close()
        return [json.loads(x) for x in good.getvalue().splitlines()], [
            json.loads(x) for x in bad.getvalue().splitlines()
        ]

    good, bad = asyncio.run(scenario())
    assert sorted(r["seq"] for r in good) == [0, 1, 2, 3]
    assert all(r["ok"] and r["status"] == 200 and r["body"] == "web1" for r in good)
    assert all(r["end"] >= r["start"] for r in good)  # type: ignore[operator]
    assert len(bad) == 2 and not any(r["ok"] for r in bad)
    assert all(str(r["error"]).startswith("connect") for r in bad)
