"""Ethernet II framing (IEEE 802.3 clause 3.2.6 type field)."""

from __future__ import annotations

import struct

from .errors import MalformedFrame

HEADER = struct.Struct("!6s6sH")
HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100
BROADCAST = b"\xff" * 6


def parse(frame) -> tuple[bytes, bytes, int]:
    """Return (dst, src, ethertype); the payload starts at HEADER_LEN."""
    if len(frame) < HEADER_LEN:
        raise MalformedFrame("ethernet-truncated")
    return HEADER.unpack_from(frame, 0)


def header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return HEADER.pack(dst, src, ethertype)


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_from_str(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"invalid MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)
