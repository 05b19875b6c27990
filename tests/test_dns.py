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

from pyslirp.config import NetworkConfig
from pyslirp.nat.dns import DnsProxy, servfail
from pyslirp.stack.budget import MemoryBudget
from tests.dnsserver import DnsServer
from tests.inprocess import InProcessNetwork

GUEST = bytes([10, 0, 2, 100])
GUEST2 = bytes([10, 0, 2, 101])
DNS_ADDR = bytes([10, 0, 2, 3])
RECORDS = {"one.test.": "192.0.2.1", "two.test.": "192.0.2.2"}
PUMP_TIMEOUT = 3.0


class FakeStack:
    def __init__(self, budget: int = 1 << 20) -> None:
        self.sent = []  # (src, src_port, dst, dst_port, payload)
        self.budget = MemoryBudget(budget)

    def send_udp(self, src, src_port, dst, dst_port, payload, now, dst_mac=None):
        self.sent.append((src, src_port, dst, dst_port, bytes(payload)))


class FakeLoop:
    def __init__(self, **config_kw) -> None:
        config_kw.setdefault("random", random.Random(3))
        self.config = NetworkConfig(**config_kw)
        self.stack = FakeStack()
        self.selector = selectors.DefaultSelector()
        self.tracer = None  # Loop.tracer: tracing off

    def register(self, fileobj, events, handler, on_error=None):
        self.selector.register(fileobj, events, handler)

    def unregister(self, fileobj):
        self.selector.unregister(fileobj)

    def forget(self, fileobj):
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
        assert proxy.open_sockets == 0
        assert loop.stack.budget.held == 0, "the proxy kept bytes charged"
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
        assert proxy.open_sockets == 3  # a socket (and a port) each
        assert len({q.sock.getsockname()[1] for q in proxy.in_flight()}) == 3
        assert loop.pump(0.0, lambda: len(loop.stack.sent) == 3)
        first, second = answers(loop.stack.sent, GUEST)
        (other,) = answers(loop.stack.sent, GUEST2)
        assert {a_record(first), a_record(second)} == {"192.0.2.1", "192.0.2.2"}
        assert a_record(other) == "192.0.2.2"
        assert first.id == second.id == other.id == 7


def test_each_query_has_its_own_socket_and_an_unpredictable_id(make_proxy, manual_upstream):
    # RFC 5452 9.2: neither the id nor the port follows from the injected
    # random (which the guest also sees, in IP ids and timestamps).
    loop, proxy = make_proxy(manual_upstream.getsockname(), random=random.Random(99))
    for qid in range(8):
        proxy.query(GUEST, 5353, query("one.test", qid=qid), 0.0)
    seen = [manual_upstream.recvfrom(512) for _ in range(8)]
    ids = [struct.unpack("!H", data[:2])[0] for data, _ in seen]
    predicted = random.Random(99)
    assert ids != [predicted.getrandbits(16) for _ in range(8)]
    assert len({peer for _, peer in seen}) == 8  # eight source ports
    assert proxy.open_sockets == 8
    for data, peer in seen:  # answered: each socket closes
        reply = DNS(data)
        reply.qr = 1
        manual_upstream.sendto(bytes(reply), peer)
    assert loop.pump(0.0, lambda: len(loop.stack.sent) == 8)
    assert sorted(DNS(s[4]).id for s in loop.stack.sent) == list(range(8))
    assert proxy.open_sockets == 0 and not loop.selector.get_map()
    assert loop.stack.budget.held == 0


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


def test_sockets_are_bounded_and_queries_past_them_wait(make_proxy, manual_upstream):
    loop, proxy = make_proxy(manual_upstream.getsockname(), dns_max_sockets=2)
    for qid in range(5):
        proxy.query(GUEST, 5353, query("one.test", qid=qid), 0.0)
    assert proxy.open_sockets == 2 and proxy.counters["dns-queued"] == 3
    for answered in range(1, 6):  # each answer frees a socket for the next query
        data, peer = manual_upstream.recvfrom(512)
        assert proxy.open_sockets <= 2
        reply = DNS(data)
        reply.qr = 1
        manual_upstream.sendto(bytes(reply), peer)
        assert loop.pump(0.0, lambda n=answered: len(loop.stack.sent) == n)
    assert sorted(DNS(s[4]).id for s in loop.stack.sent) == [0, 1, 2, 3, 4]
    assert proxy.open_sockets == 0 and loop.stack.budget.held == 0


def test_queued_queries_count_toward_the_pending_limit(make_proxy):
    with DnsServer(silent=True) as silent:
        loop, proxy = make_proxy(("127.0.0.1", silent.port), dns_max_sockets=1, dns_max_pending=2)
        for qid in range(3):
            proxy.query(GUEST, 5353, query("one.test", qid=qid), 0.0)
        (sent,) = loop.stack.sent
        assert DNS(sent[4]).id == 2 and DNS(sent[4]).rcode == 2
        assert proxy.counters["dns-servfail-pending-full"] == 1
        proxy.handle_timer(2.0)  # the first times out; the queued one goes out
        assert proxy.open_sockets == 1 and proxy.next_deadline() == 4.0
        proxy.handle_timer(4.0)
        assert sorted(DNS(s[4]).id for s in loop.stack.sent) == [0, 1, 2]
        assert proxy.open_sockets == 0 and loop.stack.budget.held == 0


def test_cancelled_query_frees_its_socket_for_a_queued_one(make_proxy):
    with DnsServer(records=RECORDS) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", upstream.port), dns_max_sockets=1)
        got = []
        first = proxy.resolve(query("one.test", qid=1), 0.0, lambda r, now: got.append(r))
        proxy.resolve(query("two.test", qid=2), 0.0, lambda r, now: got.append(r))
        first.cancel()
        assert proxy.open_sockets == 0 and proxy.next_deadline() == 0.0
        proxy.handle_timer(0.0)
        assert loop.pump(0.0, lambda: got)
        loop.settle(0.0)
        assert [DNS(r).id for r in got] == [2]


def test_memory_budget_refusal_is_servfail_and_every_charge_is_released(make_proxy):
    with DnsServer(silent=True) as silent:
        size = len(query("one.test"))
        loop, proxy = make_proxy(("127.0.0.1", silent.port))
        loop.stack.budget = proxy.budget = MemoryBudget(2 * size)
        for qid in range(3):
            proxy.query(GUEST, 5353, query("one.test", qid=qid), 0.0)
        assert proxy.budget.held == 2 * size
        (sent,) = loop.stack.sent
        assert DNS(sent[4]).id == 2 and DNS(sent[4]).rcode == 2
        assert proxy.counters["dns-servfail-memory"] == 1
        cancelled = proxy.resolve(query("one.test", qid=3), 0.0, lambda r, now: None)
        assert cancelled.done  # refused at once
        proxy.handle_timer(2.0)
        assert proxy.budget.held == 0 and proxy.open_sockets == 0


def test_query_without_one_question_gets_servfail_at_once(make_proxy):
    with DnsServer(records=RECORDS) as upstream:
        loop, proxy = make_proxy(("127.0.0.1", upstream.port))
        proxy.query(GUEST, 5353, bytes(DNS(id=4, rd=1, qdcount=0)), 0.0)
        two = DNS(id=5, rd=1, qdcount=2, qd=DNSQR(qname="one.test") / DNSQR(qname="two.test"))
        proxy.query(GUEST, 5353, bytes(two), 0.0)
        assert [(DNS(s[4]).id, DNS(s[4]).rcode) for s in loop.stack.sent] == [(4, 2), (5, 2)]
        assert proxy.counters["dns-servfail-no-question"] == 2
        assert upstream.queries == [] and proxy.open_sockets == 0


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
    wrong_type = good.copy()
    wrong_type.qd = DNSQR(qname="one.test", qtype="AAAA")
    no_question = DNS(id=upstream_id, qr=1, qdcount=0, an=good.an)
    two_questions = good.copy()
    two_questions.qd = DNSQR(qname="one.test") / DNSQR(qname="one.test")
    two_questions.qdcount = 2
    not_a_response = DNS(data)
    for forged in (wrong_id, wrong_question, wrong_type, no_question, two_questions):
        manual_upstream.sendto(bytes(forged), proxy_addr)
    manual_upstream.sendto(bytes(not_a_response), proxy_addr)
    manual_upstream.sendto(b"\x00" * 5, proxy_addr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:  # another port
        spoofer.sendto(bytes(good), proxy_addr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:  # another address
        spoofer.bind(("127.0.0.2", manual_upstream.getsockname()[1]))
        spoofer.sendto(bytes(good), proxy_addr)
    expected = {
        "dns-answer-wrong-id": 1,
        "dns-answer-question": 2,
        "dns-answer-qdcount": 2,
        "dns-answer-not-response": 1,
        "dns-answer-truncated": 1,
        "dns-answer-wrong-source": 2,
    }
    assert loop.pump(0.0, lambda: proxy.drops == expected), proxy.drops
    assert loop.stack.sent == [] and proxy.open_sockets == 1
    good.qd[0].qname = b"ONE.test."  # names compare without regard to case
    manual_upstream.sendto(bytes(good), proxy_addr)
    assert loop.pump(0.0, lambda: loop.stack.sent)
    assert DNS(loop.stack.sent[0][4]).id == 9
    assert proxy.open_sockets == 0


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
    assert proxy.next_deadline() is None and proxy.open_sockets == 0


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


def outbound_check() -> None:
    """Run in a fresh network namespace: upstream sockets bind to
    --outbound-addr (192.0.2.1 here), on a port the kernel picks."""
    import subprocess

    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"],  # not 127/8: bound
        ["ip", "addr", "add", "192.0.2.53/32", "dev", "lo"],
    ):
        subprocess.run(cmd, check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("192.0.2.53", 0))
        sock.settimeout(PUMP_TIMEOUT)
        loop = FakeLoop(dns_upstreams=[sock.getsockname()], outbound_addr="192.0.2.1")
        proxy = DnsProxy(loop)
        peers = set()
        for qid in range(5):
            proxy.query(GUEST, 5353, query("one.test", qid=qid), 0.0)
            data, peer = sock.recvfrom(512)
            peers.add(peer)
            reply = DNS(data)
            reply.qr = 1
            sock.sendto(bytes(reply), peer)
            assert loop.pump(0.0, lambda n=qid + 1: len(loop.stack.sent) == n)
        assert {addr for addr, _port in peers} == {"192.0.2.1"}
        assert len(peers) == 5 and proxy.open_sockets == 0
        proxy.close()


def test_upstream_sockets_bind_to_the_outbound_address():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", "import tests.test_dns as t; t.outbound_check()"],
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


def guest_query(qid: int, name: str, sport: int) -> bytes:
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="52:55:0a:00:02:03")
        / IP(src="10.0.2.100", dst="10.0.2.3")
        / UDP(sport=sport, dport=53)
        / DNS(id=qid, rd=1, qd=DNSQR(qname=name))
    )


def test_forgeries_through_the_loop_are_dropped_and_counted():
    queries = 30
    with DnsServer(records=RECORDS, forge=True, delay=0.05) as upstream:
        net = InProcessNetwork(dns_upstreams=[("127.0.0.1", upstream.port)])
        with net:
            for i in range(queries):
                net.send(guest_query(100 + i, "one.test", 40000 + i))
                frame = net.receive(timeout=PUMP_TIMEOUT, predicate=lambda f: DNS in Ether(f))
                assert frame is not None, f"query {i} unanswered"
                reply = Ether(frame)[DNS]
                assert reply.id == 100 + i and a_record(reply) == "192.0.2.1"
                assert reply.ancount == 1
        dns = net.loop.dns
        assert dns.drops == {
            "dns-answer-wrong-id": queries,
            "dns-answer-qdcount": queries,
            "dns-answer-question": queries,
            "dns-answer-wrong-source": 2 * queries,
        }
        assert dns.counters["dns-answers"] == queries
        assert dns.open_sockets == 0
        ports = {port for _addr, port in upstream.peers}
        assert len(ports) >= 20, ports


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


@pytest.mark.e2e
def test_dig_sees_only_real_answers_from_many_source_ports():
    from tests import harness
    from tests.dnsserver import FORGED

    digs = 30
    with (
        DnsServer(records={"hello.test.": "192.0.2.9"}, forge=True, delay=0.05) as upstream,
        harness.forwarder(dns_upstreams=[upstream.address]) as fwd,
    ):
        # One query first: the forwarder may still be setting up its loop
        # (its spare descriptor, a socket, comes then).
        dig = ["dig", "@10.0.2.3", "+tries=1", "+time=5", "+short", "hello.test"]
        assert fwd.run(dig).stdout.split() == ["192.0.2.9"]
        time.sleep(0.2)
        sockets_before = fwd.socket_count()
        for _ in range(digs - 1):
            result = fwd.run(dig)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.split() == ["192.0.2.9"], result.stdout
            assert FORGED not in result.stdout
        assert len(upstream.peers) == digs
        ports = {port for _addr, port in upstream.peers}
        assert len(ports) >= 20, ports
        # Every upstream socket is closed once its query is answered.
        deadline = time.monotonic() + 5
        while fwd.socket_count() > sockets_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fwd.socket_count() == sockets_before
