"""The overlapping-GSO attack end to end: crafted frames through a real TAP
into a real forwarder, whose resident memory must stay within its budget.

A raw socket inside the namespace (tests/gso_attack.py) opens connections
to a host listener that accepts and never reads, and sends 64 KiB segments
that each bring 1 KiB of new data. Before the forwarder held what it
counted, each connection pinned about 64 MiB; now all of them together
hold no more than --memory-budget.
"""

import contextlib
import json
import select
import socket
import subprocess
import sys
import threading
import time

from tests import harness

BUDGET_MIB = 32
# Python's own overhead beyond the bytes held (objects, the heap's slack,
# frames in flight): the growth may exceed the budget by this much.
MARGIN_MIB = 32
# Under PyPy (PYSLIRP_TEST_PYTHON=pypy3) garbage waits for a major
# collection, which comes when the heap has grown by 1.82 times what
# survived the last one (PYPY_GC_MAJOR_COLLECT): the budget counts that much.
GC_FACTOR = 1.82 if "pypy" in harness.FORWARDER[0] else 1.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def silent_listener(host: str):
    """A listener on 127.0.0.1 in the namespace ``host`` that accepts and
    never reads (its receive buffers small, so that the forwarder soon has
    to hold on)."""
    with harness.this_thread_in(host):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append(conn)

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        server.close()


@contextlib.contextmanager
def small_buffered_host():
    """A host namespace whose TCP send buffers stay small (64 KiB at most),
    so that what the host peer does not read stays with the forwarder
    rather than in the kernel."""
    with harness.netns("mem") as host:
        subprocess.run(
            ["ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.tcp_wmem=4096 16384 65536"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip
        yield host


def test_overlapping_gso_attack_through_the_tap_stays_within_the_budget():
    with small_buffered_host() as host, silent_listener(host) as (
        port,
        accepted,
    ), harness.forwarder(
        f"--memory-budget={BUDGET_MIB}M",
        "--log-level=info",
        mtu=65520,
        configure=False,
        prefix=["nsenter", f"--net=/run/netns/{host}"],
    ) as fwd:
        fwd.run(["ip", "link", "set", "tap0", "mtu", "65520", "up"], timeout=10, check=True)
        time.sleep(0.5)
        before = rss_kib(fwd.pid)
        attack = fwd.popen(
            [sys.executable, "-m", "tests.gso_attack", "--port", str(port),
             "--connections", "40", "--hold"],
            stdin=subprocess.PIPE, cwd=harness.REPO, text=True,
        )  # fmt: skip
        try:
            ready = select.select([attack.stdout], [], [], 240)[0]
            assert ready, "the attack did not finish"
            line = attack.stdout.readline()
            assert line, attack.stderr.read()
            report = json.loads(line)
            time.sleep(0.5)
            after = rss_kib(fwd.pid)
            log = fwd.log()
        finally:
            attack.stdin.close()
            attack.wait(timeout=30)
        growth_mib = (after - before) / 1024
        print(f"attack {report}; forwarder RSS {before} KiB -> {after} KiB ({growth_mib:.1f} MiB)")
        assert report["connections"] == 40 and len(accepted) == 40
        # Unbounded, 40 connections of this would pin about 40 x 64 MiB.
        assert report["frame_bytes"] > 8 * (BUDGET_MIB + MARGIN_MIB) * 1024 * 1024
        assert growth_mib <= BUDGET_MIB * GC_FACTOR + MARGIN_MIB
        # It got as far as the budget allows (less what the kernel took).
        assert report["acked"] > BUDGET_MIB * 1024 * 1024 * 3 // 4
        assert "memory budget: under pressure" in log


def test_bytes_the_host_never_takes_are_released_with_the_lingering_flow():
    """Through the real loop: the guest sends, closes, and its connection
    ends while the host peer (reading nothing) has not taken the bytes; the
    NAT side keeps them for the TIME-WAIT timeout and then resets the host
    socket, and the budget gets every byte back."""
    from tests.inprocess import InProcessNetwork
    from tests.tcp_craft import ACK, FIN, PSH, SYN, parse_tcp, syn_options, tcp_frame

    guest_mac, gw_mac = bytes.fromhex("020000000001"), bytes.fromhex("52550a000202")
    guest, gateway = bytes([10, 0, 2, 100]), bytes([10, 0, 2, 2])
    isn, sport = 7000, 40123

    def is_ours(frame):
        return len(frame) >= 54 and frame[23] == 6 and frame[36:38] == sport.to_bytes(2, "big")

    with small_buffered_host() as host, silent_listener(host) as (port, accepted):
        net = InProcessNetwork(tcp_time_wait_timeout=1.0)
        with harness.this_thread_in(host):
            net.__enter__()  # the loop's thread (and its host sockets) in ``host``
        try:

            def send(seq, ack, flags, payload=b"", options=b""):
                net.send(tcp_frame(guest_mac, gw_mac, guest, gateway, sport, port, seq, ack,
                                   flags, payload, options=options))  # fmt: skip

            send(isn, 0, SYN, options=syn_options(1460, 7))
            ours, _ack, _flags, _window, _len = parse_tcp(net.receive(5.0, is_ours))
            ours += 1
            send(isn + 1, ours, ACK)
            total = 0
            while total < 400_000:
                send(isn + 1 + total, ours, ACK | PSH, bytes(1460))
                total += 1460
                if total % (40 * 1460) == 0:  # let the window open
                    while net.receive(0.2, is_ours) is not None:
                        pass
            send(isn + 1 + total, ours, ACK | FIN)
            deadline = time.monotonic() + 10
            fin_acked = None
            while fin_acked is None and time.monotonic() < deadline:
                frame = net.receive(0.5, is_ours)
                if frame is not None and parse_tcp(frame)[1] == (isn + 2 + total) & 0xFFFFFFFF:
                    fin_acked = frame  # all the data and the FIN acknowledged
            assert fin_acked is not None and len(accepted) == 1
            accepted[0].shutdown(socket.SHUT_WR)  # the host is done too, unread
            fin = None
            while fin is None and time.monotonic() < deadline:
                frame = net.receive(0.5, is_ours)
                if frame is not None and parse_tcp(frame)[2] & FIN:
                    fin = parse_tcp(frame)
            assert fin is not None
            tcp = net.loop.stack.tcp
            acked = (fin[1] - isn - 1) & 0xFFFFFFFF
            assert acked == total + 1
            send(isn + 2 + total, fin[0] + 1, ACK)
            while tcp.connections and time.monotonic() < deadline:
                time.sleep(0.02)
            budget = net.loop.stack.budget
            held = budget.held
            unread = sum(c.rx_bytes for c in list(tcp.unread))
            assert not tcp.connections and unread > 100_000 and held >= unread
            while budget.held and time.monotonic() < deadline:
                time.sleep(0.05)
            assert budget.held == 0 and not tcp.unread and not net.loop.tcp.flows
        finally:
            net.close()
