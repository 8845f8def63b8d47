"""One small error hierarchy for halb.

Errors are raised inside with one of these types and converted once at a boundary (the CLI prints them,
the proxy turns ProtocolError into a 4xx, the receive loops count and drop them).
"""

from __future__ import annotations


class HalbError(Exception):
    """Base of every error halb raises on purpose."""


class ConfigError(HalbError):
    """A configuration file is wrong: names the file, the key path and the problem."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class ProtocolError(HalbError):
    """Bad bytes from the network. Carries the status a proxy answers with and a counter reason."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_request") -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


class StoreUnavailable(HalbError):
    """The shared state store (Redis) did not answer in time."""
