"""A tiny client for a node's admin API (`/api/...`), used by the `halb backends` and `halb config` commands.

How this works: one HTTP/1.1 request per call with urllib (no dependency), JSON in and out. The bearer
token goes in `Authorization`. Errors come back as `AdminError` with the node's own message (its JSON
`error` field, which for 401/403 says how to authenticate) and the HTTP status.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class AdminError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def request(
    admin: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Send one request; the decoded JSON answer, or AdminError."""
    data = json.dumps(body).encode() if body is not None else (b"" if method in ("POST", "PUT") else None)
    req = urllib.request.Request(f"http://{admin}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return _decode(response.read())
    except urllib.error.HTTPError as exc:
        doc = _decode(exc.read())
        message = str(doc.get("error") or exc.reason)
        raise AdminError(f"{admin}: {exc.code} {message}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"{admin}: unreachable: {reason}") from None


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw.decode(errors="replace").strip()}
    return doc if isinstance(doc, dict) else {"result": doc}
