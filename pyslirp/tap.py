"""Writing frames to the TAP, for both backends (the python loop and libslirp's).

This module imports neither the python stack nor its host side, so that the
libslirp backend can use it without loading them.
"""

from __future__ import annotations

import errno
import os

# The largest frame read from or written to the TAP: MTU 65520 (slirp4netns's
# and libslirp's maximum) plus the Ethernet header, with room to spare.
MAX_FRAME = 65536 + 14


def writev(fd: int, buffers) -> int:
    """os.writev, or one joined write where the platform lacks it (Debian
    12's PyPy, see pyslirp/_compat.py)."""
    return os.write(fd, b"".join(buffers))


if hasattr(os, "writev"):
    writev = os.writev  # noqa: F811


def write_tap(fd: int, frame, header=None) -> bool:
    """Write one frame (after its virtio header, if any) to the TAP; False if
    the kernel dropped it: the queue is full, or the TAP is down (EIO) and the
    guest is not listening yet."""
    try:
        if header is None:
            os.write(fd, frame)
        else:
            writev(fd, (header, frame))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EIO, errno.ENOBUFS, errno.EINVAL):
            raise
        return False
    return True
