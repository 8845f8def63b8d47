"""halb: a high-availability load-balancer cluster."""

__version__ = "0.1.0"
