"""The decision trace (--trace, docs/trace.md).

In process: a Stack played frame by frame with a plain float clock (the
Script of test_tcp_stack), a recording tracer, and exact event sequences.
End to end: the real forwarder with --trace and --pcap, a namespace, udhcpc,
dig and a TCP client as the guest; the trace is read back as JSON lines.
"""

import io
import json
import random
import re
import socket
import struct
import threading
from collections import Counter
from pathlib import Path

import pytest

from pyslirp.stack import tracing
from pyslirp.stack.interface import Stack
from pyslirp.stack.tcp_connection import TcpConnection, TcpState
from pyslirp.stack.tcp_layer import TcpLayer
from pyslirp.trace import JsonTracer
from tests.test_tcp_stack import GISN, GUEST_MAC, GW_MAC, ISS, Script, ip4

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "trace.md").read_text()
FLOW = "tcp 10.0.2.100:40000>198.51.100.7:80"


class Recorder:
    """A tracer that keeps what it is told: (t, event, flow, msg, fields)."""

    def __init__(self, frame_index=None) -> None:
        self.frame_index = frame_index
        self.records: list = []

    def __call__(self, now, event, flow, msg, **fields) -> None:
        assert isinstance(msg, str) and msg
        self.records.append((now, event, flow, msg, fields))

    def events(self, name=None) -> list:
        return [r for r in self.records if name is None or r[1] == name]

    def states(self) -> list:
        return [(r[0], r[4]["old"], r[4]["new"], r[4]["cause"]) for r in self.events("tcp.state")]


def traced(**config) -> tuple[Script, Recorder]:
    s = Script(**config)
    recorder = Recorder()
    s.stack.set_tracer(recorder)
    return s, recorder


def documented_events() -> set:
    """The event names docs/trace.md lists: its '### `name`' headings."""
    return set(re.findall(r"^### `([a-z0-9.-]+)`", DOC, re.M))


# ------------------------------------------------------------ on and off
def test_tracing_off_runs_the_plain_classes_and_on_and_off_again_switches_them():
    s = Script()
    conn = s.handshake()
    assert type(s.stack) is Stack and type(s.tcp) is TcpLayer
    assert type(conn) is TcpConnection and type(s.stack.drops) is Counter
    recorder = Recorder()
    s.stack.set_tracer(recorder)
    assert isinstance(s.stack, tracing.StackTracing) and isinstance(s.stack, Stack)
    assert type(conn) is tracing.TracedTcpConnection
    assert type(s.stack.drops) is tracing.TracingCounter
    s.stack.drops["x"] += 2  # counts survive the switch both ways
    s.stack.set_tracer(None)
    assert type(s.stack) is Stack and type(s.tcp) is TcpLayer and type(conn) is TcpConnection
    assert s.stack.drops == Counter({"x": 2}) and type(s.stack.drops) is Counter
    s.stack.receive_frame(b"\0" * 10, 5.0)
    assert [r[1] for r in recorder.records] == ["drop"]  # only the one while on


# ------------------------------------------------------------ TCP
def test_handshake_and_teardown_transitions_in_order_with_their_causes():
    s, rec = traced()
    conn = s.handshake(now=1.0)
    s.feed(1.2, "FA", GISN + 1, ISS + 1, ts=(102, s.ts(1.0)))
    s.stack.frames_to_send(1.2)
    s.tcp.close(conn, 1.3)
    s.stack.frames_to_send(1.3)
    s.feed(1.4, "A", GISN + 2, ISS + 2, ts=(103, s.ts(1.3)))
    assert conn.state is TcpState.CLOSED
    assert rec.states() == [
        (1.0, "CLOSED", "LISTEN", f"segment S seq={GISN} ack=0 len=0"),
        (1.0, "LISTEN", "SYN-RECEIVED", "host connected (accept)"),
        (1.01, "SYN-RECEIVED", "ESTABLISHED", f"segment A seq={GISN + 1} ack={ISS + 1} len=0"),
        (1.2, "ESTABLISHED", "CLOSE-WAIT", f"segment FA seq={GISN + 1} ack={ISS + 1} len=0"),
        (1.3, "CLOSE-WAIT", "LAST-ACK", "output: our FIN sent"),
        (1.4, "LAST-ACK", "CLOSED", f"segment A seq={GISN + 2} ack={ISS + 2} len=0"),
    ]
    steps = [r[4]["rfc"] for r in rec.events("tcp.state")]
    assert steps[2] == "RFC 9293 3.10.7.4 (fifth: ACK of our SYN)"
    assert steps[3] == "RFC 9293 3.10.7.4 (eighth: FIN)"
    assert steps[5] == "RFC 9293 3.10.7.4 (fifth: ACK of our FIN)"
    assert {r[2] for r in rec.events("tcp.state")} == {FLOW} == {conn.describe()}


def test_active_close_reaches_time_wait_and_its_timer_closes():
    s, rec = traced(time_wait_timeout=60.0)
    conn = s.handshake(now=1.0)
    s.tcp.close(conn, 1.1)
    s.stack.frames_to_send(1.1)
    s.feed(1.2, "A", GISN + 1, ISS + 2, ts=(102, s.ts(1.1)))
    s.feed(1.3, "FA", GISN + 1, ISS + 2, ts=(103, s.ts(1.1)))
    s.tick(61.4)
    assert [(old, new, cause) for _t, old, new, cause in rec.states()[3:]] == [
        ("ESTABLISHED", "FIN-WAIT-1", "output: our FIN sent"),
        ("FIN-WAIT-1", "FIN-WAIT-2", f"segment A seq={GISN + 1} ack={ISS + 2} len=0"),
        ("FIN-WAIT-2", "TIME-WAIT", f"segment FA seq={GISN + 1} ack={ISS + 2} len=0"),
        ("TIME-WAIT", "CLOSED", "timer time-wait"),
    ]
    assert rec.events("tcp.state")[-1][4]["rfc"] == "RFC 9293 3.10.8 (time-wait timeout)"


def test_guest_reset_and_refused_connection_name_their_cause():
    s, rec = traced()
    conn = s.handshake(now=1.0)
    s.feed(2.0, "R", GISN + 1, 0)
    assert rec.states()[-1] == (
        2.0,
        "ESTABLISHED",
        "CLOSED",
        f"segment R seq={GISN + 1} ack=0 len=0",
    )
    assert rec.events("tcp.state")[-1][4]["rfc"] == "RFC 9293 3.10.7.4 (second: RST)"
    s.feed(3.0, "S", GISN + 500, sport=40001)
    (event,) = [e for e in s.events() if hasattr(e, "conn") and e.conn is not conn]
    s.tcp.refuse(event.conn, 3.1)
    assert rec.states()[-1] == (3.1, "LISTEN", "CLOSED", "host connection failed (refuse: RST)")


def test_rto_retransmission_names_its_reason_and_the_congestion_response():
    s, rec = traced()
    conn = s.handshake()
    s.tcp.send(conn, b"data", 1.1)
    s.stack.frames_to_send(1.1)
    rto = conn.rto
    s.tick(1.1 + rto)
    (retransmit,) = rec.events("tcp.retransmit")
    assert retransmit[0] == 1.1 + rto and retransmit[2] == FLOW
    assert retransmit[4] == {"reason": "rto", "seq": ISS + 1, "retries": 1, "rto": 2 * rto}
    (congestion,) = rec.events("tcp.congestion")
    assert congestion[4] == {"what": "timeout", "cwnd": conn.mss, "ssthresh": 2 * conn.mss}


def test_syn_ack_resent_on_timeout_is_a_syn_retransmission():
    s, rec = traced()
    s.feed(1.0, "S", GISN, window=64240)
    (event,) = s.events()
    s.tcp.accept(event.conn, 1.0)
    s.stack.frames_to_send(1.0)
    s.tick(1.0 + event.conn.rto)
    assert [r[4]["reason"] for r in rec.events("tcp.retransmit")] == ["syn"]
    assert "SYN-ACK resent" in rec.events("tcp.retransmit")[0][3]


def test_fast_retransmit_and_recovery_are_traced_in_order():
    s, rec = traced()
    conn = s.handshake()
    s.tcp.send(conn, bytes(1448 * 5), 1.1)
    s.stack.frames_to_send(1.1)
    s.feed(1.11, "A", GISN + 1, ISS + 1449, ts=(102, s.ts(1.1)))
    for i in range(3):
        s.feed(1.111 + i / 1000, "A", GISN + 1, ISS + 1449, ts=(103 + i, s.ts(1.1)))
    s.stack.frames_to_send(1.114)
    s.feed(1.12, "A", GISN + 1, ISS + 1 + 1448 * 3, ts=(106, s.ts(1.114)))
    s.stack.frames_to_send(1.12)
    s.feed(1.13, "A", GISN + 1, ISS + 1 + 1448 * 5, ts=(107, s.ts(1.12)))
    got = [
        (r[0], r[1], r[4].get("reason") or r[4].get("what"))
        for r in rec.records
        if r[1] in ("tcp.retransmit", "tcp.congestion")
    ]
    assert got == [
        (1.113, "tcp.retransmit", "fast-retransmit"),
        (1.113, "tcp.congestion", "recovery-entered"),
        (1.12, "tcp.retransmit", "partial-ack"),
        (1.13, "tcp.congestion", "recovery-left"),
    ]
    entered = rec.events("tcp.congestion")[0][4]
    assert entered["recover"] == ISS + 1 + 1448 * 5
    assert entered["cwnd"] == entered["ssthresh"] + 3 * conn.mss
    assert rec.events("tcp.retransmit")[0][4]["seq"] == ISS + 1449


def test_guest_zero_window_closes_is_probed_and_opens():
    s, rec = traced()
    conn = s.handshake()
    s.feed(1.1, "A", GISN + 1, ISS + 1, window=0, ts=(102, s.ts(1.0)))
    s.tcp.send(conn, b"abc", 1.1)
    s.stack.frames_to_send(1.1)
    probe_at = 1.1 + conn.rto
    s.tick(probe_at)
    s.feed(2.5, "A", GISN + 1, ISS + 1, window=100, ts=(103, s.ts(1.1)))
    got = [
        (r[0], r[1], r[4].get("side"), r[4].get("zero"), r[4].get("reason"))
        for r in rec.records
        if r[1] != "tcp.state"
    ]
    assert got == [
        (1.1, "tcp.window", "guest", True, None),
        (probe_at, "tcp.retransmit", None, None, "probe"),
        (2.5, "tcp.window", "guest", False, None),
    ]
    assert rec.records[-1][4]["window"] == 100 << 7


def test_our_zero_window_closes_when_the_buffer_fills_and_opens_when_read():
    s, rec = traced(receive_buffer=4096, window_scaling=False)
    conn = s.handshake(options=[("MSS", 1460), ("Timestamp", (100, 0))])
    for i in range(4):
        s.feed(1.1 + i / 100, "A", GISN + 1 + 1024 * i, ISS + 1, payload=bytes(1024), ts=(102, 0))
    s.stack.frames_to_send(1.2)
    s.tcp.consume(conn, 4096, 1.3)
    s.stack.frames_to_send(1.3)
    windows = [(r[0], r[4]["side"], r[4]["zero"], r[4]["window"]) for r in rec.events("tcp.window")]
    # Closed when the flush after the fourth segment advertises it.
    assert windows == [(1.2, "ours", True, 0), (1.3, "ours", False, 4096)]


# ------------------------------------------------------------ drops, ARP
def test_a_malformed_frame_is_a_drop_with_its_reason_and_pcap_index():
    index = [0]
    s = Script()
    rec = Recorder(frame_index=lambda: index[0])
    s.stack.set_tracer(rec)
    index[0] = 7
    macs = bytes.fromhex(GW_MAC.replace(":", "") + GUEST_MAC.replace(":", ""))
    s.stack.receive_frame(macs + b"\x08\x00\x45", 3.0)  # an IPv4 header of 1 byte
    index[0] = 8
    s.stack.send_ip(ip4("10.0.2.2"), ip4("10.0.2.100"), 17, b"x" * 70000, 3.5)
    assert [(r[0], r[1], r[2], r[4]) for r in rec.records] == [
        (3.0, "drop", None, {"reason": "ipv4-truncated", "count": 1, "frame": 7}),
        # Not while a guest frame is handled: no frame index.
        (3.5, "drop", None, {"reason": "ipv4-too-long-out", "count": 1, "frame": None}),
    ]
    assert s.stack.drops == Counter({"ipv4-truncated": 1, "ipv4-too-long-out": 1})


def test_arp_resolution_retries_and_giving_up_are_traced():
    s, rec = traced()
    guest2, guest3 = ip4("10.0.2.101"), ip4("10.0.2.102")
    s.stack.send_udp(ip4("10.0.2.2"), 53, guest2, 5353, b"hello", 1.0)
    s.stack.send_udp(ip4("10.0.2.2"), 53, guest3, 5353, b"lost", 1.0)
    s.stack.frames_to_send(1.0)
    reply = (
        bytes.fromhex(GW_MAC.replace(":", ""))
        + bytes.fromhex("020000000065")
        + b"\x08\x06"
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
        + bytes.fromhex("020000000065")
        + guest2
        + bytes.fromhex(GW_MAC.replace(":", ""))
        + ip4("10.0.2.2")
    )
    s.stack.receive_frame(reply, 1.1)
    for _ in range(10):
        at = s.stack.get_timer()
        if at is None:
            break
        s.tick(at)
    got = [(r[1], r[4]) for r in rec.records if r[1].startswith("arp.")]
    attempts = s.stack.config.arp_attempts
    retries = [
        ("arp.retry", {"addr": "10.0.2.102", "attempt": n, "queued": 1})
        for n in range(2, attempts + 1)
    ]
    assert attempts >= 2 and got == [
        ("arp.request", {"addr": "10.0.2.101"}),
        ("arp.request", {"addr": "10.0.2.102"}),
        ("arp.resolved", {"addr": "10.0.2.101", "mac": "02:00:00:00:00:65", "queued": 1}),
        *retries,
        ("arp.unresolved", {"addr": "10.0.2.102", "attempts": attempts, "dropped": 1}),
    ]
    assert [r[4]["reason"] for r in rec.events("drop")] == ["arp-unresolved"]


def test_neighbour_discovery_resolution_retries_and_giving_up_are_traced():
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import Ether

    from tests.test_ipv6_stack import GUEST, GW, a6, new_stack

    stack = new_stack()
    rec = Recorder()
    stack.set_tracer(rec)
    other = "fd00::ff:fe00:99"
    stack.send_udp(a6("fd00::3"), 53, a6(GUEST), 4000, b"answer", 1.0)
    stack.send_udp(a6("fd00::3"), 53, a6(other), 4000, b"lost", 1.0)
    stack.frames_to_send(1.0)
    na = (
        IPv6(src=GUEST, dst=GW, hlim=255)
        / ICMPv6ND_NA(tgt=GUEST, S=1, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr="02:00:00:00:00:64")
    )
    stack.receive_frame(bytes(Ether(src="02:00:00:00:00:64", dst="52:56:00:00:00:02") / na), 1.5)
    for now in (2.0, 3.0, 4.0):
        stack.handle_timer(now)
    got = [(r[0], r[1], r[4]) for r in rec.records if r[1].startswith("nd.")]
    assert got == [
        (1.0, "nd.request", {"addr": GUEST}),
        (1.0, "nd.request", {"addr": other}),
        (1.5, "nd.resolved", {"addr": GUEST, "mac": "02:00:00:00:00:64", "queued": 1}),
        (2.0, "nd.retry", {"addr": other, "attempt": 2, "queued": 1}),
        (3.0, "nd.retry", {"addr": other, "attempt": 3, "queued": 1}),
        (4.0, "nd.unresolved", {"addr": other, "attempts": 3, "dropped": 1}),
    ]


def test_hostile_frames_with_tracing_on_never_escape_and_every_line_is_json():
    """Random and mutated frames into a traced stack: nothing escapes
    receive_frame, every drop is a line, and a tracer whose stream fails
    (a full disk) does not stop the stack."""
    import random

    stream = io.StringIO()
    s = Script()
    s.strict = False
    tracer = JsonTracer(stream, frame_index=lambda: 1)
    s.stack.set_tracer(tracer)
    s.handshake()
    rng = random.Random(15)
    base = s.ours("PA", GISN + 1, ISS + 1, payload=b"x" * 40)  # any valid TCP frame
    now = 2.0
    for i in range(3000):
        if i % 3 == 0:
            frame = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
        else:
            frame = bytearray(base)
            for _ in range(rng.randrange(1, 6)):
                frame[rng.randrange(len(frame))] = rng.getrandbits(8)
            frame = bytes(frame[: rng.randrange(14, len(frame) + 1)])
        now += 0.001
        s.stack.receive_frame(frame, now)
        s.stack.frames_to_send(now)
        if i == 2000:
            stream.close()  # from here on every write fails
    assert s.stack.drops.total() > 1000 and "internal-error" not in s.stack.drops
    assert tracer.lines > 1000 and tracer.errors > 0  # lines went, then failed quietly


def test_json_lines_of_a_fuzzed_stack_parse():
    import random

    stream = io.StringIO()
    s = Script()
    s.strict = False
    s.stack.set_tracer(JsonTracer(stream))
    rng = random.Random(16)
    for i in range(500):
        frame = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        s.stack.receive_frame(frame, 1.0 + i / 1000)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == s.stack.drops.total() == 500
    assert {line["event"] for line in lines} == {"drop"}
    assert all(line["frame"] is None and line["count"] == 1 for line in lines)


def test_memory_pressure_entered_and_left_are_traced():
    from pyslirp.stack.config import StackConfig

    stack = Stack(StackConfig(memory_budget=1 << 20), random.Random(1))
    rec = Recorder()
    stack.set_tracer(rec)
    budget = stack.budget
    budget.held = budget.pressure  # as if the holders had charged that much
    stack.frames_to_send(1.0)
    budget.held = budget.relief - 1
    stack.frames_to_send(2.0)
    assert [(r[0], r[1], r[4]) for r in rec.records] == [
        (1.0, "memory.pressure", {"entered": True, "held": budget.pressure, "limit": 1 << 20}),
        (2.0, "memory.pressure", {"entered": False, "held": budget.relief - 1, "limit": 1 << 20}),
    ]


# ------------------------------------------------------------ the NAT side
def test_udp_flow_created_and_expired_through_the_real_loop(echo_server):
    import time

    from tests.inprocess import InProcessNetwork
    from tests.test_udp_nat import guest_udp

    port = echo_server.getsockname()[1]
    rec = Recorder()
    net = InProcessNetwork(udp_idle_timeout=0.2)
    net.loop.set_tracer(rec)
    assert net.loop.tracer is rec
    with net:
        net.send(guest_udp("10.0.2.2", port, b"hello"))
        _data, peer = echo_server.recvfrom(100)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not rec.events("udp.flow-expired"):
            time.sleep(0.05)
    flow = "udp 10.0.2.100:40000>*"
    got = [(r[1], r[2], r[4]) for r in rec.records if r[1].startswith("udp.")]
    assert got == [
        ("udp.flow-created", flow, {"host_port": peer[1], "idle_timeout": 0.2}),
        (
            "udp.flow-expired",
            flow,
            {"idle_timeout": 0.2, "bytes_from_guest": 5, "bytes_to_guest": 0},
        ),
    ]
    created, expired = (r[0] for r in rec.records if r[1].startswith("udp."))
    assert expired - created >= 0.2


def test_a_refused_host_connection_is_traced_with_its_errno_and_the_guest_rst():
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from tests.inprocess import InProcessNetwork
    from tests.test_udp_nat import GUEST_MAC

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens there: ECONNREFUSED
    rec = Recorder()
    net = InProcessNetwork()
    net.loop.set_tracer(rec)
    with net:
        syn = (
            Ether(src=GUEST_MAC, dst=GW_MAC)
            / IP(src="10.0.2.100", dst="10.0.2.2")
            / TCP(sport=41000, dport=port, flags="S", seq=7)
        )
        net.send(bytes(syn))
        rst = net.receive(timeout=10, predicate=lambda f: TCP in Ether(f))
        assert rst is not None and Ether(rst)[TCP].flags == "RA"
    flow = f"tcp 10.0.2.100:41000>10.0.2.2:{port}"
    got = [(r[1], r[2], r[4].get("result"), r[4].get("new")) for r in rec.records]
    assert got == [
        ("tcp.state", flow, None, "LISTEN"),
        ("tcp.host-connect", flow, "refused", None),
        ("tcp.state", flow, None, "CLOSED"),
    ]
    connect = rec.records[1][4]
    assert connect == {"result": "refused", "host": f"127.0.0.1:{port}", "errno": "ECONNREFUSED"}
    assert rec.records[2][4]["cause"] == "host connection failed (refuse: RST)"


# ------------------------------------------------------------ DHCP
def test_dhcp_offer_ack_nak_decline_release_and_ignored_with_their_reasons():
    from tests.test_dhcp import MAC_A, MAC_B, SERVER, client, lease, server

    srv = server()
    rec = Recorder()
    srv.tracer = rec  # Loop.set_tracer does this
    lease(srv, MAC_A, now=1.0)
    srv.handle(
        client(MAC_B, "request", options=[("server_id", SERVER), ("requested_addr", "10.0.2.15")]),
        MAC_B,
        2.0,
    )
    srv.handle(
        client(MAC_B, "request", options=[("server_id", SERVER), ("requested_addr", "10.9.9.9")]),
        MAC_B,
        2.5,
    )
    srv.handle(client(MAC_B, "request", options=[("server_id", "10.0.2.99")]), MAC_B, 3.0)
    decline = [("server_id", SERVER), ("requested_addr", "10.0.2.15")]
    srv.handle(client(MAC_A, "decline", options=decline), MAC_A, 4.0)
    lease(srv, MAC_A, now=5.0)
    srv.handle(
        client(MAC_A, "release", ciaddr="10.0.2.16", options=[("server_id", SERVER)]), MAC_A, 6.0
    )
    srv.handle(b"\x01" * 10, MAC_A, 7.0)
    a, b = MAC_A.hex(":"), MAC_B.hex(":")
    assert [(r[0], r[1], r[4].get("address"), r[4].get("reason")) for r in rec.records] == [
        (1.0, "dhcp.offer", "10.0.2.15", None),
        (1.0, "dhcp.ack", "10.0.2.15", None),
        (2.0, "dhcp.nak", "10.0.2.15", "is leased to another client"),
        (2.5, "dhcp.nak", "10.9.9.9", "is not in the pool"),
        (3.0, "dhcp.ignored", None, "dhcp-other-server"),
        (4.0, "dhcp.decline", "10.0.2.15", None),
        (5.0, "dhcp.offer", "10.0.2.16", None),
        (5.0, "dhcp.ack", "10.0.2.16", None),
        (6.0, "dhcp.release", "10.0.2.16", None),
        (7.0, "dhcp.ignored", None, "dhcp-truncated"),
    ]
    assert [r[4].get("mac") for r in rec.records[:4]] == [a, a, b, b]
    assert rec.records[1][4]["lease_time"] == 86400
    assert rec.records[2][3] == f"NAK to {b}: 10.0.2.15 is leased to another client"


# ------------------------------------------------------------ the format
def test_json_lines_have_the_common_keys_and_documented_event_names():
    stream = io.StringIO()
    s = Script()
    s.stack.set_tracer(JsonTracer(stream))
    conn = s.handshake()
    s.tcp.send(conn, b"data", 1.1)
    s.stack.frames_to_send(1.1)
    s.tick(1.1 + conn.rto)
    s.stack.receive_frame(b"\0" * 5, 3.0)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) >= 6
    for line in lines:
        assert list(line)[:4] == ["t", "event", "flow", "msg"]
        assert line["event"] in documented_events(), line
    assert lines[0] == {
        "t": 1.0,
        "event": "tcp.state",
        "flow": FLOW,
        "msg": f"CLOSED -> LISTEN on segment S seq={GISN} ack=0 len=0",
        "old": "CLOSED",
        "new": "LISTEN",
        "cause": f"segment S seq={GISN} ack=0 len=0",
        "rfc": "RFC 9293 3.10.7.2 (SYN in LISTEN)",
    }


def test_every_event_name_in_the_source_is_documented():
    """The names are literals at the calls (the schema is stable): each
    one in pyslirp/ must have its section in docs/trace.md, and back."""
    names = set()
    for path in (REPO / "pyslirp").rglob("*.py"):
        if path.name == "record.py":  # its "tcp.send"... name recorded calls, not events
            continue
        text = path.read_text()
        names |= set(re.findall(r'"((?:tcp|udp|icmp|dns|dhcp|arp|nd|memory)\.[a-z-]+)"', text))
    names.add("drop")
    assert names - documented_events() == set()
    assert documented_events() - names == set()


# ------------------------------------------------------------ end to end
GUEST_CLIENT = """
import socket, sys
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=20)
print(s.getsockname()[1], flush=True)
data = b""
while True:
    chunk = s.recv(100)
    if not chunk:
        break
    data += chunk
s.close()
assert data == b"hello from the host", data
"""

# An IPv4 header cut after 12 bytes (the stack drops it: ipv4-truncated),
# marked so that the pcap frame can be recognised.
RAW_SENDER = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
mac = s.getsockname()[4]  # (ifname, proto, pkttype, hatype, addr)
head = bytes.fromhex("52550a000202") + mac + b"\\x08\\x00"
frame = head + bytes.fromhex(sys.argv[1])
s.send(frame)
print(frame.hex())
"""
TRUNCATED_IPV4 = "4500" + b"trace-test".hex()


def _host_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"hello from the host")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.e2e
def test_forwarder_trace_names_flows_as_the_log_and_drops_by_pcap_frame(tmp_path):
    import sys

    from scapy.utils import rdpcap

    from tests import harness
    from tests.dnsserver import DnsServer
    from tests.test_dns import dead_port

    trace, pcap = tmp_path / "trace.jsonl", tmp_path / "frames.pcap"
    server, thread = _host_server()
    port = server.getsockname()[1]
    try:
        with (
            DnsServer(records={"hello.test.": "192.0.2.9"}) as upstream,
            harness.forwarder(
                "--log-level=info",  # the connection's log line
                "--trace",
                str(trace),
                "--pcap",
                str(pcap),
                dns_upstreams=[f"127.0.0.1:{dead_port()}", upstream.address],
            ) as fwd,
        ):
            dhcp = fwd.run(
                ["udhcpc", "-i", "tap0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", "/bin/true"],
                timeout=30,
            )
            assert dhcp.returncode == 0, dhcp.stderr
            dig = fwd.run(["dig", "@10.0.2.3", "+tries=1", "+time=5", "hello.test"], timeout=20)
            assert "status: NOERROR" in dig.stdout, dig.stdout + dig.stderr
            client = fwd.run([sys.executable, "-c", GUEST_CLIENT, str(port)], timeout=30)
            assert client.returncode == 0, client.stderr
            guest_port = int(client.stdout.split()[0])
            raw = fwd.run([sys.executable, "-c", RAW_SENDER, TRUNCATED_IPV4], timeout=30)
            assert raw.returncode == 0, raw.stderr
            sent = bytes.fromhex(raw.stdout.strip())
            # The guest's kernel ends the connection in TIME-WAIT or after
            # our FIN's ACK; give the forwarder a moment to read the last frames.
            fwd.run(["ping", "-c", "1", "-W", "5", "10.0.2.2"], timeout=10)
            log = fwd.log()
    finally:
        server.close()
        thread.join(timeout=5)

    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    for line in lines:
        assert list(line)[:4] == ["t", "event", "flow", "msg"], line
        assert isinstance(line["t"], float | int) and isinstance(line["msg"], str)
        assert line["event"] in documented_events(), line
    times = [line["t"] for line in lines]
    assert times == sorted(times)

    # The TCP connection: the same name as in the log, transitions in order.
    flow = f"tcp 10.0.2.100:{guest_port}>10.0.2.2:{port}"
    assert flow in log, log
    mine = [line for line in lines if line["flow"] == flow]
    states = [(line["old"], line["new"]) for line in mine if line["event"] == "tcp.state"]
    assert states[:3] == [
        ("CLOSED", "LISTEN"),
        ("LISTEN", "SYN-RECEIVED"),
        ("SYN-RECEIVED", "ESTABLISHED"),
    ], states
    assert all(a[1] == b[0] for a, b in zip(states, states[1:], strict=False)), states
    assert ("ESTABLISHED", "FIN-WAIT-1") in states  # the host closed first
    assert states[-1][1] in ("TIME-WAIT", "CLOSED"), states
    connects = [line for line in mine if line["event"] == "tcp.host-connect"]
    assert [(c["result"], c["host"]) for c in connects] == [("connected", f"127.0.0.1:{port}")]

    # DHCP and DNS decisions.
    events = [line["event"] for line in lines]
    offer = next(line for line in lines if line["event"] == "dhcp.offer")
    ack = next(line for line in lines if line["event"] == "dhcp.ack")
    assert offer["address"] == ack["address"] == "10.0.2.15"
    assert events.index("dhcp.offer") < events.index("dhcp.ack")
    dns = [line for line in lines if line["event"].startswith("dns.")]
    assert [(d["event"], d.get("attempt"), d.get("reason")) for d in dns] == [
        ("dns.upstream", 1, None),
        ("dns.failover", None, "upstream-unreachable"),
        ("dns.upstream", 2, None),
        ("dns.answer", None, None),
    ], dns
    assert {d["question"] for d in dns} == {"hello.test. A"}
    assert dns[-1]["upstream"] == upstream.address and dns[-1]["rcode"] == 0

    # The drop names the frame's index in the pcap (1-based).
    (drop,) = [
        line for line in lines if line["event"] == "drop" and line["reason"] == "ipv4-truncated"
    ]
    frames = rdpcap(str(pcap))
    assert isinstance(drop["frame"], int) and 1 <= drop["frame"] <= len(frames)
    assert bytes(frames[drop["frame"] - 1]) == sent
