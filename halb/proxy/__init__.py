"""The data plane: HTTP/1.1 reverse proxy and TCP proxy, run by each worker process.

`ProxyServer` (server.py) is the entry point; `http_codec` is the sans-I/O HTTP/1.1 parser and framers.
"""

from halb.proxy.server import ProxyServer

__all__ = ["ProxyServer"]
