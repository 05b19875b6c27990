"""Port forwarding (pyslirp/nat/forward.py): in-process through the real loop
with a fake TAP, then end to end with the kernel as the guest.

The end-to-end tests that need a client on a non-loopback address run the
forwarder inside a test-made "host" namespace joined by a veth pair to a
"client" namespace; nothing leaves the namespaces the test makes.
"""

import contextlib
import socket
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from pyslirp.nat.forward import Forwards, list_connections, validate
from tests.inprocess import InProcessNetwork

GUEST_MAC = "02:00:00:00:00:01"
GW_MAC = "52:55:0a:00:02:02"
GUEST = "10.0.2.100"
GW = "10.0.2.2"


# ----------------------------------------------------------- helpers
def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_udp_to_guest(frame: bytes) -> bool:
    pkt = Ether(frame)
    return UDP in pkt and pkt[IP].dst == GUEST


def answer_arp(net: InProcessNetwork) -> None:
    """The stack asks for the guest's MAC before its first frame to it."""
    frame = net.receive(predicate=lambda f: ARP in Ether(f))
    assert frame is not None, "no ARP request for the guest"
    request = Ether(frame)[ARP]
    assert request.pdst == GUEST
    net.send(
        bytes(
            Ether(src=GUEST_MAC, dst=GW_MAC)
            / ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST, hwdst=request.hwsrc, pdst=request.psrc)
        )
    )


def guest_udp(dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst=dst)
        / UDP(sport=sport, dport=dport)
        / payload
    )


@contextlib.contextmanager
def network_with_forwards(*forwards, **config_kw):
    net = InProcessNetwork(**config_kw)
    table = Forwards(net.loop)
    net.loop.forwards = table
    net.loop.services.append(table)
    try:
        ids = [table.add(*f) for f in forwards]
    except BaseException:
        net.loop.close()
        net._close_fds()
        raise
    with net:
        yield net, table, ids


# ------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "args, word",
    [
        (("sctp", "0.0.0.0", 1, GUEST, 1), "proto"),
        (("tcp", "::", 1, GUEST, 1), "host_addr"),
        (("tcp", "1.2.3", 1, GUEST, 1), "host_addr"),
        (("tcp", "0.0.0.0", 0, GUEST, 1), "host_port"),
        (("tcp", "0.0.0.0", 65536, GUEST, 1), "host_port"),
        (("tcp", "0.0.0.0", True, GUEST, 1), "host_port"),
        (("udp", "0.0.0.0", 1, GUEST, 0), "guest_port"),
        (("udp", "0.0.0.0", 1, "10.0.3.1", 1), "guest_addr"),
        (("udp", "0.0.0.0", 1, GW, 1), "guest_addr"),
        (("udp", "0.0.0.0", 1, "10.0.2.255", 1), "guest_addr"),
        (("udp", "0.0.0.0", 1, "x", 1), "guest_addr"),
    ],
)
def test_validate_names_the_bad_argument(args, word):
    from pyslirp.nat.config import NetworkConfig

    with pytest.raises(ValueError) as info:
        validate(NetworkConfig(), *args)
    assert str(info.value).split()[0] == word


def test_ids_from_one_never_reused_and_busy_port_is_oserror():
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        port = free_port()
        with network_with_forwards(("udp", "127.0.0.1", port, GUEST, 7)) as (net, table, ids):
            assert ids == [1]
            with pytest.raises(OSError) as info:
                table.add("udp", "127.0.0.1", busy.getsockname()[1], GUEST, 7)
            assert info.value.errno == 98  # EADDRINUSE
            tcp_port = free_port(socket.SOCK_STREAM)
            assert table.add("tcp", "127.0.0.1", tcp_port, GUEST, 80) == 2
            table.remove(1)
            with pytest.raises(KeyError):
                table.remove(1)
            assert table.add("udp", "127.0.0.1", port, GUEST, 7) == 3
            assert table.entries() == [
                {
                    "id": 2,
                    "proto": "tcp",
                    "host_addr": "127.0.0.1",
                    "host_port": tcp_port,
                    "guest_addr": GUEST,
                    "guest_port": 80,
                },
                {
                    "id": 3,
                    "proto": "udp",
                    "host_addr": "127.0.0.1",
                    "host_port": port,
                    "guest_addr": GUEST,
                    "guest_port": 7,
                },
            ]
    finally:
        busy.close()


# ------------------------------------------------------------ UDP in-process
def test_udp_forward_per_client_flows_and_replies_go_back():
    port = free_port()
    with network_with_forwards(("udp", "127.0.0.1", port, GUEST, 7000)) as (net, table, _):
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.2", 0))
            a.settimeout(2)
            b.settimeout(2)
            a.sendto(b"from a", ("127.0.0.1", port))
            answer_arp(net)
            got_a = Ether(net.receive(predicate=is_udp_to_guest))
            # A loopback client appears as the gateway, with its own port.
            assert (got_a[IP].src, got_a[UDP].sport) == (GW, a.getsockname()[1])
            assert got_a[UDP].dport == 7000 and bytes(got_a[UDP].payload) == b"from a"
            b.sendto(b"from b", ("127.0.0.1", port))
            got_b = Ether(net.receive(predicate=is_udp_to_guest))
            assert got_b[IP].src == GW and bytes(got_b[UDP].payload) == b"from b"
            # The guest answers each; each answer reaches its own client from the
            # forward's host port.
            net.send(guest_udp(GW, 7000, got_b[UDP].sport, b"to b"))
            net.send(guest_udp(GW, 7000, got_a[UDP].sport, b"to a"))
            assert a.recvfrom(100) == (b"to a", ("127.0.0.1", port))
            assert b.recvfrom(100) == (b"to b", ("127.0.0.1", port))
            # Flows are listed with their bytes.
            rows = [r for r in list_connections(net.loop, net.loop.now()) if "forward" in r]
            assert sorted(
                (r["host"], r["bytes_to_guest"], r["bytes_from_guest"]) for r in rows
            ) == [
                (f"127.0.0.1:{a.getsockname()[1]}", 6, 4),
                (f"127.0.0.2:{b.getsockname()[1]}", 6, 4),
            ]
        finally:
            a.close()
            b.close()


def test_udp_forward_same_port_from_two_loopback_addresses_gets_a_second_port():
    port = free_port()
    with network_with_forwards(("udp", "0.0.0.0", port, GUEST, 7000)) as (net, table, _):
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.3", a.getsockname()[1]))
            b.settimeout(2)
            a.sendto(b"1", ("127.0.0.1", port))
            answer_arp(net)
            first = Ether(net.receive(predicate=is_udp_to_guest))
            b.sendto(b"2", ("127.0.0.1", port))
            second = Ether(net.receive(predicate=is_udp_to_guest))
            assert first[UDP].sport == a.getsockname()[1]
            assert second[IP].src == GW and second[UDP].sport != first[UDP].sport
            net.send(guest_udp(GW, 7000, second[UDP].sport, b"back"))
            assert b.recvfrom(10)[0] == b"back"
        finally:
            a.close()
            b.close()


def test_udp_forward_flows_expire_and_removal_stops_it():
    port = free_port()
    with network_with_forwards(("udp", "127.0.0.1", port, GUEST, 7000), udp_idle_timeout=0.3) as (
        net,
        table,
        ids,
    ):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.sendto(b"x", ("127.0.0.1", port))
            answer_arp(net)
            assert net.receive(predicate=is_udp_to_guest) is not None
            deadline = time.monotonic() + 5
            while table.udp_clients and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not table.udp_clients and table.counters["udp-flows-expired"] == 1
            # After expiry the guest's reply to the old client is NAT traffic, not ours.
            table.remove(ids[0])
            c.sendto(b"y", ("127.0.0.1", port))  # nobody listens any more
            assert net.receive(timeout=0.3, predicate=is_udp_to_guest) is None
        finally:
            c.close()


def test_udp_forward_flow_limit_refuses_new_clients():
    port = free_port()
    with network_with_forwards(("udp", "127.0.0.1", port, GUEST, 7000), max_udp_flows=2) as (
        net,
        table,
        _,
    ):
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for i, c in enumerate(clients):
                c.sendto(bytes([i]), ("127.0.0.1", port))
                if i == 0:
                    answer_arp(net)
            got = [net.receive(timeout=0.5, predicate=is_udp_to_guest) for _ in range(3)]
            assert sum(g is not None for g in got) == 2
            assert table.counters["udp-flows-refused"] == 1
        finally:
            for c in clients:
                c.close()


# ------------------------------------------------------------ TCP in-process
def test_tcp_forward_opens_toward_the_guest_and_relays():
    port = free_port(socket.SOCK_STREAM)
    with network_with_forwards(("tcp", "127.0.0.1", port, GUEST, 8080)) as (net, table, _):
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            answer_arp(net)
            syn = Ether(net.receive(predicate=lambda f: TCP in Ether(f)))
            assert syn[TCP].flags == "S" and syn[TCP].dport == 8080
            assert (syn[IP].src, syn[TCP].sport) == (GW, client.getsockname()[1])
            seq = 1000
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST, dst=GW)
                    / TCP(sport=8080, dport=syn[TCP].sport, flags="SA", seq=seq, ack=syn.seq + 1)
                )
            )
            ack = Ether(net.receive(predicate=lambda f: TCP in Ether(f)))
            assert ack[TCP].flags == "A"
            client.sendall(b"hello guest")
            data = Ether(
                net.receive(predicate=lambda f: TCP in Ether(f) and len(Ether(f)[TCP].payload))
            )
            assert bytes(data[TCP].payload) == b"hello guest"
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST, dst=GW)
                    / TCP(
                        sport=8080,
                        dport=syn[TCP].sport,
                        flags="PA",
                        seq=seq + 1,
                        ack=data.seq + len(data[TCP].payload),
                    )
                    / b"hello host"
                )
            )
            assert client.recv(100) == b"hello host"
            rows = [r for r in list_connections(net.loop, net.loop.now()) if r["proto"] == "tcp"]
            assert len(rows) == 1 and rows[0]["forward"] == 1
            assert rows[0]["state"] == "ESTABLISHED"
            assert rows[0]["bytes_from_guest"] == 10 and rows[0]["bytes_to_guest"] == 11
        finally:
            client.close()


def test_tcp_forward_refused_by_guest_resets_the_client():
    port = free_port(socket.SOCK_STREAM)
    with network_with_forwards(("tcp", "127.0.0.1", port, GUEST, 8080)) as (net, table, _):
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            answer_arp(net)
            syn = Ether(net.receive(predicate=lambda f: TCP in Ether(f)))
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST, dst=GW)
                    / TCP(sport=8080, dport=syn[TCP].sport, flags="RA", seq=0, ack=syn.seq + 1)
                )
            )
            with pytest.raises(ConnectionResetError):
                client.recv(10)
        finally:
            client.close()
