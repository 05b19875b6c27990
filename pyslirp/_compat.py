"""What differs between the Pythons we run on: CPython 3.11 (tested) and
Debian 12's PyPy (7.3.11, Python 3.9), which the benchmark measures because
its JIT halves our per-packet interpreter time.

PyPy 3.9 has no ``dataclass(slots=...)``, ``os.writev``,
``socket.if_nametoindex`` or ``os.pidfd_open``, and evaluates no ``X | Y``
type at run time (hence ``from __future__ import annotations`` in every
module); the code uses the names below instead."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys

# ``@dataclass(**SLOTS)``: __slots__ where dataclass can make them (3.10+).
SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}

_SIOCGIFINDEX = 0x8933
_IFREQ_INDEX = struct.Struct("16si")


def writev(fd: int, buffers) -> int:
    """os.writev, or one joined write where the platform lacks it."""
    return os.write(fd, b"".join(buffers))


if hasattr(os, "writev"):
    writev = os.writev  # noqa: F811


def if_nametoindex(name: str) -> int:
    """socket.if_nametoindex, in the calling thread's network namespace."""
    if hasattr(socket, "if_nametoindex"):
        return socket.if_nametoindex(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ_INDEX.pack(name.encode(), 0)
        return _IFREQ_INDEX.unpack(fcntl.ioctl(sock.fileno(), _SIOCGIFINDEX, request))[1]


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
