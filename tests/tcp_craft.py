"""Hand-made IPv4 TCP frames from a guest, for the memory tests: any
sequence number, any length up to a 64 KiB GSO segment, checksums right.

Built here with struct rather than scapy: a test sends hundreds of 64 KiB
segments, and these frames are inputs (what a hostile guest may write), not
expectations of our emitter.
"""

import struct

SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
MASK = 0xFFFFFFFF


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data)) if data else 0


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    window: int = 0xFFFF,
    options: bytes = b"",
    ident: int = 1,
) -> bytes:
    """One Ethernet frame: IPv4 (DF, TTL 64) and TCP with ``options``
    (padded to 4 bytes) and ``payload``."""
    options += b"\x01" * (-len(options) % 4)  # NOP padding
    header_len = 20 + len(options)
    tcp_head = struct.pack(
        "!HHIIBBHHH", sport, dport, seq & MASK, ack & MASK, header_len << 2, flags, window, 0, 0
    )
    segment = tcp_head + options + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
    body = int.from_bytes(segment + b"\0" * (len(segment) % 2), "big") % 0xFFFF
    csum = 0xFFFF - _fold(_sum16(pseudo) + body)
    csum = csum or 0xFFFF
    segment = segment[:16] + struct.pack("!H", csum) + segment[18:]
    total = 20 + len(segment)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0x4000, 64, 6, 0, src, dst)
    ip_csum = 0xFFFF - _fold(_sum16(ip))
    ip = ip[:10] + struct.pack("!H", ip_csum) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + segment


def syn_options(mss: int, wscale: int) -> bytes:
    """MSS, NOP, window scale (no timestamps, no SACK)."""
    return struct.pack("!BBH", 2, 4, mss) + struct.pack("!BBBB", 1, 3, 3, wscale)


def parse_tcp(frame: bytes):
    """(seq, ack, flags, window, payload length) of a frame toward the guest."""
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    at = 14 + ihl
    seq, ack, doff, flags, window = struct.unpack_from("!IIBBH", frame, at + 4)
    return seq, ack, flags, window, total - ihl - (doff >> 4) * 4
