"""A timer as a file descriptor (timerfd_create(2)), for the backend's loop.

The front end's timers (the SLAAC watch's time limit, the end of a log
rate-limit interval) are descriptors that the loop serves like any other,
never threads: the sandbox of a user who is not root starts with
setns(CLONE_NEWUSER), which the kernel refuses to a process with more than
one thread (EINVAL).
"""

from __future__ import annotations

import os
import struct
import time

from pyslirp.backend import READ

from .libc import get_errno, libc

# <sys/timerfd.h>, <time.h>
CLOCK_MONOTONIC = 1
TFD_CLOEXEC = os.O_CLOEXEC
TFD_NONBLOCK = os.O_NONBLOCK
_ITIMERSPEC = struct.Struct("=qqqq")  # it_interval (sec, nsec), it_value (sec, nsec)

def _raise(what: str):
    err = get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


class TimerFd:
    """A one-shot timer on CLOCK_MONOTONIC (the clock of time.monotonic()):
    readable once it has expired, until ``clear``."""

    def __init__(self) -> None:
        fd = libc().timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            _raise("timerfd_create")
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def arm(self, delay: float) -> None:
        """Expire ``delay`` seconds from now (replacing any earlier setting)."""
        delay = max(delay, 1e-9)  # zero would disarm it
        seconds = int(delay)
        nanoseconds = max(int((delay - seconds) * 1e9), 0 if seconds else 1)
        self._set(seconds, nanoseconds)

    def disarm(self) -> None:
        self._set(0, 0)

    def _set(self, seconds: int, nanoseconds: int) -> None:
        import ctypes  # loaded by libc() already

        spec = ctypes.create_string_buffer(_ITIMERSPEC.pack(0, 0, seconds, nanoseconds))
        if libc().timerfd_settime(self.fd, 0, spec, None) != 0:
            _raise("timerfd_settime")

    def clear(self) -> None:
        """Take the expiry, so that the descriptor is no longer readable."""
        try:
            os.read(self.fd, 8)
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Deadline:
    """The earliest of the deadlines asked for (``by``), kept by one TimerFd
    that is registered in a backend's loop on first use; when it expires,
    ``callback(now)`` runs, the deadline forgotten first (the callback asks
    for the next one). The API's and the metrics endpoint's slow clients."""

    def __init__(self, backend, callback) -> None:
        self._backend = backend
        self._callback = callback
        self._timer: TimerFd | None = None
        self.at: float | None = None  # when it fires, if armed

    def by(self, deadline: float) -> None:
        """Fire no later than ``deadline`` (monotonic seconds)."""
        if self._timer is None:
            try:
                timer = TimerFd()  # may come when every descriptor is taken
            except Exception:  # noqa: BLE001 - no timer now; the next call tries again
                return
            try:
                self._backend.register(timer.fileno(), READ, self._fired)
            except Exception:  # noqa: BLE001 - then only new clients evict old ones
                timer.close()
                return
            self._timer = timer
        if self.at is None or deadline < self.at:
            self.at = deadline
            self._timer.arm(max(0.001, deadline - time.monotonic()))

    def _fired(self, mask: int, now: float) -> None:
        self._timer.clear()
        self.at = None
        self._callback(now)

    def close(self) -> None:
        if self._timer is not None:
            try:
                self._backend.unregister(self._timer.fileno())
            except Exception:  # noqa: BLE001 - the loop may be gone at exit
                pass
            self._timer.close()
            self._timer = None
