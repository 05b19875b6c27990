"""TCP NAT through the real loop and real host sockets on loopback: what a
guest SYN becomes on the host, with limits set through NetworkConfig."""

import socket
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror
from scapy.layers.l2 import Ether

from tests.inprocess import InProcessNetwork

GUEST_MAC = "02:00:00:00:00:01"
GW_MAC = "52:55:0a:00:02:02"
GUEST = "10.0.2.100"
ISN = 5000


def guest_syn(dst: str, dport: int, sport: int = 40000, seq: int = ISN) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst=dst)
        / TCP(sport=sport, dport=dport, seq=seq, flags="S", options=[("MSS", 1460)])
    )


def tcp_or_icmp(frame: bytes) -> bool:
    pkt = Ether(frame)
    return TCP in pkt or ICMP in pkt


def accepted_within(listener: socket.socket, seconds: float) -> list:
    listener.settimeout(0.05)
    accepted = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            accepted.append(listener.accept()[0])
        except TimeoutError:
            pass
    return accepted


def test_repeated_syns_while_connecting_make_one_host_connection():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        with InProcessNetwork() as net:
            for _ in range(3):
                net.send(guest_syn("10.0.2.2", port))
            reply = Ether(net.receive(predicate=tcp_or_icmp))
            assert str(reply[TCP].flags) == "SA" and reply[TCP].ack == ISN + 1
            accepted = accepted_within(listener, 0.5)
            assert len(accepted) == 1
            # SYNs that came after the answer get the same SYN-ACK again.
            for _ in range(3):
                frame = net.receive(timeout=0.3, predicate=tcp_or_icmp)
                if frame is None:
                    break
                again = Ether(frame)[TCP]
                assert (str(again.flags), again.seq, again.ack) == ("SA", reply[TCP].seq, ISN + 1)
            for sock in accepted:
                sock.close()
            assert net.loop.tcp.counters["connections-opened"] == 1
    finally:
        listener.close()


def test_host_connect_timeout_becomes_icmp_host_unreachable():
    # A listener that never accepts and whose queue is full drops SYNs: the
    # host connect hangs until our timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = []
    for _ in range(2):  # non-blocking: the second one hangs like ours will
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        filler.append(sock)
    time.sleep(0.1)
    try:
        with InProcessNetwork(tcp_connect_timeout=0.5) as net:
            start = time.monotonic()
            net.send(guest_syn("10.0.2.2", port))
            reply = Ether(net.receive(timeout=3, predicate=tcp_or_icmp))
            elapsed = time.monotonic() - start
            assert ICMP in reply, reply.summary()
            assert (reply[ICMP].type, reply[ICMP].code) == (3, 1)
            assert reply[IP].src == "10.0.2.2" and reply[IP].dst == GUEST
            quoted = reply[IPerror]
            assert quoted.src == GUEST and quoted.dst == "10.0.2.2"
            assert reply[TCPerror].seq == ISN and reply[TCPerror].dport == port
            assert 0.4 < elapsed < 2.5
            assert net.loop.tcp.counters["connections-timed-out"] == 1
            assert net.loop.tcp.flows == set()
    finally:
        for sock in filler:
            sock.close()
        listener.close()


def test_connection_limit_refuses_with_rst_and_keeps_the_others():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        with InProcessNetwork(tcp_max_connections=2) as net:
            flags = {}
            for sport in (40001, 40002, 40003):
                net.send(guest_syn("10.0.2.2", port, sport=sport))
                reply = Ether(net.receive(predicate=tcp_or_icmp))
                flags[reply[TCP].dport] = str(reply[TCP].flags)
            assert flags == {40001: "SA", 40002: "SA", 40003: "RA"}
            # The stack's table has the same bound and answers first.
            limited = net.loop.stack.tcp.counters["tcp-refused-table-full"]
            assert limited + net.loop.tcp.counters["connections-limited"] == 1
            accepted = accepted_within(listener, 0.3)
            assert len(accepted) == 2
            for sock in accepted:
                sock.close()
    finally:
        listener.close()


def test_disable_dns_refuses_tcp_to_the_dns_address():
    with InProcessNetwork(disable_dns=True) as net:
        net.send(guest_syn("10.0.2.3", 53))
        reply = Ether(net.receive(predicate=tcp_or_icmp))
        assert str(reply[TCP].flags) == "RA" and reply[IP].src == "10.0.2.3"


def test_closed_port_is_rst_and_loopback_disabled_is_icmp_net_unreachable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with InProcessNetwork() as net:
        net.send(guest_syn("10.0.2.2", closed))
        reply = Ether(net.receive(predicate=tcp_or_icmp))
        assert str(reply[TCP].flags) == "RA" and reply[TCP].ack == ISN + 1
        assert net.loop.tcp.flows == set()
    with InProcessNetwork(disable_host_loopback=True) as net:
        net.send(guest_syn("10.0.2.2", closed))
        reply = Ether(net.receive(predicate=tcp_or_icmp))
        assert (reply[ICMP].type, reply[ICMP].code) == (3, 0)


def test_thousands_of_pipelined_dns_queries_over_tcp_answered_without_upstream():
    """With no upstream every answer (SERVFAIL) comes back from inside the
    resolve call; thousands pipelined must not nest calls or stop the loop."""
    import struct

    query = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x01a\x07example\x00\x00\x01\x00\x01"
    stream = (struct.pack("!H", len(query)) + query) * 3000
    with InProcessNetwork(mtu=65520) as net:
        net.send(
            bytes(
                Ether(src=GUEST_MAC, dst=GW_MAC)
                / IP(src=GUEST, dst="10.0.2.3")
                / TCP(
                    sport=40000,
                    dport=53,
                    seq=ISN,
                    flags="S",
                    window=65535,
                    options=[("MSS", 1460), ("WScale", 7)],
                )
            )
        )
        syn_ack = Ether(net.receive(predicate=tcp_or_icmp))[TCP]
        assert str(syn_ack.flags) == "SA"
        ours = syn_ack.seq + 1
        seq = ISN + 1
        for i in range(0, len(stream), 60000):  # ~2000 queries per segment
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST, dst="10.0.2.3")
                    / TCP(sport=40000, dport=53, seq=seq + i, ack=ours, flags="A", window=65535)
                    / stream[i : i + 60000]
                )
            )
        answered = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and answered < 3000:
            # made(): the loop's thread makes the DNS service on first use,
            # and loop.dns from this thread could race it.
            dns = net.loop.made("dns")
            answered = dns.counters["dns-servfail-no-upstream"] if dns is not None else 0
            time.sleep(0.05)
        assert answered == 3000
        data = Ether(
            net.receive(predicate=lambda f: TCP in Ether(f) and len(Ether(f)[TCP].payload))
        )
        assert bytes(data[TCP].payload)[:4] == struct.pack("!HH", len(query), 1)
    assert net.error is None


def _handshake(net, port: int, sport: int):
    """The guest's SYN and ACK; returns (our ISN + 1, the accepted host socket)."""
    net.send(guest_syn("10.0.2.2", port, sport=sport))
    reply = Ether(net.receive(predicate=has_flag(0x12, sport)))[TCP]
    ours = reply.seq + 1
    net.send(guest_segment(port, sport, ISN + 1, ours, "A"))
    return ours


def guest_segment(dport: int, sport: int, seq: int, ack: int, flags: str, data: bytes = b""):
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst="10.0.2.2")
        / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=65535)
        / data
    )


def has_flag(bits: int, guest_port: int):
    """A predicate: a segment to ``guest_port`` with all of ``bits`` set."""

    def predicate(frame: bytes) -> bool:
        pkt = Ether(frame)
        return TCP in pkt and pkt[TCP].dport == guest_port and pkt[TCP].flags & bits == bits

    return predicate


def test_ended_connections_leave_no_reference_cycle():
    """A connection and its host flow point at each other until both are
    done; then the link goes, so that reference counting frees them rather
    than the cycle collector (connect/close runs spent a few per cent of the
    CPU in it), and a flow holds no method bound to itself. Four endings:
    guest FIN first, host close first (TIME-WAIT here), guest RST, host RST."""
    import gc
    import types

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(2)
    port = listener.getsockname()[1]
    pairs = []
    try:
        with InProcessNetwork() as net:
            table = net.loop.stack.tcp.connections
            for i, ending in enumerate(("guest-fin", "host-close", "guest-rst", "host-rst")):
                sport = 41000 + i
                ours = _handshake(net, port, sport)
                host, _ = listener.accept()
                host.settimeout(2)
                conn = next(c for c in list(table.values()) if c.remote_port == sport)
                pairs.append((ending, conn, conn.user))
                if ending == "guest-fin":
                    net.send(guest_segment(port, sport, ISN + 1, ours, "FA"))
                    assert host.recv(10) == b""
                    host.close()
                    fin = Ether(net.receive(predicate=has_flag(0x01, sport)))[TCP]
                    net.send(guest_segment(port, sport, ISN + 2, fin.seq + 1, "A"))
                elif ending == "host-close":
                    host.close()
                    fin = Ether(net.receive(predicate=has_flag(0x01, sport)))[TCP]
                    net.send(guest_segment(port, sport, ISN + 1, fin.seq + 1, "FA"))
                elif ending == "guest-rst":
                    net.send(guest_segment(port, sport, ISN + 1, ours, "R"))
                    with pytest.raises(ConnectionResetError):  # a reset becomes a reset
                        host.recv(10)
                    host.close()
                else:
                    host.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    host.close()
                    assert net.receive(predicate=has_flag(0x04, sport)) is not None
            deadline = time.monotonic() + 5
            while net.loop.tcp.flows and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not net.loop.tcp.flows
            for ending, conn, flow in pairs:
                assert flow is not None and flow.closed, ending
                assert conn.user is None, ending
                bound = [r for r in gc.get_referents(flow) if isinstance(r, types.MethodType)]
                assert bound == [], ending
    finally:
        listener.close()


def test_tcp_settings_have_one_set_of_defaults_and_reach_the_layer():
    """NetworkConfig's tcp_* fields are the stack's TcpConfig through one
    mapping (NetworkConfig.tcp_config): the same defaults on both sides, and
    a setting given to the network is the one the TCP layer runs with."""
    from pyslirp.config import NetworkConfig
    from pyslirp.stack.tcp_layer import TcpConfig

    assert NetworkConfig().tcp_config() == TcpConfig()
    settings = dict(
        tcp_max_connections=7,
        tcp_receive_buffer=4096,
        tcp_send_buffer=8192,
        tcp_time_wait_timeout=5.0,
        tcp_keepalive_idle=9000.0,
        tcp_max_retransmits=3,
        tcp_max_rto=2.0,
        tcp_verify_checksum=False,
    )
    with InProcessNetwork(**settings) as net:
        layer = net.loop.stack.tcp.config
        assert [getattr(layer, name[4:]) for name in settings] == list(settings.values())


def test_a_lingering_flow_sets_its_deadline_though_its_event_is_quiet():
    """TcpConnectionClosed (like TcpConnectRequested) is a quiet event, so
    the loop does not ask every service for its deadline per connection; a
    flow that lingers (the host has not taken the guest's last bytes) must
    then say itself that the TCP NAT has a deadline, else the loop could
    sleep past it (the connect timeout's test covers the other one)."""
    import random
    import types

    from pyslirp.config import NetworkConfig
    from pyslirp.nat.backend import build_loop
    from pyslirp.nat.tcp import TcpFlow

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.create_server(("127.0.0.1", 0))
    host = socket.create_connection(listener.getsockname())
    config = NetworkConfig(random=random.Random(1), tcp_time_wait_timeout=7.0)
    loop = build_loop(config, ours.fileno())
    try:
        nat = loop.tcp
        conn = types.SimpleNamespace(user=None, state=None)
        flow = TcpFlow(nat, conn, host, ("127.0.0.1", 1))
        flow.connecting = False
        conn.user = flow
        nat.flows.add(flow)
        told = []
        loop.timers_changed = lambda: told.append(True)
        nat.on_closed(types.SimpleNamespace(conn=conn), now=100.0)
        assert not flow.closed  # the host end is still open: it lingers
        assert told and nat.next_deadline() == 107.0
    finally:
        loop.close()
        host.close()
        listener.close()
        ours.close()
        theirs.close()


def test_a_sink_that_meets_a_reset_keeps_the_first_error():
    """TcpFlow.take, the stack's sink: a host socket reset by its peer takes
    nothing and keeps the ECONNRESET it met, for write_host to report; the
    retry write_host makes meets only EPIPE."""
    import struct

    from pyslirp.nat.tcp import TcpFlow

    class Loop:
        now = staticmethod(time.monotonic)

    class Nat:
        loop = Loop

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        server, _ = listener.accept()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()  # a RST toward the client
        time.sleep(0.05)
        flow = TcpFlow(Nat, None, client, ("127.0.0.1", 0))
        assert flow.take(b"x" * 100) == 0
        assert isinstance(flow.error, ConnectionResetError)
        with pytest.raises(BrokenPipeError):
            client.send(b"x")
    finally:
        client.close()
        listener.close()
