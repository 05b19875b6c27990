"""ICMPv6 (RFC 4443): the header, its mandatory checksum, the message types.

Read first: RFC 4443 (section 2.4 for when an error must not be sent and the
rate limit, 3 for the errors, 4 for echo), RFC 8200 section 8.1 (the
pseudo-header). Neighbour discovery messages are ICMPv6 too; their bodies
and options are in ``ndp.py``.
"""

from __future__ import annotations

import struct

from . import checksum
from .errors import MalformedFrame

HEADER = struct.Struct("!BBHI")  # type, code, checksum, the 32-bit word
HEADER_LEN = 8
PROTOCOL = 58

# Errors (type < 128).
DEST_UNREACHABLE = 1
PACKET_TOO_BIG = 2
TIME_EXCEEDED = 3
PARAMETER_PROBLEM = 4
# Informational.
ECHO_REQUEST = 128
ECHO_REPLY = 129
MLD_QUERY = 130
MLD_REPORT = 131
MLD_DONE = 132
ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136
REDIRECT = 137
MLD2_REPORT = 143

# Destination-unreachable codes (RFC 4443 3.1).
NO_ROUTE = 0
ADMIN_PROHIBITED = 1
ADDRESS_UNREACHABLE = 3
PORT_UNREACHABLE = 4

# RFC 4443 2.4(c): an error holds as much of the offending packet as fits
# in the minimum MTU: 1280 - 40 (IPv6) - 8 (ICMPv6).
MAX_QUOTE = 1280 - 40 - HEADER_LEN


def is_error(icmp_type: int) -> bool:
    return icmp_type < 128


def parse(data, src: bytes, dst: bytes) -> tuple[int, int, int]:
    """Check the message in ``data`` (the whole ICMPv6 message); return
    (type, code, the 32-bit word after the checksum)."""
    size = len(data)
    if size < HEADER_LEN:
        raise MalformedFrame("icmpv6-truncated")
    total = checksum.pseudo_header_sum(src, dst, PROTOCOL, size) + checksum.partial_sum(data)
    if total % 0xFFFF:
        raise MalformedFrame("icmpv6-bad-checksum")
    icmp_type, code, _csum, word = HEADER.unpack_from(data, 0)
    return icmp_type, code, word


def emit(src: bytes, dst: bytes, icmp_type: int, code: int, word: int, body=b"") -> bytes:
    head = HEADER.pack(icmp_type, code, 0, word)
    size = HEADER_LEN + len(body)
    total = checksum.pseudo_header_sum(src, dst, PROTOCOL, size)
    total += checksum.partial_sum(head) + checksum.partial_sum(body)
    csum = checksum.finish(total) or 0xFFFF
    return b"".join((head[:2], csum.to_bytes(2, "big"), head[4:], body))
