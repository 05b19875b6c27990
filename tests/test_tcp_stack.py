"""The stack's TCP, frame by frame, with a plain float clock.

Each test plays the guest: it feeds whole frames to ``receive_frame``, calls
the commands the NAT side would call, and asserts "exactly these frames,
then nothing". Expected frames are built with scapy, independently of the
emitter. Randomness is fixed: our ISS and timestamp offset are ``ISS`` (the
RFC 6528 ISN is replaced by that constant through ``fix_isn``; its own tests
are at the end), IP ids count up from 0x1001. Retransmission is tested by
moving the clock.
"""

import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from pyslirp.stack.config import StackConfig, TcpConfig
from pyslirp.stack.events import (
    TcpConnected,
    TcpConnectionClosed,
    TcpConnectionReset,
    TcpConnectRequested,
    TcpDataReceived,
    TcpSendSpaceOpened,
)
from pyslirp.stack.interface import Stack
from pyslirp.stack.tcp_connection import TcpState
from pyslirp.stack.tcp_layer import TcpLayer

GUEST = "10.0.2.100"
PEER = "198.51.100.7"
GW = "10.0.2.2"
GUEST_MAC = "02:00:00:00:00:64"
GW_MAC = "52:55:0a:00:02:02"
ISS = 0x10000000
GISN = 1000  # the guest's initial sequence number
GPORT, PPORT = 40000, 80
MASK = 0xFFFFFFFF
LINUX_SYN = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (100, 0)), ("NOP", None), ("WScale", 7)]
BIG_WINDOW = 32768  # our 1 MiB buffer with window scale 5
GUEST_WINDOW = 502  # scaled by 7: 64256 bytes


class FixedRandom:
    def __init__(self, value: int) -> None:
        self.value = value

    def getrandbits(self, bits: int) -> int:
        return 0x1000 if bits == 16 else self.value


def fix_isn(layer: TcpLayer, iss: int) -> None:
    """Make every ISN of ``layer`` ``iss``, so that scripts can name our
    sequence numbers in advance (the keyed-hash ISN is tested on its own)."""
    layer.initial_sequence_number = lambda *tuple_and_now: iss


def ip4(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


class Script:
    """One stack with a TCP layer, and helpers to play the guest."""

    def __init__(self, iss: int = ISS, mtu: int = 1500, **tcp_config) -> None:
        config = StackConfig(mtu=mtu, tcp=TcpConfig(**tcp_config))
        self.stack = Stack(config, FixedRandom(iss))
        self.tcp = self.stack.tcp
        fix_isn(self.tcp, iss)
        self.ident = 0x1000
        self.iss = iss
        self.strict = True  # every frame fed must parse

    # -- the guest's side
    def feed(
        self,
        now,
        flags,
        seq,
        ack=0,
        payload=b"",
        window=GUEST_WINDOW,
        ts=None,
        options=None,
        sport=GPORT,
        dport=PPORT,
        dst=PEER,
    ):
        if options is None:
            options = [("NOP", None), ("NOP", None), ("Timestamp", ts)] if ts else []
        pkt = IP(src=GUEST, dst=dst, ttl=64, flags="DF") / TCP(
            sport=sport,
            dport=dport,
            seq=seq & MASK,
            ack=ack & MASK,
            flags=flags,
            window=window,
            options=options,
        )
        if payload:
            pkt = pkt / Raw(payload)
        self.stack.receive_frame(bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / pkt), now)
        if self.strict:
            assert not self.stack.drops, self.stack.drops

    def events(self):
        out = []
        event = self.stack.next_event()
        while event is not None:
            out.append(event)
            event = self.stack.next_event()
        return out

    # -- what the stack should send
    def ts(self, now: float) -> int:
        return (int(now * 1000) + self.iss) & MASK

    def ours(
        self,
        flags,
        seq,
        ack,
        window=BIG_WINDOW,
        payload=b"",
        ts=None,
        options=None,
        sport=PPORT,
        dport=GPORT,
        src=PEER,
        df=True,
    ):
        """A frame we expect, built by scapy (``ts`` is (TSval, TSecr))."""
        self.ident = (self.ident + 1) & 0xFFFF
        if options is None:
            options = [("NOP", None), ("NOP", None), ("Timestamp", ts)] if ts else []
        pkt = IP(src=src, dst=GUEST, id=self.ident, ttl=64, flags="DF" if df else 0) / TCP(
            sport=sport,
            dport=dport,
            seq=seq & MASK,
            ack=ack & MASK,
            flags=flags,
            window=window,
            options=options,
        )
        if payload:
            pkt = pkt / Raw(payload)
        return bytes(Ether(src=GW_MAC, dst=GUEST_MAC) / pkt)

    def expect(self, now, *frames):
        out = self.stack.frames_to_send(now)
        assert [describe(f) for f in out] == [describe(f) for f in frames]
        assert out == list(frames)

    def sent(self, now):
        """Parsed segments the stack sends (for tests about flow, not bytes)."""
        frames = self.stack.frames_to_send(now)
        self.ident = (self.ident + len(frames)) & 0xFFFF
        return [Ether(f)[TCP] for f in frames]

    def tick(self, now):
        deadline = self.stack.get_timer()
        if deadline is not None and deadline <= now:
            self.stack.handle_timer(now)

    # -- common openings
    def handshake(self, now=1.0, options=None, ts=(100, 0), guest_window=GUEST_WINDOW):
        """SYN, accept, SYN-ACK, ACK with Linux's options; returns the connection."""
        options = LINUX_SYN if options is None else options
        self.feed(now, "S", GISN, window=64240, options=options)
        (event,) = self.events()
        assert isinstance(event, TcpConnectRequested)
        conn = event.conn
        self.tcp.accept(conn, now)
        self.stack.frames_to_send(now)  # the SYN-ACK, checked in its own test
        self.ident += 1
        guest_ts = (ts[0] + 1, self.ts(now)) if ts else None
        self.feed(now + 0.01, "A", GISN + 1, self.iss + 1, window=guest_window, ts=guest_ts)
        assert conn.state is TcpState.ESTABLISHED
        assert self.events() == []
        return conn


def describe(frame: bytes) -> str:
    pkt = Ether(frame)
    if TCP in pkt:
        t = pkt[TCP]
        return (
            f"{pkt[IP].src}:{t.sport}>{pkt[IP].dst}:{t.dport} {t.flags} seq={t.seq} ack={t.ack}"
            f" win={t.window} len={len(t.payload)} opts={t.options} id={pkt[IP].id:#x}"
        )
    return pkt.summary()


def ts_opts(value):
    return [("NOP", None), ("NOP", None), ("Timestamp", value)]


# ---------------------------------------------------------------- handshake
@pytest.mark.parametrize(
    "guest_options, ours",
    [
        ([], [("MSS", 1460)]),
        ([("MSS", 536)], [("MSS", 1460)]),
        (
            [("MSS", 1460), ("NOP", None), ("WScale", 7)],
            [("MSS", 1460), ("NOP", None), ("WScale", 5)],
        ),
        (
            [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (100, 0))],
            [("MSS", 1460), ("NOP", None), ("NOP", None), ("Timestamp", ("TS", 100))],
        ),
        (
            LINUX_SYN,
            [
                ("MSS", 1460),
                ("NOP", None),
                ("NOP", None),
                ("Timestamp", ("TS", 100)),
                ("NOP", None),
                ("WScale", 5),
            ],
        ),
        (
            [("WScale", 14), ("Timestamp", (5, 0))],
            [
                ("MSS", 1460),
                ("NOP", None),
                ("NOP", None),
                ("Timestamp", ("TS", 5)),
                ("NOP", None),
                ("WScale", 5),
            ],
        ),
    ],
    ids=["none", "mss", "mss-ws", "mss-sack-ts", "linux", "ws-ts"],
)
def test_syn_ack_answers_each_option_combination(guest_options, ours):
    s = Script()
    s.feed(1.0, "S", GISN, window=64240, options=guest_options)
    (event,) = s.events()
    assert isinstance(event, TcpConnectRequested)
    conn = event.conn
    assert (conn.remote, conn.remote_port, conn.local, conn.local_port) == (
        ip4(GUEST),
        GPORT,
        ip4(PEER),
        PPORT,
    )
    s.expect(1.0)  # nothing before the NAT side answers
    s.tcp.accept(conn, 1.0)
    ours = [(k, (s.ts(1.0), v[1]) if k == "Timestamp" else v) for k, v in ours]
    s.expect(1.0, s.ours("SA", ISS, GISN + 1, window=65535, options=ours))
    assert conn.state is TcpState.SYN_RECEIVED


def test_syn_options_common_case_equals_the_general_builder():
    """syn_options packs timestamps with window scaling in one go: the same
    bytes and sum as tcp.build_options and checksum.partial_sum, for shifts,
    MSS limits (IPv4 and IPv6 MTUs) and timestamps up to 2**32 - 1."""
    from pyslirp.stack import checksum, tcp

    rng = random.Random(7)
    for mtu in (576, 1500, 9000, 65520):
        s = Script(mtu=mtu)
        s.feed(1.0, "S", GISN, window=64240, options=LINUX_SYN)
        (event,) = s.events()
        conn = event.conn
        for _ in range(200):
            conn.rcv_wscale = rng.randrange(15)
            conn.ts_offset = rng.getrandbits(32)
            conn.ts_recent = rng.choice((0, MASK, rng.getrandbits(32)))
            now = rng.uniform(0, 5e6)
            reference = tcp.build_options(
                mss=mtu - 40,  # IPv4 and TCP headers
                window_scale=conn.rcv_wscale,
                timestamp=(conn.ts_value(now), conn.ts_recent),
            )
            assert s.tcp.syn_options(conn, now) == (reference, checksum.partial_sum(reference))


@pytest.mark.parametrize(
    "options, guest_mss, payload_size",
    [
        ([("MSS", 536)], 536, 536),
        ([("MSS", 536), ("Timestamp", (9, 0))], 536, 524),
        ([], 536, 536),  # RFC 9293 3.7.1: 536 when the option is absent
        ([("MSS", 9000)], 9000, 1460),  # never above our MTU
        ([("MSS", 1)], 48, 48),  # a tiny MSS is raised to Linux's floor
    ],
)
def test_segment_size_follows_both_mss_and_timestamps(options, guest_mss, payload_size):
    s = Script()
    ts = (9, 0) if any(k == "Timestamp" for k, _ in options) else None
    conn = s.handshake(options=options, ts=ts, guest_window=60000)
    assert conn.guest_mss == guest_mss
    assert s.tcp.send(conn, bytes(3000), 1.1) == 3000
    sizes = [len(seg.payload) for seg in s.sent(1.1)]
    assert sizes[0] == payload_size
    assert sum(sizes) == min(3000, 10 * payload_size)  # RFC 6928: ten segments at first


def test_window_scaling_applies_both_ways():
    s = Script()
    conn = s.handshake(guest_window=2)  # 2 << 7 = 256 bytes
    assert conn.snd_wnd == 256
    s.tcp.send(conn, bytes(1000), 1.1)
    (seg,) = s.sent(1.1)
    assert len(seg.payload) == 256
    assert seg.window == BIG_WINDOW  # 1 MiB >> 5


def test_without_window_scaling_the_window_stays_under_64k():
    s = Script()
    conn = s.handshake(options=[("MSS", 1460)], ts=None, guest_window=65535)
    s.tcp.send(conn, b"x", 1.1)
    (seg,) = s.sent(1.1)
    assert seg.window == 65535
    assert conn.snd_wnd == 65535


def test_ack_of_syn_ack_establishes_and_wrong_ack_gets_rst():
    s = Script()
    s.feed(1.0, "S", GISN, options=LINUX_SYN)
    (event,) = s.events()
    s.tcp.accept(event.conn, 1.0)
    s.sent(1.0)
    s.feed(1.01, "A", GISN + 1, ISS + 5, ts=(101, s.ts(1.0)))  # acknowledges nothing we sent
    s.expect(1.01, s.ours("R", ISS + 5, 0, window=0, df=False))
    assert event.conn.state is TcpState.SYN_RECEIVED
    s.feed(1.02, "A", GISN + 1, ISS + 1, ts=(101, s.ts(1.0)))
    assert event.conn.state is TcpState.ESTABLISHED


def test_repeated_syn_while_connecting_makes_one_request():
    s = Script()
    for now in (1.0, 2.0, 4.0):
        s.feed(now, "S", GISN, options=LINUX_SYN)
    events = s.events()
    assert len(events) == 1
    assert len(s.tcp.connections) == 1
    assert s.tcp.counters["tcp-syn-repeated"] == 2
    s.expect(4.0)


def test_lost_syn_ack_is_sent_again_on_repeated_syn_and_on_timeout():
    s = Script()
    s.feed(1.0, "S", GISN, options=[("MSS", 1460)])
    (event,) = s.events()
    s.tcp.accept(event.conn, 1.0)
    syn_ack = [("MSS", 1460)]
    s.expect(1.0, s.ours("SA", ISS, GISN + 1, window=65535, options=syn_ack))
    s.feed(1.5, "S", GISN, options=[("MSS", 1460)])
    s.expect(1.5, s.ours("SA", ISS, GISN + 1, window=65535, options=syn_ack))
    s.tick(1.99)
    s.expect(1.99)
    s.tick(2.0)  # initial RTO 1 s (RFC 6298 2.1)
    s.expect(2.0, s.ours("SA", ISS, GISN + 1, window=65535, options=syn_ack))
    s.tick(3.99)
    s.expect(3.99)
    s.tick(4.0)  # backed off to 2 s
    s.expect(4.0, s.ours("SA", ISS, GISN + 1, window=65535, options=syn_ack))


def test_syn_ack_retries_give_up_with_reset():
    s = Script(syn_retries=2)
    s.feed(1.0, "S", GISN, options=[("MSS", 1460)])
    (event,) = s.events()
    s.tcp.accept(event.conn, 1.0)
    now = 1.0
    for _ in range(10):
        now += 10
        s.tick(now)
    frames = s.sent(now)
    assert [str(seg.flags) for seg in frames] == ["SA", "SA", "SA", "RA"]
    (reset,) = s.events()
    assert isinstance(reset, TcpConnectionReset) and reset.reason == "timeout"
    assert s.tcp.connections == {}


def test_refuse_sends_rst_and_icmp_quotes_the_syn():
    s = Script()
    s.feed(1.0, "S", GISN, options=[("MSS", 1460)])
    (event,) = s.events()
    s.tcp.refuse(event.conn, 1.0)
    s.expect(1.0, s.ours("RA", 0, GISN + 1, window=0, df=False))
    assert s.tcp.connections == {}
    s.feed(2.0, "S", GISN, sport=GPORT + 1, options=[("MSS", 1460)])
    (event,) = s.events()
    s.tcp.refuse(event.conn, 2.0, icmp_code=1)
    syn = IP(src=GUEST, dst=PEER, ttl=64, flags="DF") / TCP(
        sport=GPORT + 1, dport=PPORT, seq=GISN, flags="S", window=502, options=[("MSS", 1460)]
    )
    quote = bytes(syn)[:40]
    s.ident += 1
    expected = (
        Ether(src=GW_MAC, dst=GUEST_MAC)
        / IP(src=GW, dst=GUEST, id=s.ident, ttl=64)
        / ICMP(type=3, code=1)
        / Raw(quote)
    )
    assert s.stack.frames_to_send(2.0) == [bytes(expected)]


def test_guest_rst_while_connecting_cancels_the_request():
    s = Script()
    s.feed(1.0, "S", GISN, options=[("MSS", 1460)])
    (event,) = s.events()
    s.feed(1.1, "R", GISN + 1)
    (reset,) = s.events()
    assert isinstance(reset, TcpConnectionReset) and reset.conn is event.conn
    s.tcp.accept(event.conn, 1.2)  # the NAT side answers late: nothing happens
    s.expect(1.2)


# ---------------------------------------------------------------- no connection
def test_segments_for_no_connection():
    s = Script()
    s.feed(1.0, "A", 5000, 7000)
    s.expect(1.0, s.ours("R", 7000, 0, window=0, df=False))
    s.feed(1.0, "R", 5000, 7000)
    s.feed(1.0, "FA", 5000, 7000, payload=b"x")
    s.expect(1.0, s.ours("R", 7000, 0, window=0, df=False))
    s.feed(1.0, "", 5000)  # no flags at all: dropped
    s.feed(1.0, "SF", 5000)  # SYN-FIN: dropped
    s.expect(1.0)
    assert s.events() == []


def test_table_full_refuses_with_rst_and_keeps_the_others():
    s = Script(max_connections=2)
    for port in (1, 2, 3):
        s.feed(1.0, "S", GISN, sport=port, options=[("MSS", 1460)])
    events = s.events()
    assert len(events) == 2
    s.expect(1.0, s.ours("RA", 0, GISN + 1, window=0, df=False, dport=3))
    assert s.tcp.counters["tcp-refused-table-full"] == 1


# ---------------------------------------------------------------- data
def test_data_from_guest_delayed_ack_and_every_second_segment():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "PA", GISN + 1, ISS + 1, payload=b"hello", ts=(102, s.ts(1.0)))
    (event,) = s.events()
    assert isinstance(event, TcpDataReceived) and event.conn is conn
    assert b"".join(bytes(c) for c in conn.rx) == b"hello"
    s.tcp.consume(conn, 5, 1.1)
    s.expect(1.1)  # the ACK waits for an answer to carry it
    s.tick(1.1019)
    s.expect(1.1019)
    s.tick(1.102)  # 2 ms later it goes alone
    s.expect(1.102, s.ours("A", ISS + 1, GISN + 6, ts=(s.ts(1.102), 102)))
    # Two full-sized segments are acknowledged at once (RFC 5681 4.2).
    seq = GISN + 6
    for i in range(2):
        s.feed(1.2, "A", seq, ISS + 1, payload=bytes(1448), ts=(103 + i, s.ts(1.102)))
        seq += 1448
    assert len(s.events()) == 1  # one event until the NAT side has read
    s.tcp.consume(conn, 2896, 1.2)
    s.expect(1.2, s.ours("A", ISS + 1, seq, ts=(s.ts(1.2), 104)))


def test_answer_carries_the_delayed_ack():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "PA", GISN + 1, ISS + 1, payload=b"ping", ts=(102, s.ts(1.0)))
    s.tcp.consume(conn, 4, 1.1)
    s.expect(1.1)
    s.tcp.send(conn, b"pong", 1.1005)
    s.expect(1.1005, s.ours("PA", ISS + 1, GISN + 5, payload=b"pong", ts=(s.ts(1.1005), 102)))
    s.tick(1.2)
    s.expect(1.2)


def test_data_to_guest_segmented_windowed_and_window_update():
    s = Script()
    conn = s.handshake(guest_window=23)  # 23 << 7 = 2944 bytes
    data = bytes(range(256)) * 20  # 5120 bytes
    assert s.tcp.send(conn, data, 1.1) == 5120
    t = s.ts(1.1)
    s.expect(
        1.1,
        s.ours("A", ISS + 1, GISN + 1, payload=data[:1448], ts=(t, 101)),
        s.ours("A", ISS + 1449, GISN + 1, payload=data[1448:2896], ts=(t, 101)),
    )  # the 48 bytes left of the window wait (sender SWS avoidance)
    s.feed(1.2, "A", GISN + 1, ISS + 2897, window=23, ts=(102, t))
    t2 = s.ts(1.2)
    s.expect(
        1.2,
        s.ours("A", ISS + 2897, GISN + 1, payload=data[2896:4344], ts=(t2, 102)),
        s.ours("PA", ISS + 4345, GISN + 1, payload=data[4344:], ts=(t2, 102)),
    )
    s.feed(1.3, "A", GISN + 1, ISS + 5121, window=23, ts=(103, t2))
    s.expect(1.3)
    assert len(conn.snd_buf) == 0
    assert conn.bytes_out == 5120


def test_send_buffer_is_bounded_and_space_event_comes_back():
    s = Script(send_buffer=4000)
    conn = s.handshake()
    assert s.tcp.send(conn, bytes(5000), 1.1) == 4000
    assert s.tcp.send_space(conn) == 0
    frames = s.sent(1.1)
    acked = sum(len(seg.payload) for seg in frames)
    s.feed(1.2, "A", GISN + 1, ISS + 1 + acked, ts=(102, s.ts(1.1)))
    (event,) = s.events()
    assert isinstance(event, TcpSendSpaceOpened)
    assert s.tcp.send_space(conn) == 4000


def test_receive_window_follows_what_the_nat_side_takes():
    s = Script(receive_buffer=4096)  # scale 0: 4096 fits in 16 bits
    conn = s.handshake()
    seq = GISN + 1
    for _ in range(2):
        s.feed(1.1, "A", seq, ISS + 1, payload=bytes(1448), ts=(102, s.ts(1.0)))
        seq += 1448
    s.expect(1.1, s.ours("A", ISS + 1, seq, window=4096 - 2896, ts=(s.ts(1.1), 102)))
    # The host socket is slow: nothing is consumed. More than the window is cut.
    s.feed(1.2, "A", seq, ISS + 1, payload=bytes(1448), ts=(103, s.ts(1.1)))
    assert conn.rx_bytes == 4096  # 1200 of the 1448 bytes fit
    s.expect(1.2, s.ours("A", ISS + 1, seq + 1200, window=0, ts=(s.ts(1.2), 103)))
    # A zero-window probe from the guest is answered with the same state.
    s.feed(1.3, "A", seq + 1200, ISS + 1, payload=b"z", ts=(104, s.ts(1.2)))
    s.expect(1.3, s.ours("A", ISS + 1, seq + 1200, window=0, ts=(s.ts(1.3), 104)))
    assert conn.rx_bytes == 4096
    # The host takes it all: a window update goes out without being asked.
    s.tcp.consume(conn, 4096, 1.4)
    s.expect(1.4, s.ours("A", ISS + 1, seq + 1200, window=4096, ts=(s.ts(1.4), 104)))


def test_zero_window_from_guest_is_probed_until_it_opens():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "A", GISN + 1, ISS + 1, window=0, ts=(102, s.ts(1.0)))
    s.tcp.send(conn, b"abc", 1.1)
    s.expect(1.1)
    rto = conn.rto
    assert rto == pytest.approx(0.2)
    s.tick(1.1 + rto / 2)
    s.expect(1.1 + rto / 2)
    s.tick(1.1 + rto)
    s.expect(1.3, s.ours("A", ISS, GISN + 1, ts=(s.ts(1.3), 102)))  # old sequence number
    s.feed(1.31, "A", GISN + 1, ISS + 1, window=0, ts=(103, s.ts(1.3)))
    s.expect(1.31)
    s.tick(1.69)
    s.expect(1.69)
    s.tick(1.701)  # backed off: 0.4 s
    s.expect(1.701, s.ours("A", ISS, GISN + 1, ts=(s.ts(1.701), 103)))
    s.feed(1.75, "A", GISN + 1, ISS + 1, window=GUEST_WINDOW, ts=(104, s.ts(1.7)))
    s.expect(1.75, s.ours("PA", ISS + 1, GISN + 1, payload=b"abc", ts=(s.ts(1.75), 104)))


def next_sent(s: Script):
    """Move the clock from timer to timer until the stack sends something:
    (the time, the segments), or (None, []) if no timer is left."""
    for _ in range(20):
        now = s.stack.get_timer()
        if now is None:
            return None, []
        s.tick(now)
        segs = s.sent(now)
        if segs:
            return now, segs
    raise AssertionError("timers without frames")


@pytest.mark.parametrize("predict", [True, False], ids=["predicted", "full-path"])
def test_zero_window_answered_for_hours_keeps_the_connection(predict):
    # RFC 1122 4.2.2.17: a receiver that keeps answering the probes is kept
    # indefinitely (here 3 simulated hours, far past 12 retransmissions).
    s = Script()
    s.tcp.predict = predict
    conn = s.handshake()
    tsval = 102
    s.feed(1.1, "A", GISN + 1, ISS + 1, window=0, ts=(tsval, s.ts(1.0)))
    data = bytes(range(256)) * 40  # 10240 bytes
    assert s.tcp.send(conn, data, 1.1) == len(data)
    assert s.sent(1.1) == []
    now, probes = 1.1, 0
    for _ in range(1000):  # about 190 probes at the 60 s ceiling
        now, (probe,) = next_sent(s)
        assert (probe.flags, probe.seq, len(probe.payload)) == ("A", ISS, 0)
        probes += 1
        tsval += 1
        s.feed(now + 0.001, "A", GISN + 1, ISS + 1, window=0, ts=(tsval, s.ts(now)))
        assert s.sent(now + 0.001) == []
        if now > 3 * 3600:
            break
    assert probes > 12 and conn.state is TcpState.ESTABLISHED
    assert s.events() == [] and s.tcp.counters["tcp-window-probes"] == probes
    # The window opens: every byte arrives, in order.
    now += 1.0
    tsval += 1
    got = b""
    for _ in range(100):
        s.feed(now, "A", GISN + 1, ISS + 1 + len(got), window=GUEST_WINDOW, ts=(tsval, s.ts(now)))
        for seg in s.sent(now):
            assert seg.seq == (ISS + 1 + len(got)) & MASK
            got += bytes(seg.payload)
        if len(got) == len(data):
            break
        now += 0.01
        tsval += 1
    assert got == data
    assert conn.state is TcpState.ESTABLISHED


def test_zero_window_probes_unanswered_reset_after_the_limit():
    s = Script(max_retransmits=12, max_rto=60.0)
    conn = s.handshake()
    s.feed(1.1, "A", GISN + 1, ISS + 1, window=0, ts=(102, s.ts(1.0)))
    s.tcp.send(conn, b"abc", 1.1)
    # Two probes answered, then silence.
    for tsval in (103, 104):
        now, segs = next_sent(s)
        assert [seg.flags for seg in segs] == ["A"]
        s.feed(now + 0.001, "A", GISN + 1, ISS + 1, window=0, ts=(tsval, s.ts(now)))
    started = now
    frames = []
    for _ in range(100):
        at, segs = next_sent(s)
        if at is None:
            break
        now = at
        frames += [(str(seg.flags), seg.seq) for seg in segs]
    assert frames == [("A", ISS)] * 12 + [("RA", ISS + 1)]
    (event,) = s.events()
    assert isinstance(event, TcpConnectionReset) and event.reason == "timeout"
    assert conn.state is TcpState.CLOSED
    assert now - started < 13 * 60  # each unanswered probe at most max_rto apart


def test_retransmission_by_moving_the_clock():
    s = Script()
    conn = s.handshake()
    s.tcp.send(conn, b"data", 1.1)
    s.expect(1.1, s.ours("PA", ISS + 1, GISN + 1, payload=b"data", ts=(s.ts(1.1), 101)))
    rto = conn.rto
    s.tick(1.1 + rto - 0.001)
    s.expect(1.1 + rto - 0.001)
    s.tick(1.1 + rto)
    s.expect(1.3, s.ours("PA", ISS + 1, GISN + 1, payload=b"data", ts=(s.ts(1.3), 101)))
    s.tick(1.3 + 2 * rto)
    s.expect(1.7, s.ours("PA", ISS + 1, GISN + 1, payload=b"data", ts=(s.ts(1.7), 101)))
    assert conn.retransmits == 2
    s.feed(1.8, "A", GISN + 1, ISS + 5, ts=(102, s.ts(1.7)))
    assert conn.rtx_at is None
    s.tick(10.0)
    s.expect(10.0)


def test_retransmission_gives_up_with_reset_and_event():
    s = Script(max_retransmits=3)
    conn = s.handshake()
    s.tcp.send(conn, b"data", 1.1)
    now = 1.1
    segs = s.sent(now)
    for _ in range(8):
        now += 30
        s.tick(now)
        segs += s.sent(now)
    assert [str(seg.flags) for seg in segs] == ["PA"] * 4 + ["RA"]
    (event,) = s.events()
    assert isinstance(event, TcpConnectionReset) and event.reason == "timeout"
    assert conn.state is TcpState.CLOSED


def test_fast_retransmit_on_three_duplicate_acks():
    s = Script()
    conn = s.handshake()
    s.tcp.send(conn, bytes(1448 * 5), 1.1)
    assert len(s.sent(1.1)) == 5
    # The first segment arrives, the second is lost: each later one makes a
    # duplicate ACK; the third duplicate starts fast retransmit.
    s.feed(1.11, "A", GISN + 1, ISS + 1449, ts=(102, s.ts(1.1)))
    for i in range(2):
        s.feed(1.111 + i / 1000, "A", GISN + 1, ISS + 1449, ts=(103 + i, s.ts(1.1)))
    assert not conn.in_recovery
    s.expect(1.113)
    s.feed(1.113, "A", GISN + 1, ISS + 1449, ts=(105, s.ts(1.1)))
    assert conn.in_recovery
    # One resend of the first missing segment (RFC 5681 3.2), nothing more.
    (seg,) = s.sent(1.114)
    assert seg.seq == ISS + 1449 and len(seg.payload) == 1448
    s.feed(1.115, "A", GISN + 1, ISS + 1449, ts=(105, s.ts(1.1)))  # a fourth: no resend
    assert s.sent(1.115) == []
    # A partial ACK resends the next hole (RFC 6582); the full one ends recovery.
    s.feed(1.12, "A", GISN + 1, ISS + 1 + 1448 * 3, ts=(106, s.ts(1.114)))
    (seg,) = s.sent(1.12)
    assert seg.seq == ISS + 1 + 1448 * 3
    s.feed(1.13, "A", GISN + 1, ISS + 1 + 1448 * 5, ts=(107, s.ts(1.12)))
    assert not conn.in_recovery
    assert s.tcp.counters["tcp-fast-retransmits"] == 1


def test_out_of_order_and_duplicate_segments_from_guest():
    s = Script()
    conn = s.handshake()
    a, b, c = b"A" * 100, b"B" * 100, b"C" * 100
    s.feed(1.1, "A", GISN + 101, ISS + 1, payload=b, ts=(102, s.ts(1.0)))
    assert s.events() == []  # nothing in order yet
    # Out of order data is acknowledged at once with the hole's start.
    s.expect(1.1, s.ours("A", ISS + 1, GISN + 1, ts=(s.ts(1.1), 101)))
    s.feed(1.1, "A", GISN + 201, ISS + 1, payload=c, ts=(103, s.ts(1.0)))
    s.feed(1.1, "A", GISN + 101, ISS + 1, payload=b, ts=(103, s.ts(1.0)))  # a duplicate
    # One duplicate ACK for each segment out of order (RFC 5681 4.2), also
    # when both came in before the stack's next flush.
    dupack = ("A", ISS + 1, GISN + 1)
    s.expect(1.1, s.ours(*dupack, ts=(s.ts(1.1), 101)), s.ours(*dupack, ts=(s.ts(1.1), 101)))
    s.feed(1.2, "A", GISN + 1, ISS + 1, payload=a, ts=(104, s.ts(1.1)))
    (event,) = s.events()
    assert b"".join(bytes(x) for x in conn.rx) == a + b + c
    s.tcp.consume(conn, 300, 1.2)
    # 300 bytes less than 1 MiB, rounded up to the scale: the right edge
    # does not move for so little (RFC 9293 3.8.6.2.2).
    window = (2**20 - 300 + 31) >> 5
    s.expect(1.2, s.ours("A", ISS + 1, GISN + 301, window=window, ts=(s.ts(1.2), 104)))
    # An old duplicate of data already taken gets a duplicate ACK.
    s.feed(1.3, "A", GISN + 1, ISS + 1, payload=a, ts=(105, s.ts(1.2)))
    # (RFC 7323 4.3: an unacceptable segment does not update TS.Recent.)
    s.expect(1.3, s.ours("A", ISS + 1, GISN + 301, window=window, ts=(s.ts(1.3), 104)))
    # Overlapping the edge: only the new part is delivered.
    s.feed(1.4, "A", GISN + 251, ISS + 1, payload=b"x" * 100, ts=(106, s.ts(1.3)))
    assert b"".join(bytes(x) for x in conn.rx) == b"x" * 50


def test_out_of_order_queue_is_bounded():
    s = Script(max_out_of_order=3)
    conn = s.handshake()
    for i in range(10):
        s.feed(1.1, "A", GISN + 1 + 10 * (i + 1), ISS + 1, payload=b"y", ts=(102, s.ts(1.0)))
    assert len(conn.ooo) == 3
    assert s.tcp.counters["tcp-ooo-dropped"] == 7


def test_paws_drops_old_timestamps():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "PA", GISN + 1, ISS + 1, payload=b"old", ts=(50, s.ts(1.0)))
    assert conn.rx_bytes == 0
    s.expect(1.1, s.ours("A", ISS + 1, GISN + 1, ts=(s.ts(1.1), 101)))


# ---------------------------------------------------------------- wrapping
@pytest.mark.parametrize("iss, gisn", [(2**32 - 700, 2**32 - 900), (2**31 - 500, 2**31 - 300)])
def test_sequence_numbers_wrap_both_ways(iss, gisn):
    global GISN
    saved = GISN
    GISN = gisn
    try:
        s = Script(iss=iss)
        conn = s.handshake()
        data = bytes(range(256)) * 12  # 3072 bytes: crosses 2**32 (or 2**31)
        assert s.tcp.send(conn, data, 1.1) == len(data)
        got = b"".join(bytes(seg.payload) for seg in s.sent(1.1))
        assert got == data
        s.feed(1.2, "A", gisn + 1, iss + 1 + len(data), ts=(102, s.ts(1.1)))
        assert conn.snd_una == (iss + 1 + len(data)) & MASK
        assert len(conn.snd_buf) == 0
        seq = gisn + 1
        for i in range(0, len(data), 1000):
            s.feed(
                1.3,
                "A",
                seq + i,
                iss + 1 + len(data),
                payload=data[i : i + 1000],
                ts=(103, s.ts(1.1)),
            )
        assert b"".join(bytes(x) for x in conn.rx) == data
        assert conn.rcv_nxt == (gisn + 1 + len(data)) & MASK
    finally:
        GISN = saved


# ---------------------------------------------------------------- RFC 5961
def test_rst_validation_challenge_ack():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "R", GISN + 1 + 1000)  # in the window, not exact: challenge ACK
    s.expect(1.1, s.ours("A", ISS + 1, GISN + 1, ts=(s.ts(1.1), 101)))
    assert conn.state is TcpState.ESTABLISHED
    s.feed(1.1, "R", GISN + 1 + 10**8)  # outside the window: silently dropped
    s.expect(1.1)
    assert s.tcp.counters["tcp-challenge-acks"] == 1
    s.feed(1.2, "R", GISN + 1)  # exact: reset
    (event,) = s.events()
    assert isinstance(event, TcpConnectionReset) and event.reason == "reset by guest"
    assert conn.state is TcpState.CLOSED and s.tcp.connections == {}
    s.expect(1.2)


def test_syn_on_established_gets_challenge_ack():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "S", GISN + 5000, options=[("MSS", 1460)])
    s.expect(1.1, s.ours("A", ISS + 1, GISN + 1, ts=(s.ts(1.1), 101)))
    assert conn.state is TcpState.ESTABLISHED
    assert s.events() == []


def test_ack_outside_what_was_sent_is_answered_and_ignored():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "PA", GISN + 1, ISS + 500, payload=b"bad", ts=(102, s.ts(1.0)))
    s.expect(1.1, s.ours("A", ISS + 1, GISN + 1, ts=(s.ts(1.1), 101)))
    assert conn.rx_bytes == 0


def test_challenge_acks_are_rate_limited():
    s = Script(challenge_ack_limit=5)
    s.handshake()
    for i in range(20):
        s.feed(1.1, "R", GISN + 10 + i)
    assert len(s.sent(1.1)) == 1  # all of them were folded into one ACK at flush
    assert s.tcp.counters["tcp-challenge-acks"] == 5
    assert s.tcp.counters["tcp-challenge-ack-limited"] == 15


# ---------------------------------------------------------------- closing
def test_guest_closes_first_then_host():
    s = Script()
    conn = s.handshake()
    s.feed(1.1, "FA", GISN + 1, ISS + 1, ts=(102, s.ts(1.0)))
    (event,) = s.events()
    assert isinstance(event, TcpDataReceived) and conn.guest_fin and not conn.rx
    assert conn.state is TcpState.CLOSE_WAIT
    s.expect(1.1, s.ours("A", ISS + 1, GISN + 2, ts=(s.ts(1.1), 102)))
    # Half-closed: we may still send (the guest did shutdown(SHUT_WR)).
    s.tcp.send(conn, b"reply", 1.2)
    s.tcp.close(conn, 1.2)
    s.expect(1.2, s.ours("FPA", ISS + 1, GISN + 2, payload=b"reply", ts=(s.ts(1.2), 102)))
    assert conn.state is TcpState.LAST_ACK
    s.feed(1.3, "A", GISN + 2, ISS + 7, ts=(103, s.ts(1.2)))
    (event,) = s.events()
    assert isinstance(event, TcpConnectionClosed)
    assert conn.state is TcpState.CLOSED and s.tcp.connections == {}
    s.tick(100.0)
    s.expect(100.0)


def test_host_closes_first_time_wait_then_gone():
    s = Script()
    conn = s.handshake()
    s.tcp.close(conn, 1.1)
    s.expect(1.1, s.ours("FA", ISS + 1, GISN + 1, ts=(s.ts(1.1), 101)))
    assert conn.state is TcpState.FIN_WAIT_1
    s.feed(1.2, "A", GISN + 1, ISS + 2, ts=(102, s.ts(1.1)))
    assert conn.state is TcpState.FIN_WAIT_2
    # Half-closed the other way: the guest still sends, we still deliver.
    s.feed(1.3, "PA", GISN + 1, ISS + 2, payload=b"more", ts=(103, s.ts(1.1)))
    assert b"".join(bytes(x) for x in conn.rx) == b"more"
    s.tcp.consume(conn, 4, 1.3)
    s.feed(1.4, "FA", GISN + 5, ISS + 2, ts=(104, s.ts(1.1)))
    assert conn.state is TcpState.TIME_WAIT
    assert [type(e) for e in s.events()] == [TcpDataReceived, TcpDataReceived, TcpConnectionClosed]
    s.expect(1.4, s.ours("A", ISS + 2, GISN + 6, ts=(s.ts(1.4), 104)))
    # A retransmitted FIN in TIME-WAIT is acknowledged again.
    s.feed(2.0, "FA", GISN + 5, ISS + 2, ts=(105, s.ts(1.1)))
    s.expect(2.0, s.ours("A", ISS + 2, GISN + 6, ts=(s.ts(2.0), 104)))
    s.tick(61.9)
    assert conn.state is TcpState.TIME_WAIT
    s.tick(62.0)  # 60 s after the last FIN
    assert conn.state is TcpState.CLOSED and s.tcp.connections == {}
    s.expect(62.0)


def test_simultaneous_close():
    s = Script()
    conn = s.handshake()
    s.tcp.close(conn, 1.1)
    s.expect(1.1, s.ours("FA", ISS + 1, GISN + 1, ts=(s.ts(1.1), 101)))
    # The guest's FIN crosses ours: it does not acknowledge our FIN yet.
    s.feed(1.1, "FA", GISN + 1, ISS + 1, ts=(102, s.ts(1.0)))
    assert conn.state is TcpState.CLOSING
    s.expect(1.1, s.ours("A", ISS + 2, GISN + 2, ts=(s.ts(1.1), 102)))
    s.feed(1.2, "A", GISN + 2, ISS + 2, ts=(103, s.ts(1.1)))
    assert conn.state is TcpState.TIME_WAIT
    s.tick(70.0)
    assert s.tcp.connections == {}


def test_fin_is_retransmitted_and_fin_wait_1_with_lost_fin():
    s = Script()
    conn = s.handshake()
    s.tcp.send(conn, b"tail", 1.1)
    s.tcp.close(conn, 1.1)
    s.expect(1.1, s.ours("FPA", ISS + 1, GISN + 1, payload=b"tail", ts=(s.ts(1.1), 101)))
    s.feed(1.15, "A", GISN + 1, ISS + 5, ts=(102, s.ts(1.1)))  # data acked, FIN lost
    assert conn.state is TcpState.FIN_WAIT_1
    s.tick(1.15 + conn.rto)
    (seg,) = s.sent(1.4)
    assert str(seg.flags) == "FA" and seg.seq == ISS + 5
    s.feed(1.5, "A", GISN + 1, ISS + 6, ts=(103, s.ts(1.4)))
    assert conn.state is TcpState.FIN_WAIT_2


def test_abort_sends_rst_and_no_event():
    s = Script()
    conn = s.handshake()
    s.tcp.send(conn, b"x", 1.1)
    s.sent(1.1)
    s.tcp.abort(conn, 1.2)
    s.expect(1.2, s.ours("RA", ISS + 2, GISN + 1, ts=(s.ts(1.2), 101)))
    assert s.events() == [] and s.tcp.connections == {}


def test_time_wait_is_reused_by_a_new_syn():
    s = Script()
    conn = s.handshake()
    s.tcp.close(conn, 1.1)
    s.sent(1.1)
    s.feed(1.2, "FA", GISN + 1, ISS + 2, ts=(102, s.ts(1.1)))
    assert conn.state is TcpState.TIME_WAIT
    s.events()
    s.sent(1.2)
    s.feed(2.0, "S", GISN + 100000, options=[("MSS", 1460), ("Timestamp", (200, 0))])
    (event,) = s.events()
    assert isinstance(event, TcpConnectRequested) and event.conn is not conn
    assert s.tcp.counters["tcp-time-wait-reused"] == 1


def test_keepalive_probes_a_silent_guest_then_resets():
    s = Script(keepalive_idle=100.0, keepalive_interval=10.0, keepalive_probes=2)
    conn = s.handshake()
    s.tick(50.0)
    s.expect(50.0)
    s.tick(101.01)
    s.expect(101.01, s.ours("A", ISS, GISN + 1, ts=(s.ts(101.01), 101)))
    s.feed(101.02, "A", GISN + 1, ISS + 1, ts=(102, s.ts(101.01)))  # the guest is alive
    s.tick(111.02)
    s.expect(111.02)
    s.tick(201.02)
    s.expect(201.02, s.ours("A", ISS, GISN + 1, ts=(s.ts(201.02), 102)))
    s.tick(211.02)
    s.expect(211.02, s.ours("A", ISS, GISN + 1, ts=(s.ts(211.02), 102)))
    s.tick(221.02)
    s.expect(221.02, s.ours("RA", ISS + 1, GISN + 1, ts=(s.ts(221.02), 102)))
    (event,) = s.events()
    assert isinstance(event, TcpConnectionReset) and event.reason == "keep-alive timeout"
    assert conn.state is TcpState.CLOSED


# ---------------------------------------------------------------- active open
def test_connect_toward_the_guest():
    s = Script()
    s.stack.learn_neighbor(ip4(GUEST), bytes.fromhex("020000000064"))
    conn = s.tcp.connect(ip4(GW), 5555, ip4(GUEST), 8080, 1.0)
    opts = [
        ("MSS", 1460),
        ("NOP", None),
        ("NOP", None),
        ("Timestamp", (s.ts(1.0), 0)),
        ("NOP", None),
        ("WScale", 5),
    ]
    s.expect(1.0, s.ours("S", ISS, 0, window=65535, options=opts, src=GW, sport=5555, dport=8080))
    s.feed(
        1.01,
        "SA",
        GISN,
        ISS + 1,
        window=65535,
        sport=8080,
        dport=5555,
        dst=GW,
        options=[("MSS", 1460), ("Timestamp", (7, s.ts(1.0))), ("NOP", None), ("WScale", 7)],
    )
    (event,) = s.events()
    assert isinstance(event, TcpConnected) and event.conn is conn
    assert conn.state is TcpState.ESTABLISHED and conn.snd_wnd == 65535
    s.expect(
        1.01, s.ours("A", ISS + 1, GISN + 1, ts=(s.ts(1.01), 7), src=GW, sport=5555, dport=8080)
    )


def test_connect_refused_by_the_guest():
    s = Script()
    s.stack.learn_neighbor(ip4(GUEST), bytes.fromhex("020000000064"))
    conn = s.tcp.connect(ip4(GW), 5555, ip4(GUEST), 8080, 1.0)
    s.sent(1.0)
    s.feed(1.01, "RA", 0, ISS + 1, window=0, sport=8080, dport=5555, dst=GW)
    (event,) = s.events()
    assert isinstance(event, TcpConnectionReset) and event.reason == "refused by guest"
    assert conn.state is TcpState.CLOSED


# ---------------------------------------------------------------- a lossy link
class LossyLink:
    """Frames between two stacks with loss, duplication and reordering."""

    def __init__(self, rnd, loss, duplicate, reorder) -> None:
        self.rnd = rnd
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self.queue = []  # (deliver_at, serial, frame, destination)
        self.serial = 0

    def carry(self, frames, destination, now) -> None:
        for frame in frames:
            if self.rnd.random() < self.loss:
                continue
            copies = 2 if self.rnd.random() < self.duplicate else 1
            for _ in range(copies):
                delay = 0.0005 + (
                    self.rnd.random() * 0.003 if self.rnd.random() < self.reorder else 0
                )
                self.serial += 1
                self.queue.append((now + delay, self.serial, frame, destination))
        self.queue.sort()

    def due(self, now):
        out = [item for item in self.queue if item[0] <= now]
        self.queue = [item for item in self.queue if item[0] > now]
        return out

    def next_at(self):
        return self.queue[0][0] if self.queue else None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lossy_link_between_two_stacks_keeps_data_intact(seed):
    rnd = random.Random(seed)
    host_config = StackConfig(tcp=TcpConfig(receive_buffer=64 * 1024, send_buffer=64 * 1024))
    host = Stack(host_config, random.Random(seed + 100))
    host_tcp = host.tcp
    # The "guest" is a second stack that owns 10.0.2.100 and opens toward PEER.
    guest = Stack(
        StackConfig(
            gateway=ip4(GUEST),
            gateway_mac=bytes.fromhex("020000000064"),
            dns=ip4("10.0.2.99"),
            tcp=TcpConfig(receive_buffer=48 * 1024, send_buffer=48 * 1024),
        ),
        random.Random(seed + 200),
    )
    guest_tcp = guest.tcp
    guest.learn_neighbor(ip4(PEER), bytes.fromhex("52550a000202"))
    link = LossyLink(rnd, loss=0.05, duplicate=0.03, reorder=0.1)
    up = bytes(rnd.getrandbits(8) for _ in range(200_000))
    down = bytes(rnd.getrandbits(8) for _ in range(300_000))
    got_up, got_down = bytearray(), bytearray()
    sent = {"up": 0, "down": 0}
    now = 1.0
    g_conn = guest_tcp.connect(ip4(GUEST), GPORT, ip4(PEER), PPORT, now)
    h_conn = None
    closed = set()
    for _ in range(200_000):
        # the NAT side of the host stack, and the application in the guest
        for stack, tcp_layer, name in ((host, host_tcp, "host"), (guest, guest_tcp, "guest")):
            event = stack.next_event()
            while event is not None:
                if isinstance(event, TcpConnectRequested):
                    h_conn = event.conn
                    tcp_layer.accept(h_conn, now)
                elif isinstance(event, (TcpConnectionClosed, TcpConnectionReset)):
                    closed.add((name, type(event).__name__))
                event = stack.next_event()
        for conn, tcp_layer, sink in ((h_conn, host_tcp, got_up), (g_conn, guest_tcp, got_down)):
            if conn is not None and conn.rx_bytes:
                sink += b"".join(bytes(c) for c in conn.rx)
                tcp_layer.consume(conn, conn.rx_bytes, now)
        if h_conn is not None and h_conn.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            if sent["down"] < len(down):
                sent["down"] += host_tcp.send(
                    h_conn, down[sent["down"] : sent["down"] + 20000], now
                )
            elif not h_conn.close_requested:
                host_tcp.close(h_conn, now)
        if g_conn.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            if sent["up"] < len(up):
                sent["up"] += guest_tcp.send(g_conn, up[sent["up"] : sent["up"] + 20000], now)
            elif not g_conn.close_requested:
                guest_tcp.close(g_conn, now)
        link.carry(host.frames_to_send(now), guest, now)
        link.carry(guest.frames_to_send(now), host, now)
        if (
            h_conn is not None
            and h_conn.state in (TcpState.TIME_WAIT, TcpState.CLOSED)
            and (g_conn.state in (TcpState.TIME_WAIT, TcpState.CLOSED))
        ):
            break
        # advance to the next thing that happens
        candidates = [x for x in (link.next_at(), host.get_timer(), guest.get_timer()) if x]
        now = max(now, min(candidates)) if candidates else now + 0.01
        for _at, _serial, frame, destination in link.due(now):
            destination.receive_frame(frame, now)
        for stack in (host, guest):
            deadline = stack.get_timer()
            if deadline is not None and deadline <= now:
                stack.handle_timer(now)
    assert bytes(got_up) == up
    assert bytes(got_down) == down
    assert not host.drops and not guest.drops
    assert h_conn.retransmits + g_conn.retransmits > 0  # the link did lose frames
    assert ("host", "TcpConnectionClosed") in closed and ("guest", "TcpConnectionClosed") in closed
    assert len(h_conn.snd_buf) == 0 and h_conn.rx_bytes == 0 and not h_conn.ooo


# ---------------------------------------------------------------- fuzz
def test_fuzzed_segments_never_escape_and_the_table_stays_bounded():
    rnd = random.Random(1234)
    s = Script(max_connections=50)
    conns = [s.handshake()]
    s.strict = False
    flag_choices = ["S", "A", "PA", "FA", "R", "RA", "SA", "", "FPAU", "SF", "U", "EC"]
    for i in range(3000):
        now = 1.0 + i * 0.01
        flags = rnd.choice(flag_choices)
        seq = rnd.choice([GISN + 1 + rnd.randrange(-3000, 3000), rnd.getrandbits(32)])
        ack = rnd.choice([ISS + 1 + rnd.randrange(-3000, 3000), rnd.getrandbits(32), 0])
        options = rnd.choice(
            [
                None,
                LINUX_SYN,
                [("MSS", rnd.randrange(0, 65536))],
                [("WScale", rnd.randrange(0, 256))],
                [("Timestamp", (rnd.getrandbits(32), rnd.getrandbits(32)))],
                [("SAck", (1, 2))],
            ]
        )
        sport = rnd.choice([GPORT, GPORT, rnd.randrange(1, 65536)])
        payload = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([0, 0, 1, 100, 1448])))
        s.feed(
            now,
            flags,
            seq,
            ack,
            payload=payload,
            window=rnd.randrange(0, 65536),
            options=options or [],
            sport=sport,
        )
        for event in s.events():
            conn = event.conn
            if isinstance(event, TcpConnectRequested):
                action = rnd.random()
                if action < 0.6:
                    s.tcp.accept(conn, now)
                    conns.append(conn)
                elif action < 0.8:
                    s.tcp.refuse(conn, now, icmp_code=rnd.choice([None, 0, 1, 13]))
            elif isinstance(event, TcpDataReceived):
                s.tcp.consume(conn, conn.rx_bytes, now)
        for conn in rnd.sample(conns, min(3, len(conns))):
            action = rnd.random()
            if action < 0.3:
                s.tcp.send(conn, bytes(rnd.randrange(0, 5000)), now)
            elif action < 0.35:
                s.tcp.close(conn, now)
            elif action < 0.37:
                s.tcp.abort(conn, now)
        if rnd.random() < 0.2:
            s.tick(now + rnd.random() * 5)
        s.stack.frames_to_send(now)
        assert len(s.tcp.connections) <= 50
    assert s.stack.drops["internal-error"] == 0, s.stack.last_internal_error
    for conn in s.tcp.connections.values():
        assert conn.rx_bytes <= conn.rcv_limit
        assert len(conn.snd_buf) <= conn.snd_limit
        assert len(conn.ooo) <= s.tcp.config.max_out_of_order
        assert conn.ooo_bytes <= conn.rcv_limit
        assert conn.ooo_bytes == sum(len(data) for _, data in conn.ooo)


def test_send_buffer_views_drops_and_merges():
    from pyslirp.stack.tcp_connection import SendBuffer

    rnd = random.Random(5)
    buf = SendBuffer()
    model = bytearray()
    for _ in range(2000):
        action = rnd.random()
        if action < 0.5:
            data = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([1, 10, 3000, 9000])))
            buf.append(memoryview(data) if rnd.random() < 0.5 else data)
            model += data
        elif action < 0.7 and model:
            count = rnd.randrange(0, len(model) + 1)
            buf.drop(count)
            del model[:count]
        elif model:
            start = rnd.randrange(0, len(model))
            end = rnd.randrange(start, len(model) + 1)
            assert bytes(buf.view(start, end)) == bytes(model[start:end])
        assert len(buf) == len(model)
    assert all(len(c) for c in buf.chunks)


def test_connect_toward_a_guest_whose_mac_is_unknown_asks_arp_first():
    from scapy.layers.l2 import ARP

    s = Script()
    conn = s.tcp.connect(ip4(GW), 5555, ip4(GUEST), 8080, 1.0)
    (request,) = [Ether(f) for f in s.stack.frames_to_send(1.0)]
    assert ARP in request and request[ARP].pdst == GUEST and request[ARP].op == 1
    reply = Ether(src=GUEST_MAC, dst=GW_MAC) / ARP(
        op=2, hwsrc=GUEST_MAC, psrc=GUEST, hwdst=GW_MAC, pdst=GW
    )
    s.stack.receive_frame(bytes(reply), 1.01)
    (syn,) = [Ether(f) for f in s.stack.frames_to_send(1.01)]
    assert syn[Ether].dst == GUEST_MAC and str(syn[TCP].flags) == "S"
    assert syn[TCP].seq == ISS and conn.state is TcpState.SYN_SENT
    # Later segments use the learned address directly.
    s.tick(2.5)
    (again,) = [Ether(f) for f in s.stack.frames_to_send(2.5)]
    assert again[Ether].dst == GUEST_MAC and str(again[TCP].flags) == "S"


def test_tiny_segments_are_merged_and_out_of_order_bytes_are_bounded():
    """Memory stays near the window: 1-byte segments do not each keep their
    frame alive, and overlapping early segments cannot exceed the buffer."""
    s = Script(receive_buffer=8192)
    conn = s.handshake()
    for i in range(600):
        s.feed(1.1, "PA", GISN + 1 + i, ISS + 1, payload=b"%c" % (65 + i % 26), ts=(102, s.ts(1.0)))
    assert conn.rx_bytes == 600
    assert len(conn.rx) == 1 and type(conn.rx[0]) is bytearray
    s.tcp.consume(conn, 600, 1.2)
    s.stack.frames_to_send(1.2)
    # Early segments, overlapping each other: at most the buffer's worth.
    start = GISN + 1 + 600 + 100
    for k in range(20):
        s.feed(1.3, "A", start + k, ISS + 1, payload=bytes(1400), ts=(103, s.ts(1.0)))
    assert conn.ooo_bytes <= 8192
    assert s.tcp.counters["tcp-ooo-dropped"] > 0


def test_closed_connections_leave_no_timer_entries_behind():
    """Connection churn keeps the timer heap and the TIME-WAIT queue about
    as long as the table: a closed connection's deadline may be hours away
    (keep-alive), and its entry must not keep it alive that long."""
    s = Script()
    keeper = s.tcp.connect(ip4(GW), 5555, ip4(GUEST), 8080, 1.0)  # the earliest deadline
    for i in range(3000):
        conn = s.tcp.connect(ip4(GW), 5556, ip4(GUEST), 10000 + i, 1.0)
        conn.wait_at = 7200.0  # as a keep-alive deadline would be
        s.tcp.arm(conn)
        if i % 2:
            s.tcp.abort(conn, 1.0)
        else:  # through TIME-WAIT, which then expires
            conn.enter_time_wait(1.0)
            s.tcp.connection_closed(conn, 1.0)
        assert s.stack.get_timer() == keeper.rtx_at
    s.stack.frames_to_send(1.0)
    assert len(s.tcp.connections) == 1
    queues = s.tcp.queue_lengths()
    assert queues["timers"] <= 2 * len(s.tcp.connections) + 65
    assert queues["time-wait"] <= 2


# ------------------------------------------------------ RFC 6528 ISNs
def rfc6528_isn(key: bytes, local: str, lport: int, remote: str, rport: int, now: float) -> int:
    """ISN = M + F(localip, localport, remoteip, remoteport, secretkey): M
    counts 4-microsecond ticks, F is BLAKE2b keyed with the secret."""
    import hashlib
    import struct

    data = ip4(local) + struct.pack("!H", lport) + ip4(remote) + struct.pack("!H", rport)
    f = int.from_bytes(hashlib.blake2b(data, digest_size=4, key=key).digest(), "big")
    return (int(now * 250_000) + f) & MASK


def syn_ack_seq(key: bytes, now: float, sport: int = GPORT) -> int:
    """Our SYN-ACK's sequence number, read from the wire, on a fresh stack
    with ISN key ``key`` accepting a guest SYN from ``sport`` at ``now``."""
    stack = Stack(StackConfig(isn_key=key), random.Random(7))
    tcp = stack.tcp
    syn = IP(src=GUEST, dst=PEER, flags="DF") / TCP(
        sport=sport, dport=PPORT, seq=GISN, flags="S", options=LINUX_SYN
    )
    stack.receive_frame(bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / syn), now)
    event = stack.next_event()
    assert isinstance(event, TcpConnectRequested)
    tcp.accept(event.conn, now)
    (frame,) = stack.frames_to_send(now)
    segment = Ether(frame)[TCP]
    assert segment.flags == "SA"
    return segment.seq


def test_isn_is_a_timer_plus_a_keyed_hash_of_the_four_tuple():
    key = bytes(range(16))
    isn = syn_ack_seq(key, 5.0)
    assert isn == rfc6528_isn(key, PEER, PPORT, GUEST, GPORT, 5.0)
    assert syn_ack_seq(key, 5.0) == isn  # same key, tuple and time: same ISN
    assert syn_ack_seq(bytes(16), 5.0) != isn  # another key
    assert syn_ack_seq(key, 5.0, sport=GPORT + 1) != isn  # another tuple
    # The timer: 4 us a tick, so one second later the ISN is 250000 further.
    assert syn_ack_seq(key, 6.0) == (isn + 250_000) & MASK
    assert syn_ack_seq(key, 5.000004) == (isn + 1) & MASK


def test_isn_does_not_come_from_the_injected_random():
    # The guest sees the injected random's outputs (IP ids, timestamp
    # offsets); an ISN drawn from it would be predictable from them.
    stack = Stack(StackConfig(), FixedRandom(ISS))
    tcp = stack.tcp
    isn = tcp.initial_sequence_number(ip4(PEER), PPORT, ip4(GUEST), GPORT, 1.0)
    assert isn == rfc6528_isn(bytes(16), PEER, PPORT, GUEST, GPORT, 1.0) != ISS


def test_network_config_draws_a_fresh_isn_key():
    from pyslirp.config import NetworkConfig

    a, b = NetworkConfig(), NetworkConfig()
    assert len(a.isn_key) == 16 and a.isn_key != b.isn_key
    assert a.stack_config().isn_key == a.isn_key
