"""The access log: one line per HTTP request (whichever path served it) and per TCP connection."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest

from halb.proxy.access_log import AccessLog
from tests.integration.test_proxy_http import (  # (event_loop_kind: every test on asyncio and uvloop)
    Client,
    Request,
    backends,
    closed_port,
    default_handler,
    event_loop_kind,  # noqa: F401
    make_pool,
    poll,
    proxy,
    run,
    stream_backend,
)
from tests.integration.test_proxy_tcp import echo

pytestmark = pytest.mark.timeout(30)

HTTP_LINE = re.compile(
    r"(?P<client>127\.0\.0\.1):(?P<port>\d+) \[(?P<date>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3})\] "
    r"(?P<listener>\S+) (?P<pool>\S+)/(?P<backend>\S+) (?P<tr>-?\d+)/(?P<ta>-?\d+) (?P<status>-?\d+) "
    r'(?P<bytes>\d+) "(?P<request>[^"]*)" (?P<rid>\S+)'
)
TCP_LINE = re.compile(
    r"(?P<client>127\.0\.0\.1):(?P<port>\d+) \[(?P<date>[^\]]+)\] (?P<listener>\S+) "
    r"(?P<pool>\S+)/(?P<backend>\S+) (?P<tc>-?\d+)/(?P<tt>-?\d+) (?P<up>\d+)/(?P<down>\d+) (?P<end>\S+)"
)


def lines(path: Path, pattern: re.Pattern[str]) -> list[dict[str, str]]:
    text = path.read_text()
    out = []
    for line in text.splitlines():
        m = pattern.fullmatch(line)
        assert m is not None, f"malformed access log line: {line!r}"
        out.append(m.groupdict())
    return out


def test_every_http_request_gets_one_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    gate = asyncio.Event()

    async def handler(req: Request, reader: Any, writer: asyncio.StreamWriter, conn_no: int) -> bool:
        if req.target == "/hang":
            await gate.wait()
        return await default_handler(req, reader, writer, conn_no)

    async def main() -> None:
        access_log = AccessLog(str(path))
        async with (
            backends(handler) as (be,),
            proxy(make_pool([be.port]), access_log=access_log) as (
                server,
                addr,
            ),
        ):
            client = await Client.connect(addr)
            simple = await client.get("/simple")  # answered from the callbacks (inline)
            posted = await client.request(b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
            quoted = await client.get('/q?a="x"')
            bad = await client.request(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # two Hosts: 400
            assert (simple.status, posted.status, quoted.status, bad.status) == (200, 200, 200, 400)

            leaving = await Client.connect(addr)
            leaving.writer.write(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
            await poll(lambda: len(be.requests) == 4)
            leaving.reset()  # the client gives up (RST) while the backend thinks
            await poll(lambda: server.stats()["listeners"]["web"]["client_aborts_total"] == 1)  # type: ignore[index]
            gate.set()
        access_log.close()

        got = lines(path, HTTP_LINE)
        assert [(g["status"], g["request"], g["backend"]) for g in got] == [
            ("200", "GET /simple HTTP/1.1", "b0"),
            ("200", "POST /form HTTP/1.1", "b0"),
            ("200", "GET /q?a=%22x%22 HTTP/1.1", "b0"),
            ("400", "<BADREQ>", "-"),
            ("-1", "GET /hang HTTP/1.1", "b0"),
        ]
        assert all(g["listener"] == "web" and g["pool"] == "app" for g in got)
        assert got[0]["rid"] == simple.get("x-request-id") == be.requests[0].get("x-request-id")
        assert int(got[0]["bytes"]) > len(simple.body) and got[3]["bytes"] != "0"
        assert int(got[0]["tr"]) >= 0 and int(got[0]["ta"]) >= int(got[0]["tr"])
        assert got[3]["tr"] == "-1" and got[4]["tr"] == "-1"  # no response head from a backend
        assert len({g["port"] for g in got[:4]}) == 1 and got[4]["port"] != got[0]["port"]

    run(main)


def test_a_request_no_backend_accepted_is_logged_with_its_503(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def main() -> None:
        access_log = AccessLog(str(path))
        async with proxy(make_pool([closed_port()]), access_log=access_log) as (_, addr):
            client = await Client.connect(addr)
            assert (await client.get("/x")).status == 503
            client.close()
        access_log.close()
        (line,) = lines(path, HTTP_LINE)
        assert (line["status"], line["backend"], line["request"]) == ("503", "-", "GET /x HTTP/1.1")

    run(main)


def test_every_tcp_connection_gets_one_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def main() -> None:
        access_log = AccessLog(str(path))
        async with (
            stream_backend(echo) as port,
            proxy(make_pool([port]), mode="tcp", access_log=access_log) as (
                server,
                addr,
            ),
        ):
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"twelve bytes")
            assert await reader.readexactly(12) == b"twelve bytes"
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            await poll(lambda: server.open_connections() == 0)
        async with proxy(make_pool([closed_port()]), mode="tcp", access_log=access_log) as (_, addr):
            reader, writer = await asyncio.open_connection(*addr)
            assert await reader.read() == b""
            writer.close()
        access_log.close()
        good, failed = lines(path, TCP_LINE)
        assert (good["backend"], good["up"], good["down"], good["end"]) == ("b0", "12", "12", "-")
        assert int(good["tc"]) >= 0 and int(good["tt"]) >= int(good["tc"])
        assert (failed["backend"], failed["tc"], failed["end"]) == ("-", "-1", "connect_failed")

    run(main)


def test_lines_are_batched_and_the_file_reopens_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def main() -> None:
        access_log = AccessLog(str(path))
        access_log.tcp("127.0.0.1", 1, "l", "p", "b", 0.001, 0.002, 1, 2, "-")
        assert path.read_text() == ""  # waiting in memory...
        await poll(lambda: path.read_text().count("\n") == 1, timeout=3)  # ...then written by the timer
        os.rename(path, tmp_path / "access.log.1")  # logrotate
        access_log.tcp("127.0.0.1", 2, "l", "p", "b", 0.001, 0.002, 1, 2, "-")
        access_log.reopen()  # SIGHUP: the waiting line goes to the old file, the next ones to a new one
        access_log.tcp("127.0.0.1", 3, "l", "p", "b", 0.001, 0.002, 1, 2, "-")
        access_log.close()
        assert [line.split(" ")[0] for line in (tmp_path / "access.log.1").read_text().splitlines()] == [
            "127.0.0.1:1",
            "127.0.0.1:2",
        ]
        assert path.read_text().startswith("127.0.0.1:3 ")

    run(main)


def test_a_failing_log_drops_lines_and_counts_them(tmp_path: Path) -> None:
    async def main() -> None:
        access_log = AccessLog("/dev/full")  # every write fails: ENOSPC
        for i in range(3):
            access_log.tcp("127.0.0.1", i, "l", "p", "b", 0.0, 0.0, 0, 0, "-")
        access_log.close()
        assert access_log.dropped_lines == 3

    run(main)


def test_a_log_that_cannot_be_opened_drops_lines_until_a_reopen_works(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet" / "access.log"

    async def main() -> None:
        access_log = AccessLog(str(missing))  # its directory does not exist (yet): serving goes on
        access_log.tcp("127.0.0.1", 1, "l", "p", "b", 0.0, 0.0, 0, 0, "-")
        access_log.flush()
        assert access_log.dropped_lines == 1
        missing.parent.mkdir()
        access_log.reopen()
        access_log.tcp("127.0.0.1", 2, "l", "p", "b", 0.0, 0.0, 0, 0, "-")
        access_log.close()
        assert missing.read_text().startswith("127.0.0.1:2 ")

    run(main)
