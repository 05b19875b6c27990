"""Two stacks joined by a seeded impairment: frames duplicated, reordered
(and, in one case, lost), in both directions at once.

One stack plays the host side (the NAT's stack), the other the guest (a
second Stack that owns 10.0.2.100 and connects out). Data goes both ways on
one connection; the test asserts that every byte arrives once and in order,
that the impairment did reach the receivers (duplicates seen, segments
queued out of order), that both ends close, and that nothing stays charged
to either memory budget. The clock is a plain float moved to the next event.
"""

import random

import pytest

from pyslirp.stack.config import StackConfig, TcpConfig
from pyslirp.stack.events import TcpConnectionClosed, TcpConnectionReset, TcpConnectRequested
from pyslirp.stack.interface import Stack
from pyslirp.stack.tcp_connection import TcpState

GUEST = bytes([10, 0, 2, 100])
PEER = bytes([198, 51, 100, 7])
DONE = (TcpState.TIME_WAIT, TcpState.CLOSED)


class Impairment:
    """A link that loses, duplicates and reorders frames, from one seed.

    A frame is late by ``reorder_delay`` with probability ``reorder`` (so
    the frames behind it overtake it), and is delivered twice with
    probability ``duplicate`` (the copy a little later again)."""

    def __init__(self, rnd, loss=0.0, duplicate=0.0, reorder=0.0, reorder_delay=0.004):
        self.rnd = rnd
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self.reorder_delay = reorder_delay
        self.queue = []  # (deliver_at, serial, frame, destination)
        self.serial = 0
        self.counts = {"lost": 0, "duplicated": 0, "reordered": 0, "carried": 0}

    def carry(self, frames, destination, now) -> None:
        for frame in frames:
            self.counts["carried"] += 1
            if self.rnd.random() < self.loss:
                self.counts["lost"] += 1
                continue
            at = now + 0.0005
            if self.rnd.random() < self.reorder:
                self.counts["reordered"] += 1
                at += self.reorder_delay * (0.5 + self.rnd.random())
            self._put(at, frame, destination)
            if self.rnd.random() < self.duplicate:
                self.counts["duplicated"] += 1
                self._put(at + self.rnd.random() * self.reorder_delay, frame, destination)
        self.queue.sort(key=lambda item: (item[0], item[1]))

    def _put(self, at, frame, destination) -> None:
        self.serial += 1
        self.queue.append((at, self.serial, frame, destination))

    def due(self, now):
        cut = 0
        while cut < len(self.queue) and self.queue[cut][0] <= now:
            cut += 1
        out, self.queue = self.queue[:cut], self.queue[cut:]
        return out

    def next_at(self):
        return self.queue[0][0] if self.queue else None


def run_pair(seed, up_size, down_size, **impairment):
    rnd = random.Random(seed)
    host = Stack(
        StackConfig(tcp=TcpConfig(receive_buffer=64 * 1024, send_buffer=64 * 1024)),
        random.Random(seed + 100),
    )
    host_tcp = host.tcp
    guest = Stack(
        StackConfig(
            gateway=GUEST,
            gateway_mac=bytes.fromhex("020000000064"),
            dns=bytes([10, 0, 2, 99]),
            tcp=TcpConfig(receive_buffer=48 * 1024, send_buffer=48 * 1024),
        ),
        random.Random(seed + 200),
    )
    guest_tcp = guest.tcp
    guest.learn_neighbor(PEER, bytes.fromhex("52550a000202"))
    link = Impairment(rnd, **impairment)
    up = rnd.randbytes(up_size)
    down = rnd.randbytes(down_size)
    got = {"up": bytearray(), "down": bytearray()}
    sent = {"up": 0, "down": 0}
    ends = set()
    now = 1.0
    g_conn = guest_tcp.connect(GUEST, 40000, PEER, 80, now)
    h_conn = None
    for _ in range(300_000):
        for stack, layer, name in ((host, host_tcp, "host"), (guest, guest_tcp, "guest")):
            event = stack.next_event()
            while event is not None:
                if isinstance(event, TcpConnectRequested):
                    h_conn = event.conn
                    layer.accept(h_conn, now)
                elif isinstance(event, (TcpConnectionClosed, TcpConnectionReset)):
                    ends.add((name, type(event).__name__))
                event = stack.next_event()
        for conn, layer, sink in ((h_conn, host_tcp, "up"), (g_conn, guest_tcp, "down")):
            if conn is not None and conn.rx_bytes:
                got[sink] += b"".join(bytes(chunk) for chunk in conn.rx)
                layer.consume(conn, conn.rx_bytes, now)
        for conn, layer, data, name in (
            (h_conn, host_tcp, down, "down"),
            (g_conn, guest_tcp, up, "up"),
        ):
            if conn is None or conn.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
                continue
            if sent[name] < len(data):
                sent[name] += layer.send(conn, data[sent[name] : sent[name] + 16384], now)
            elif not conn.close_requested:
                layer.close(conn, now)
        link.carry(host.frames_to_send(now), guest, now)
        link.carry(guest.frames_to_send(now), host, now)
        if h_conn is not None and h_conn.state in DONE and g_conn.state in DONE:
            break
        candidates = [t for t in (link.next_at(), host.get_timer(), guest.get_timer()) if t]
        now = max(now, min(candidates)) if candidates else now + 0.01
        for _at, _serial, frame, destination in link.due(now):
            destination.receive_frame(frame, now)
        for stack in (host, guest):
            deadline = stack.get_timer()
            if deadline is not None and deadline <= now:
                stack.handle_timer(now)
    return {
        "up_ok": bytes(got["up"]) == up,
        "down_ok": bytes(got["down"]) == down,
        "ends": ends,
        "link": link.counts,
        "counters": host_tcp.counters + guest_tcp.counters,
        "drops": host.drops + guest.drops,
        "held": (host.budget.held, guest.budget.held),
        "conns": (h_conn, g_conn),
        "elapsed": now - 1.0,
    }


@pytest.mark.parametrize("seed", [11, 12])
def test_duplicated_and_reordered_frames_both_ways_arrive_once_in_order(seed):
    result = run_pair(seed, 400_000, 600_000, duplicate=0.2, reorder=0.25)
    assert result["up_ok"] and result["down_ok"]
    assert not result["drops"], result["drops"]
    # The impairment reached both receivers: late segments waited in the
    # out-of-order queue and duplicates were recognised as such.
    assert result["link"]["duplicated"] > 100 and result["link"]["reordered"] > 100
    counters = result["counters"]
    assert counters["tcp-ooo-queued"] > 0
    assert counters["tcp-ooo-duplicate"] + counters["tcp-out-of-window"] > 0
    assert ("host", "TcpConnectionClosed") in result["ends"]
    assert ("guest", "TcpConnectionClosed") in result["ends"]
    assert result["held"] == (0, 0)
    # Nothing was lost; reordering alone makes a few spurious fast
    # retransmits (no SACK to tell them apart), and a timer fires only where
    # the ACKs ride on data (data both ways: no duplicate ACKs, RFC 5681).
    assert counters["tcp-timeouts"] <= 3, counters


# Seed 12 stalled for good before ACKs were sent at SND.MAX (see
# tests/test_tcp_recovery.py).
@pytest.mark.parametrize("seed", [12, 21, 22])
def test_loss_duplication_and_reordering_together_recover_quickly(seed):
    result = run_pair(seed, 300_000, 300_000, loss=0.05, duplicate=0.05, reorder=0.1)
    assert result["up_ok"] and result["down_ok"]
    assert result["link"]["lost"] > 20
    assert ("host", "TcpConnectionClosed") in result["ends"]
    assert ("guest", "TcpConnectionClosed") in result["ends"]
    assert result["held"] == (0, 0)
    # Recovery is prompt: the transfers take seconds of the simulated
    # clock, not the minutes an RTO backed off to its ceiling would.
    assert result["elapsed"] < 60.0, result
