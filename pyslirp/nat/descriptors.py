"""The file descriptor budget: host sockets against RLIMIT_NOFILE.

Every flow the guest opens costs one host descriptor (a UDP flow, a TCP
connection, a ping socket), and the process has ``RLIMIT_NOFILE`` of them in
all. A guest that could use them all would leave none for its next TCP
connection, for a published port's ``accept()`` or for the API socket.
So the flows share what is left after a reserve:

    flow capacity = soft limit - descriptors open at start-up - reserve
    reserve       = published-port listeners (fd_reserve_listeners)
                  + the API socket and its clients (fd_reserve_api)
                  + the DNS proxy's upstream sockets (dns_max_sockets)
                  + a margin (fd_reserve_margin: pcap, netlink, /proc reads)

``acquire()`` asks for one flow descriptor: past the capacity it first asks
the evictors (the UDP NAT closes its least recently used flow), and says no
only when nothing could be evicted. ``release()`` gives one back.

``AcceptGuard`` keeps a listener from spinning when ``accept()`` fails with
EMFILE or ENFILE (a level-triggered loop would call it again at once, for
ever): it holds one spare descriptor, and on EMFILE closes
it, accepts the waiting client and closes it at once, then opens the spare
again (the trick of libev and nginx). If even that fails the listener is
paused for ``accept_pause`` seconds.
"""

from __future__ import annotations

import _socket
import errno
import os
import resource
import struct

from pyslirp.log import WARNING, Logger, get_logger

log = get_logger("pyslirp.descriptors")

# Descriptor exhaustion, as socket() and accept() report it.
EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE))
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (container runtimes
    start us with a soft limit of 1024); the (soft, hard) pair in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # RLIM_INFINITY is refused for NOFILE: the kernel's nr_open caps it.
        wanted = hard if hard != resource.RLIM_INFINITY else _nr_open()
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, wanted, exc)
    return soft, hard


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def open_descriptors() -> int:
    """How many descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used
    except OSError:
        return 0


class DescriptorBudget:
    """How many flow descriptors may be open, and how many are."""

    def __init__(self, limit: int, reserve: int, in_use_at_start: int = 0) -> None:
        self.limit = limit  # the soft RLIMIT_NOFILE
        self.reserve = reserve
        self.capacity = max(0, limit - in_use_at_start - reserve)
        self.open = 0  # flow descriptors open now
        self.peak = 0
        # Callables that close one idle flow and return True, or return False.
        self.evictors: list = []
        self.counters = {"descriptors-evicted": 0, "descriptors-refused": 0}

    @classmethod
    def for_process(cls, config) -> DescriptorBudget:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = _nr_open()
        reserve = (
            config.fd_reserve_listeners
            + config.fd_reserve_api
            + config.dns_max_sockets
            + config.fd_reserve_margin
        )
        return cls(limit, reserve, open_descriptors())

    def table_size(self, wanted: int) -> int:
        """The most flows a table configured for ``wanted`` may hold: no
        more than there are descriptors for flows."""
        return min(wanted, self.capacity)

    def acquire(self) -> bool:
        """One more flow descriptor (evicting an idle flow if need be);
        False if none can be had: refuse the flow."""
        if self.open >= self.capacity and not self.evict():
            self.counters["descriptors-refused"] += 1
            return False
        self.open += 1
        if self.open > self.peak:
            self.peak = self.open
        return True

    def release(self) -> None:
        self.open -= 1

    def evict(self) -> bool:
        """Close one idle flow to make room; False if there was none."""
        for evictor in self.evictors:
            if evictor():
                self.counters["descriptors-evicted"] += 1
                return True
        return False


class LogLimiter:
    """At most one log line per ``interval`` seconds for each kind; the
    next line says how many were left out."""

    def __init__(self, logger: Logger, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self._next_at: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, level: int, kind: str, now: float, message: str, *args, **kw) -> bool:
        if now < self._next_at.get(kind, float("-inf")):
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return False
        self._next_at[kind] = now + self.interval
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, skipped, self.interval)
        self.logger.log(level, message, *args, **kw)
        return True


class AcceptGuard:
    """Accepting on a listener when no descriptor is left, without spinning."""

    def __init__(self, what: str, limiter: LogLimiter) -> None:
        self.what = what
        self.limiter = limiter
        self.spare = _open_spare()
        self.shed = 0  # clients accepted and closed at once for want of descriptors

    def accept_failed(self, listener: _socket.socket, exc: OSError, now: float) -> bool:
        """``accept()`` on ``listener`` raised ``exc``. For EMFILE/ENFILE,
        take one waiting client off the queue with the spare descriptor and
        reset it. True if the listener must be paused (nothing could be
        taken off: the next wake-up would fail the same way)."""
        if exc.errno not in EXHAUSTED:
            what = self.what
            self.limiter.log(WARNING, what, now, "%s: accept failed: %s", what, exc)
            return exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR)
        self.limiter.log(
            WARNING,
            self.what,
            now,
            "%s: no descriptor left (%s): clients are reset until one is free",
            self.what,
            os.strerror(exc.errno),
        )
        if self.spare < 0:
            self.spare = _open_spare()
            return True
        os.close(self.spare)
        self.spare = -1
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            paused = False  # someone else took it: nothing waits any more
        except OSError:
            paused = True
        else:
            self.shed += 1
            try:
                client.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            client.close()
            paused = False
        self.spare = _open_spare()
        return paused or self.spare < 0

    def close(self) -> None:
        if self.spare >= 0:
            os.close(self.spare)
            self.spare = -1


def _open_spare() -> int:
    """A descriptor that costs nothing and needs no file system (after
    --enable-sandbox's pivot_root there is no /dev/null): an unbound unix
    datagram socket."""
    try:
        return _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM).detach()
    except OSError:
        return -1
