"""The ICMP echo relay through host ping sockets.

Real ping sockets, but only inside namespaces these tests make: a "host"
namespace (where the relay's sockets live, with net.ipv4.ping_group_range
opened) joined by a veth pair to a "peer" namespace that answers pings as
10.200.0.2 and routes like a small router (an unreachable route, and a
forwarding route where a TTL of 1 expires). The relay tests switch this
thread into the host namespace only while they open sockets there (setns),
and drive the relay with a tiny selector loop and a float clock; the
end-to-end tests run the real forwarder inside the host namespace and the
Linux kernel's ping as the guest.

Nothing here sends a packet outside those namespaces: every address used is
10.200.0.0/16 inside them, or 10.0.2.0/24 inside the virtual network.
"""

import contextlib
import logging
import selectors
import subprocess
import time

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from pyslirp.config import NetworkConfig
from pyslirp.nat.descriptors import DescriptorBudget
from pyslirp.nat.icmp import IcmpRelay
from pyslirp.stack.events import IcmpEchoRequested
from pyslirp.stack.interface import Stack
from tests import harness

GUEST = "10.0.2.100"
GW = "10.0.2.2"
GUEST_MAC = "02:00:00:00:00:64"
GW_MAC = "52:55:0a:00:02:02"
HOST_SIDE = "10.200.0.1"
PEER = "10.200.0.2"
PEER_UNREACHABLE = "10.201.0.5"  # the peer has an "unreachable" route for it
PEER_NO_ROUTE = "10.206.0.5"  # the peer has no route for it
PEER_PROHIBITED = "10.207.0.5"  # the peer has a "prohibit" route for it
PEER_FORWARDS = "10.202.0.5"  # the peer forwards it (where a TTL of 1 expires)
LOCAL_UNREACHABLE = "10.204.0.5"  # "unreachable" route in the host namespace
LOCAL_PROHIBITED = "10.205.0.5"  # "prohibit" route in the host namespace
LOCAL_THROW = "10.208.0.5"  # "throw" route in the host namespace: no route at all
CLONE_NEWNET = 0x40000000
FIRST_ID = 0x1001
WAIT = 3.0


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


# ------------------------------------------------------------ namespaces
named_netns = harness.netns


def in_ns(ns: str, *cmd: str) -> None:
    sh("ip", "netns", "exec", ns, *cmd)


@contextlib.contextmanager
def host_and_peer(ping_range: str = "0 2147483647"):
    """Yield the names of the host and peer namespaces, wired and routed."""
    with named_netns("host") as host, named_netns("peer") as peer:
        sh("ip", "link", "add", "h0", "netns", host, "type", "veth", "peer", "p0", "netns", peer)
        sh("ip", "-n", host, "addr", "add", f"{HOST_SIDE}/24", "dev", "h0")
        sh("ip", "-n", host, "link", "set", "h0", "up")
        sh("ip", "-n", host, "route", "add", "default", "via", PEER)
        sh("ip", "-n", host, "route", "add", "unreachable", "10.204.0.0/24")
        sh("ip", "-n", host, "route", "add", "prohibit", "10.205.0.0/24")
        sh("ip", "-n", host, "route", "add", "throw", "10.208.0.0/24")
        in_ns(host, "sysctl", "-q", "-w", f"net.ipv4.ping_group_range={ping_range}")
        sh("ip", "-n", peer, "addr", "add", f"{PEER}/24", "dev", "p0")
        sh("ip", "-n", peer, "link", "set", "p0", "up")
        # A link that leads nowhere (no dummy driver here: a veth pair of its own).
        sh("ip", "-n", peer, "link", "add", "d1", "type", "veth", "peer", "d2")
        sh("ip", "-n", peer, "addr", "add", "10.203.0.1/24", "dev", "d1")
        sh("ip", "-n", peer, "link", "set", "d1", "up")
        sh("ip", "-n", peer, "link", "set", "d2", "up")
        sh("ip", "-n", peer, "route", "add", "10.202.0.0/24", "dev", "d1")
        sh("ip", "-n", peer, "route", "add", "unreachable", "10.201.0.0/24")
        sh("ip", "-n", peer, "route", "add", "prohibit", "10.207.0.0/24")
        in_ns(peer, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        in_ns(peer, "sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0")
        yield host, peer


# ------------------------------------------------------------ a tiny loop
class FixedRandom:
    def getrandbits(self, bits: int) -> int:
        return 0x1000


class MiniLoop:
    """What IcmpRelay needs of the real loop: a stack, a config, register."""

    def __init__(self, **config) -> None:
        self.config = NetworkConfig(**config)
        self.stack = Stack(self.config.stack_config(), FixedRandom())
        self.descriptors = DescriptorBudget.for_process(self.config)
        self.tracer = None  # Loop.tracer: tracing off
        self.selector = selectors.DefaultSelector()

    def register(self, sock, events, handler, on_error=None) -> None:
        self.selector.register(sock, events, handler)

    def unregister(self, sock) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def guest_sends(self, relay: IcmpRelay, frame: bytes, now: float) -> None:
        self.stack.receive_frame(frame, now)
        while (event := self.stack.next_event()) is not None:
            assert isinstance(event, IcmpEchoRequested)
            relay.on_echo(event, now)

    def frames(self, now: float, count: int, timeout: float = WAIT) -> list[bytes]:
        """Serve the sockets until ``count`` frames are out (or ``timeout``)."""
        out = self.stack.frames_to_send(now)
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            for key, mask in self.selector.select(0.05):
                key.data(mask, now)
            out += self.stack.frames_to_send(now)
        return out

    def close(self) -> None:
        self.selector.close()


def echo_from_guest(dst: str, ident: int, seq: int, payload: bytes = b"", ttl: int = 64) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst=dst, ttl=ttl, id=0x77)
        / ICMP(type=8, id=ident, seq=seq)
        / Raw(payload)
    )


def to_guest(pkt) -> bytes:
    return bytes(Ether(src=GW_MAC, dst=GUEST_MAC) / pkt)


def echo_reply(src: str, ident: int, seq: int, payload: bytes, ip_id: int) -> bytes:
    return to_guest(
        IP(src=src, dst=GUEST, id=ip_id, ttl=64) / ICMP(type=0, id=ident, seq=seq) / Raw(payload)
    )


def icmp_error(icmp_type: int, code: int, request: bytes, src: str = GW, ip_id=FIRST_ID):
    quote = request[14 : 14 + 28]
    return to_guest(
        IP(src=src, dst=GUEST, id=ip_id, ttl=64) / ICMP(type=icmp_type, code=code) / Raw(quote)
    )


def describe(frames) -> str:
    return "\n".join(Ether(f).summary() for f in frames)


@pytest.fixture(scope="module")
def namespaces():
    with host_and_peer() as names:
        yield names


@pytest.fixture
def relay(namespaces):
    host, _peer = namespaces
    loop = MiniLoop(max_ping_sockets=3, ping_idle_timeout=30.0)
    with harness.this_thread_in(host):
        relay = IcmpRelay(loop)
        loop.relay = relay
        try:
            yield loop
        finally:
            relay.close()
            loop.close()


# ------------------------------------------------------------ the relay
def test_echo_relayed_with_the_guests_identifier(relay):
    loop, r = relay, relay.relay
    payloads = [bytes(range(seq, seq + 48)) for seq in range(3)]
    for seq, payload in enumerate(payloads, start=1):
        loop.guest_sends(r, echo_from_guest(PEER, 0x4242, seq, payload), 10.0 + seq)
        frames = loop.frames(10.0 + seq, 1)
        expected = [echo_reply(PEER, 0x4242, seq, payload, FIRST_ID + seq - 1)]
        assert frames == expected, describe(frames)
    assert list(r.flows) == [(bytes([10, 0, 2, 100]), 0x4242)]  # one socket, reused
    assert r.counters["echo-requests"] == 3 and r.counters["echo-replies"] == 3


def test_each_guest_identifier_has_its_own_socket(relay):
    loop, r = relay, relay.relay
    loop.guest_sends(r, echo_from_guest(PEER, 1, 1, b"one"), 1.0)
    loop.guest_sends(r, echo_from_guest(PEER, 2, 1, b"two"), 1.0)
    frames = loop.frames(1.0, 2)
    replies = sorted((Ether(f)[ICMP].id, Ether(f)[Raw].load) for f in frames)
    assert replies == [(1, b"one"), (2, b"two")]
    assert len(r.flows) == 2
    assert len({flow.host_ident for flow in r.flows.values()}) == 2


def test_echo_to_another_guest_network_address_is_host_unreachable(relay):
    loop, r = relay, relay.relay
    request = echo_from_guest("10.0.2.50", 5, 1)
    loop.guest_sends(r, request, 1.0)
    assert loop.frames(1.0, 1, timeout=0.2) == [icmp_error(3, 1, request)]
    assert r.flows == {}


@pytest.mark.parametrize("dst", ["127.0.0.1", "0.1.2.3"])
def test_echo_to_martian_address_is_net_unreachable(relay, dst):
    loop, r = relay, relay.relay
    request = echo_from_guest(dst, 5, 1)
    loop.guest_sends(r, request, 1.0)
    assert loop.frames(1.0, 1, timeout=0.2) == [icmp_error(3, 0, request)]
    assert r.flows == {}


@pytest.mark.parametrize(
    "dst,code",
    [(LOCAL_UNREACHABLE, 1), (LOCAL_PROHIBITED, 13), (LOCAL_THROW, 0)],
    ids=["unreachable", "prohibit", "no-route"],
)
def test_host_route_errors_answered_at_once(relay, dst, code):
    loop, r = relay, relay.relay
    request = echo_from_guest(dst, 6, 1)
    loop.guest_sends(r, request, 1.0)
    assert loop.frames(1.0, 1, timeout=0.5) == [icmp_error(3, code, request)]


@pytest.mark.parametrize(
    "dst,code",
    [(PEER_UNREACHABLE, 1), (PEER_NO_ROUTE, 0), (PEER_PROHIBITED, 13)],
    ids=["host", "net", "prohibited"],
)
def test_unreachable_from_a_router_is_passed_on(relay, dst, code):
    loop, r = relay, relay.relay
    request = echo_from_guest(dst, 7, 1, b"far away")
    loop.guest_sends(r, request, 1.0)
    frames = loop.frames(1.0, 1)
    # From the router that said so, quoting the guest's own request.
    assert frames == [icmp_error(3, code, request, src=PEER)], describe(frames)
    assert r.counters["errors-relayed"] == 1


def test_ttl_exceeded_at_a_router_is_passed_on(relay):
    loop, r = relay, relay.relay
    # TTL 2 from the guest: 1 when it leaves the host, expiring at the peer.
    request = echo_from_guest(PEER_FORWARDS, 8, 3, b"trace", ttl=2)
    loop.guest_sends(r, request, 1.0)
    frames = loop.frames(1.0, 1)
    assert frames == [icmp_error(11, 0, request, src=PEER)], describe(frames)


def test_ttl_1_is_answered_by_the_stack_without_a_socket(relay):
    loop, r = relay, relay.relay
    request = echo_from_guest(PEER, 9, 1, ttl=1)
    loop.guest_sends(r, request, 1.0)
    assert loop.frames(1.0, 1, timeout=0.2) == [icmp_error(11, 0, request)]
    assert r.flows == {}


def test_idle_sockets_are_closed(relay):
    loop, r = relay, relay.relay
    loop.guest_sends(r, echo_from_guest(PEER, 10, 1), 100.0)
    assert len(loop.frames(100.0, 1)) == 1
    loop.guest_sends(r, echo_from_guest(PEER, 10, 2), 110.0)
    assert len(loop.frames(110.0, 1)) == 1
    (flow,) = r.flows.values()
    assert r.next_deadline() == 140.0
    r.handle_timer(139.9)
    assert len(r.flows) == 1
    r.handle_timer(140.0)
    assert r.flows == {} and r.next_deadline() is None
    assert flow.sock.fileno() == -1
    assert r.counters["sockets-expired"] == 1
    # The next ping opens a socket again and works.
    loop.guest_sends(r, echo_from_guest(PEER, 10, 3, b"again"), 150.0)
    assert loop.frames(150.0, 1) == [echo_reply(PEER, 10, 3, b"again", FIRST_ID + 2)]


def test_sockets_are_bounded(relay):
    loop, r = relay, relay.relay  # max_ping_sockets=3
    for ident in range(1, 6):
        loop.guest_sends(r, echo_from_guest(PEER, ident, 1), float(ident))
        assert len(loop.frames(float(ident), 1)) == 1
        assert len(r.flows) <= 3
    # The least recently used made room.
    assert sorted(ident for _, ident in r.flows) == [3, 4, 5]
    assert r.counters["sockets-evicted"] == 2
    assert r.counters["echo-replies"] == 5


def test_close_closes_every_socket(relay):
    loop, r = relay, relay.relay
    loop.guest_sends(r, echo_from_guest(PEER, 11, 1), 1.0)
    loop.frames(1.0, 1)
    socks = [flow.sock for flow in r.flows.values()]
    r.close()
    assert r.flows == {} and all(s.fileno() == -1 for s in socks)


def test_ping_sockets_not_permitted_answer_admin_prohibited(caplog):
    # A fresh namespace keeps the kernel default ping_group_range "1 0".
    with named_netns("noping") as ns, harness.this_thread_in(ns):
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            assert f.read().split() == ["1", "0"]
        loop = MiniLoop()
        r = IcmpRelay(loop)
        caplog.set_level(logging.WARNING, logger="pyslirp.icmp")
        try:
            for seq in (1, 2):
                request = echo_from_guest(PEER, 12, seq)
                loop.guest_sends(r, request, 1.0)
                frames = loop.frames(1.0, 1, timeout=0.1)
                assert frames == [icmp_error(3, 13, request, ip_id=FIRST_ID + seq - 1)]
        finally:
            r.close()
            loop.close()
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "pyslirp.icmp"]
    assert len(warnings) == 1
    assert "net.ipv4.ping_group_range" in warnings[0] and "1 0" in warnings[0]


# ------------------------------------------------------------ end to end
# The real forwarder runs inside the test's host namespace (nsenter --net, so
# that its bind mount stays visible to us); the guest is the Linux kernel.

GUEST_ECHO_SCRIPT = """
import socket, struct, sys
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(3)
payload = b'pyslirp relay check!'
for seq in (1, 2):
    head = struct.pack('!BBHHH', 8, 0, 0, 0x4242, seq)
    head = struct.pack('!BBHHH', 8, 0, csum(head + payload), 0x4242, seq)
    s.sendto(head + payload, ('10.200.0.2', 0))
    while True:
        data, addr = s.recvfrom(2048)
        hl = (data[0] & 15) * 4
        t, c, _, ident, rseq = struct.unpack('!BBHHH', data[hl:hl + 8])
        if t == 0:
            break
    print(addr[0], t, hex(ident), rseq, data[hl + 8:] == payload)
"""


def relayed_forwarder(host: str, **kw):
    return harness.forwarder(prefix=["nsenter", f"--net=/run/netns/{host}"], **kw)


@pytest.mark.e2e
def test_e2e_guest_ping_through_the_relay():
    with host_and_peer() as (host, _peer), relayed_forwarder(host) as fwd:
        for local in (GW, "10.0.2.3"):
            out = fwd.run(["ping", "-c", "1", "-W", "2", local], timeout=10)
            assert out.returncode == 0, out.stdout + out.stderr
        out = fwd.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", PEER], timeout=15)
        assert out.returncode == 0, out.stdout + out.stderr + fwd.log()
        assert "3 packets transmitted, 3 received" in out.stdout
        assert f"from {PEER}: icmp_seq=3" in out.stdout
        # A guest raw socket sees its own identifier, sequence and payload.
        out = fwd.run(["python3", "-c", GUEST_ECHO_SCRIPT], timeout=15)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:2] == [
            f"{PEER} 0 0x4242 1 True",
            f"{PEER} 0 0x4242 2 True",
        ]


@pytest.mark.e2e
def test_e2e_guest_ping_to_empty_guest_address_is_host_unreachable():
    with host_and_peer() as (host, _peer), relayed_forwarder(host) as fwd:
        # On its own link the guest would ARP for it and give up by itself;
        # routed through the gateway, the relay has to say nobody is there.
        fwd.run(["ip", "route", "add", "10.0.2.50/32", "via", GW], check=True)
        out = fwd.run(["ping", "-c", "1", "-W", "2", "10.0.2.50"], timeout=10)
        assert out.returncode != 0
        assert "Destination Host Unreachable" in out.stdout, out.stdout


@pytest.mark.e2e
def test_e2e_ping_sockets_not_permitted_is_packet_filtered():
    with host_and_peer(ping_range="1 0") as (host, _peer), relayed_forwarder(host) as fwd:
        out = fwd.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", PEER], timeout=10)
        assert out.returncode != 0
        assert out.stdout.count("Packet filtered") == 2, out.stdout
        # The stack still answers for its own addresses.
        assert fwd.run(["ping", "-c", "1", "-W", "2", GW], timeout=10).returncode == 0
        log = fwd.log()
    assert log.count("net.ipv4.ping_group_range") == 1, log


@pytest.mark.e2e
def test_e2e_df_ping_above_the_forwarder_mtu_gets_frag_needed():
    with host_and_peer() as (host, _peer), relayed_forwarder(host, configure=False) as fwd:
        harness.configure_guest(fwd, mtu=9000)  # the forwarder runs at 1500
        out = fwd.run(["ping", "-M", "do", "-s", "3000", "-c", "1", "-W", "2", PEER], timeout=10)
        assert "Frag needed and DF set (mtu = 1500)" in out.stdout, out.stdout + out.stderr
        # Without DF the same size goes through, fragmented both ways.
        out = fwd.run(["ping", "-M", "dont", "-s", "3000", "-c", "1", "-W", "2", PEER])
        assert out.returncode == 0, out.stdout + out.stderr
        assert "3008 bytes from 10.200.0.2" in out.stdout
