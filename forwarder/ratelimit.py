"""Warnings rate-limited per kind, so that a guest cannot flood the journal.

Many warnings are the guest's doing, one line per frame it sends: "DHCP pool
exhausted" per DISCOVER from a new hardware address, "DHCP client declined"
per DECLINE, "tcp ... refused: N connections open" per SYN past the limit,
"cannot open a UDP socket" / "cannot open a ping socket" per datagram or echo
request while descriptors run out, "cannot bind a UDP socket" per datagram
with --outbound-addr. Each kind (the logger and the message's template,
before its arguments) gets ``burst`` lines per ``interval``; past that its
lines are counted, and when the interval ends one line says how many were
left out:

    suppressed 179 similar messages: DHCP pool exhausted: no offer for %s

Only records at ``level`` or above are limited: info and debug lines are
asked for with --log-level, and are for someone watching.

The filter sits on the handler (a filter on the "pyslirp" logger would not
see the records of "pyslirp.dhcp" and the other children). The clock is
injected; the loop calls ``flush`` when the earliest interval with
suppressed lines ends (``wake`` asks for that), so the summary comes on time
even if the flood has stopped.
"""

from __future__ import annotations

import os
import sys
import time

from pyslirp import log
from pyslirp.settings import Settings

from .timerfd import Deadline

SUMMARY = "suppressed %d similar messages: %s"


class WarningLimits(Settings):
    # Lines of one kind per interval: a few show what happens and to whom,
    # more only repeat it (a guest can send thousands of frames a second).
    burst: int = 5
    # Seconds; a flood of one kind costs at most burst + 1 lines per interval.
    interval: float = 10.0
    # Kinds tracked at once. Templates are constants in the code (a few
    # dozen); the bound only matters if one is built per call. Past it the
    # oldest interval is closed early (its summary written).
    max_kinds: int = 256
    # Records below this level pass untouched.
    level: int = log.WARNING


class _Window:
    __slots__ = ("ends_at", "count", "suppressed", "name", "template")

    def __init__(self, ends_at: float, name: str, template: str) -> None:
        self.ends_at = ends_at
        self.count = 0
        self.suppressed = 0
        self.name = name
        self.template = template


class RateLimitFilter:
    """A filter for a logging handler (``logging`` takes any object with a
    ``filter`` method: this module need not import it). ``emit(record)``
    writes a summary record (the handler's ``handle``); ``wake(deadline)``
    asks the loop to call ``flush`` at ``deadline`` (on ``clock``'s scale)."""

    def __init__(self, limits: WarningLimits | None = None, clock=time.monotonic) -> None:
        self.limits = limits or WarningLimits()
        self.clock = clock
        self.emit = None
        self.wake = None
        self._windows: dict[tuple, _Window] = {}
        self.suppressed_total = 0

    @property
    def kinds_tracked(self) -> int:
        """How many kinds of warning have an open interval (at most
        ``limits.max_kinds``)."""
        return len(self._windows)

    def filter(self, record) -> bool:
        if record.levelno < self.limits.level or getattr(record, "rate_limit_summary", False):
            return True
        now = self.clock()
        template = record.msg if isinstance(record.msg, str) else repr(record.msg)
        key = (record.name, template)
        window = self._windows.get(key)
        if window is not None and now >= window.ends_at:
            self._close(key, window)
            window = None
        if window is None:
            if len(self._windows) >= self.limits.max_kinds:
                self.flush(now)
            if len(self._windows) >= self.limits.max_kinds:
                oldest = min(self._windows, key=lambda k: self._windows[k].ends_at)
                self._close(oldest, self._windows[oldest])
            window = self._windows[key] = _Window(now + self.limits.interval, *key)
        window.count += 1
        if window.count <= self.limits.burst:
            return True
        window.suppressed += 1
        self.suppressed_total += 1
        if window.suppressed == 1 and self.wake is not None:
            self.wake(window.ends_at)
        return False

    def flush(self, now: float | None = None) -> None:
        """Close every interval that has ended, writing its summary."""
        now = self.clock() if now is None else now
        for key, window in list(self._windows.items()):
            if now >= window.ends_at:
                self._close(key, window)

    def next_deadline(self) -> float | None:
        """When the earliest interval with suppressed lines ends."""
        ends = [w.ends_at for w in self._windows.values() if w.suppressed]
        return min(ends) if ends else None

    def _close(self, key: tuple, window: _Window) -> None:
        del self._windows[key]
        if window.suppressed and self.emit is not None:
            import logging  # records are being handled: it is imported

            record = logging.LogRecord(
                window.name, logging.WARNING, "", 0, SUMMARY,
                (window.suppressed, window.template), None,
            )  # fmt: skip
            record.rate_limit_summary = True
            self.emit(record)


def install(handler, limits: WarningLimits | None = None) -> RateLimitFilter:
    """Put a RateLimitFilter on ``handler`` (a logging.Handler); returns it
    (the loop arms its timer)."""
    limiter = RateLimitFilter(limits)
    _attach(limiter, handler)
    return limiter


def _attach(limiter: RateLimitFilter, handler) -> None:
    limiter.emit = handler.handle
    handler.addFilter(limiter)


# The console's filter (log_to_stderr), there before ``logging`` is set up.
_console: RateLimitFilter | None = None

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr(level: str) -> RateLimitFilter:
    """The forwarder's logging: records at ``level`` and above on stderr
    in FORMAT, guest-triggered warnings a few per kind per interval. The
    handler is made, and ``logging`` imported, when the first such record
    comes (pyslirp.log); the filter exists at once, so that the loop can
    serve its timer. Returns the filter."""
    global _console
    limiter = _console = RateLimitFilter()
    # The first line may well come when the descriptors have run out (a
    # guest opening flows past the limit), and importing logging opens its
    # files: one descriptor is kept for that, and given up just before.
    spare = [os.open("/dev/null", os.O_RDONLY)]

    def setup() -> None:
        if spare:
            os.close(spare.pop())
        import logging

        handler = logging.StreamHandler(sys.stderr)
        _attach(limiter, handler)
        logging.basicConfig(level=level, handlers=[handler], format=FORMAT)

    log.configure(level, setup)
    return limiter


def serve(limiter: RateLimitFilter, backend) -> object:
    """Have ``backend``'s loop call ``limiter.flush`` when an interval with
    suppressed lines ends (a timerfd, no thread, made when a line is first
    suppressed: a forwarder that never suppresses one loads no ctypes).
    Returns the timer (its ``close`` ends it)."""

    def expired(now: float) -> None:
        limiter.flush()
        deadline = limiter.next_deadline()
        if deadline is not None:
            timer.by(deadline)

    timer = Deadline(backend, expired)
    limiter.wake = timer.by
    deadline = limiter.next_deadline()
    if deadline is not None:
        timer.by(deadline)
    return timer


def installed() -> RateLimitFilter | None:
    """The console's filter (log_to_stderr), else the one that ``install``
    put on a handler of the root logger, if any."""
    if _console is not None:
        return _console
    logging = sys.modules.get("logging")
    if logging is None:
        return None  # not imported: no handler has a filter
    for handler in logging.getLogger().handlers:
        for candidate in handler.filters:
            if isinstance(candidate, RateLimitFilter):
                return candidate
    return None
