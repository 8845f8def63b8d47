"""Strict HTTP/1.1 message heads and body framing, sans I/O.

How this works: the proxy collects bytes until `find_head_end()` reports a complete head (the first empty
line), then hands exactly those bytes to `parse_request_head()` / `parse_response_head()`. The parsers
validate everything a request-smuggling or response-splitting attack could use and raise `ProtocolError`
carrying the status to answer with (400 malformed, 414 request line too long, 431 head too large, 501/505
unsupported) and a short counter reason. Bodies are delimited by a *framer* (`request_framer()` /
`response_framer()`): `feed(data)` returns how many bytes of `data` belong to the current message (the
proxy forwards exactly those, unchanged: chunked bodies are validated, not re-encoded) and sets `done` when
the message ended; the rest of `data` belongs to the next message. `eof()` tells a framer the peer closed.

Line endings: every line of a head, chunk-size line and trailer must end with CRLF. A bare LF or bare CR
anywhere in a head is rejected (400, reason "bare_lf"), never tolerated, so the proxy and every backend
agree on where a line ends. Leading empty lines (CRLF) before a request line are skipped by the proxy.

Request rules (RFC 9112, strict): exactly `METHOD SP target SP HTTP/1.x`; method a token; target printable
ASCII without spaces, origin-form, absolute-form or `*` (OPTIONS); HTTP/1.0 and 1.1 (other 1.x minor
versions are treated as 1.1, other majors get 505); header names are tokens (so a space before the colon is
rejected), values have no control characters; obs-fold is rejected; HTTP/1.1 needs exactly one Host.
Smuggling shapes get 400 "smuggling": Content-Length together with Transfer-Encoding, Content-Length
values that differ, Transfer-Encoding on HTTP/1.0, more than one Transfer-Encoding header, and any
Transfer-Encoding value other than exactly `chunked` (case-insensitive, at most one SP after the colon,
nothing after it). CONNECT is not supported (501).
"""

from __future__ import annotations

import re
from typing import NoReturn

from halb.errors import ProtocolError

# Limits for what backends send (requests use the listener's limits).
MAX_RESPONSE_LINE = 8192
MAX_RESPONSE_HEAD = 65536
MAX_CHUNK_LINE = 4096  # chunk-size line including extensions
MAX_TRAILER_BYTES = 32768

_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# A block of field lines, each `token ":" value CRLF` where a value has no control character but HTAB.
# (No bare CR/LF can hide in it, and a line starting with whitespace, obs-fold, does not match.)
_RE_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_RE_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_RE_VALUE_CHAR = rb"[\t \x21-\x7e\x80-\xff]"
_RE_FIELDS_BLOCK = rb"(?:" + _RE_TCHAR + rb"++:" + _RE_VALUE_CHAR + rb"*+\r\n)*+"
_FIELDS_BLOCK = re.compile(_RE_FIELDS_BLOCK)  # possessive: no backtracking
# One field of a validated block: name, value without leading whitespace (fast; trailing whitespace is
# rare and then _FIELD strips it too).
_FIELD_FAST = re.compile(rb"([^:]+):[ \t]*([^\r]*)\r\n")
# One field of a validated block: name, value without leading/trailing whitespace.
_FIELD = re.compile(
    rb"(" + _RE_TCHAR + rb"+):[ \t]*((?:" + _RE_VCHAR + rb"(?:" + _RE_VALUE_CHAR + rb"*" + _RE_VCHAR
    + rb")?)?)[ \t]*\r\n"
)  # fmt: skip
_TE_RAW = re.compile(rb"(?:^|\n)transfer-encoding:([^\r]*)\r", re.IGNORECASE)
_VALUE_OK = bytes([9]) + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_TARGET_OK = bytes(range(0x21, 0x7F))
_HEX = b"0123456789abcdefABCDEF"
_DIGITS = b"0123456789"

_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONNECTION = b"connection"
_HOST = b"host"
_EXPECT = b"expect"
_UPGRADE = b"upgrade"
_SPECIAL = frozenset({_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _HOST, _EXPECT, _UPGRADE})

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def _bad(message: str, reason: str = "bad_request", status: int = 400) -> ProtocolError:
    return ProtocolError(message, status, reason)


def _is_token(value: bytes) -> bool:
    return bool(value) and not value.translate(None, _TCHAR)


def _is_version(value: bytes) -> bool:
    """HTTP/d.d"""
    return (
        len(value) == 8
        and value.startswith(b"HTTP/")
        and value[5] in _DIGITS
        and value[6] == 0x2E
        and value[7] in _DIGITS
    )


# --------------------------------------------------------------------------------------------- heads
# The head fields the parsers (and the proxy, which rewrites hop-by-hop and forwarding headers) look at.
# They are found with one case-insensitive regex scan over the validated head: no per-field Python loop.
# Each match is `lname, value without OWS, start of the line, end of the line (after its CRLF)`.
Special = tuple[bytes, bytes, int, int]

_REQUEST_SPECIAL = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|host|expect|upgrade|keep-alive|proxy-connection|te"
    rb"|x-forwarded-for|x-forwarded-proto|x-request-id):([^\r]*)",
    re.IGNORECASE,
)
# A response's field block is split around these lines (`split` keeps the two groups): one C-speed pass
# gives both the values the parser reads and the block without the lines the proxy drops or rewrites.
_RESPONSE_SPECIAL = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|keep-alive|proxy-connection|te|upgrade|x-request-id)"
    rb":([^\r]*+)",
    re.IGNORECASE,
)
# A valid request line (method token, printable target, HTTP/d.d); anything else takes the slow path,
# which finds the precise error.
_RE_REQUEST_LINE = rb"(" + _RE_TCHAR + rb"+) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\r\n"
_RE_RESPONSE_LINE = rb"(HTTP/1\.[01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?\r\n"
# A whole valid head in one pass: the first line, the field block, the empty line. The empty group marks
# where the field lines start.
_REQUEST_HEAD = re.compile(_RE_REQUEST_LINE + rb"()" + _RE_FIELDS_BLOCK + rb"\r\n")
_RESPONSE_HEAD = re.compile(_RE_RESPONSE_LINE + rb"()" + _RE_FIELDS_BLOCK + rb"\r\n")


_NO_TOKENS: frozenset[bytes] = frozenset()
# A Host value: a DNS name or IPv4 address, or [IPv6], then an optional port (matched lower-cased).
_HOST_NAME = re.compile(rb"([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


def _specials(regex: re.Pattern[bytes], raw: bytes, start: int) -> list[Special]:
    # `start` is the index of the CRLF that ends the first line: every field line follows a CRLF.
    out = []
    for m in regex.finditer(raw, start):
        name, value = m.groups()
        line_start, line_end = m.span()
        out.append((name.lower(), value.strip(b" \t"), line_start + 2, line_end + 2))
    return out


class RequestHead:
    """A parsed request head. `headers` (name, value) pairs in order, names in their original case and
    values without OWS, are computed on first use; `raw`, `fields_start` and `special` let the proxy copy
    the field block unchanged except for the lines it rewrites."""

    __slots__ = (
        "_headers",
        "chunked",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "fields_start",
        "host",
        "keep_alive",
        "line_ok",
        "method",
        "minor",
        "raw",
        "special",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,  # b"HTTP/1.1" or b"HTTP/1.0"
        headers: list[tuple[bytes, bytes]] | None = None,
        minor: int = 1,
        content_length: int | None = None,
        chunked: bool = False,
        keep_alive: bool = True,
        connection_tokens: frozenset[bytes] = frozenset(),  # lower-cased tokens of the Connection header(s)
        upgrade: bytes | None = None,
        expect_continue: bool = False,
        raw: bytes = b"",
        fields_start: int = 0,
        special: list[Special] | None = None,
        line_ok: bool = False,  # raw[:fields_start] is the request line as it is to be forwarded
        host: bytes | None = None,  # the Host header's value (there is at most one)
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self._headers = headers
        self.minor = minor
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.connection_tokens = connection_tokens
        self.upgrade = upgrade
        self.expect_continue = expect_continue
        self.raw = raw
        self.fields_start = fields_start
        self.special = special if special is not None else []
        self.line_ok = line_ok
        self.host = host

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = self._headers
        if headers is None:
            headers = self._headers = _FIELD.findall(self.raw, self.fields_start, len(self.raw) - 2)
        return headers

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, lname: bytes) -> bytes | None:
        """First value of the header whose lower-cased name is `lname`."""
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None

    def host_name(self) -> bytes | None:
        """The Host header's name, lower-cased and without its port ("API.example.com:8443" ->
        "api.example.com", "[::1]:80" -> "[::1]"); None when there is none or it is not a host name."""
        m = _HOST_NAME.fullmatch((self.host or b"").lower())
        return m.group(1) if m is not None else None

    @property
    def path(self) -> bytes:
        """The path of the target, without query (absolute-form targets are reduced to their path)."""
        target = self.target
        if not target.startswith(b"/"):
            scheme_end = target.find(b"://")
            if scheme_end < 0:
                return target
            slash = target.find(b"/", scheme_end + 3)
            target = target[slash:] if slash >= 0 else b"/"
        query = target.find(b"?")
        return target if query < 0 else target[:query]

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, {self.version!r})"


class ResponseHead:
    """A parsed response head (see RequestHead for `headers`, `raw` and `fields_start`). `special`: the
    (lower-cased name, value) of the fields the proxy acts on (framing, hop-by-hop, X-Request-ID), in order;
    `kept`: the field block without those lines (each line led by CRLF, the block ending with one)."""

    __slots__ = (
        "_headers",
        "chunked",
        "connection_tokens",
        "content_length",
        "fields_start",
        "keep_alive",
        "kept",
        "raw",
        "reason",
        "special",
        "status",
        "te_other",
        "version",
    )

    def __init__(
        self,
        version: bytes,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        content_length: int | None = None,
        chunked: bool = False,  # final transfer coding is chunked
        te_other: bool = False,  # Transfer-Encoding present but chunked is not final: read until close
        keep_alive: bool = True,
        connection_tokens: frozenset[bytes] = frozenset(),
        raw: bytes = b"",
        fields_start: int = 0,
        special: list[tuple[bytes, bytes]] | None = None,
        kept: bytes = b"\r\n",
    ) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self._headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.te_other = te_other
        self.keep_alive = keep_alive
        self.connection_tokens = connection_tokens
        self.raw = raw
        self.fields_start = fields_start
        self.special = special if special is not None else []
        self.kept = kept

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = self._headers
        if headers is None:
            headers = self._headers = _FIELD.findall(self.raw, self.fields_start, len(self.raw) - 2)
        return headers

    def __repr__(self) -> str:
        return f"ResponseHead({self.status}, {self.reason!r})"


def find_head_end(
    buf: bytes | bytearray, max_line: int, max_head: int, *, status: tuple[int, int] = (414, 431)
) -> int:
    """Index just past the empty line that ends the head in `buf`, or -1 when more bytes are needed.

    Raises ProtocolError when the first line is longer than `max_line` (status[0]) or the head is longer
    than `max_head` (status[1]). Bare-LF heads are found too (the parser then rejects them).
    """
    lf = buf.find(b"\n")
    if lf < 0:
        if len(buf) > max_line + 1:
            raise ProtocolError("request line too long", status[0], "line_too_long")
        return -1
    if lf > max_line + 1:
        raise ProtocolError("request line too long", status[0], "line_too_long")
    end = -1
    i = buf.find(b"\n\r\n", lf)
    if i >= 0:
        end = i + 3
    j = buf.find(b"\n\n", lf, end if end > 0 else len(buf))  # (not into a body that follows the head)
    if j >= 0:
        end = j + 2
    if end < 0:
        if len(buf) > max_head:
            raise ProtocolError("request head too large", status[1], "head_too_large")
        return -1
    if end > max_head:
        raise ProtocolError("request head too large", status[1], "head_too_large")
    return end


def _split_head(data: bytes, error_status: int) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """-> (first line, field block, fields). The whole block is validated by one regex (C speed)."""
    if not data.endswith(b"\r\n\r\n"):
        raise _bad("head does not end with CRLF CRLF", "bare_lf", error_status)
    lf = data.find(b"\r\n")
    first = data[:lf]
    if b"\n" in first or b"\r" in first:
        raise _bad("bare CR or LF in head", "bare_lf", error_status)
    block = data[lf + 2 : -2]
    if not block:
        return first, block, []
    if _FIELDS_BLOCK.fullmatch(block) is None:
        _explain(block, error_status)
    if b" \r" in block or b"\t\r" in block:
        return first, block, _FIELD.findall(block)
    return first, block, _FIELD_FAST.findall(block)


def _explain(block: bytes, error_status: int) -> NoReturn:
    """The field block is invalid: raise the precise error (slow path)."""
    crlf = block.count(b"\r\n")
    if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
        raise _bad("bare CR or LF in head", "bare_lf", error_status)
    for line in block[:-2].split(b"\r\n"):
        _header_line(line, error_status)
    raise _bad("malformed header field", "bad_header", error_status)  # pragma: no cover - defensive


def _header_line(line: bytes, error_status: int) -> tuple[bytes, bytes, bytes]:
    """-> (name, value without OWS, raw value)."""
    if line[:1] in (b" ", b"\t"):
        raise _bad("obsolete line folding", "obs_fold", error_status)
    if not line:
        raise _bad("empty line inside head", "bad_header", error_status)
    name, sep, raw = line.partition(b":")
    if not sep or not _is_token(name):
        raise _bad("invalid header name", "bad_header", error_status)
    value = raw.strip(b" \t")
    if value.translate(None, _VALUE_OK):
        raise _bad("control character in header value", "bad_header", error_status)
    return name, value, raw


def _content_length(value: bytes, current: int | None, error_status: int) -> int:
    if current is None and value.isdigit() and len(value) <= 18:
        return int(value)  # the common case: one plain number
    result = current
    for part in value.split(b","):
        digits = part.strip(b" \t")
        if not digits or digits.translate(None, _DIGITS) or len(digits) > 18:
            raise _bad("invalid Content-Length", "bad_content_length", error_status)
        n = int(digits)
        if result is not None and n != result:
            raise _bad("conflicting Content-Length values", "smuggling", error_status)
        result = n
    assert result is not None
    return result


def header_tokens(value: bytes) -> list[bytes]:
    """The lower-cased tokens of a comma-separated field value (Connection, Transfer-Encoding, Upgrade)."""
    lower = value.lower()
    if lower == b"keep-alive" or lower == b"close":
        return [lower]  # the common case: one plain token
    return [t for t in (p.strip(b" \t").lower() for p in value.split(b",")) if t]


def parse_request_head(
    data: bytes | bytearray, max_request_line: int = 8192, max_header_bytes: int = 32768
) -> RequestHead:
    """Parse a complete request head (request line, fields, empty line). Raises ProtocolError."""
    if len(data) > max_header_bytes:
        raise _bad("request head too large", "head_too_large", 431)
    raw = bytes(data)
    # Fast path: one C-speed regex pass validates the line and every field (no bare CR/LF, no obs-fold,
    # token names, clean values); anything it rejects is explained by the slow path.
    m = _REQUEST_HEAD.fullmatch(raw)
    if m is None:
        _explain_request(raw, max_request_line)
    fields_start = m.start(4)
    if fields_start - 2 > max_request_line:
        raise _bad("request line too long", "line_too_long", 414)
    method, target, version, _ = m.groups()
    line_ok = True
    if version == b"HTTP/1.1":
        minor = 1
    elif version == b"HTTP/1.0":
        minor = 0
    else:
        if version[5] != 0x31:  # "1"
            raise _bad("HTTP version not supported", "bad_version", 505)
        minor, version, line_ok = 1, b"HTTP/1.1", False
    if method == b"CONNECT":
        raise _bad("CONNECT is not supported", "method", 501)
    if target[0] != 0x2F:  # "/"
        lower = target[:8].lower()
        if not (lower.startswith(b"http://") or lower.startswith(b"https://")) and not (
            target == b"*" and method == b"OPTIONS"
        ):
            raise _bad("invalid request target form", "bad_request_line")

    special = _specials(_REQUEST_SPECIAL, raw, fields_start - 2)
    content_length: int | None = None
    te_count = 0
    hosts = 0
    tokens: list[bytes] = []
    upgrade: bytes | None = None
    expect_continue = False
    host: bytes | None = None
    for lname, value, line_start, _ in special:
        if lname == _HOST:
            hosts += 1
            host = value
        elif lname == _CONTENT_LENGTH:
            content_length = _content_length(value, content_length, 400)
        elif lname == _TRANSFER_ENCODING:
            te_count += 1
            # Exactly "chunked" (any case), at most one SP after the colon: nothing else is accepted.
            rawvalue = raw[line_start + 18 : raw.index(b"\r", line_start)]
            if rawvalue.lower() not in (b"chunked", b" chunked"):
                raise _bad("unsupported or obfuscated Transfer-Encoding", "smuggling")
        elif lname == _CONNECTION:
            tokens += header_tokens(value)
        elif lname == _EXPECT:
            expect_continue = value.lower() == b"100-continue"
        elif lname == _UPGRADE:
            upgrade = value
    if te_count:
        if te_count > 1:
            raise _bad("several Transfer-Encoding headers", "smuggling")
        if content_length is not None:
            raise _bad("both Content-Length and Transfer-Encoding", "smuggling")
        if minor == 0:
            raise _bad("Transfer-Encoding in an HTTP/1.0 request", "smuggling")
    if hosts != 1 and (hosts > 1 or minor == 1):
        raise _bad("an HTTP/1.1 request needs exactly one Host header", "bad_host")
    connection = frozenset(tokens) if tokens else _NO_TOKENS
    if minor == 1:
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection and b"close" not in connection
    return RequestHead(
        method,
        target,
        version,
        None,
        minor,
        content_length,
        te_count == 1,
        keep_alive,
        connection,
        upgrade,
        expect_continue,
        raw,
        fields_start,
        special,
        line_ok,
        host,
    )


def _explain_request(raw: bytes, max_request_line: int) -> NoReturn:
    """The fast path rejected this head: raise the precise error (slow path)."""
    line, _block, _headers = _split_head(raw, 400)
    if len(line) > max_request_line:
        raise _bad("request line too long", "line_too_long", 414)
    parts = line.split(b" ")
    if len(parts) != 3:
        raise _bad("malformed request line", "bad_request_line")
    method, target, version = parts
    if not _is_token(method):
        raise _bad("invalid method", "bad_request_line")
    if not target or target.translate(None, _TARGET_OK):
        raise _bad("invalid request target", "bad_request_line")
    if not _is_version(version):
        raise _bad("invalid HTTP version", "bad_request_line")
    raise _bad("malformed request head", "bad_request")  # pragma: no cover - defensive


def parse_response_head(data: bytes | bytearray) -> ResponseHead:
    """Parse a complete response head from a backend. Raises ProtocolError with status 502."""
    if len(data) > MAX_RESPONSE_HEAD:
        raise _bad("response head too large", "bad_response", 502)
    raw = bytes(data)
    m = _RESPONSE_HEAD.fullmatch(raw)
    if m is None:
        _explain_response(raw)
    fields_start = m.start(4)
    if fields_start > MAX_RESPONSE_LINE + 2:
        raise _bad("response line too long", "bad_response", 502)
    version, code, reason, _ = m.groups()
    status = int(code)
    if not 100 <= status <= 599:
        raise _bad("invalid response status", "bad_response", 502)
    parts = _RESPONSE_SPECIAL.split(raw[fields_start - 2 : -2])  # [kept, name, value, kept, ...]
    special: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    codings: list[bytes] = []
    tokens: list[bytes] = []
    for i in range(1, len(parts), 3):
        lname = parts[i].lower()
        value = parts[i + 1].strip(b" \t")
        special.append((lname, value))
        if lname == _CONTENT_LENGTH:
            content_length = _content_length(value, content_length, 502)
        elif lname == _TRANSFER_ENCODING:
            codings.extend(header_tokens(value))
            if not codings:
                raise _bad("empty Transfer-Encoding", "bad_response", 502)
        elif lname == _CONNECTION:
            tokens += header_tokens(value)
    connection = frozenset(tokens) if tokens else _NO_TOKENS
    if version == b"HTTP/1.1":
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection and b"close" not in connection
    chunked = False
    if codings:
        # Transfer-Encoding wins over Content-Length; anything unusual: do not reuse the connection.
        chunked = codings[-1] == b"chunked"
        if not chunked or content_length is not None or len(codings) > 1:
            keep_alive = False
        content_length = None
    return ResponseHead(
        version,
        status,
        reason or b"",
        None,
        content_length,
        chunked,
        bool(codings) and not chunked,
        keep_alive,
        connection,
        raw,
        fields_start,
        special,
        parts[0] if len(parts) == 1 else b"".join(parts[0::3]),
    )


def _explain_response(raw: bytes) -> NoReturn:
    line, _block, _headers = _split_head(raw, 502)
    version, _, rest = line.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _bad("invalid response version", "bad_response", 502)
    code, _, reason = rest.partition(b" ")
    if len(code) != 3 or code.translate(None, _DIGITS) or not 100 <= int(code) <= 599:
        raise _bad("invalid response status", "bad_response", 502)
    if reason.translate(None, _VALUE_OK):
        raise _bad("invalid reason phrase", "bad_response", 502)
    raise _bad("malformed response head", "bad_response", 502)  # pragma: no cover - defensive


# ------------------------------------------------------------------------------------------- framers
class BodyFramer:
    """Delimits one message body. `feed()` returns the bytes of `data` that belong to this message."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes | bytearray) -> int:
        raise NotImplementedError

    def eof(self) -> None:
        """The peer closed. Raises ProtocolError (reason "truncated") when the body is incomplete."""
        if not self.done:
            raise ProtocolError("connection closed inside a message body", 400, "truncated")

    @property
    def close_delimited(self) -> bool:
        return False


class NoBody(BodyFramer):
    __slots__ = ()

    def __init__(self) -> None:
        self.done = True

    def feed(self, data: bytes | bytearray) -> int:
        return 0


class LengthBody(BodyFramer):
    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes | bytearray) -> int:
        n = len(data)
        if n >= self.remaining:
            n = self.remaining
            self.done = True
        self.remaining -= n
        return n


class CloseDelimitedBody(BodyFramer):
    """A response body without length: everything until the backend closes."""

    __slots__ = ()

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes | bytearray) -> int:
        return len(data)

    def eof(self) -> None:
        self.done = True

    @property
    def close_delimited(self) -> bool:
        return True


_SIZE, _DATA, _DATA_END, _TRAILER = 0, 1, 2, 3


class ChunkedBody(BodyFramer):
    """Incremental validator of a chunked body, trailers included; the bytes pass through unchanged.

    With `decode=True` the payload is collected into `decoded` and trailer lines into `trailers` (tests).
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailer_bytes", "decode", "decoded", "trailers")

    def __init__(self, decode: bool = False) -> None:
        self.done = False
        self.decode = decode
        self.decoded = bytearray()
        self.trailers: list[bytes] = []
        self._state = _SIZE
        self._remaining = 0
        self._line = bytearray()
        self._trailer_bytes = 0

    def feed(self, data: bytes | bytearray) -> int:
        if self.done:
            return 0
        pos = 0
        n = len(data)
        while pos < n:
            if self._state == _DATA:
                take = min(self._remaining, n - pos)
                if self.decode:
                    self.decoded += data[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
                continue
            lf = data.find(b"\n", pos)
            limit = 2 if self._state == _DATA_END else MAX_CHUNK_LINE
            if lf < 0:
                self._line += data[pos:]
                if len(self._line) > limit:
                    raise _bad("chunk line too long", "bad_chunk")
                return n
            self._line += data[pos : lf + 1]
            pos = lf + 1
            line = bytes(self._line)
            self._line.clear()
            if len(line) > limit:
                raise _bad("chunk line too long", "bad_chunk")
            if line[-2:] != b"\r\n" or b"\r" in line[:-2]:
                raise _bad("chunk line does not end with CRLF", "bad_chunk")
            if self._state == _SIZE:
                self._size_line(line[:-2])
            elif self._state == _DATA_END:
                if line != b"\r\n":
                    raise _bad("chunk data not followed by CRLF", "bad_chunk")
                self._state = _SIZE
            else:  # trailer section
                if line == b"\r\n":
                    self.done = True
                    return pos
                self._trailer_bytes += len(line)
                if self._trailer_bytes > MAX_TRAILER_BYTES:
                    raise _bad("trailer section too large", "bad_chunk")
                _header_line(line[:-2], 400)
                if self.decode:
                    self.trailers.append(line[:-2])
        return n

    def _size_line(self, line: bytes) -> None:
        semi = line.find(b";")
        size = line
        if semi >= 0:
            size = line[:semi].rstrip(b" \t")
            if line[semi:].translate(None, _VALUE_OK):
                raise _bad("invalid chunk extension", "bad_chunk")
        if not size or len(size) > 16 or size.translate(None, _HEX):
            raise _bad("invalid chunk size", "bad_chunk")
        self._remaining = int(size, 16)
        self._state = _DATA if self._remaining else _TRAILER


def request_framer(head: RequestHead) -> BodyFramer:
    if head.chunked:
        return ChunkedBody()
    if head.content_length:
        return LengthBody(head.content_length)
    return NoBody()


def simple_body_length(method: bytes, head: ResponseHead) -> int:
    """The length of the body after this response head when it is empty or has a Content-Length; -1 for
    a 1xx, chunked or close-delimited one (the rule `response_framer` frames bodies by)."""
    status = head.status
    if status < 200:
        return -1
    if method == b"HEAD" or status == 204 or status == 304:
        return 0
    if head.content_length is not None and not head.chunked and not head.te_other:
        return head.content_length
    return -1


def response_framer(method: bytes, head: ResponseHead) -> BodyFramer:
    length = simple_body_length(method, head)
    if length > 0:
        return LengthBody(length)
    if length == 0 or head.status < 200:  # (a 1xx has no body: the final response follows it)
        return NoBody()
    return ChunkedBody() if head.chunked else CloseDelimitedBody()
