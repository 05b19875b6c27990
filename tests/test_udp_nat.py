"""UDP NAT through the real loop and real host sockets on loopback."""

import socket

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.l2 import ARP, Ether

from tests.inprocess import InProcessNetwork

GUEST_MAC = "02:00:00:00:00:01"
GW_MAC = "52:55:0a:00:02:02"
GUEST = "10.0.2.100"


def guest_udp(dst: str, dport: int, payload: bytes, sport: int = 40000, **ip_kw) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst=dst, **ip_kw)
        / UDP(sport=sport, dport=dport)
        / payload
    )


def is_udp(frame: bytes) -> bool:
    pkt = Ether(frame)
    return UDP in pkt and ICMP not in pkt


def is_icmp(frame: bytes) -> bool:
    return ICMP in Ether(frame)


def test_guest_datagram_reaches_host_loopback_and_reply_returns(echo_server):
    port = echo_server.getsockname()[1]
    with InProcessNetwork() as net:
        net.send(guest_udp("10.0.2.2", port, b"hello"))
        data, peer = echo_server.recvfrom(100)
        assert data == b"hello"
        echo_server.sendto(b"world!", peer)
        reply = Ether(net.receive(predicate=is_udp))
        assert reply[Ether].dst == GUEST_MAC and reply[Ether].src == GW_MAC
        assert reply[IP].src == "10.0.2.2" and reply[IP].dst == GUEST
        assert (reply[UDP].sport, reply[UDP].dport) == (port, 40000)
        assert bytes(reply[UDP].payload) == b"world!"
        # checksums as sent must verify: rebuild and compare
        raw = bytes(reply)
        fixed = Ether(raw)
        del fixed[IP].chksum, fixed[UDP].chksum
        assert bytes(fixed) == raw
        # the same guest endpoint keeps its host port (endpoint-independent mapping)
        net.send(guest_udp("10.0.2.2", port, b"again"))
        data, peer2 = echo_server.recvfrom(100)
        assert data == b"again" and peer2 == peer


def test_large_datagram_fragmented_both_ways(echo_server):
    port = echo_server.getsockname()[1]
    payload = bytes(range(256)) * 31 + b"x" * 64  # 8000 bytes
    with InProcessNetwork() as net:
        frags = [
            bytes(f)
            for f in (
                IP(src=GUEST, dst="10.0.2.2", id=77) / UDP(sport=40001, dport=port) / payload
            ).fragment(1480)
        ]
        assert len(frags) == 6
        for frag in reversed(frags):  # out of order on purpose
            net.send(bytes(Ether(src=GUEST_MAC, dst=GW_MAC, type=0x0800)) + frag)
        data, peer = echo_server.recvfrom(9000)
        assert data == payload
        echo_server.sendto(payload, peer)
        pieces = []
        for _ in range(6):
            frame = net.receive(predicate=lambda f: IP in Ether(f))
            assert frame is not None and len(frame) <= 1514
            pieces.append(Ether(frame)[IP])
        assert net.receive(timeout=0.2) is None
        offsets = sorted(p.frag * 8 for p in pieces)
        assert offsets == [0, 1480, 2960, 4440, 5920, 7400]
        whole = b"".join(bytes(p.payload) for p in sorted(pieces, key=lambda p: p.frag))
        udp = UDP(whole)
        assert udp.dport == 40001 and bytes(udp.payload) == payload


def test_closed_host_port_gives_port_unreachable():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with InProcessNetwork() as net:
        net.send(guest_udp("10.0.2.2", port, b"anyone?", sport=40002))
        icmp = Ether(net.receive(predicate=is_icmp))
        assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 3)
        assert icmp[IP].dst == GUEST and icmp[IP].src == "10.0.2.2"
        assert icmp[IPerror].dst == "10.0.2.2"
        assert (icmp[UDPerror].sport, icmp[UDPerror].dport) == (40002, port)


def test_disable_host_loopback_refuses_gateway(echo_server):
    port = echo_server.getsockname()[1]
    with InProcessNetwork(disable_host_loopback=True) as net:
        net.send(guest_udp("10.0.2.2", port, b"blocked"))
        icmp = Ether(net.receive(predicate=is_icmp))
        assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 0)
        echo_server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            echo_server.recvfrom(100)


def test_other_address_in_virtual_network_is_host_unreachable():
    with InProcessNetwork() as net:
        net.send(guest_udp("10.0.2.50", 9, b"nobody"))
        icmp = Ether(net.receive(predicate=is_icmp))
        assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 1)


def test_flow_limit_refuses_new_flows_and_keeps_old(echo_server):
    port = echo_server.getsockname()[1]
    with InProcessNetwork(max_udp_flows=2) as net:
        for sport in (41000, 41001):
            net.send(guest_udp("10.0.2.2", port, b"x", sport=sport))
            echo_server.recvfrom(10)
        net.send(guest_udp("10.0.2.2", port, b"third", sport=41002))
        icmp = Ether(net.receive(predicate=is_icmp))
        assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 13)
        net.send(guest_udp("10.0.2.2", port, b"old flow", sport=41000))
        assert echo_server.recvfrom(10)[0] == b"old flow"
        assert len(net.loop.udp.flows) == 2


def test_idle_flows_expire_and_close_their_sockets(echo_server):
    port = echo_server.getsockname()[1]
    with InProcessNetwork(udp_idle_timeout=0.3) as net:
        net.send(guest_udp("10.0.2.2", port, b"x", sport=42000))
        echo_server.recvfrom(10)
        assert len(net.loop.udp.flows) == 1
        sock = next(iter(net.loop.udp.flows.values())).sock
        net.receive(timeout=1.8)  # let the loop sweep
        assert len(net.loop.udp.flows) == 0
        assert sock.fileno() == -1


def test_arp_for_gateway_answered_through_loop():
    with InProcessNetwork() as net:
        net.send(
            bytes(
                Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst="10.0.2.2")
            )
        )
        reply = Ether(net.receive())
        assert reply[ARP].op == 2 and reply[ARP].hwsrc == GW_MAC and reply[ARP].psrc == "10.0.2.2"


def test_consumers_see_datagrams_first_and_pass_on_the_rest(echo_server):
    """UdpNat.add_consumer: a consumer that returns True keeps the datagram
    (no host flow, nothing sent); one that returns False leaves it to the NAT."""
    port = echo_server.getsockname()[1]
    with InProcessNetwork() as net:
        seen = []

        def consumer(event, now):
            seen.append((event.src_port, bytes(event.payload)))
            return event.src_port == 41000

        net.loop.udp.add_consumer(consumer)
        net.send(guest_udp("10.0.2.2", port, b"mine", sport=41000))
        net.send(guest_udp("10.0.2.2", port, b"theirs", sport=41001))
        data, _peer = echo_server.recvfrom(100)
        assert data == b"theirs"  # "mine" never reached the host
        assert seen == [(41000, b"mine"), (41001, b"theirs")]
        assert [key[1] for key in net.loop.udp.flows] == [41001]
        with pytest.raises(TimeoutError):
            echo_server.settimeout(0.3)
            echo_server.recvfrom(100)
