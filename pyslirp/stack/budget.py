"""One memory budget for everything held on the guests' behalf.

Read first: Linux's ``tcp_mem`` (Documentation/networking/ip-sysctl.rst:
below the pressure mark buffers grow freely; above it they are held back;
at the limit new buffers are refused), RFC 9293 3.8.6 (a receiver shrinks
the window it offers rather than drop what it has offered), RFC 1122
4.2.2.16 (it should not shrink a window it has already offered; it may
drop a segment it has no room for, which the sender then resends).

Every holder (TCP receive, out-of-order and send buffers, IPv4 reassembly,
frames waiting for ARP or neighbour discovery, DNS queries waiting for an
upstream) charges the bytes it actually holds, a view of a frame counted as
the whole frame, and releases them when it lets go. ``charge`` refuses what
would take the total past ``limit``: the holder drops that one datagram or
segment (the guest resends it, or its flow is reset), never the process.
Past ``pressure`` a window (or send space) offered anew is a quarter of
what is left, nothing at the limit; a window already offered is not taken
back (RFC 1122), so a segment inside it may still be refused at the limit
and resent, as in Linux when tcp_mem's limit is reached.
"""

from __future__ import annotations


class MemoryBudget:
    """``held`` bytes out of ``limit``. Holders on a hot path add to
    ``held`` themselves (the test of ``charge`` written out); the rest call
    ``charge`` and ``release``. ``pressed`` (and ``peak``) are brought up
    to date by ``pressure_changed``, which the stack asks once per wake-up
    near the marks and when a connection lets go of its buffers."""

    __slots__ = ("limit", "pressure", "relief", "held", "peak", "refused", "pressed", "episodes")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Past three quarters of the limit, windows close in proportion to
        # what is left (Linux's tcp_mem[1] is about that fraction of [2]).
        self.pressure = limit * 3 // 4
        # Pressure ends a sixteenth of the limit below where it began, so
        # that a budget hovering at the mark does not flap (and log) per
        # wake-up.
        self.relief = self.pressure - limit // 16
        self.held = 0
        self.peak = 0  # the most held, as seen at charge() and once per wake-up
        self.refused = 0  # charges refused, in calls
        self.pressed = False  # between passing ``pressure`` and falling below ``relief``
        self.episodes = 0  # times pressure began

    def charge(self, size: int) -> bool:
        """Hold ``size`` more bytes if the limit allows; False (and nothing
        held) if it does not."""
        held = self.held + size
        if held > self.limit:
            self.refused += 1
            return False
        self.held = held
        if held > self.peak:
            self.peak = held
        return True

    def release(self, size: int) -> None:
        self.held -= size

    def free(self) -> int:
        """Bytes that may still be charged."""
        left = self.limit - self.held
        return left if left > 0 else 0

    def window_room(self) -> int:
        """How much a window (or a send buffer) may offer now: what is free
        below the pressure mark, then a quarter of what is left, which
        shrinks to nothing at the limit."""
        held = self.held
        left = self.limit - held
        if held < self.pressure:
            return left
        return left // 4 if left > 0 else 0

    def pressure_changed(self):
        """True when pressure has just begun, False when it has just ended,
        None otherwise (the caller logs and wakes whoever waited)."""
        held = self.held
        if held > self.peak:
            self.peak = held
        if self.pressed:
            if held < self.relief:
                self.pressed = False
                return False
        elif held >= self.pressure:
            self.pressed = True
            self.episodes += 1
            return True
        return None


def held_size(chunk) -> int:
    """The bytes a buffered chunk keeps alive: a view keeps its whole
    underlying object (a guest's frame), anything else itself."""
    return len(chunk.obj) if type(chunk) is memoryview else len(chunk)
