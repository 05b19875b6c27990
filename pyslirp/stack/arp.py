"""ARP for IPv4 over Ethernet (RFC 826)."""

from __future__ import annotations

import struct

from .errors import MalformedFrame

# htype, ptype, hlen, plen, oper, sha, spa, tha, tpa
PACKET = struct.Struct("!HHBBH6s4s6s4s")
PACKET_LEN = 28
REQUEST = 1
REPLY = 2


def parse(data) -> tuple[int, bytes, bytes, bytes, bytes]:
    """Return (operation, sender_mac, sender_ip, target_mac, target_ip)."""
    if len(data) < PACKET_LEN:
        raise MalformedFrame("arp-truncated")
    htype, ptype, hlen, plen, oper, sha, spa, tha, tpa = PACKET.unpack_from(data, 0)
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        raise MalformedFrame("arp-unsupported")
    if oper not in (REQUEST, REPLY):
        raise MalformedFrame("arp-bad-operation")
    return oper, sha, spa, tha, tpa


def emit(oper: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return PACKET.pack(1, 0x0800, 6, 4, oper, sha, spa, tha, tpa)
