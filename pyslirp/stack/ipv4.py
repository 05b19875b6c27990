"""IPv4 header parsing, emission and fragmentation.

Read first: RFC 791 (the protocol), RFC 1122 section 3.2.1 (host
requirements for the header), RFC 815 (reassembly), RFC 6864 (the ID field).
"""

from __future__ import annotations

import struct

from pyslirp.settings import Record

from . import checksum
from .errors import MalformedFrame

# version/ihl, tos, total length, id, flags/fragment offset, ttl, protocol,
# header checksum, source, destination
HEADER = struct.Struct("!BBHHHBBH4s4s")
HEADER_LEN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
FLAG_DF = 0x4000
FLAG_MF = 0x2000
OFFSET_MASK = 0x1FFF
MAX_PACKET = 65535
DEFAULT_TTL = 64


class Ipv4Header(Record):
    __slots__ = (
        "header_len",
        "tos",
        "total_len",
        "ident",
        "dont_fragment",
        "more_fragments",
        "fragment_offset",
        "ttl",
        "protocol",
        "src",
        "dst",
    )

    def __init__(
        self,
        header_len: int,
        tos: int,
        total_len: int,
        ident: int,
        dont_fragment: bool,
        more_fragments: bool,
        fragment_offset: int,
        ttl: int,
        protocol: int,
        src: bytes,
        dst: bytes,
    ) -> None:
        self.header_len = header_len
        self.tos = tos
        self.total_len = total_len
        self.ident = ident
        self.dont_fragment = dont_fragment
        self.more_fragments = more_fragments
        self.fragment_offset = fragment_offset  # in bytes
        self.ttl = ttl
        self.protocol = protocol
        self.src = src
        self.dst = dst

    @property
    def is_fragment(self) -> bool:
        return self.more_fragments or self.fragment_offset != 0


def parse(data) -> Ipv4Header:
    """Parse and check the header at the start of ``data`` (a memoryview or bytes).

    Options, if any, are skipped by the header length without being read.
    The payload is ``data[header.header_len:header.total_len]``; bytes past
    total_len (Ethernet padding) are ignored.
    """
    if len(data) < HEADER_LEN:
        raise MalformedFrame("ipv4-truncated")
    ver_ihl, tos, total_len, ident, frag, ttl, proto, _csum, src, dst = HEADER.unpack_from(data, 0)
    if ver_ihl >> 4 != 4:
        raise MalformedFrame("ipv4-bad-version")
    header_len = (ver_ihl & 0x0F) * 4
    if header_len < HEADER_LEN:
        raise MalformedFrame("ipv4-bad-header-length")
    if total_len < header_len or total_len > len(data):
        raise MalformedFrame("ipv4-bad-total-length")
    if not checksum.is_valid(data[:header_len]):
        raise MalformedFrame("ipv4-bad-checksum")
    if frag & 0x8000:
        raise MalformedFrame("ipv4-reserved-flag")
    return Ipv4Header(
        header_len,
        tos,
        total_len,
        ident,
        bool(frag & FLAG_DF),
        bool(frag & FLAG_MF),
        (frag & OFFSET_MASK) * 8,
        ttl,
        proto,
        src,
        dst,
    )


def header(
    src: bytes,
    dst: bytes,
    protocol: int,
    payload_len: int,
    ident: int,
    ttl: int = DEFAULT_TTL,
    flags_offset: int = 0,
    tos: int = 0,
) -> bytes:
    """A 20-byte header with its checksum filled in."""
    total = HEADER_LEN + payload_len
    raw = HEADER.pack(0x45, tos, total, ident, flags_offset, ttl, protocol, 0, src, dst)
    csum = checksum.checksum(raw)
    return raw[:10] + csum.to_bytes(2, "big") + raw[12:]


def fragment(
    src: bytes,
    dst: bytes,
    protocol: int,
    payload: bytes,
    ident: int,
    mtu: int,
    ttl: int = DEFAULT_TTL,
    tos: int = 0,
) -> list[bytes]:
    """Split ``payload`` into IP packets of at most ``mtu`` bytes (RFC 791 section 2.3)."""
    chunk = ((mtu - HEADER_LEN) // 8) * 8
    if chunk <= 0:
        raise ValueError(f"MTU {mtu} too small to fragment")
    view = memoryview(payload)
    packets = []
    for offset in range(0, len(payload), chunk):
        part = view[offset : offset + chunk]
        more = offset + chunk < len(payload)
        flags = (FLAG_MF if more else 0) | (offset // 8)
        packets.append(header(src, dst, protocol, len(part), ident, ttl, flags, tos) + part)
    return packets
