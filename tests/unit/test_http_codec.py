"""The strict HTTP/1.1 parser and the body framers of halb.proxy.http_codec."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halb.errors import ProtocolError
from halb.proxy.http_codec import (
    ChunkedBody,
    CloseDelimitedBody,
    LengthBody,
    NoBody,
    find_head_end,
    parse_request_head,
    parse_response_head,
    request_framer,
    response_framer,
    simple_body_length,
)


def req(text: bytes, **kw: int):  # type: ignore[no-untyped-def]
    return parse_request_head(text, **kw)


def rejected(text: bytes, status: int = 400, **kw: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request_head(text, **kw)
    assert info.value.status == status, info.value
    return info.value


# ------------------------------------------------------------------------------------------ requests
def test_parses_a_simple_request_preserving_order_and_case() -> None:
    head = req(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Thing:  v a l  \r\nx-thing: 2\r\n\r\n")
    assert (head.method, head.target, head.version) == (b"GET", b"/a?b=1", b"HTTP/1.1")
    assert head.headers == [(b"Host", b"x"), (b"X-Thing", b"v a l"), (b"x-thing", b"2")]
    assert head.keep_alive and not head.has_body
    assert head.path == b"/a"
    assert head.header(b"x-thing") == b"v a l"


def test_content_length_and_chunked_framing() -> None:
    head = req(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
    assert head.content_length == 5 and isinstance(request_framer(head), LengthBody)
    head = req(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert head.chunked and isinstance(request_framer(head), ChunkedBody)
    head = req(b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: CHUNKED\r\n\r\n")
    assert head.chunked
    head = req(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n")
    assert head.content_length == 7
    assert isinstance(request_framer(req(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")), NoBody)


def test_http10_keep_alive_rules() -> None:
    assert not req(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert req(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive
    assert not req(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").keep_alive
    assert req(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n").version == b"HTTP/1.1"


def test_absolute_form_and_asterisk() -> None:
    assert req(b"GET http://h/p/q?x HTTP/1.1\r\nHost: h\r\n\r\n").path == b"/p/q"
    assert req(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").target == b"*"
    rejected(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n")
    rejected(b"GET foo HTTP/1.1\r\nHost: h\r\n\r\n")


@pytest.mark.parametrize(
    "text",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked \r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",  # space before colon
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: x\r\n\tX-A: 1\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",  # NUL in value
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n: empty-name\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX(Y): 1\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n",  # no empty line
        b"GET / http/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/11\r\nHost: x\r\n\r\n",
        b"\r\n\r\n",
    ],
)
def test_rejections_400(text: bytes) -> None:
    rejected(text, 400)


def test_other_statuses() -> None:
    assert rejected(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505).reason == "bad_version"
    rejected(b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n", 501)
    long_line = b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    rejected(long_line, 414, max_request_line=50)
    big = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 200 + b"\r\n\r\n"
    rejected(big, 431, max_header_bytes=100)
    assert (
        rejected(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").reason
        == "smuggling"
    )


def test_find_head_end() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 100, 1000) == -1
    text = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY"
    assert find_head_end(text, 100, 1000) == len(text) - 4
    assert find_head_end(b"GET / HTTP/1.1\nHost: x\n\nrest", 100, 1000) == 24  # found; the parser rejects
    with pytest.raises(ProtocolError) as info:
        find_head_end(b"G" * 200, 100, 1000)
    assert info.value.status == 414
    with pytest.raises(ProtocolError) as info:
        find_head_end(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 300, 100, 1000)
    assert info.value.status == 431
    with pytest.raises(ProtocolError) as info:
        find_head_end(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 300 + b"\r\n", 100, 1000)
    assert info.value.status == 431
    # exactly at the limits is fine
    line = b"GET /" + b"a" * 86 + b" HTTP/1.1"
    assert len(line) == 100
    assert find_head_end(line + b"\r\nHost: x\r\n\r\n", 100, 1000) > 0
    with pytest.raises(ProtocolError):
        find_head_end(b"GET /" + b"a" * 87 + b" HTTP/1.1\r\n", 100, 1000)


# ----------------------------------------------------------------------------------------- responses
def test_response_head_and_framing() -> None:
    resp = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX: y\r\n\r\n")
    assert (resp.status, resp.reason, resp.content_length, resp.keep_alive) == (200, b"OK", 10, True)
    assert isinstance(response_framer(b"GET", resp), LengthBody)
    assert isinstance(response_framer(b"HEAD", resp), NoBody)
    for status in (b"204 No Content", b"304 Not Modified", b"100 Continue"):
        resp = parse_response_head(b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n")
        assert isinstance(response_framer(b"GET", resp), NoBody)
    resp = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert resp.chunked and isinstance(response_framer(b"GET", resp), ChunkedBody)
    resp = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n")
    assert resp.te_other and not resp.keep_alive and resp.content_length is None
    assert response_framer(b"GET", resp).close_delimited
    resp = parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n")
    assert not resp.keep_alive and isinstance(response_framer(b"GET", resp), CloseDelimitedBody)
    resp = parse_response_head(b"HTTP/1.1 404\r\n\r\n")
    assert resp.status == 404 and resp.reason == b""


@pytest.mark.parametrize(
    ("method", "head", "expected", "framer_kind"),
    [
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", 12, LengthBody),
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0, NoBody),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", 0, NoBody),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", 0, NoBody),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n", 0, NoBody),
        (b"GET", b"HTTP/1.1 103 Early Hints\r\n\r\n", -1, NoBody),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", -1, ChunkedBody),
        (
            b"GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n",
            -1,
            CloseDelimitedBody,
        ),
        (b"GET", b"HTTP/1.1 200 OK\r\n\r\n", -1, CloseDelimitedBody),
    ],
)
def test_body_length_and_framer_of_each_response_shape(
    method: bytes, head: bytes, expected: int, framer_kind: type
) -> None:
    resp = parse_response_head(head)
    assert simple_body_length(method, resp) == expected
    framer = response_framer(method, resp)
    assert type(framer) is framer_kind
    if expected >= 0:
        assert framer.feed(b"x" * (expected + 5)) == expected and framer.done


@pytest.mark.parametrize(
    "text",
    [
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 999 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\nX: a\n\n",
        b"HTTP/1.1 200 OK\r\nBad Name: a\r\n\r\n",
        pytest.param(b"HTTP/1.1 200 " + b"R" * 8190 + b"\r\n\r\n", id="status-line-over-the-limit"),
    ],
)
def test_bad_responses_are_502(text: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_response_head(text)
    assert info.value.status == 502


# ------------------------------------------------------------------------------------------- framers
def test_length_framer_stops_at_the_end() -> None:
    framer = LengthBody(5)
    assert framer.feed(b"abc") == 3 and not framer.done
    assert framer.feed(b"deNEXT") == 2 and framer.done
    assert framer.feed(b"x") == 0
    framer = LengthBody(3)
    framer.feed(b"a")
    with pytest.raises(ProtocolError):
        framer.eof()


def test_close_delimited_framer() -> None:
    framer = CloseDelimitedBody()
    assert framer.feed(b"abc") == 3 and not framer.done
    framer.eof()
    assert framer.done


CHUNKED = b'5\r\nhello\r\n6;ext=1;q="x"\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n'


def test_chunked_decode_with_extensions_and_trailers() -> None:
    framer = ChunkedBody(decode=True)
    assert framer.feed(CHUNKED + b"NEXT") == len(CHUNKED)
    assert framer.done and bytes(framer.decoded) == b"hello world"
    assert framer.trailers == [b"X-Trailer: yes"]
    assert framer.feed(b"more") == 0


def test_chunked_byte_by_byte() -> None:
    framer = ChunkedBody(decode=True)
    for i in range(len(CHUNKED)):
        assert framer.feed(CHUNKED[i : i + 1]) == 1
    assert framer.done and bytes(framer.decoded) == b"hello world"


@pytest.mark.parametrize(
    "body",
    [
        b"g\r\nx\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"-1\r\n",
        b"\r\n",
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after size
        b"5\r\nhelloXX0\r\n\r\n",  # data not followed by CRLF
        b"5\r\nhello\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nBad Trailer: x\r\n\r\n",
        b"5\r\nhello\r\n0\r\n folded\r\n\r\n",
        b"11111111111111111\r\n",  # more than 16 hex digits
        b"5;a\x00b\r\nhello\r\n0\r\n\r\n",
        b"5" * 5000,
    ],
)
def test_chunked_rejections(body: bytes) -> None:
    framer = ChunkedBody()
    with pytest.raises(ProtocolError) as info:
        framer.feed(body)
        framer.eof()
    assert info.value.status == 400


def test_chunked_truncated_at_eof() -> None:
    framer = ChunkedBody()
    framer.feed(b"5\r\nhel")
    with pytest.raises(ProtocolError) as info:
        framer.eof()
    assert info.value.reason == "truncated"


# ---------------------------------------------------------------------------------------- hypothesis
@st.composite
def chunked_messages(draw: st.DrawFn) -> tuple[bytes, bytes, list[bytes]]:
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    wire = bytearray()
    for chunk in chunks:
        size = f"{len(chunk):x}"
        if draw(st.booleans()):
            size = size.upper()
        wire += size.encode()
        if draw(st.booleans()):
            wire += b";name=value"
        wire += b"\r\n" + chunk + b"\r\n"
    trailers = draw(st.lists(st.sampled_from([b"X-A: 1", b"Checksum: abc", b"t:"]), max_size=2))
    wire += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    return bytes(wire), b"".join(chunks), trailers


@settings(max_examples=300, deadline=None)
@given(
    chunked_messages(), st.lists(st.integers(min_value=0, max_value=400), max_size=12), st.binary(max_size=8)
)
def test_chunked_split_anywhere_gives_the_same_result(
    message: tuple[bytes, bytes, list[bytes]], cuts: list[int], tail: bytes
) -> None:
    wire, payload, trailers = message
    data = wire + tail
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    framer = ChunkedBody(decode=True)
    consumed = 0
    for piece in pieces:
        n = framer.feed(piece)
        assert 0 <= n <= len(piece)
        consumed += n
        if framer.done:
            break
    assert framer.done
    assert consumed == len(wire)
    assert bytes(framer.decoded) == payload
    assert framer.trailers == trailers


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    for kw in ({}, {"max_request_line": 20, "max_header_bytes": 60}):
        try:
            end = find_head_end(data, kw.get("max_request_line", 8192), kw.get("max_header_bytes", 32768))
            if end > 0:
                head = parse_request_head(data[:end], **kw)
                request_framer(head).feed(data[end:])
        except ProtocolError:
            pass
        with contextlib.suppress(ProtocolError):
            parse_request_head(data, **kw)
    with contextlib.suppress(ProtocolError):
        parse_response_head(data)
    for framer in (ChunkedBody(), LengthBody(10), CloseDelimitedBody()):
        try:
            framer.feed(data)
            framer.eof()
        except ProtocolError:
            pass


PREFIXES = [
    b"GET / HTTP/1.1\r\nHost: x\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=200))
def test_fuzzed_continuations_only_raise_protocol_error(prefix: bytes, data: bytes) -> None:
    text = prefix + data
    try:
        end = find_head_end(text, 8192, 32768)
        if end > 0:
            if text.startswith(b"HTTP/"):
                response_framer(b"GET", parse_response_head(text[:end])).feed(text[end:])
            else:
                request_framer(parse_request_head(text[:end])).feed(text[end:])
    except ProtocolError:
        pass


def test_host_name_comes_from_the_parse_without_splitting_every_field() -> None:
    req = parse_request_head(b"GET / HTTP/1.1\r\nX-A: 1\r\nhost:  API.Example.com:8443 \r\nX-B: 2\r\n\r\n")
    assert req.host == b"API.Example.com:8443" and req.host_name() == b"api.example.com"
    assert req._headers is None  # (the full field list is only built when something asks for it)
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").host_name() == b"[::1]"
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: bad_name\r\n\r\n").host_name() is None
    assert parse_request_head(b"GET / HTTP/1.0\r\n\r\n").host_name() is None
