"""TCP segments on the wire: the header, its options and the checksum.

Read first: RFC 9293 section 3.1 (header format) and 3.2 (options), RFC 6691
(MSS), RFC 7323 (window scale and timestamps), RFC 2018 (SACK-permitted).
The state machine lives in tcp_connection.py; this file only parses and
emits.
"""

from __future__ import annotations

import struct

from pyslirp.settings import Record

from . import checksum
from .errors import MalformedFrame

# source port, destination port, sequence, acknowledgment, data offset and
# reserved bits, flags, window, checksum, urgent pointer
HEADER = struct.Struct("!HHIIBBHHH")
HEADER_LEN = 20
PROTOCOL = 6

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WINDOW_SCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMPS = 8
MAX_WINDOW_SCALE = 14  # RFC 7323 section 2.3

# The form Linux and we use for timestamps on every segment: NOP NOP TS.
TIMESTAMPS_ALIGNED = struct.Struct("!4xII")
_TS_PREFIX = b"\x01\x01\x08\x0a"
_TS_OPTION = struct.Struct("!BBBBII")
_MSS_OPTION = struct.Struct("!BBH")
_TWO = struct.Struct("!II")

_FLAG_NAMES = "FSRPAUEC"


class TcpSegment(Record):
    __slots__ = (
        "src_port",
        "dst_port",
        "seq",
        "ack",
        "flags",
        "window",
        "urgent",
        "payload",
        "mss",
        "window_scale",
        "sack_permitted",
        "timestamp",
    )

    def __init__(
        self,
        src_port: int,
        dst_port: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        urgent: int,
        payload: memoryview,
        mss: int = 0,
        window_scale: int = -1,
        sack_permitted: bool = False,
        timestamp: tuple[int, int] | None = None,
    ) -> None:
        self.src_port = src_port
        self.dst_port = dst_port
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window  # as sent, not yet scaled
        self.urgent = urgent
        self.payload = payload
        self.mss = mss  # 0: option absent
        self.window_scale = window_scale  # -1: option absent
        self.sack_permitted = sack_permitted
        self.timestamp = timestamp  # (TSval, TSecr)

    @property
    def length(self) -> int:
        """Sequence space the segment occupies (RFC 9293 SEG.LEN)."""
        return len(self.payload) + (self.flags & SYN) // SYN + (self.flags & FIN)


def flags_to_str(flags: int) -> str:
    return "".join(name for bit, name in enumerate(_FLAG_NAMES) if flags & (1 << bit))


def flags_from_str(text: str) -> int:
    return sum(1 << _FLAG_NAMES.index(ch) for ch in text)


def parse(data, src: bytes, dst: bytes, verify_checksum: bool = True) -> TcpSegment:
    """Parse and check the segment in ``data`` (the whole IP payload).

    ``src``/``dst`` are the IP addresses for the pseudo-header (RFC 9293
    3.1); a segment whose checksum does not add up raises MalformedFrame,
    as does any truncated header or option.
    """
    size = len(data)
    if size < HEADER_LEN:
        raise MalformedFrame("tcp-truncated")
    sport, dport, seq, ack, offset, flags, window, _csum, urgent = HEADER.unpack_from(data, 0)
    header_len = (offset >> 4) * 4
    if header_len < HEADER_LEN or header_len > size:
        raise MalformedFrame("tcp-bad-header-length")
    if verify_checksum:
        total = (
            int.from_bytes(src, "big")
            + int.from_bytes(dst, "big")
            + PROTOCOL
            + size
            + checksum.partial_sum(data)
        )
        if total % 0xFFFF:
            raise MalformedFrame("tcp-bad-checksum")
    if not sport or not dport:
        raise MalformedFrame("tcp-zero-port")
    segment = TcpSegment(sport, dport, seq, ack, flags, window, urgent, data[header_len:])
    if header_len > HEADER_LEN:
        if header_len == 32 and data[20:24] == _TS_PREFIX:  # the common case, NOP NOP TS
            segment.timestamp = TIMESTAMPS_ALIGNED.unpack_from(data, 20)
        else:
            parse_options(segment, data[HEADER_LEN:header_len])
    return segment


# MSS (kind 2, length 4), SACK permitted (4, 2), timestamps (8, 10), then NOP
# and window scale (3, 3) as one 32-bit word.
_SYN_OPTIONS = struct.Struct("!HHHHIII")


def parse_options(segment: TcpSegment, options) -> None:
    """RFC 9293 3.2: kind, length, value; unknown kinds are skipped by length."""
    if len(options) == 20:
        # The SYN of Linux (and most stacks): MSS, SACK permitted, timestamps,
        # NOP, window scale. One unpack; anything else is walked below.
        mss_head, mss, sack, ts_head, ts_val, ts_ecr, ws_head = _SYN_OPTIONS.unpack(options)
        if mss_head == 0x0204 and sack == 0x0402 and ts_head == 0x080A and ws_head >> 8 == 0x010303:
            segment.mss = mss
            segment.sack_permitted = True
            segment.timestamp = (ts_val, ts_ecr)
            ws = ws_head & 0xFF
            segment.window_scale = ws if ws < MAX_WINDOW_SCALE else MAX_WINDOW_SCALE
            return
    i = 0
    end = len(options)
    while i < end:
        kind = options[i]
        if kind == OPT_END:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedFrame("tcp-option-truncated")
        length = options[i + 1]
        if length < 2 or i + length > end:
            raise MalformedFrame("tcp-option-bad-length")
        if kind == OPT_MSS:
            if length != 4:
                raise MalformedFrame("tcp-option-bad-length")
            segment.mss = _MSS_OPTION.unpack_from(options, i)[2]
        elif kind == OPT_WINDOW_SCALE:
            if length != 3:
                raise MalformedFrame("tcp-option-bad-length")
            # RFC 7323 2.3: a shift above 14 is used as 14.
            segment.window_scale = min(options[i + 2], MAX_WINDOW_SCALE)
        elif kind == OPT_SACK_PERMITTED:
            if length != 2:
                raise MalformedFrame("tcp-option-bad-length")
            segment.sack_permitted = True
        elif kind == OPT_TIMESTAMPS:
            if length != 10:
                raise MalformedFrame("tcp-option-bad-length")
            segment.timestamp = _TWO.unpack_from(options, i + 2)
        i += length


def build_options(
    mss: int = 0,
    window_scale: int = -1,
    sack_permitted: bool = False,
    timestamp: tuple[int, int] | None = None,
) -> bytes:
    """Options in the layout Linux uses, padded to a multiple of 4 bytes."""
    parts = []
    if mss:
        parts.append(_MSS_OPTION.pack(OPT_MSS, 4, mss))
    if sack_permitted and timestamp is not None:
        parts.append(_TS_OPTION.pack(OPT_SACK_PERMITTED, 2, OPT_TIMESTAMPS, 10, *timestamp))
    else:
        if sack_permitted:
            parts.append(b"\x01\x01\x04\x02")
        if timestamp is not None:
            parts.append(_TS_OPTION.pack(OPT_NOP, OPT_NOP, OPT_TIMESTAMPS, 10, *timestamp))
    if window_scale >= 0:
        parts.append(bytes((OPT_NOP, OPT_WINDOW_SCALE, 3, window_scale)))
    return b"".join(parts)


def timestamp_option(ts_val: int, ts_ecr: int) -> bytes:
    """The 12-byte NOP NOP TS block carried by every segment once negotiated."""
    return _TS_OPTION.pack(OPT_NOP, OPT_NOP, OPT_TIMESTAMPS, 10, ts_val, ts_ecr)


def emit(
    src: bytes,
    dst: bytes,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload=b"",
) -> bytes:
    """The segment (header, options, payload) with its checksum filled in."""
    header_len = HEADER_LEN + len(options)
    if header_len & 3 or header_len > 60:
        raise ValueError(f"TCP options must pad to a multiple of 4, up to 40 bytes: {options!r}")
    head = HEADER.pack(src_port, dst_port, seq, ack, header_len << 2, flags, window, 0, 0)
    head += options
    size = header_len + len(payload)
    total = (
        int.from_bytes(src, "big")
        + int.from_bytes(dst, "big")
        + PROTOCOL
        + size
        + int.from_bytes(head, "big")
        + checksum.partial_sum(payload)
    )
    csum = checksum.finish(total)
    return b"".join((head[:16], csum.to_bytes(2, "big"), head[18:], payload))
