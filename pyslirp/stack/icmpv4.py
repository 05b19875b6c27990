"""ICMP for IPv4 (RFC 792; RFC 1191 for the next-hop MTU; RFC 1812 4.3 for
what a router quotes).
"""

from __future__ import annotations

import struct

from . import checksum
from .errors import MalformedFrame

HEADER = struct.Struct("!BBHHH")  # type, code, checksum, id/unused, seq/mtu
HEADER_LEN = 8

ECHO_REPLY = 0
DEST_UNREACHABLE = 3
ECHO_REQUEST = 8
TIME_EXCEEDED = 11

# Destination-unreachable codes.
NET_UNREACHABLE = 0
HOST_UNREACHABLE = 1
PORT_UNREACHABLE = 3
FRAGMENTATION_NEEDED = 4
ADMIN_PROHIBITED = 13

ERROR_TYPES = frozenset({DEST_UNREACHABLE, 4, 5, TIME_EXCEEDED, 12})
# RFC 1812 4.3.2.3 allows quoting up to 576 bytes of the datagram in total;
# RFC 792 requires the IP header plus 64 bits.
MAX_QUOTE = 576 - 20 - HEADER_LEN


def parse(data) -> tuple[int, int, int, int]:
    """Return (type, code, rest-of-header high 16 bits, low 16 bits)."""
    if len(data) < HEADER_LEN:
        raise MalformedFrame("icmp-truncated")
    if not checksum.is_valid(data):
        raise MalformedFrame("icmp-bad-checksum")
    icmp_type, code, _csum, word1, word2 = HEADER.unpack_from(data, 0)
    return icmp_type, code, word1, word2


def emit(icmp_type: int, code: int, word1: int, word2: int, body) -> bytes:
    raw = HEADER.pack(icmp_type, code, 0, word1, word2) + bytes(body)
    csum = checksum.checksum(raw)
    return raw[:2] + csum.to_bytes(2, "big") + raw[4:]
