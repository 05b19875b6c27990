"""TCP wire format: segments a real Linux guest sent parse to the expected
fields, the emitter gives the same bytes back, and every malformed or
truncated segment raises MalformedFrame and nothing else.

The frames below were captured with ``--pcap`` while a Linux 6.x guest
(10.0.2.100, MAC c6:a2:55:63:cd:c1) connected to 10.0.2.2:44459, sent
b"hello pyslirp", read b"pong", shut down its write side and closed.
"""

import itertools
import random

import pytest
from scapy.layers.inet import IP, TCP

from pyslirp.stack import tcp
from pyslirp.stack.errors import MalformedFrame

GUEST = bytes([10, 0, 2, 100])
GATEWAY = bytes([10, 0, 2, 2])
ETH_LEN, IP_LEN = 14, 20  # header lengths in these frames

SYN = bytes.fromhex(
    "52550a000202c6a25563cdc108004500003ce2e4400040063f720a0002640a000202943aadabea74d114"
    "00000000a002faf00b640000020405b40402080ad5895649000000000103030a"
)
DATA = bytes.fromhex(
    "52550a000202c6a25563cdc1080045000041e2e6400040063f6b0a0002640a000202943aadabea74d115"
    "56a23dda8018003f5c0f00000101080ad589564a65ebdcfc68656c6c6f207079736c697270"
)
FIN = bytes.fromhex(
    "52550a000202c6a25563cdc1080045000034e2e8400040063f760a0002640a000202943aadabea74d122"
    "56a23dde8011003f5d5b00000101080ad589564b65ebdcfd"
)


def segment_of(frame: bytes) -> memoryview:
    return memoryview(frame)[ETH_LEN + IP_LEN :]


def test_guest_syn_fields():
    seg = tcp.parse(segment_of(SYN), GUEST, GATEWAY)
    assert (seg.src_port, seg.dst_port) == (37946, 44459)
    assert seg.seq == 0xEA74D114
    assert seg.ack == 0
    assert seg.flags == tcp.SYN
    assert seg.window == 64240
    assert seg.mss == 1460
    assert seg.sack_permitted
    assert seg.timestamp == (0xD5895649, 0)
    assert seg.window_scale == 10
    assert bytes(seg.payload) == b""
    assert seg.length == 1


def test_guest_data_fields_common_timestamp_layout():
    seg = tcp.parse(segment_of(DATA), GUEST, GATEWAY)
    assert seg.flags == tcp.ACK | tcp.PSH
    assert (seg.seq, seg.ack) == (0xEA74D115, 0x56A23DDA)
    assert seg.window == 63
    assert seg.timestamp == (0xD589564A, 0x65EBDCFC)
    assert (seg.mss, seg.window_scale, seg.sack_permitted) == (0, -1, False)
    assert bytes(seg.payload) == b"hello pyslirp"
    assert seg.length == 13


def test_guest_fin_fields():
    seg = tcp.parse(segment_of(FIN), GUEST, GATEWAY)
    assert seg.flags == tcp.ACK | tcp.FIN
    assert seg.length == 1
    assert tcp.flags_to_str(seg.flags) == "FA"


@pytest.mark.parametrize("frame", [SYN, DATA, FIN], ids=["syn", "data", "fin"])
def test_emit_gives_the_captured_bytes_back(frame):
    seg = tcp.parse(segment_of(frame), GUEST, GATEWAY)
    options = tcp.build_options(
        mss=seg.mss,
        window_scale=seg.window_scale,
        sack_permitted=seg.sack_permitted,
        timestamp=seg.timestamp,
    )
    out = tcp.emit(
        GUEST,
        GATEWAY,
        seg.src_port,
        seg.dst_port,
        seg.seq,
        seg.ack,
        seg.flags,
        seg.window,
        options,
        bytes(seg.payload),
    )
    assert out == bytes(segment_of(frame))


def test_emit_matches_scapy_for_odd_payload_and_every_option():
    payload = b"odd"
    options = tcp.build_options(mss=1000, window_scale=7, timestamp=(1, 2))
    out = tcp.emit(GATEWAY, GUEST, 80, 40000, 2**32 - 1, 12345, tcp.SYN | tcp.ACK, 500, options)
    ref = TCP(
        sport=80,
        dport=40000,
        seq=2**32 - 1,
        ack=12345,
        flags="SA",
        window=500,
        options=[
            ("MSS", 1000),
            ("NOP", None),
            ("NOP", None),
            ("Timestamp", (1, 2)),
            ("NOP", None),
            ("WScale", 7),
        ],
    )
    assert out == bytes(IP(src="10.0.2.2", dst="10.0.2.100") / ref)[20:]
    out = tcp.emit(GATEWAY, GUEST, 80, 40000, 7, 9, tcp.ACK | tcp.PSH, 5, b"", payload)
    ref = TCP(sport=80, dport=40000, seq=7, ack=9, flags="PA", window=5) / payload
    assert out == bytes(IP(src="10.0.2.2", dst="10.0.2.100") / ref)[20:]


def test_checksum_of_all_ones_sum_is_zero_not_ffff():
    # Stepping the sequence number by one steps the sum by one, so some
    # sequence number below 2**16 gives the checksum 0; it must verify.
    for seq in range(1 << 16):
        out = tcp.emit(GATEWAY, GUEST, 1, 2, seq, 0, tcp.ACK, 0)
        if out[16:18] == b"\0\0":
            tcp.parse(out, GATEWAY, GUEST)
            break
    else:
        raise AssertionError("no segment with checksum 0")


def test_unknown_options_are_skipped_and_end_stops():
    # kind 30 (MPTCP) length 4, then MSS, then END and junk after it
    options = bytes([30, 4, 0, 0, 2, 4, 0x05, 0xDC, 0, 0xAA, 0xBB, 0xCC])
    segment = tcp.emit(GUEST, GATEWAY, 1, 2, 3, 4, tcp.SYN, 5, options)
    seg = tcp.parse(segment, GUEST, GATEWAY)
    assert seg.mss == 1500
    assert seg.timestamp is None


def test_linux_syn_layout_reads_as_the_same_options_in_another_order():
    """Linux's 20-byte SYN layout has a one-unpack path; the same options in
    another order take the general walk and must read the same."""
    rng = random.Random(7)
    for _ in range(200):
        mss, ws = rng.randrange(1 << 16), rng.randrange(16)
        ts = (rng.randrange(1 << 32), rng.randrange(1 << 32))
        linux = tcp.build_options(mss=mss, window_scale=ws, sack_permitted=True, timestamp=ts)
        assert len(linux) == 20
        other = linux[16:] + linux[:16]  # NOP and window scale first
        fast = tcp.parse(tcp.emit(GUEST, GATEWAY, 1, 2, 3, 4, tcp.SYN, 5, linux), GUEST, GATEWAY)
        slow = tcp.parse(tcp.emit(GUEST, GATEWAY, 1, 2, 3, 4, tcp.SYN, 5, other), GUEST, GATEWAY)
        got = (fast.mss, fast.window_scale, fast.sack_permitted, fast.timestamp)
        assert got == (slow.mss, slow.window_scale, slow.sack_permitted, slow.timestamp)
        assert got == (mss, min(ws, 14), True, ts)
    # Twenty bytes in another layout are walked, not misread.
    odd = bytes([2, 4, 5, 0xB4, 1, 1, 4, 2, 8, 10]) + bytes(8) + bytes([1, 0])
    seg = tcp.parse(tcp.emit(GUEST, GATEWAY, 1, 2, 3, 4, tcp.SYN, 5, odd), GUEST, GATEWAY)
    assert (seg.mss, seg.window_scale, seg.sack_permitted, seg.timestamp) == (
        1460,
        -1,
        True,
        (0, 0),
    )


def test_window_scale_above_14_is_used_as_14():
    segment = tcp.emit(GUEST, GATEWAY, 1, 2, 3, 4, tcp.SYN, 5, bytes([1, 3, 3, 20]))
    assert tcp.parse(segment, GUEST, GATEWAY).window_scale == 14


def test_every_truncation_raises_malformed_frame_only():
    for frame in (SYN, DATA, FIN):
        whole = bytes(segment_of(frame))
        header_len = (whole[12] >> 4) * 4
        for cut in range(len(whole)):
            if cut >= header_len:
                # A shorter payload is a different segment: its checksum fails.
                with pytest.raises(MalformedFrame) as info:
                    tcp.parse(whole[:cut], GUEST, GATEWAY)
                assert info.value.reason == "tcp-bad-checksum"
            else:
                with pytest.raises(MalformedFrame):
                    tcp.parse(whole[:cut], GUEST, GATEWAY)


@pytest.mark.parametrize(
    "options, reason",
    [
        (bytes([1, 2, 4, 5]), "tcp-option-bad-length"),  # MSS running past the options
        (bytes([2, 3, 5, 1]), "tcp-option-bad-length"),
        (bytes([3, 2, 1, 1]), "tcp-option-bad-length"),
        (bytes([4, 3, 1, 1]), "tcp-option-bad-length"),
        (bytes([8, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "tcp-option-bad-length"),
        (bytes([1, 1, 1, 30]), "tcp-option-truncated"),
        (bytes([30, 1, 0, 0]), "tcp-option-bad-length"),
        (bytes([30, 8, 0, 0]), "tcp-option-bad-length"),
    ],
)
def test_bad_options(options, reason):
    segment = tcp.emit(GUEST, GATEWAY, 1, 2, 3, 4, tcp.SYN, 5, options)
    with pytest.raises(MalformedFrame) as info:
        tcp.parse(segment, GUEST, GATEWAY)
    assert info.value.reason == reason


def test_bad_header_length_checksum_and_ports():
    good = tcp.emit(GUEST, GATEWAY, 1, 2, 3, 4, tcp.ACK, 5)
    short = bytearray(good)
    short[12] = 4 << 4  # 16-byte header
    with pytest.raises(MalformedFrame, match="tcp-bad-header-length"):
        tcp.parse(bytes(short), GUEST, GATEWAY)
    long = bytearray(good)
    long[12] = 6 << 4  # 24 bytes, more than there is
    with pytest.raises(MalformedFrame, match="tcp-bad-header-length"):
        tcp.parse(bytes(long), GUEST, GATEWAY)
    flipped = bytearray(good)
    flipped[4] ^= 1
    with pytest.raises(MalformedFrame, match="tcp-bad-checksum"):
        tcp.parse(bytes(flipped), GUEST, GATEWAY)
    tcp.parse(bytes(flipped), GUEST, GATEWAY, verify_checksum=False)
    with pytest.raises(MalformedFrame, match="tcp-bad-checksum"):
        tcp.parse(good, GUEST, bytes([10, 0, 2, 3]))  # the pseudo-header counts
    zero = tcp.emit(GUEST, GATEWAY, 0, 2, 3, 4, tcp.ACK, 5)
    with pytest.raises(MalformedFrame, match="tcp-zero-port"):
        tcp.parse(zero, GUEST, GATEWAY)


def test_random_garbage_raises_malformed_frame_only():
    rnd = random.Random(7)
    seen = set()
    for _ in range(3000):
        size = rnd.randrange(0, 80)
        data = bytes(rnd.getrandbits(8) for _ in range(size))
        try:
            tcp.parse(data, GUEST, GATEWAY, verify_checksum=rnd.random() < 0.5)
        except MalformedFrame as exc:
            seen.add(exc.reason)
    assert "tcp-truncated" in seen


def test_mutated_options_raise_malformed_frame_only():
    base = bytearray(segment_of(SYN))
    for i, value in itertools.product(range(20, 40), (0, 1, 2, 3, 4, 8, 10, 40, 255)):
        raw = bytearray(base)
        raw[i] = value
        try:
            tcp.parse(bytes(raw), GUEST, GATEWAY, verify_checksum=False)
        except MalformedFrame:
            pass


def test_flags_round_trip():
    for flags in range(256):
        assert tcp.flags_from_str(tcp.flags_to_str(flags)) == flags


def test_fast_partial_sum_equals_the_plain_definition():
    """checksum.partial_sum reads little-endian and folds (a speed-up for
    64 KiB segments); it must equal the big-endian definition exactly."""
    from pyslirp.stack import checksum

    def plain(data: bytes) -> int:
        value = int.from_bytes(data, "big")
        if len(data) & 1:
            value <<= 8
        return value % 0xFFFF

    rnd = random.Random(3)
    sizes = list(range(0, 64)) + [599, 600, 601, 1460, 65467, 65468, 65535, 65536]
    sizes += [rnd.randrange(0, 70000) for _ in range(40)]
    for size in sizes:
        for data in (rnd.randbytes(size), b"\xff" * size, bytes(size)):
            assert checksum.partial_sum(data) == plain(data), size
            assert checksum.partial_sum(memoryview(data)) == plain(data), size


def test_syn_options_in_one_pack_equal_build_options_and_their_sum():
    """TcpLayer packs its SYN-ACK options (the common case) in one go and
    sums their words from the fields: the same bytes and the same checksum
    contribution as build_options and partial_sum."""
    from pyslirp.stack import checksum, tcp_connection, tcp_layer

    rng = random.Random(3)
    for _ in range(500):
        mss, shift = rng.randrange(536, 65496), rng.randrange(15)
        ts_val, ts_ecr = rng.randrange(1 << 32), rng.randrange(1 << 32)
        conn = type("Conn", (), {"ts_value": tcp_connection.TcpConnection.ts_value})()
        conn.ws_enabled = conn.ts_enabled = True
        conn.rcv_wscale, conn.ts_recent, conn.ts_offset = shift, ts_ecr, ts_val
        conn.mss_limit = mss  # an MTU of mss + 40 (TcpLayer._new_connection)
        layer = tcp_layer.TcpLayer.__new__(tcp_layer.TcpLayer)
        options, words = layer.syn_options(conn, 0.0)
        expected = tcp.build_options(mss=mss, window_scale=shift, timestamp=(ts_val, ts_ecr))
        assert options == expected
        assert words % 0xFFFF == checksum.partial_sum(expected) % 0xFFFF
