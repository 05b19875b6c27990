"""IPv6 header parsing, extension headers, emission and fragmentation.

Read first: RFC 8200 (the protocol: section 4 for extension headers and their
order, 4.2 for the option actions, 4.4 for the routing header, 4.5 for
fragments, 5 for the minimum MTU of 1280), RFC 7112 (the first fragment
carries the whole header chain), RFC 6946 (atomic fragments), RFC 8021 (why
we never send them), RFC 4291 (the address kinds).

The walk over extension headers is bounded (``MAX_EXTENSION_HEADERS``) and
every length is checked against the packet before it is read. What RFC 8200
asks to answer with an ICMPv6 parameter problem raises ``ParameterProblem``
(a MalformedFrame carrying the code and the pointer), so the stack can both
count the drop and tell the guest.
"""

from __future__ import annotations

import struct

from pyslirp.settings import Record

from .errors import MalformedFrame

# version/traffic class/flow label, payload length, next header, hop limit,
# source, destination
HEADER = struct.Struct("!IHBB16s16s")
HEADER_LEN = 40
FRAGMENT = struct.Struct("!BBHI")  # next header, reserved, offset/flags, id
FRAGMENT_LEN = 8
MIN_MTU = 1280  # RFC 8200 section 5
MAX_PAYLOAD = 65535  # without a jumbogram (RFC 2675, not supported)
DEFAULT_HOP_LIMIT = 64

PROTO_HOP_BY_HOP = 0
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DEST_OPTIONS = 60
_WALKED = frozenset({PROTO_HOP_BY_HOP, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_DEST_OPTIONS})
# A guest needs at most hop-by-hop, destination options, routing, fragment
# and destination options again (RFC 8200 4.1's order); a few more are
# tolerated, a long chain is an attack on the walk.
MAX_EXTENSION_HEADERS = 8

# Options inside hop-by-hop and destination options headers.
OPTION_PAD1 = 0
OPTION_PADN = 1
OPTION_ROUTER_ALERT = 5  # RFC 2711 (MLD carries it)
_KNOWN_OPTIONS = frozenset({OPTION_PADN, OPTION_ROUTER_ALERT})

# ICMPv6 parameter problem codes (RFC 4443 3.4, RFC 7112).
ERRONEOUS_FIELD = 0
UNRECOGNIZED_NEXT_HEADER = 1
UNRECOGNIZED_OPTION = 2

UNSPECIFIED = bytes(16)
LOOPBACK = bytes(15) + b"\x01"
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
ALL_DHCP_AGENTS = bytes.fromhex("ff020000000000000000000000010002")  # RFC 8415 7.1
SOLICITED_NODE_PREFIX = bytes.fromhex("ff0200000000000000000001ff")


class ParameterProblem(MalformedFrame):
    """A packet RFC 8200 answers with ICMPv6 parameter problem ``code``,
    ``pointer`` bytes into it; not when it went to a multicast address and
    ``unless_multicast`` is set (option action 11, RFC 8200 4.2)."""

    def __init__(self, reason: str, code: int, pointer: int, unless_multicast=False) -> None:
        super().__init__(reason)
        self.code = code
        self.pointer = pointer
        self.unless_multicast = unless_multicast


class Ipv6Header(Record):
    __slots__ = (
        "header_len",
        "total_len",
        "traffic_class",
        "hop_limit",
        "protocol",
        "src",
        "dst",
        "next_header_at",
        "fragment_offset",
        "more_fragments",
        "fragment_id",
        "fragment_at",
    )

    def __init__(
        self,
        header_len: int,
        total_len: int,
        traffic_class: int,
        hop_limit: int,
        protocol: int,
        src: bytes,
        dst: bytes,
        next_header_at: int,
        fragment_offset: int = 0,
        more_fragments: bool = False,
        fragment_id: int = -1,
        fragment_at: int = 0,
    ) -> None:
        self.header_len = (
            header_len  # where the upper-layer header starts (after extension headers)
        )
        self.total_len = total_len  # 40 + payload length
        self.traffic_class = traffic_class
        self.hop_limit = hop_limit
        self.protocol = protocol  # the upper-layer protocol (or the fragment's next header)
        self.src = src
        self.dst = dst
        self.next_header_at = next_header_at  # offset of the next-header field naming ``protocol``
        self.fragment_offset = fragment_offset  # in bytes
        self.more_fragments = more_fragments
        self.fragment_id = fragment_id  # -1: no fragment header
        self.fragment_at = fragment_at  # offset of the fragment header

    @property
    def is_fragment(self) -> bool:
        """A real fragment; an atomic fragment (offset 0, no more) is whole."""
        return self.more_fragments or self.fragment_offset != 0

    @property
    def ttl(self) -> int:  # the name the family-neutral code uses
        return self.hop_limit


def is_multicast(addr: bytes) -> bool:
    return addr[0] == 0xFF


def is_link_local(addr: bytes) -> bool:
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def solicited_node(addr: bytes) -> bytes:
    """RFC 4291 2.7.1: ff02::1:ffXX:XXXX for the low 24 bits of ``addr``."""
    return SOLICITED_NODE_PREFIX + addr[13:]


def multicast_mac(addr: bytes) -> bytes:
    """RFC 2464 7: 33:33 followed by the low 32 bits of the group."""
    return b"\x33\x33" + addr[12:]


def parse(data) -> Ipv6Header:
    """Parse the fixed header and walk the extension headers of ``data``.

    Bytes past 40 + payload length (Ethernet padding) are ignored. Stops at
    the first upper-layer header, or after a fragment header whose offset is
    not zero (the rest belongs to the reassembled datagram).
    """
    size = len(data)
    if size < HEADER_LEN:
        raise MalformedFrame("ipv6-truncated")
    vtf, payload_len, next_header, hop_limit, src, dst = HEADER.unpack_from(data, 0)
    if vtf >> 28 != 6:
        raise MalformedFrame("ipv6-bad-version")
    total = HEADER_LEN + payload_len
    if total > size:
        raise MalformedFrame("ipv6-bad-payload-length")
    if payload_len == 0 and next_header == PROTO_HOP_BY_HOP:
        raise MalformedFrame("ipv6-jumbogram")  # RFC 2675, which a TAP cannot carry
    header = Ipv6Header(HEADER_LEN, total, (vtf >> 20) & 0xFF, hop_limit, next_header, src, dst, 6)
    if next_header in _WALKED:
        _walk(data, header, total)
    return header


def _walk(data, header: Ipv6Header, end: int) -> None:
    offset = HEADER_LEN
    next_header = header.protocol
    next_header_at = 6
    for count in range(MAX_EXTENSION_HEADERS + 1):
        if next_header not in _WALKED:
            break
        if count == MAX_EXTENSION_HEADERS:
            raise MalformedFrame("ipv6-too-many-extension-headers")
        if next_header == PROTO_HOP_BY_HOP and offset != HEADER_LEN:
            # RFC 8200 4.1: only right after the IPv6 header.
            raise ParameterProblem(
                "ipv6-misplaced-hop-by-hop", UNRECOGNIZED_NEXT_HEADER, next_header_at
            )
        if offset + 8 > end:
            raise MalformedFrame("ipv6-extension-truncated")
        if next_header == PROTO_FRAGMENT:
            if header.fragment_id >= 0:
                raise MalformedFrame("ipv6-two-fragment-headers")
            following, _reserved, offset_flags, ident = FRAGMENT.unpack_from(data, offset)
            header.fragment_offset = offset_flags & 0xFFF8
            header.more_fragments = bool(offset_flags & 1)
            header.fragment_id = ident
            header.fragment_at = offset
            next_header_at = offset
            next_header = following
            offset += FRAGMENT_LEN
            if header.fragment_offset:
                break  # what follows is the middle of a datagram
            continue
        length = (data[offset + 1] + 1) * 8
        if offset + length > end:
            raise MalformedFrame("ipv6-extension-truncated")
        if next_header == PROTO_ROUTING:
            if data[offset + 3]:  # segments left: we implement no routing type
                raise ParameterProblem(
                    "ipv6-routing-header", ERRONEOUS_FIELD, offset + 2, unless_multicast=False
                )
        else:
            _walk_options(data, offset + 2, offset + length)
        next_header_at = offset
        next_header = data[offset]
        offset += length
    header.protocol = next_header
    header.next_header_at = next_header_at
    header.header_len = offset


def _walk_options(data, start: int, end: int) -> None:
    """RFC 8200 4.2: skip what we know, act on the high bits of the rest."""
    i = start
    while i < end:
        kind = data[i]
        if kind == OPTION_PAD1:
            i += 1
            continue
        if i + 2 > end or i + 2 + data[i + 1] > end:
            raise MalformedFrame("ipv6-option-truncated")
        if kind not in _KNOWN_OPTIONS:
            action = kind >> 6
            if action == 1:
                raise MalformedFrame("ipv6-option-unknown")
            if action >= 2:
                raise ParameterProblem(
                    "ipv6-option-unknown", UNRECOGNIZED_OPTION, i, unless_multicast=action == 3
                )
        i += 2 + data[i + 1]


def header(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = DEFAULT_HOP_LIMIT,
    traffic_class: int = 0,
) -> bytes:
    return HEADER.pack(
        (6 << 28) | (traffic_class << 20), payload_len, next_header, hop_limit, src, dst
    )


def fragment(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload,
    ident: int,
    mtu: int,
    hop_limit: int = DEFAULT_HOP_LIMIT,
) -> list[bytes]:
    """Split ``payload`` into packets of at most ``mtu`` bytes, each with a
    fragment header (RFC 8200 4.5; we are the source, so this is allowed)."""
    chunk = ((mtu - HEADER_LEN - FRAGMENT_LEN) // 8) * 8
    if chunk <= 0:
        raise ValueError(f"MTU {mtu} too small to fragment")
    view = memoryview(payload)
    size = len(payload)
    packets = []
    for offset in range(0, size, chunk):
        part = view[offset : offset + chunk]
        more = 1 if offset + chunk < size else 0
        packets.append(
            b"".join(
                (
                    header(src, dst, PROTO_FRAGMENT, FRAGMENT_LEN + len(part), hop_limit),
                    FRAGMENT.pack(next_header, 0, offset | more, ident),
                    part,
                )
            )
        )
    return packets


def finish_reassembly(first_header: bytes, payload_len: int) -> bytes:
    """The unfragmentable part of the first fragment (its fragment header
    last) made the header of the whole datagram: the fragment header goes,
    the header before it names the fragment's next header, and the payload
    length covers everything (RFC 8200 4.5)."""
    head = bytearray(first_header[:-FRAGMENT_LEN])
    following = first_header[-FRAGMENT_LEN]
    total_payload = len(head) - HEADER_LEN + payload_len
    if total_payload > MAX_PAYLOAD:
        raise MalformedFrame("reassembly-too-long")
    # Find the next-header field that names the fragment header: walk the
    # (already checked) chain of the unfragmentable part.
    at, offset, kind = 6, HEADER_LEN, head[6]
    while offset < len(head):
        at = offset
        kind = head[offset]
        offset += (head[offset + 1] + 1) * 8
    if kind != PROTO_FRAGMENT or offset != len(head):
        raise MalformedFrame("reassembly-bad-chain")
    head[at] = following
    head[4:6] = total_payload.to_bytes(2, "big")
    return bytes(head)
