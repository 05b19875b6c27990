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
Windows offered to the guest shrink as ``held`` passes ``pressure``, so a
guest that respects them is flow-controlled before anything is refused.
"""

from __future__ import annotations


class MemoryBudget:
    __slots__ = ("limit", "pressure", "held", "peak", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Past three quarters of the limit, windows close in proportion to
        # what is left (Linux's tcp_mem[1] is about that fraction of [2]).
        self.pressure = limit * 3 // 4
        self.held = 0
        self.peak = 0
        self.refused = 0  # charges refused, in calls

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
        return self.limit - self.held

    def window_room(self) -> int:
        """How much a window may offer now: anything below the pressure
        mark, then a share of what is left that shrinks toward zero."""
        held = self.held
        if held < self.pressure:
            return self.limit  # no constraint from the budget
        left = self.limit - held
        return left // 4 if left > 0 else 0
