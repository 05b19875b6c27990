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
        assert growth_mib <= BUDGET_MIB + MARGIN_MIB
        assert "memory budget: under pressure" in log
