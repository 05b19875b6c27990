"""The descriptor budget (pyslirp/nat/descriptors.py) and the loop's barrier
around its handlers: in-process through the real loop on real sockets, then
end to end under ``prlimit --nofile=1024:1024`` with the kernel as the guest."""

import os
import resource
import socket
import subprocess
import threading
import time

import pytest
from scapy.layers.inet import ICMP, TCP, UDP
from scapy.layers.l2 import Ether

from pyslirp.nat.descriptors import DescriptorBudget, raise_soft_limit
from pyslirp.nat.loop import READ
from pyslirp.stack.events import UdpDatagramReceived
from tests import harness
from tests.dnsserver import DnsServer
from tests.inprocess import InProcessNetwork
from tests.test_forward import free_port, guest_server
from tests.test_tcp_e2e import Server, read_request_head
from tests.test_tcp_nat import ISN, _handshake, guest_segment, guest_syn, has_flag, tcp_or_icmp
from tests.test_udp_e2e import UdpEcho, socat_udp
from tests.test_udp_nat import guest_udp, is_icmp


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def udp_reply_to(port: int):
    def predicate(frame: bytes) -> bool:
        pkt = Ether(frame)
        return UDP in pkt and ICMP not in pkt and pkt[UDP].dport == port

    return predicate


# ------------------------------------------------------------ the budget
def test_budget_sizes_from_the_limit_less_the_reserve():
    budget = DescriptorBudget(limit=1024, reserve=241, in_use_at_start=12)
    assert budget.capacity == 1024 - 241 - 12
    budget = DescriptorBudget(limit=100, reserve=241, in_use_at_start=12)
    assert budget.capacity == 0 and not budget.acquire()
    assert budget.counters["descriptors-refused"] == 1


def test_budget_evicts_before_it_refuses():
    budget = DescriptorBudget(limit=10, reserve=5, in_use_at_start=3)
    assert budget.capacity == 2
    assert budget.acquire() and budget.acquire()
    idle = [1]

    def evict() -> bool:
        if not idle:
            return False
        idle.pop()
        budget.release()
        return True

    budget.evictors.append(evict)
    assert budget.acquire() and budget.open == 2
    assert budget.counters["descriptors-evicted"] == 1
    assert not budget.acquire()  # nothing idle left
    budget.release()
    assert budget.acquire()


def test_raise_soft_limit_takes_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        new_soft, new_hard = raise_soft_limit()
        assert new_hard == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == new_soft
        if hard != resource.RLIM_INFINITY:
            assert new_soft == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_tables_are_sized_from_the_budget():
    with InProcessNetwork() as net:
        loop = net.loop
        capacity = loop.descriptors.capacity
        assert capacity > 0
        assert loop.udp.max_flows == min(loop.config.max_udp_flows, capacity)
        assert loop.tcp.max_flows == min(loop.config.tcp_max_connections, capacity)
        assert loop.icmp.max_flows == min(loop.config.max_ping_sockets, capacity)


def test_short_of_descriptors_the_least_recently_used_udp_flow_goes(echo_server):
    port = echo_server.getsockname()[1]
    with InProcessNetwork() as net:
        budget = net.loop.descriptors
        udp = net.loop.udp
        budget.capacity = budget.open + 3  # room for three flows
        for sport in (41000, 41001, 41002):
            net.send(guest_udp("10.0.2.2", port, b"x", sport=sport))
            echo_server.recvfrom(10)
        socks = {key[1]: flow.sock for key, flow in udp.flows.items()}
        # 41000 is used again (a reply to it counts too): 41001 is now the oldest.
        net.send(guest_udp("10.0.2.2", port, b"again", sport=41000))
        _, peer = echo_server.recvfrom(10)
        echo_server.sendto(b"reply", peer)
        assert net.receive(predicate=udp_reply_to(41000)) is not None
        net.send(guest_udp("10.0.2.2", port, b"fourth", sport=41003))
        assert echo_server.recvfrom(10)[0] == b"fourth"
        assert wait_until(lambda: sorted(k[1] for k in udp.flows) == [41000, 41002, 41003])
        assert socks[41001].fileno() == -1  # its socket is closed
        assert udp.counters["flows-evicted"] == 1 and budget.open == 3
        # A TCP connection finds no descriptor either: 41002 makes room.
        listener = socket.create_server(("127.0.0.1", 0))
        try:
            net.send(guest_syn("10.0.2.2", listener.getsockname()[1], sport=42000))
            reply = Ether(net.receive(predicate=tcp_or_icmp))
            assert str(reply[TCP].flags) == "SA"
            assert sorted(k[1] for k in udp.flows) == [41000, 41003]
            assert socks[41002].fileno() == -1
        finally:
            listener.close()


def test_with_no_descriptor_to_be_had_a_syn_gets_a_rst_alone():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        with InProcessNetwork() as net:
            budget = net.loop.descriptors
            budget.capacity = budget.open + 1  # one connection, no UDP flow to evict
            net.send(guest_syn("10.0.2.2", port, sport=40001))
            first = Ether(net.receive(predicate=tcp_or_icmp))
            net.send(guest_syn("10.0.2.2", port, sport=40002))
            second = Ether(net.receive(predicate=tcp_or_icmp))
            assert str(first[TCP].flags) == "SA" and str(second[TCP].flags) == "RA"
            assert second[TCP].dport == 40002
            assert net.loop.tcp.counters["connections-limited"] == 1
            assert budget.counters["descriptors-refused"] >= 1
    finally:
        listener.close()


def test_emfile_from_socket_is_a_refusal_not_a_crash(echo_server):
    """The process runs out of descriptors behind the budget's back (its
    count says there is room): socket() fails with EMFILE; the loop evicts,
    retries, and refuses only what it cannot serve."""
    port = echo_server.getsockname()[1]
    listener = socket.create_server(("127.0.0.1", 0))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hogs = []
    try:
        with InProcessNetwork() as net:
            net.send(guest_udp("10.0.2.2", port, b"x", sport=43000))
            echo_server.recvfrom(10)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
            try:
                while True:
                    hogs.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            # The UDP flow is evicted to give its descriptor to the SYN.
            net.send(guest_syn("10.0.2.2", listener.getsockname()[1], sport=40010))
            reply = Ether(net.receive(predicate=tcp_or_icmp))
            assert str(reply[TCP].flags) == "SA"
            assert net.loop.udp.counters["flows-evicted"] == 1
            # Nothing is left to evict: the next SYN gets a RST, a datagram ICMP.
            net.send(guest_syn("10.0.2.2", listener.getsockname()[1], sport=40011))
            reply = Ether(net.receive(predicate=tcp_or_icmp))
            assert str(reply[TCP].flags) == "RA" and reply[TCP].dport == 40011
            net.send(guest_udp("10.0.2.2", port, b"y", sport=43001))
            icmp = Ether(net.receive(predicate=is_icmp))
            assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 13)
            assert net.loop.counters["internal-error"] == 0
            for fd in hogs:
                os.close(fd)
            hogs.clear()
    finally:
        for fd in hogs:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        listener.close()


# ------------------------------------------------------------ the barrier
def fail_handler_of(loop, sock, events: int, exc: Exception) -> None:
    """Make the loop's handler of ``sock`` (registered for ``events``) raise
    ``exc`` from now on; its on_error stays."""

    def broken(mask, now):
        raise exc

    loop.modify(sock, events, broken)


def test_a_failing_udp_socket_handler_closes_its_flow_alone(echo_server):
    port = echo_server.getsockname()[1]
    with InProcessNetwork() as net:
        udp = net.loop.udp
        peers = {}
        for sport in (44000, 44001):
            net.send(guest_udp("10.0.2.2", port, b"x", sport=sport))
            peers[sport] = echo_server.recvfrom(10)[1]
        broken = udp.flows[(bytes([10, 0, 2, 100]), 44000)]
        fail_handler_of(net.loop, broken.sock, READ, RuntimeError("boom in udp"))
        echo_server.sendto(b"to the broken flow", peers[44000])
        assert wait_until(lambda: net.loop.counters["internal-error"] == 1)
        assert "boom in udp" in net.loop.last_internal_error
        assert wait_until(lambda: broken.sock.fileno() == -1)
        assert [k[1] for k in udp.flows] == [44001]
        # The other flow carries on, both ways, and the loop is alive.
        net.send(guest_udp("10.0.2.2", port, b"other", sport=44001))
        data, peer = echo_server.recvfrom(10)
        assert data == b"other"
        echo_server.sendto(b"back", peer)
        reply = Ether(net.receive(predicate=udp_reply_to(44001)))
        assert bytes(reply[UDP].payload) == b"back"
        # The guest's next datagram from the failed port opens a new flow.
        net.send(guest_udp("10.0.2.2", port, b"new", sport=44000))
        assert echo_server.recvfrom(10)[0] == b"new"
    assert net.error is None


def test_a_failing_tcp_socket_handler_resets_that_connection_alone():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(2)
    port = listener.getsockname()[1]
    try:
        with InProcessNetwork() as net:
            ours = {}
            hosts = {}
            for sport in (45000, 45001):
                ours[sport] = _handshake(net, port, sport)
                hosts[sport], _ = listener.accept()
                hosts[sport].settimeout(2)
            flows = {f.conn.remote_port: f for f in net.loop.tcp.flows}
            victim = flows[45000]
            fail_handler_of(net.loop, victim.sock, victim.mask, ValueError("boom in tcp"))
            hosts[45000].sendall(b"wakes the broken handler")
            rst = net.receive(predicate=has_flag(0x04, 45000))
            assert rst is not None, "the guest got no RST"
            assert net.loop.counters["internal-error"] == 1
            assert "boom in tcp" in net.loop.last_internal_error
            assert net.loop.tcp.counters["connections-failed"] == 1
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                hosts[45000].recv(10) or hosts[45000].sendall(b"x" * 100000)
            # The other connection relays both ways.
            net.send(guest_segment(port, 45001, ISN + 1, ours[45001], "PA", b"ping"))
            assert hosts[45001].recv(10) == b"ping"
            hosts[45001].sendall(b"pong")
            data = net.receive(predicate=lambda f: TCP in Ether(f) and bytes(Ether(f)[TCP].payload))
            assert bytes(Ether(data)[TCP].payload) == b"pong"
            assert Ether(data)[TCP].dport == 45001
            for sock in hosts.values():
                sock.close()
        assert net.error is None
    finally:
        listener.close()


def test_a_failing_event_handler_answers_that_datagram_and_serves_the_rest(echo_server):
    port = echo_server.getsockname()[1]
    with InProcessNetwork() as net:
        loop = net.loop
        handler = loop.udp.on_datagram

        def sometimes_broken(event, now):
            if event.src_port == 46000:
                raise KeyError("boom in an event")
            handler(event, now)

        loop.on_event(UdpDatagramReceived, sometimes_broken, on_error=loop.udp.on_error)
        net.send(guest_udp("10.0.2.2", port, b"x", sport=46000))
        icmp = Ether(net.receive(predicate=is_icmp))
        assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 13)
        assert loop.counters["internal-error"] == 1
        assert "UdpDatagramReceived" in loop.last_internal_error
        net.send(guest_udp("10.0.2.2", port, b"fine", sport=46001))
        assert echo_server.recvfrom(10)[0] == b"fine"
    assert net.error is None


def test_a_failing_timer_closes_the_flow_it_was_on(echo_server):
    port = echo_server.getsockname()[1]
    with InProcessNetwork(udp_idle_timeout=0.3) as net:
        udp = net.loop.udp
        net.send(guest_udp("10.0.2.2", port, b"x", sport=47000))
        echo_server.recvfrom(10)
        flow = next(iter(udp.flows.values()))
        unregister = net.loop.unregister
        failures = []

        def unregister_once_broken(sock):
            # The sweep closes the idle flow: its first step fails.
            if sock is flow.sock and not failures:
                failures.append(sock)
                raise OSError("boom in a timer")
            unregister(sock)

        net.loop.unregister = unregister_once_broken
        # (the loop runs in its own thread: wait for the whole of its clean-up)
        assert wait_until(
            lambda: failures
            and flow.sock.fileno() == -1
            and not udp.flows
            and net.loop.descriptors.open == 0,
            timeout=5,
        ), (failures, udp.flows, net.loop.descriptors.open)
        assert net.loop.counters["internal-error"] == 1
        assert "timer of UdpNat" in net.loop.last_internal_error
        # And the loop goes on: a new flow works.
        net.send(guest_udp("10.0.2.2", port, b"after", sport=47001))
        assert echo_server.recvfrom(10)[0] == b"after"
    assert net.error is None


def test_internal_errors_are_logged_once_per_interval(echo_server, caplog):
    port = echo_server.getsockname()[1]
    with InProcessNetwork(log_interval=60.0) as net:
        loop = net.loop
        handler = loop.udp.on_datagram

        def broken(event, now):
            if event.src_port < 48100:
                raise RuntimeError("boom again")
            handler(event, now)

        loop.on_event(UdpDatagramReceived, broken, on_error=loop.udp.on_error)
        with caplog.at_level("ERROR", logger="pyslirp"):
            for sport in range(48000, 48020):
                net.send(guest_udp("10.0.2.2", port, b"x", sport=sport))
            net.send(guest_udp("10.0.2.2", port, b"ok", sport=48100))
            assert echo_server.recvfrom(10)[0] == b"ok"
        assert loop.counters["internal-error"] == 20
        lines = [r for r in caplog.records if "internal error" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
    assert net.error is None


# ------------------------------------------------------------ end to end
LIMIT = 1024
SPRAY = r"""
import socket, sys, time
host, port, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sent = 0
for sport in range(first, first + count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("0.0.0.0", sport))
        s.sendto(b"spray", (host, port))
        sent += 1
    except OSError:
        pass
    finally:
        s.close()
    if sport % 8 == 0:
        time.sleep(0.002)  # a few seconds in all: the checks run while it goes on
print(sent, flush=True)
"""


def fd_numbers(pid: int) -> list:
    return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class FdSampler:
    """The forwarder's open descriptors, counted every few milliseconds."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < 100_000:
            try:
                self.samples.append(len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                return
            self._stop.wait(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def hello(conn) -> None:
    read_request_head(conn)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")


def published_port_answers(port: int, timeout: float = 10.0) -> bool:
    """A client of the published port reaches the guest's echo server."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        reader = conn.makefile("rb")
        if not reader.readline().startswith(b"10.0.2.2:"):
            return False
        conn.sendall(b"through\n")
        return reader.readline() == b"through\n"


def guest_checks(fwd, web: int, echo: int, pub: int) -> dict:
    """curl, dig and a UDP echo from the guest, and a client of the published port."""
    curl = fwd.run(
        ["curl", "-s", "--max-time", "10", f"http://10.0.2.2:{web}/"], timeout=20
    ).stdout
    dig = fwd.run(["dig", "@10.0.2.3", "+tries=2", "+time=3", "+short", "hello.test"], timeout=20)
    udp = socat_udp(fwd, f"10.0.2.2:{echo}", b"echo me\n").stdout
    return {
        "curl": curl,
        "dig": dig.stdout.strip(),
        "udp": udp,
        "published": published_port_answers(pub),
    }


@pytest.mark.e2e
def test_udp_source_port_spray_under_a_1024_descriptor_limit():
    """A guest sends one datagram from each of 3000 source ports: the
    forwarder keeps its reserve free, evicts the oldest UDP flows, and the
    guest's next connection, DNS query and datagram all work, during the
    spray and after it; a published port keeps accepting."""
    pub = free_port(socket.SOCK_STREAM)
    expected = {"curl": "hello", "dig": "192.0.2.9", "udp": "echo me\n", "published": True}
    with (
        Server(hello) as web,
        UdpEcho(limit=20_000) as echo,
        DnsServer(records={"hello.test.": "192.0.2.9"}) as dns,
        harness.forwarder(
            "-p",
            f"127.0.0.1:{pub}:8080",
            dns_upstreams=[dns.address],
            prefix=["prlimit", f"--nofile={LIMIT}:{LIMIT}"],
        ) as fwd,
        guest_server(fwd),
    ):
        before = fwd.fd_count()
        assert guest_checks(fwd, web.port, echo.port, pub) == expected
        with FdSampler(fwd.pid) as sampler:
            spray = fwd.popen(
                ["python3", "-c", SPRAY, "10.0.2.2", str(echo.port), "20000", "3000"], text=True
            )
            during = guest_checks(fwd, web.port, echo.port, pub)
            still_spraying = spray.poll() is None
            out, err = spray.communicate(timeout=120)
            assert out.strip() == "3000", err
            # Let the forwarder take in the last datagrams (UDP may drop a
            # few on the way: wait until no more come), then check that far
            # more flows than the limit reached the host.
            counts = [-1]
            for _ in range(100):
                if counts[-1] == len(echo.received):
                    break
                counts.append(len(echo.received))
                time.sleep(0.3)
            assert len(echo.received) > LIMIT + 1000, len(echo.received)
            after = guest_checks(fwd, web.port, echo.port, pub)
        assert during == expected
        assert after == expected
        peak = max(sampler.samples)
        print(
            f"\nfds: {before} before the spray, peak {peak} during it (limit {LIMIT}), "
            f"{fwd.fd_count()} after; spray still running during the checks: {still_spraying}"
        )
        # The budget keeps its reserve: well under the limit, never at it.
        assert peak <= LIMIT - 200, peak
        assert peak > 700, peak  # and the flows did use what they were given
        assert fwd.proc.poll() is None
    log = fwd.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@pytest.mark.e2e
def test_accept_without_descriptors_does_not_spin_and_recovers(tmp_path):
    """The forwarder's descriptor limit drops below what it has open
    (prlimit --pid): clients of a published port and of the API socket are
    shed, the forwarder stays idle and says so once, and serves them again
    once descriptors are back."""
    from forwarder.api import request

    pub = free_port(socket.SOCK_STREAM)
    api = str(tmp_path / "api.sock")
    with (
        harness.forwarder("-a", api, "-p", f"127.0.0.1:{pub}:8080") as fwd,
        guest_server(fwd),
    ):
        assert wait_until(lambda: os.path.exists(api), timeout=10)
        assert request(api, {"execute": "list_hostfwd"})["entries"][0]["host_port"] == pub
        assert published_port_answers(pub)
        numbers = fd_numbers(fwd.pid)
        lowest_free = next(n for n in range(len(numbers) + 1) if n not in numbers)
        subprocess.run(
            ["prlimit", f"--pid={fwd.pid}", f"--nofile={lowest_free}:{LIMIT * 4}"], check=True
        )
        try:
            cpu_before = cpu_seconds(fwd.pid)
            started = time.monotonic()
            clients = []
            targets = ((socket.AF_INET, ("127.0.0.1", pub)), (socket.AF_UNIX, api))
            while time.monotonic() - started < 2.0 and len(clients) < 200:
                for family, address in targets:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.settimeout(0.5)
                    clients.append(sock)
                    try:
                        sock.connect(address)
                        if family == socket.AF_UNIX:
                            sock.sendall(b'{"execute": "list_hostfwd"}')
                    except OSError:
                        pass
                time.sleep(0.05)
            remaining = 2.0 - (time.monotonic() - started)
            if remaining > 0:
                time.sleep(remaining)
            cpu = cpu_seconds(fwd.pid) - cpu_before
            for sock in clients:
                sock.close()
            assert fwd.proc.poll() is None
            assert cpu < 0.5, f"{cpu:.2f} s of CPU in 2 s: the listener spins"
            log = fwd.log()
            shed = [line for line in log.splitlines() if "no descriptor left" in line]
            assert 1 <= len(shed) <= 4, log[-3000:]
        finally:
            subprocess.run(["prlimit", f"--pid={fwd.pid}", f"--nofile={LIMIT * 4}"], check=True)
        # Descriptors are back: both listeners accept again (after a pause at most).
        assert wait_until(lambda: _answers(pub), timeout=10)
        assert request(api, {"execute": "list_hostfwd"})["entries"][0]["host_port"] == pub
        print(f"\ncpu {cpu:.3f} s in 2 s with no descriptor; {len(clients)} clients shed or held")


def _answers(pub: int) -> bool:
    try:
        return published_port_answers(pub, timeout=3)
    except OSError:
        return False
