"""UDP (RFC 768; RFC 1122 section 4.1 for the checksum rules)."""

from __future__ import annotations

import struct

from . import checksum
from .errors import MalformedFrame

HEADER = struct.Struct("!HHHH")
HEADER_LEN = 8
PROTOCOL = 17


def parse(data, src: bytes, dst: bytes, verify: bool = True) -> tuple[int, int, int]:
    """Check the datagram in ``data`` (the whole IP payload).

    Returns (src_port, dst_port, length); the payload is data[8:length].
    A zero checksum means "not computed" over IPv4 and is accepted there.
    ``verify`` False: the sender's kernel left the checksum to us (virtio
    NEEDS_CSUM) or checked it already.
    """
    if len(data) < HEADER_LEN:
        raise MalformedFrame("udp-truncated")
    sport, dport, length, csum = HEADER.unpack_from(data, 0)
    if length < HEADER_LEN or length > len(data):
        raise MalformedFrame("udp-bad-length")
    if verify and (csum or len(src) == 16):
        if csum == 0:
            raise MalformedFrame("udp-zero-checksum")  # RFC 8200 section 8.1
        total = checksum.pseudo_header_sum(src, dst, PROTOCOL, length)
        total += checksum.partial_sum(data[:length])
        if total % 0xFFFF:
            raise MalformedFrame("udp-bad-checksum")
    return sport, dport, length


def emit(src: bytes, dst: bytes, sport: int, dport: int, payload) -> bytes:
    length = HEADER_LEN + len(payload)
    head = HEADER.pack(sport, dport, length, 0)
    total = checksum.pseudo_header_sum(src, dst, PROTOCOL, length)
    total += checksum.partial_sum(head) + checksum.partial_sum(payload)
    csum = checksum.finish(total) or 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    return b"".join((head[:6], csum.to_bytes(2, "big"), payload))
