"""DNS proxy: real upstream sockets on loopback, a fake loop with a float clock.

The proxy's sockets are served by a selector the test drives (``pump``); the
clock the proxy sees is the ``now`` the test passes, so timeouts are tested by
moving it, not by waiting.
"""

import random
import selectors
import socket
import struct
import time

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyslirp.nat.config import NetworkConfig
from pyslirp.nat.dns import DnsProxy, servfail
from tests.dnsserver import DnsServer
from tests.inprocess import InProcessNetwork

GUEST = bytes([10, 0, 2, 100])
GUEST2 = bytes([10, 0, 2, 101])
DNS_ADDR = bytes([10, 0, 2, 3])
RECORDS = {"one.test.": "192.0.2.1", "two.test.": "192.0.2.2"}
PUMP_TIMEOUT = 3.0


class FakeStack:
    def __init__(self) -> None:
        self.sent = []  # (src, src_port, dst, dst_port, payload)

    def send_udp(self, src, src_port, dst, dst_port, payload, now, dst_mac=None):
        self.sent.append((src, src_port, dst, dst_port, bytes(payload)))


class FakeLoop:
    def __init__(self, **config_kw) -> None:
        config_kw.setdefault("random", random.Random(3))
        self.config = NetworkConfig(**config_kw)
        self.stack = FakeStack()
        self.selector = selectors.DefaultSelector()

    def register(self, fileobj, events, handler, on_error=None):
        self.selector.register(fileobj, events, handler)

    def unregister(self, fileobj):
        self.selector.unregister(fileobj)

    def timers_changed(self) -> None:
        pass  # pump() serves the sockets; the tests move the clock

    def pump(self, now: float, until, timeout: float = PUMP_TIMEOUT) -> bool:
        """Serve the proxy's sockets (at clock ``now``) until ``until()``."""
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            for key, mask in self.selector.select(0.02):
                key.data(mask, now)
        return until()

    def settle(self, now: float, seconds: float = 0.2) -> None:
        """Serve the sockets for a while, expecting nothing in particular."""
        self.pump(now, lambda: False, timeout=seconds)


@pytest.fixture
def make_proxy():
    made = []

    def make(*upstreams, **config_kw):
        loop = FakeLoop(dns_upstreams=list(upstreams), **config_kw)
        proxy = DnsProxy(loop)
        made.append((loop, proxy))
        return loop, proxy

    yield make
    for loop, proxy in made:
        proxy.close()
        assert not loop.selector.get_map(), "the proxy left sockets registered"
        loop.selector.close()


def dead_port() -> int:
    """A loopback UDP port with nobody behind it (ICMP port unreachable)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def query(name: str, qid: int = 0x1234, qtype: str = "A") -> bytes:
    return bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


def answers(sent, guest=GUEST, port=5353):
    """The DNS replies the guest (address, port) got, parsed."""
    out = []
    for src, sport, dst, dport, payload in sent:
        assert (src, sport) == (DNS_ADDR, 53)
        if (dst, dport) == (guest, port):
            out.append(DNS(payload))
    return out


def a_record(reply) -> str:
    return reply.an[0].rdata


# ------------------------------------------------------------- the happy path
def test_answer_returns_to_the_guest_from_the_dns_address(make_proxy):
    with DnsServer(records=RECORDS) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", upstream.port))
        proxy.query(GUEST, 5353, query("one.test", qid=0xBEEF), 0.0)
        assert loop.pump(0.0, lambda: loop.stack.sent)
        (reply,) = answers(loop.stack.sent)
        assert reply.id == 0xBEEF and reply.qr == 1 and reply.rcode == 0
        assert a_record(reply) == "192.0.2.1"
        assert upstream.queries == [("one.test.", 1)]
        assert proxy.next_deadline() is None


def test_nxdomain_is_passed_through(make_proxy):
    with DnsServer(records=RECORDS) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", upstream.port))
        proxy.query(GUEST, 5353, query("nope.test"), 0.0)
        assert loop.pump(0.0, lambda: loop.stack.sent)
        assert answers(loop.stack.sent)[0].rcode == 3


def test_concurrent_guests_with_the_same_id_do_not_collide(make_proxy):
    with DnsServer(records=RECORDS, delay=0.2) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", upstream.port))
        proxy.query(GUEST, 5353, query("one.test", qid=7), 0.0)
        proxy.query(GUEST2, 5353, query("two.test", qid=7), 0.0)
        proxy.query(GUEST, 5353, query("two.test", qid=7), 0.0)  # same guest, same id
        ids = set(proxy.upstreams[0].pending)
        assert len(ids) == 3  # three distinct upstream ids
        assert loop.pump(0.0, lambda: len(loop.stack.sent) == 3)
        first, second = answers(loop.stack.sent, GUEST)
        (other,) = answers(loop.stack.sent, GUEST2)
        assert {a_record(first), a_record(second)} == {"192.0.2.1", "192.0.2.2"}
        assert a_record(other) == "192.0.2.2"
        assert first.id == second.id == other.id == 7


def test_upstream_ids_come_from_the_configured_random(make_proxy):
    with DnsServer(records=RECORDS, silent=True) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", upstream.port), random=random.Random(99))
        proxy.query(GUEST, 5353, query("one.test"), 0.0)
        assert list(proxy.upstreams[0].pending) == [random.Random(99).getrandbits(16)]


# ---------------------------------------------------------------- failover
def test_refused_upstream_fails_over_at_once_and_the_good_one_is_remembered(make_proxy):
    with DnsServer(records=RECORDS) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", dead_port()), ("127.0.0.1", upstream.port))
        proxy.query(GUEST, 5353, query("one.test"), 0.0)
        # ICMP port unreachable comes back on loopback: no timer needed.
        assert loop.pump(0.0, lambda: loop.stack.sent)
        assert a_record(answers(loop.stack.sent)[0]) == "192.0.2.1"
        assert proxy.counters["dns-upstream-unreachable"] == 1
        assert proxy.counters["dns-upstream-timeout"] == 0
        # The next query starts at the upstream that answered.
        proxy.query(GUEST, 5353, query("two.test"), 1.0)
        assert proxy.upstreams[1].pending and not proxy.upstreams[0].pending
        assert loop.pump(1.0, lambda: len(loop.stack.sent) == 2)
        assert proxy.counters["dns-upstream-unreachable"] == 1


def test_silent_upstream_fails_over_on_timeout(make_proxy):
    with DnsServer(silent=True) as dead, DnsServer(records=RECORDS) as good:
        loop, proxy = make_proxy(
            ("127.0.0.1", dead.port), ("127.0.0.1", good.port), dns_upstream_timeout=2.0
        )
        proxy.query(GUEST, 5353, query("one.test"), 10.0)
        assert proxy.next_deadline() == 12.0
        loop.settle(10.0)
        assert loop.stack.sent == [] and dead.queries == [("one.test.", 1)]
        proxy.handle_timer(11.9)  # not yet
        assert good.queries == []
        proxy.handle_timer(12.0)
        assert proxy.next_deadline() == 14.0
        assert loop.pump(12.0, lambda: loop.stack.sent)
        assert a_record(answers(loop.stack.sent)[0]) == "192.0.2.1"
        assert proxy.counters["dns-upstream-timeout"] == 1
        assert proxy.next_deadline() is None
        assert proxy.preferred == 1


def test_refused_rcode_moves_on_and_is_passed_on_when_nobody_helps(make_proxy):
    with DnsServer(rcode=5) as refusing, DnsServer(records=RECORDS) as good:
        loop, proxy = make_proxy(("127.0.0.1", refusing.port), ("127.0.0.1", good.port))
        proxy.query(GUEST, 5353, query("one.test"), 0.0)
        assert loop.pump(0.0, lambda: loop.stack.sent)
        assert a_record(answers(loop.stack.sent)[0]) == "192.0.2.1"
    with DnsServer(rcode=5) as refusing:
        loop, proxy = make_proxy(("127.0.0.1", refusing.port))
        proxy.query(GUEST, 5353, query("one.test", qid=5), 0.0)
        assert loop.pump(0.0, lambda: loop.stack.sent)
        (reply,) = answers(loop.stack.sent)
        assert reply.id == 5 and reply.rcode == 5


def check_servfail(payload: bytes, request: bytes) -> None:
    reply = DNS(payload)
    assert reply.id == DNS(request).id
    assert reply.qr == 1 and reply.rcode == 2 and reply.rd == 1 and reply.ra == 1
    assert reply.qdcount == 1 and reply.qd[0].qname == DNS(request).qd[0].qname
    assert reply.ancount == reply.nscount == reply.arcount == 0


def test_servfail_after_every_upstream_timed_out(make_proxy):
    with DnsServer(silent=True) as a, DnsServer(silent=True) as b:
        loop, proxy = make_proxy(("127.0.0.1", a.port), ("127.0.0.1", b.port))
        request = query("one.test", qid=0x4242)
        proxy.query(GUEST, 5353, request, 0.0)
        loop.settle(0.0)
        proxy.handle_timer(2.0)
        assert loop.pump(2.0, lambda: b.queries)
        assert loop.stack.sent == []
        proxy.handle_timer(4.0)
        (sent,) = loop.stack.sent
        check_servfail(sent[4], request)
        assert proxy.counters["dns-all-upstreams-failed"] == 1
        assert proxy.next_deadline() is None


def test_servfail_at_once_when_every_upstream_refuses(make_proxy):
    loop, proxy = make_proxy(("127.0.0.1", dead_port()), ("127.0.0.1", dead_port()))
    request = query("one.test")
    proxy.query(GUEST, 5353, request, 0.0)
    assert loop.pump(0.0, lambda: loop.stack.sent)
    check_servfail(loop.stack.sent[0][4], request)
    assert proxy.counters["dns-upstream-unreachable"] == 2


def test_servfail_without_upstreams(make_proxy):
    loop, proxy = make_proxy()
    request = query("one.test")
    proxy.query(GUEST, 5353, request, 0.0)
    check_servfail(loop.stack.sent[0][4], request)


def test_pending_queries_are_bounded(make_proxy):
    with DnsServer(silent=True) as silent:
        loop, proxy = make_proxy(("127.0.0.1", silent.port), dns_max_pending=2)
        for qid in (1, 2):
            proxy.query(GUEST, 5353, query("one.test", qid=qid), 0.0)
        assert loop.stack.sent == []
        request = query("one.test", qid=3)
        proxy.query(GUEST, 5353, request, 0.0)
        (sent,) = loop.stack.sent  # the third at once
        check_servfail(sent[4], request)
        assert proxy.counters["dns-servfail-pending-full"] == 1
        proxy.handle_timer(2.0)
        assert sorted(DNS(s[4]).id for s in loop.stack.sent) == [1, 2, 3]
        assert all(DNS(s[4]).rcode == 2 for s in loop.stack.sent)


# ------------------------------------------------------ what is not believed
def test_invalid_guest_queries_are_counted_and_dropped(make_proxy):
    with DnsServer(records=RECORDS) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", upstream.port))
        proxy.query(GUEST, 5353, b"\x12\x34\x01\x00", 0.0)
        response = bytes(DNS(id=1, qr=1, qd=DNSQR(qname="one.test")))
        proxy.query(GUEST, 5353, response, 0.0)
        loop.settle(0.0)
        assert loop.stack.sent == [] and upstream.queries == []
        assert proxy.drops == {"dns-query-truncated": 1, "dns-query-is-response": 1}


@pytest.fixture
def manual_upstream():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(PUMP_TIMEOUT)
    yield sock
    sock.close()


def test_answers_must_match_id_and_question_and_come_from_the_upstream(make_proxy, manual_upstream):
    loop, proxy = make_proxy(manual_upstream.getsockname())
    proxy.query(GUEST, 5353, query("one.test", qid=9), 0.0)
    data, proxy_addr = manual_upstream.recvfrom(512)
    upstream_id = struct.unpack("!H", data[:2])[0]
    good = DNS(data)
    good.qr = 1
    wrong_id = good.copy()
    wrong_id.id = upstream_id ^ 1
    wrong_question = good.copy()
    wrong_question.qd = DNSQR(qname="two.test")
    manual_upstream.sendto(bytes(wrong_id), proxy_addr)
    manual_upstream.sendto(bytes(wrong_question), proxy_addr)
    manual_upstream.sendto(b"\x00" * 5, proxy_addr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:  # another port
        spoofer.sendto(bytes(good), proxy_addr)
    loop.settle(0.0)
    assert loop.stack.sent == []
    assert proxy.drops == {
        "dns-response-unmatched": 1,
        "dns-response-question-mismatch": 1,
        "dns-response-truncated": 1,
    }
    good.qd[0].qname = b"ONE.test."  # names compare without regard to case
    manual_upstream.sendto(bytes(good), proxy_addr)
    assert loop.pump(0.0, lambda: loop.stack.sent)
    assert DNS(loop.stack.sent[0][4]).id == 9


def test_garbage_from_guest_and_upstream_never_escapes(make_proxy, manual_upstream):
    rng = random.Random(5)
    loop, proxy = make_proxy(manual_upstream.getsockname(), dns_max_pending=4)
    valid = query("one.test", qid=1)
    for _ in range(2000):
        data = bytearray(valid[: rng.randrange(len(valid) + 1)])
        for _ in range(rng.randrange(4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        proxy.query(GUEST, 5353, bytes(data), 0.0)
    for sent in loop.stack.sent:  # the SERVFAILs given once 4 queries waited
        assert DNS(sent[4]).rcode == 2
    proxy_addr = None
    for _ in range(4):
        data, proxy_addr = manual_upstream.recvfrom(512)
    for _ in range(500):
        garbage = bytearray(data)
        garbage[2] |= 0x80
        for _ in range(rng.randrange(1, 6)):
            garbage[rng.randrange(len(garbage))] = rng.randrange(256)
        manual_upstream.sendto(bytes(garbage[: rng.randrange(len(garbage) + 1)]), proxy_addr)
    loop.settle(0.0, 0.3)
    proxy.handle_timer(10.0)
    assert proxy.next_deadline() is None and not proxy.upstreams[0].pending


def ipv6_check() -> None:
    """Run in a fresh network namespace (the host may have IPv6 off): an
    IPv6 upstream that refuses (ICMPv6 through IPV6_RECVERR), then one that
    answers."""
    import subprocess

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    dead = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    dead.bind(("::1", 0))
    dead_port6 = dead.getsockname()[1]
    dead.close()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        sock.settimeout(PUMP_TIMEOUT)
        loop = FakeLoop(dns_upstreams=[("::1", dead_port6), ("::1", sock.getsockname()[1])])
        proxy = DnsProxy(loop)
        proxy.query(GUEST, 5353, query("one.test", qid=3), 0.0)
        loop.settle(0.0)  # the refusal arrives and the query moves on
        data, peer = sock.recvfrom(512)
        reply = DNS(data)
        reply.qr = 1
        sock.sendto(bytes(reply), peer)
        assert loop.pump(0.0, lambda: loop.stack.sent)
        assert DNS(loop.stack.sent[0][4]).id == 3
        assert proxy.counters["dns-upstream-unreachable"] == 1
        proxy.close()


def test_ipv6_upstreams():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", "import tests.test_dns as t; t.ipv6_check()"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------ the engine for TCP
def test_resolve_calls_back_once_and_cancel_stops_it(make_proxy):
    with DnsServer(records=RECORDS, delay=0.1) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", upstream.port))
        got = []
        handle = proxy.resolve(query("one.test", qid=1), 0.0, lambda r, now: got.append(r))
        cancelled = proxy.resolve(query("two.test", qid=2), 0.0, lambda r, now: got.append(r))
        cancelled.cancel()
        assert cancelled.done and not handle.done
        assert loop.pump(0.0, lambda: len(upstream.queries) == 2 and got)
        loop.settle(0.0)
        assert [DNS(r).id for r in got] == [1]
        assert handle.done and proxy.next_deadline() is None
        assert proxy.resolve(b"short", 0.0, lambda r, now: got.append(r)) is None


def test_servfail_without_a_parseable_question():
    reply = servfail(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05abc")
    assert reply == b"\xab\xcd\x81\x82" + bytes(8)


# ------------------------------------------------------ through the real loop
def test_guest_query_through_the_loop_with_a_dead_first_upstream():
    with DnsServer(records=RECORDS) as upstream:
        net = InProcessNetwork(
            dns_upstreams=[("127.0.0.1", dead_port()), ("127.0.0.1", upstream.port)]
        )
        with net:
            net.send(
                Ether(src="02:00:00:00:00:01", dst="52:55:0a:00:02:03")
                / IP(src="10.0.2.100", dst="10.0.2.3")
                / UDP(sport=33333, dport=53)
                / DNS(id=77, rd=1, qd=DNSQR(qname="two.test"))
            )
            frame = net.receive(timeout=PUMP_TIMEOUT, predicate=lambda f: DNS in Ether(f))
            assert frame is not None
            reply = Ether(frame)
            assert (reply[IP].src, reply[IP].dst) == ("10.0.2.3", "10.0.2.100")
            assert (reply[UDP].sport, reply[UDP].dport) == (53, 33333)
            assert reply[DNS].id == 77 and a_record(reply[DNS]) == "192.0.2.2"
        assert net.loop.dns.counters["dns-upstream-unreachable"] == 1


# ------------------------------------------------- end to end: dig as guest
@pytest.mark.e2e
def test_dig_through_the_proxy_with_a_dead_first_upstream():
    from tests import harness

    with (
        DnsServer(records={"hello.test.": "192.0.2.9"}) as upstream,
        harness.forwarder(dns_upstreams=[f"127.0.0.1:{dead_port()}", upstream.address]) as fwd,
    ):
        dig = ["dig", "@10.0.2.3", "+tries=1", "+time=5"]
        started = time.monotonic()
        result = fwd.run([*dig, "hello.test"], timeout=20)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert "status: NOERROR" in result.stdout
        assert "hello.test.\t\t60\tIN\tA\t192.0.2.9" in result.stdout
        assert ";; SERVER: 10.0.2.3#53(10.0.2.3)" in result.stdout
        # The dead upstream refused at once (ICMP): no wait for its timeout.
        assert elapsed < 2.0, elapsed
        result = fwd.run([*dig, "missing.test"], timeout=20)
        assert "status: NXDOMAIN" in result.stdout
        assert upstream.queries == [("hello.test.", 1), ("missing.test.", 1)]


@pytest.mark.e2e
def test_dig_gets_servfail_when_every_upstream_is_silent():
    from tests import harness

    with (
        DnsServer(silent=True) as a,
        DnsServer(silent=True) as b,
        harness.forwarder(dns_upstreams=[a.address, b.address]) as fwd,
    ):
        result = fwd.run(["dig", "@10.0.2.3", "+tries=1", "+time=8", "hello.test"], timeout=20)
        assert "status: SERVFAIL" in result.stdout, result.stdout
        assert a.queries == b.queries == [("hello.test.", 1)]
