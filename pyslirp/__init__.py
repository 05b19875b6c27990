"""pyslirp: a user-mode TCP/IP stack for rootless containers, in pure Python."""

__version__ = "0.1.0"
