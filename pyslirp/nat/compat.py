"""System calls that Debian 12's PyPy (Python 3.9) lacks, for the host side
and the front end: ``socket.if_nametoindex`` and ``os.pidfd_open`` (see
pyslirp/_compat.py for the rest, pyslirp/tap.py for ``os.writev``)."""

from __future__ import annotations

import _socket
import fcntl
import os
import struct

_SIOCGIFINDEX = 0x8933
_IFREQ_INDEX = struct.Struct("16si")


def if_nametoindex(name: str) -> int:
    """socket.if_nametoindex, in the calling thread's network namespace."""
    if hasattr(_socket, "if_nametoindex"):
        return _socket.if_nametoindex(name)
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        request = _IFREQ_INDEX.pack(name.encode(), 0)
        return _IFREQ_INDEX.unpack(fcntl.ioctl(sock.fileno(), _SIOCGIFINDEX, request))[1]
    finally:
        sock.close()


def pidfd_open(pid: int) -> int:
    """os.pidfd_open, or the system call itself (434 on every architecture)."""
    if hasattr(os, "pidfd_open"):
        return os.pidfd_open(pid)
    import ctypes

    fd = ctypes.CDLL(None, use_errno=True).syscall(434, pid, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd
