"""Reassembly of fragmented IPv4 and IPv6 datagrams from the guest.

Read first: RFC 791 section 3.2 ("Reassembly"), RFC 815 (hole accounting),
RFC 5722 and RFC 8900 (why overlapping fragments are dropped, not merged);
for IPv6, RFC 8200 section 4.5 (the fragment header and its reassembly).

One reassembler serves both families, so its bounds (datagrams, bytes,
fragments per datagram) are shared. The family shows only in the key and in
``finish``, which turns the first fragment's header and the whole payload
into a packet (the IPv4 one by default; ``ipv6.finish_reassembly`` for IPv6).

Overlaps: a fragment that repeats exactly what is already held is ignored;
any other overlap discards the whole datagram, as Linux has done for IPv4
since 2018. That way no byte the guest sent can be replaced by another.
"""

from __future__ import annotations

from pyslirp.settings import Record

from . import checksum
from .budget import MemoryBudget
from .errors import MalformedFrame

MAX_PACKET = 65535


class _Datagram(Record):
    __slots__ = ("expires_at", "first_header", "pieces", "received", "total")

    def __init__(
        self,
        expires_at: float,
        first_header: bytes = b"",
        pieces: dict | None = None,
        received: int = 0,
        total: int = -1,
    ) -> None:
        self.expires_at = expires_at
        self.first_header = first_header  # header of the offset-0 fragment, once seen
        self.pieces = {} if pieces is None else pieces  # offset -> bytes
        self.received = received
        self.total = total  # payload length, once the last fragment is seen


def finish_ipv4(first_header: bytes, payload_len: int) -> bytes:
    """The first fragment's IPv4 header, made the header of the whole datagram."""
    head = bytearray(first_header)
    if len(head) + payload_len > MAX_PACKET:
        raise MalformedFrame("reassembly-too-long")
    head[2:4] = (len(head) + payload_len).to_bytes(2, "big")
    head[6:8] = b"\0\0"  # no flags, offset 0: a whole datagram
    head[10:12] = b"\0\0"
    head[10:12] = checksum.checksum(head).to_bytes(2, "big")
    return bytes(head)


class Reassembler:
    def __init__(
        self,
        timeout: float,
        max_datagrams: int,
        max_bytes: int,
        max_fragments: int,
        budget: MemoryBudget | None = None,
    ):
        self.timeout = timeout
        # Fragments are copies (held exactly as counted), charged to the
        # stack's memory budget as well as bounded by max_bytes.
        self.budget = budget if budget is not None else MemoryBudget(max_bytes)
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.max_fragments = max_fragments
        # The datagrams being put together, by (src, dst, protocol, ident):
        # read-only outside (the Stack asks whether any is, tests look in).
        self.datagrams: dict[tuple, _Datagram] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self.datagrams)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def add(
        self,
        key: tuple,
        header: bytes,
        offset: int,
        more: bool,
        data,
        now: float,
        finish=None,
        max_end: int = MAX_PACKET - 20,
    ):
        """Add one fragment; return the whole IP packet once the datagram is complete.

        ``key`` is (src, dst, protocol, id) for IPv4, (src, dst, id) for IPv6.
        ``header`` is this fragment's IP header (only the first fragment's is
        kept, options or extension headers included). The packet returned is
        ``finish(first header, payload length)`` followed by the payload; the
        default ``finish`` gives the first fragment's IPv4 header with the
        total length, flags and checksum of the reassembled datagram.
        ``max_end`` bounds offset plus length. Raises MalformedFrame (and
        forgets the datagram) for overlaps and broken fragments.
        """
        if more and len(data) % 8:
            raise MalformedFrame("fragment-unaligned")
        if not data:
            raise MalformedFrame("fragment-empty")
        end = offset + len(data)
        if end > max_end:
            raise MalformedFrame("fragment-too-long")
        entry = self.datagrams.get(key)
        if entry is None:
            if len(self.datagrams) >= self.max_datagrams:
                raise MalformedFrame("reassembly-datagrams-full")
            entry = _Datagram(expires_at=now + self.timeout)
            self.datagrams[key] = entry
        if self._bytes + len(data) > self.max_bytes:
            self._forget(key)
            raise MalformedFrame("reassembly-memory-full")
        for held_offset, held in entry.pieces.items():
            if offset < held_offset + len(held) and held_offset < end:
                if held_offset == offset and held == data:
                    return None  # an exact duplicate
                self._forget(key)
                raise MalformedFrame("fragment-overlap")
        if not more:
            if entry.total >= 0 and entry.total != end:
                self._forget(key)
                raise MalformedFrame("fragment-conflicting-end")
            if any(o + len(d) > end for o, d in entry.pieces.items()):
                self._forget(key)
                raise MalformedFrame("fragment-past-end")
            entry.total = end
        if entry.total >= 0 and end > entry.total:
            self._forget(key)
            raise MalformedFrame("fragment-past-end")
        if len(entry.pieces) >= self.max_fragments:
            self._forget(key)
            raise MalformedFrame("reassembly-too-many-fragments")
        if not self.budget.charge(len(data)):
            self._forget(key)
            raise MalformedFrame("reassembly-memory-budget")
        entry.pieces[offset] = bytes(data)
        entry.received += len(data)
        self._bytes += len(data)
        if offset == 0:
            entry.first_header = bytes(header)
        if entry.total < 0 or entry.received != entry.total:
            return None
        # No overlaps and every byte counted once: the pieces tile 0..total.
        self._forget(key)
        head = (finish or finish_ipv4)(entry.first_header, entry.total)
        pieces = [entry.pieces[o] for o in sorted(entry.pieces)]
        return b"".join([head, *pieces])

    def _forget(self, key: tuple) -> None:
        entry = self.datagrams.pop(key, None)
        if entry is not None:
            self._bytes -= entry.received
            self.budget.release(entry.received)

    def expire(self, now: float) -> list[tuple[tuple, bytes, bytes]]:
        """Drop timed-out datagrams; return (key, first header, first piece) for
        each, the header and piece empty where the first fragment never came
        (RFC 792: time exceeded, code 1, only when it did)."""
        expired = []
        for key in [k for k, e in self.datagrams.items() if e.expires_at <= now]:
            entry = self.datagrams[key]
            expired.append((key, entry.first_header, entry.pieces.get(0, b"")))
            self._forget(key)
        return expired

    def next_deadline(self):
        if not self.datagrams:
            return None
        return min(e.expires_at for e in self.datagrams.values())
