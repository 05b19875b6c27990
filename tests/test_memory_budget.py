"""Memory held for the guest: counted honestly and bounded all together.

In-process, sans-IO: hand-made frames into a Stack with a TCP layer and a
plain float clock. A hostile guest sends 64 KiB segments that each carry
1 KiB of new data (the rest it sent before), which must not pin 64 times
what is counted; many connections filling their windows while the host
never reads must stay within one budget, lose no byte, and give it all
back when they close.
"""

import random
import struct
import subprocess
import sys

import pytest

from pyslirp.stack.config import StackConfig, TcpConfig
from pyslirp.stack.events import TcpConnectRequested
from pyslirp.stack.interface import Stack
from pyslirp.stack.tcp_connection import TcpState
from tests.harness import REPO
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
    config = StackConfig(mtu=mtu, memory_budget=budget, tcp=TcpConfig(**tcp_config))
    return Stack(config, random.Random(7))


class Guest:
    """One guest connection to PEER:80 from ``port``, played by hand."""

    all: dict = {}  # port -> Guest, for frames that another guest reads

    def __init__(self, stack, port: int, mss: int = SEGMENT) -> None:
        Guest.all[port] = self
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
        seq, _ack, _flags, window, _len = parse_tcp(syn_ack)
        self.our_next = seq + 1
        stack.receive_frame(self.frame(self.isn + 1, ACK), now)
        assert self.conn.state is TcpState.ESTABLISHED
        self.ack = self.isn + 1
        self.window = window  # not scaled on a SYN

    def send(self, offset: int, size: int, now: float) -> None:
        """Bytes [offset, offset + size) of STREAM (offset from the first
        data byte), then whatever the stack answers is read."""
        payload = STREAM[offset : offset + size]
        self.stack.receive_frame(self.frame(self.isn + 1 + offset, ACK | PSH, payload), now)
        self.read(now)

    def read(self, now: float) -> None:
        """Take in what the stack sends (to any guest port: ``Guest.all``)."""
        for frame in self.stack.frames_to_send(now):
            seq, ack, flags, window, _length = parse_tcp(frame)
            guest = self.all.get(struct.unpack_from("!H", frame, 36)[0], self)
            if not flags & RST:
                guest.ack = ack
                guest.window = window << 5  # our window scale for a 1 MiB buffer

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


def check_accounts(stack, extra: int = 0) -> None:
    """The invariant: the budget holds exactly what the holders hold."""
    held = stack.memory_held()
    assert stack.budget.held == sum(held.values()) + extra, (stack.budget.held, held)
    assert stack.budget.held <= stack.budget.limit


class Sender(Guest):
    """A guest connection that sends ``total`` bytes of STREAM as the
    windows allow, going back to the first unacknowledged byte when a round
    brings no progress (what a retransmission timeout does)."""

    def __init__(self, stack, port: int, total: int, mss: int = 1460) -> None:
        super().__init__(stack, port, mss)
        self.total = total
        self.next = 0
        self.last_acked = -1
        self.received = bytearray()  # what the NAT side took from the stack

    def round(self, now: float, budget) -> int:
        """Send what the window allows; returns how many segments went."""
        if self.acked == self.last_acked:
            self.next = self.acked  # nothing new acknowledged: resend
        self.last_acked = self.acked
        sent = 0
        edge = min(self.acked + self.window, self.total)
        while self.next < edge and sent < 64:
            size = min(self.mss, edge - self.next)
            self.send(self.next, size, now)
            assert budget.held <= budget.limit
            self.next += size
            sent += 1
        return sent

    def take(self, now: float) -> None:
        """The NAT side passes everything received on."""
        conn = self.conn
        data = b"".join(bytes(chunk) for chunk in conn.rx)
        self.received += data
        self.stack.tcp.consume(conn, len(data), now)


def test_many_connections_stay_within_one_budget_and_lose_nothing():
    """50 connections, each with a 1 MiB window, share a 2 MiB budget while
    the host reads nothing: the budget is never exceeded, windows close,
    what arrives beyond the budget is dropped and counted. Once the host
    reads again every byte arrives in order, and closing gives all back."""
    budget_limit = 2 * MIB
    stack = new_stack(budget=budget_limit, mtu=1500)
    budget = stack.budget
    total = 160 * 1024  # per connection: 8 MB in all, four times the budget
    guests = [Sender(stack, 41000 + i, total) for i in range(50)]
    now = 1.0
    for guest in guests:
        guest.connect(now)
    events = []

    def tick(now):
        deadline = stack.get_timer()
        if deadline is not None and deadline <= now:
            stack.handle_timer(now)
        guests[0].read(now)
        event = stack.next_event()
        while event is not None:
            events.append(event)
            event = stack.next_event()

    # The host reads nothing: rounds until nothing more is taken.
    taken = -1
    edges = None
    for _ in range(40):
        now += 0.01
        for guest in guests:
            guest.round(now, budget)
        tick(now)
        check_accounts(stack)
        if budget.held >= budget.pressure:
            # Past the pressure mark no right edge moves on (none is pulled
            # back either) but for rounding to the window scale (32 bytes):
            # the windows only shrink as they fill.
            now_edges = [g.acked + g.window for g in guests]
            if edges is not None:
                assert all(0 <= new - old < 32 for new, old in zip(now_edges, edges))
            edges = now_edges
        in_rx = sum(g.conn.rx_bytes for g in guests)
        if in_rx == taken:
            break
        taken = in_rx
    assert in_rx == taken, "the connections kept taking data"
    assert budget.held <= budget.limit and budget.peak <= budget.limit
    assert budget.held > budget.pressure  # it did fill up
    assert stack.drops["tcp-memory-budget"] > 0  # what did not fit was dropped
    assert budget.pressed
    # Connections that come now are offered no window at all.
    late = [Sender(stack, 42000 + i, total) for i in range(2)]
    for guest in late:
        guest.connect(now)
        assert guest.window == 0
        guest.send(0, 1000, now)  # beyond the window: dropped
        assert guest.conn.rx_bytes == 0
    guests += late

    # The host reads again: everything arrives, in order.
    for _ in range(400):
        now += 0.01
        for guest in guests:
            guest.take(now)
        tick(now)
        check_accounts(stack)
        for guest in guests:
            guest.round(now, budget)
        tick(now)
        check_accounts(stack)
        if all(len(g.received) == total for g in guests):
            break
    for guest in guests:
        assert bytes(guest.received) == STREAM[:total], guest.port
    kinds = [(type(e).__name__, getattr(e, "entered", None)) for e in events]
    assert ("MemoryPressureChanged", True) in kinds
    assert ("MemoryPressureChanged", False) in kinds
    assert not budget.pressed

    # Half close gracefully (guest FIN, our FIN, its ACK), half are reset.
    for i, guest in enumerate(guests):
        conn = guest.conn
        stack.tcp.send(conn, b"reply" * 1000, now)  # the send buffer is charged too
        stack.receive_frame(guest.frame(guest.isn + 1 + total, ACK | PSH), now)  # unread data
        if i % 2:
            stack.tcp.abort(conn, now)
        else:
            guest.read(now)
            stack.receive_frame(guest.frame(guest.isn + 1 + total, ACK | 0x01), now)  # FIN
            stack.tcp.close(conn, now)
            guest.read(now)
            fin_ack = tcp_frame(
                GUEST_MAC, GW_MAC, GUEST, PEER, guest.port, 80, guest.isn + 2 + total,
                guest.our_next + 5000 + 1, ACK,
            )  # fmt: skip
            stack.receive_frame(fin_ack, now)
            assert conn.state is TcpState.CLOSED
    check_accounts(stack)
    assert budget.held == 0


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    "text, size",
    [("1M", MIB), ("32m", 32 * MIB), ("1536K", 1536 * 1024), ("2G", 2 << 30), ("1048576", MIB)],
)
def test_memory_budget_option_sets_the_network_config(tmp_path, text, size):
    from forwarder.options import parse

    ns = tmp_path / "net"
    ns.touch()
    _text, options = parse([f"--memory-budget={text}", str(ns)])
    assert options.config.memory_budget == size
    assert options.config.stack_config().memory_budget == size
    _text, options = parse([str(ns)])
    assert options.config.memory_budget == 256 * MIB


@pytest.mark.parametrize("text", ["512K", "1048575", "lots", "1.5M", "-1M", "1T", ""])
def test_bad_memory_budget_is_one_line_and_exit_1(tmp_path, text):
    ns = tmp_path / "net"
    ns.touch()
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", f"--memory-budget={text}", str(ns)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyslirp-forwarder: --memory-budget must be")
    assert "--memory-budget=SIZE" in subprocess.run(
        [sys.executable, "-m", "forwarder", "--help"],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    ).stdout  # fmt: skip


# ---------------------------------------------------------------- the other holders
def test_arp_queue_is_bounded_in_bytes_and_charged_until_resolved_or_given_up():
    stack = new_stack()
    budget = stack.budget
    other = bytes([10, 0, 2, 77])
    for _ in range(6):  # 60 KB each: four fit in 256 KiB
        stack.send_udp(PEER, 53, other, 4000, bytes(60000), 1.0)
    assert stack.drops["arp-queue-full"] == 2
    assert budget.held == 4 * (60000 + 28)
    check_accounts(stack)
    # The guest answers for the address: the queue goes out, nothing is held.
    arp_reply = (
        GW_MAC + GUEST_MAC + b"\x08\x06" + bytes.fromhex("0001080006040002")
        + GUEST_MAC + other + GW_MAC + bytes([10, 0, 2, 2])
    )  # fmt: skip
    stack.receive_frame(arp_reply, 1.1)
    assert len([f for f in stack.frames_to_send(1.1) if len(f) > 60000]) == 4
    assert budget.held == 0
    # Unanswered: given up after its attempts, and released.
    stack.send_udp(PEER, 53, bytes([10, 0, 2, 78]), 4000, bytes(1000), 2.0)
    assert budget.held == 1028
    for step in range(1, 6):
        stack.handle_timer(2.0 + step)
    assert stack.drops["arp-unresolved"] == 1 and budget.held == 0


def test_arp_queue_refused_by_a_full_budget():
    stack = new_stack(budget=100_000)
    stack.send_udp(PEER, 53, bytes([10, 0, 2, 77]), 4000, bytes(60000), 1.0)
    stack.send_udp(PEER, 53, bytes([10, 0, 2, 78]), 4000, bytes(60000), 1.0)
    assert stack.drops["arp-memory-budget"] == 1
    assert stack.budget.held == 60028
    check_accounts(stack)


def test_reassembly_is_charged_and_refused_past_the_budget():
    from scapy.layers.inet import IP, UDP, fragment
    from scapy.layers.l2 import Ether

    def fragments(ident, size):
        datagram = IP(src="10.0.2.100", dst="10.0.2.2", id=ident) / UDP(sport=1, dport=9)
        return [
            bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / f)
            for f in fragment(datagram / bytes(size), fragsize=1400)
        ]

    stack = new_stack(budget=10_000, mtu=1500)
    first = fragments(1, 5000)
    for frame in first[:-1]:
        stack.receive_frame(frame, 1.0)
    assert stack.budget.held == stack.memory_held()["reassembly"] == 3 * 1400
    stack.receive_frame(first[-1], 1.0)  # complete: handed on, released
    assert stack.budget.held == 0 and stack.counters["reassembled"] == 1
    big = fragments(2, 20000)
    for frame in big:
        stack.receive_frame(frame, 1.0)
    assert stack.drops["reassembly-memory-budget"] >= 1
    assert stack.counters["reassembled"] == 1
    check_accounts(stack)
    stack.handle_timer(100.0)  # what was left of it times out
    assert stack.budget.held == 0


def test_received_bytes_stay_charged_for_the_nat_side_after_a_graceful_close():
    """The guest's last bytes outlive its connection until the NAT side has
    passed them on (or let go of them); the budget says so throughout."""
    stack = new_stack()
    budget = stack.budget
    guest = Guest(stack, 43000, mss=1460)
    guest.connect(1.0)
    conn = guest.conn
    conn.user = "a NAT flow"  # someone will read
    guest.send(0, 3000, 1.1)
    stack.receive_frame(guest.frame(guest.isn + 3001, ACK | 0x01), 1.1)  # FIN
    stack.tcp.close(conn, 1.1)
    guest.read(1.1)
    stack.receive_frame(
        tcp_frame(GUEST_MAC, GW_MAC, GUEST, PEER, 43000, 80, guest.isn + 3002,
                  guest.our_next + 1, ACK),
        1.2,
    )  # fmt: skip
    assert conn.state is TcpState.CLOSED and conn.rx_bytes == 3000
    assert conn in stack.tcp.unread and budget.held >= 3000
    check_accounts(stack)
    stack.tcp.consume(conn, 1000, 1.3)
    check_accounts(stack)
    stack.tcp.consume(conn, 2000, 1.3)
    assert budget.held == 0 and not stack.tcp.unread
    # Or the NAT side gives up on them.
    guest = Guest(stack, 43001, mss=1460)
    guest.connect(2.0)
    guest.conn.user = "a NAT flow"
    guest.send(0, 3000, 2.1)
    stack.receive_frame(guest.frame(guest.isn + 3001, ACK | 0x01), 2.1)
    stack.tcp.close(guest.conn, 2.1)
    stack.receive_frame(
        tcp_frame(GUEST_MAC, GW_MAC, GUEST, PEER, 43001, 80, guest.isn + 3002,
                  guest.our_next + 1, ACK),
        2.2,
    )  # fmt: skip
    assert budget.held > 0
    stack.tcp.release_received(guest.conn)
    assert budget.held == 0 and not stack.tcp.unread


def test_send_space_follows_the_budget_and_reopens_when_pressure_ends():
    stack = new_stack(budget=4 * MIB)
    budget = stack.budget
    guest = Guest(stack, 43100, mss=1460)
    guest.connect(1.0)
    conn = guest.conn
    tcp = stack.tcp
    assert tcp.send_space(conn) == 1 << 20  # the send buffer's own bound
    other = budget.limit - 200_000  # someone else (the DNS proxy, say) holds most
    assert budget.charge(other)
    space = tcp.send_space(conn)
    assert space == 200_000 // 4  # under pressure: a quarter of what is left
    assert tcp.send(conn, bytes(100_000), 1.1) == space
    check_accounts(stack, extra=other)
    assert tcp.send_space(conn) < space and conn.send_blocked
    stack.frames_to_send(1.1)
    assert budget.pressed
    while stack.next_event() is not None:
        pass
    budget.release(other)
    stack.frames_to_send(1.2)  # the stack notices once per wake-up
    assert not budget.pressed
    events = []
    event = stack.next_event()
    while event is not None:
        events.append(type(event).__name__)
        event = stack.next_event()
    assert events == ["MemoryPressureChanged", "TcpSendSpaceOpened"]
    assert tcp.send_space(conn) == (1 << 20) - space


def test_time_wait_expiry_and_a_guest_reset_release_everything():
    stack = new_stack()
    budget = stack.budget
    tcp = stack.tcp
    # Host closes first; the guest's data is never read; TIME-WAIT expires.
    guest = Guest(stack, 43200, mss=1460)
    guest.connect(1.0)
    conn = guest.conn
    guest.send(0, 5000, 1.1)
    tcp.send(conn, b"x" * 3000, 1.1)
    tcp.close(conn, 1.1)
    guest.read(1.1)
    ours_after_fin = guest.our_next + 3000 + 1
    stack.receive_frame(
        tcp_frame(GUEST_MAC, GW_MAC, GUEST, PEER, 43200, 80, guest.isn + 5001,
                  ours_after_fin, ACK | 0x01),
        1.2,
    )  # fmt: skip
    assert conn.state is TcpState.TIME_WAIT
    assert budget.held >= 5000
    check_accounts(stack)
    stack.handle_timer(1.2 + tcp.config.time_wait_timeout + 1)
    assert conn.state is TcpState.CLOSED and budget.held == 0
    # The guest resets a connection with bytes in every buffer.
    guest = Guest(stack, 43201, mss=1460)
    guest.connect(100.0)
    conn = guest.conn
    guest.send(0, 5000, 100.1)
    guest.send(8000, 2000, 100.1)  # out of order
    tcp.send(conn, b"y" * 3000, 100.1)
    assert conn.ooo and conn.rx and conn.snd_buf.size
    check_accounts(stack)
    stack.receive_frame(guest.frame(guest.isn + 5001, RST), 100.2)
    assert conn.state is TcpState.CLOSED and budget.held == 0
    check_accounts(stack)


def test_neighbour_discovery_queue_is_bounded_in_bytes_and_charged():
    stack = Stack(StackConfig(mtu=MTU, ipv6=True), random.Random(7))
    budget = stack.budget
    ipv6 = stack.ipv6
    gateway = ipv6.gateway
    target = bytes.fromhex("fd000000000000000000000000000077")
    for _ in range(6):  # 60 KB each: four fit in 256 KiB
        ipv6.send(gateway, target, 17, bytes(60000), 1.0)
    assert stack.drops["nd-queue-full"] == 2
    assert budget.held == 4 * (60000 + 40) == stack.memory_held()["nd"]
    for step in range(1, 6):
        stack.handle_timer(1.0 + step)
    assert stack.drops["nd-unresolved"] == 4 and budget.held == 0


def test_random_segments_keep_the_accounts_exact():
    """Overlapping, early, late, repeated and FIN-bearing segments of every
    size, the host reading now and then: the budget always equals what the
    buffers hold, and an abort gives it all back."""
    rng = random.Random(11)
    stack = new_stack(budget=3 * MIB)
    conns = []
    for i in range(4):
        guest = Guest(stack, 44000 + i)
        guest.connect(1.0)
        conns.append(guest)
    now = 1.0
    for step in range(1500):
        now += 0.001
        guest = rng.choice(conns)
        if guest.conn.state is TcpState.CLOSED:
            continue
        start = max(0, guest.acked + rng.randrange(-70000, 300000))
        size = rng.choice((1, 100, 1023, 1024, 1500, 20000, SEGMENT))
        flags = ACK | PSH | (0x01 if rng.random() < 0.01 else 0)
        payload = STREAM[start : start + size]
        stack.receive_frame(guest.frame(guest.isn + 1 + start, flags, payload), now)
        guest.read(now)
        if rng.random() < 0.05:
            stack.tcp.consume(guest.conn, rng.randrange(0, guest.conn.rx_bytes + 1), now)
        if rng.random() < 0.02:
            stack.tcp.send(guest.conn, bytes(rng.randrange(1, 200000)), now)
        if step % 50 == 0:
            check_accounts(stack)
            stack.handle_timer(now)
    check_accounts(stack)
    assert stack.budget.held > 0
    for guest in conns:
        stack.tcp.abort(guest.conn, now)
    assert stack.budget.held == 0
