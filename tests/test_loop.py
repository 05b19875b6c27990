"""The event loop's busy polling (NetworkConfig.busy_poll): after a wake-up
that found work the loop polls without sleeping for a bounded time, and an
idle loop sleeps."""

import select
import socket
import time

import pytest

from pyslirp.config import NetworkConfig
from pyslirp.nat.loop import Loop
from tests.guest_frames import ARP_REQUEST
from tests.inprocess import InProcessNetwork


class RecordingEpoll:
    """The loop's epoll, with every poll timeout written down."""

    def __init__(self, epoll) -> None:
        self.epoll = epoll
        self.timeouts: list = []

    def poll(self, timeout=-1):
        self.timeouts.append(timeout)
        return self.epoll.poll(timeout)

    def __getattr__(self, name):
        return getattr(self.epoll, name)


def arp_answered(net: InProcessNetwork) -> bool:
    """The guest asks for the gateway's MAC; the loop answers."""
    net.send(ARP_REQUEST)
    return net.receive(timeout=2.0, predicate=lambda f: f[12:14] == b"\x08\x06") is not None


def polls_after_one_frame(busy_poll: float) -> list:
    net = InProcessNetwork(busy_poll=busy_poll)
    recorder = net.loop.epoll = RecordingEpoll(net.loop.epoll)
    with net:
        time.sleep(0.1)
        recorder.timeouts.clear()  # from here on: one frame, then idle
        assert arp_answered(net)
        time.sleep(0.2)  # any spinning is long over: the loop sleeps again
        return list(recorder.timeouts)


def test_after_traffic_the_loop_polls_without_sleeping_then_sleeps():
    timeouts = polls_after_one_frame(busy_poll=0.001)
    spins = [t for t in timeouts if t == 0.0]
    assert len(spins) >= 2, timeouts  # it kept asking, not sleeping...
    assert timeouts[-1] != 0.0, timeouts[-5:]  # ...and then slept


def test_busy_poll_zero_never_spins():
    timeouts = polls_after_one_frame(busy_poll=0.0)
    assert timeouts and 0.0 not in timeouts, timeouts


def test_an_idle_loop_uses_no_cpu_after_traffic():
    """With the longest spin the CLI allows, a loop that has answered a
    frame costs at most that spin, then nothing while idle (the loop runs
    in a thread of this process, so the process's CPU time is the measure)."""
    with InProcessNetwork(busy_poll=0.001) as net:
        time.sleep(0.1)
        assert arp_answered(net)
        before = time.process_time()
        time.sleep(0.5)
        spent = time.process_time() - before
    assert spent < 0.05, spent  # a loop that kept spinning would spend about 0.5 s


def _loop_with_pair():
    config = NetworkConfig()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    loop = Loop(config, a.fileno())
    return loop, a, b


def test_busy_poll_returns_what_is_ready_at_once():
    loop, a, b = _loop_with_pair()
    try:
        b.send(b"frame")
        started = time.monotonic()
        ready = loop.busy_poll(0.5, None)
        assert time.monotonic() - started < 0.1
        assert ready and ready[0][0] == a.fileno() and ready[0][1] & select.EPOLLIN
    finally:
        loop.close()
        a.close()
        b.close()


@pytest.mark.parametrize("spin, deadline_in, longest", [(0.02, None, 0.02), (1.0, 0.02, 0.02)])
def test_busy_poll_gives_up_after_the_spin_or_the_deadline(spin, deadline_in, longest):
    loop, a, b = _loop_with_pair()
    try:
        started = time.monotonic()
        deadline = None if deadline_in is None else started + deadline_in
        assert loop.busy_poll(spin, deadline) is None
        took = time.monotonic() - started
        assert longest <= took < longest + 0.2, took
    finally:
        loop.close()
        a.close()
        b.close()


def test_services_are_made_when_first_asked_for_and_not_by_stats():
    """DHCP, the DNS proxy, the ICMP relay and the forwards are made at first
    use (Loop.on_first_use); a stats request reports them without making them."""
    import os

    from pyslirp.nat.backend import PythonBackend

    guest, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop_r, stop_w = os.pipe()
    backend = PythonBackend(NetworkConfig(dns_upstreams=[("127.0.0.1", 9)]))
    try:
        backend.start(tap.fileno(), stop_r)
        loop = backend.loop
        names = ("dhcp", "dns", "icmp", "forwards")
        stats = backend.stats()
        assert [loop.made(name) for name in names] == [None] * 4
        assert stats["counters"]["dns"] == {} and stats["flows"]["ping"] == 0
        assert backend.list_hostfwd() == [] and loop.made("forwards") is None
        limit = stats["flow_limits"]["ping"]
        relay = loop.icmp  # made now, and its timers are served from now on
        assert loop.made("icmp") is relay and relay in loop.services
        assert relay.max_flows == limit == backend.stats()["flow_limits"]["ping"]
        assert loop.icmp is relay  # made once
        with pytest.raises(AttributeError):
            loop.no_such_service  # noqa: B018
    finally:
        backend.close()
        for fd in (stop_r, stop_w):
            os.close(fd)
        guest.close()
        tap.close()
