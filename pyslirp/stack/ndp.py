"""Neighbour discovery for IPv6 (the bodies of ICMPv6 types 133 to 136).

Read first: RFC 4861 (4.1-4.4 the messages, 4.6 the options, 6.1.1 and
7.1.1 what a receiver checks, 6.2 router constants and RA timing), RFC 4862
(SLAAC: the prefix option's A flag, DAD's neighbour solicitations from ::),
RFC 8106 (RDNSS and DNSSL options).

Bodies here start after the 4-byte ICMPv6 header; the 32-bit word of that
header (flags, or the RA's hop limit/flags/lifetime) is passed separately,
as icmpv6.parse and icmpv6.emit take it.
"""

from __future__ import annotations

import struct

from .errors import MalformedFrame

OPT_SOURCE_LINK_ADDRESS = 1
OPT_TARGET_LINK_ADDRESS = 2
OPT_PREFIX_INFORMATION = 3
OPT_MTU = 5
OPT_RDNSS = 25  # RFC 8106 5.1
OPT_DNSSL = 31  # RFC 8106 5.2

# Neighbour advertisement flags, in the ICMPv6 word.
NA_ROUTER = 1 << 31
NA_SOLICITED = 1 << 30
NA_OVERRIDE = 1 << 29
# Router advertisement flags byte (RFC 4861 4.2).
RA_MANAGED = 0x80
RA_OTHER = 0x40
# Prefix information flags (RFC 4861 4.6.2).
PREFIX_ON_LINK = 0x80
PREFIX_AUTONOMOUS = 0x40

HOP_LIMIT = 255  # RFC 4861: every ND message is sent, and must arrive, with 255
MAX_OPTIONS = 64  # a guest's NS/RS carries one or two; a bound on the walk

_PREFIX = struct.Struct("!BBBBIII16s")  # type, len, prefix len, flags, valid, preferred, 0
_MTU = struct.Struct("!BBHI")
_DNS_HEAD = struct.Struct("!BBHI")  # type, len, reserved, lifetime


def parse_options(data) -> list[tuple[int, bytes]]:
    """RFC 4861 4.6: (type, bytes after type and length) for each option;
    a zero length or one running past the end makes the message invalid."""
    options = []
    i, end = 0, len(data)
    while i < end:
        if i + 2 > end:
            raise MalformedFrame("ndp-option-truncated")
        length = data[i + 1] * 8
        if length == 0:
            raise MalformedFrame("ndp-option-zero-length")
        if i + length > end:
            raise MalformedFrame("ndp-option-truncated")
        if len(options) >= MAX_OPTIONS:
            raise MalformedFrame("ndp-too-many-options")
        options.append((data[i], bytes(data[i + 2 : i + length])))
        i += length
    return options


def link_address(options, kind: int) -> bytes | None:
    """The Ethernet address in a source or target link-layer option."""
    for option_type, value in options:
        if option_type == kind and len(value) >= 6:
            return value[:6]
    return None


def parse_solicitation(body) -> tuple[bytes, list]:
    """Neighbour solicitation or advertisement body: (target, options)."""
    if len(body) < 16:
        raise MalformedFrame("ndp-truncated")
    target = bytes(body[:16])
    if target[0] == 0xFF:
        raise MalformedFrame("ndp-multicast-target")  # RFC 4861 7.1.1
    return target, parse_options(body[16:])


def link_option(kind: int, mac: bytes) -> bytes:
    return bytes((kind, 1)) + mac


def neighbor_advertisement(target: bytes, mac: bytes) -> bytes:
    """NA body: the target and our link-layer address (RFC 4861 4.4)."""
    return target + link_option(OPT_TARGET_LINK_ADDRESS, mac)


def neighbor_solicitation(target: bytes, mac: bytes) -> bytes:
    return target + link_option(OPT_SOURCE_LINK_ADDRESS, mac)


def router_advertisement_word(hop_limit: int, flags: int, lifetime: int) -> int:
    return (hop_limit << 24) | (flags << 16) | lifetime


def router_advertisement(
    mac: bytes,
    prefix: bytes,
    prefix_len: int,
    valid_lifetime: int,
    preferred_lifetime: int,
    mtu: int,
    dns: list[bytes],
    dns_lifetime: int,
    search: list[str],
    reachable_time: int = 0,
    retrans_timer: int = 0,
) -> bytes:
    """RA body after the word: reachable time, retransmission timer and the
    options source link-layer address, MTU, prefix, RDNSS and DNSSL."""
    parts = [
        struct.pack("!II", reachable_time, retrans_timer),
        link_option(OPT_SOURCE_LINK_ADDRESS, mac),
        _MTU.pack(OPT_MTU, 1, 0, mtu),
        _PREFIX.pack(
            OPT_PREFIX_INFORMATION,
            4,
            prefix_len,
            PREFIX_ON_LINK | PREFIX_AUTONOMOUS,
            valid_lifetime,
            preferred_lifetime,
            0,
            prefix,
        ),
    ]
    if dns:
        parts.append(_DNS_HEAD.pack(OPT_RDNSS, 1 + 2 * len(dns), 0, dns_lifetime))
        parts.extend(dns)
    if search:
        names = b"".join(encode_name(name) for name in search)
        names += bytes(-(8 + len(names)) % 8)  # padded with zeros to 8 bytes
        parts.append(_DNS_HEAD.pack(OPT_DNSSL, (8 + len(names)) // 8, 0, dns_lifetime))
        parts.append(names)
    return b"".join(parts)


def encode_name(name: str) -> bytes:
    """A domain name in DNS wire form (RFC 1035 3.1), no compression."""
    labels = [label for label in name.strip(".").split(".") if label]
    out = b"".join(bytes((len(label),)) + label.encode("ascii") for label in labels)
    return out + b"\0"
