"""Memory held for the guest: counted honestly and bounded all together.

In-process, sans-IO: hand-made frames into a Stack with a TCP layer and a
plain float clock. A hostile guest sends 64 KiB segments that each carry
1 KiB of new data (the rest it sent before), which must not pin 64 times
what is counted; many connections filling their windows while the host
never reads must stay within one budget, lose no byte, and give it all
back when they close.
"""

import random

from pyslirp.stack.config import StackConfig
from pyslirp.stack.events import TcpConnectRequested
from pyslirp.stack.interface import Stack
from pyslirp.stack.tcp_connection import TcpState
from pyslirp.stack.tcp_layer import TcpConfig, TcpLayer
from tests.tcp_craft import ACK, PSH, RST, SYN, parse_tcp, syn_options, tcp_frame

GUEST_MAC = bytes.fromhex("020000000064")
GW_MAC = bytes.fromhex("52550a000202")
GUEST = bytes([10, 0, 2, 100])
PEER = bytes([198, 51, 100, 7])
MTU = 65520
SEGMENT = MTU - 40  # a full segment's payload without TCP options
MIB = 1024 * 1024
# The bytes the guest sends, by offset from its first data byte: a stream
# longer than any test sends, so that a misplaced byte shows.
STREAM = bytes(i % 251 for i in range(8 * MIB))


def held_by(conn) -> int:
    """What the connection's buffers keep alive: a view keeps its whole
    frame (``obj``), a bytes-like object itself."""
    total = 0
    for chunk in list(conn.rx) + [data for _start, data in conn.ooo]:
        total += len(chunk.obj) if isinstance(chunk, memoryview) else len(chunk)
    return total


def counted_by(conn) -> int:
    return conn.rx_bytes + conn.ooo_bytes


def new_stack(budget: int = 256 * MIB, mtu: int = MTU, **tcp_config):
    stack = Stack(StackConfig(mtu=mtu, memory_budget=budget), random.Random(7))
    TcpLayer(stack, TcpConfig(**tcp_config))
    return stack


class Guest:
    """One guest connection to PEER:80 from ``port``, played by hand."""

    def __init__(self, stack, port: int, mss: int = SEGMENT) -> None:
        self.stack = stack
        self.port = port
        self.mss = mss
        self.isn = 5000 + port
        self.conn = None
        self.ack = 0  # the latest acknowledgment number from the stack
        self.window = 0  # and its window, scaled
        self.our_next = 0  # the stack's next sequence number

    def frame(self, seq: int, flags: int, payload=b"", options=b"") -> bytes:
        return tcp_frame(
            GUEST_MAC, GW_MAC, GUEST, PEER, self.port, 80, seq, self.our_next, flags,
            payload, window=0xFFFF, options=options,
        )  # fmt: skip

    def connect(self, now: float) -> None:
        stack = self.stack
        while stack.next_event() is not None:  # earlier connections' news
            pass
        stack.receive_frame(self.frame(self.isn, SYN, options=syn_options(self.mss, 7)), now)
        event = stack.next_event()
        assert isinstance(event, TcpConnectRequested)
        self.conn = event.conn
        stack.tcp.accept(self.conn, now)
        (syn_ack,) = stack.frames_to_send(now)
        seq, _ack, _flags, _window, _len = parse_tcp(syn_ack)
        self.our_next = seq + 1
        stack.receive_frame(self.frame(self.isn + 1, ACK), now)
        assert self.conn.state is TcpState.ESTABLISHED
        self.ack = self.isn + 1
        self.window = 0xFFFF

    def send(self, offset: int, size: int, now: float) -> None:
        """Bytes [offset, offset + size) of STREAM (offset from the first
        data byte), then whatever the stack answers is read."""
        payload = STREAM[offset : offset + size]
        self.stack.receive_frame(self.frame(self.isn + 1 + offset, ACK | PSH, payload), now)
        self.read(now)

    def read(self, now: float) -> None:
        for frame in self.stack.frames_to_send(now):
            seq, ack, flags, window, _length = parse_tcp(frame)
            if not flags & RST:
                self.ack = ack
                self.window = window << 5  # our window scale for a 1 MiB buffer

    @property
    def acked(self) -> int:
        """Data bytes the stack has acknowledged."""
        return (self.ack - self.isn - 1) & 0xFFFFFFFF


def test_overlapping_gso_segments_hold_about_what_they_count():
    """The audit's attack: each 64 KiB segment starts 63 KiB before
    RCV.NXT, so it brings 1 KiB of new data; the host never reads. What the
    connection holds stays within twice what it counts (the window), in
    order and out of order alike."""
    stack = new_stack()
    guest = Guest(stack, 40000)
    guest.connect(1.0)
    conn = guest.conn
    guest.send(0, SEGMENT, 1.1)  # one honest segment: kept as a view, no copy
    assert isinstance(conn.rx[0], memoryview)
    sent = 0
    while guest.window >= 1024 and sent < 2000:
        start = guest.acked - (SEGMENT - 1024)
        guest.send(start, SEGMENT, 1.2)
        sent += 1
    assert conn.rx_bytes > 900 * 1024
    held, counted = held_by(conn), counted_by(conn)
    print(f"in order: {sent} segments, counted {counted}, held {held}")
    assert held <= 2 * counted
    assert b"".join(bytes(c) for c in conn.rx) == STREAM[: conn.rx_bytes]

    # Out of order: a hole at RCV.NXT, then segments of which only the
    # last 1 KiB or so lies inside the window.
    guest2 = Guest(stack, 40001)
    guest2.connect(2.0)
    conn2 = guest2.conn
    guest2.send(SEGMENT, 1024, 2.1)  # early: the answer carries the full window
    right = guest2.acked + guest2.window
    for j in range(1, 255):
        guest2.send(right - 1024 - 8 * j, SEGMENT, 2.2)
    assert len(conn2.ooo) > 200
    held, counted = held_by(conn2), counted_by(conn2)
    print(f"out of order: {len(conn2.ooo)} segments, counted {counted}, held {held}")
    assert held <= 2 * counted
