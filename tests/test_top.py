"""``pyslirp top`` and ``pyslirp stats`` against a real forwarder (its API
socket), and the API's ``stats`` and TCP fields of ``list_connections``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from tests import harness
from tests.test_api import ask, our_api
from tests.test_libslirp import needs_libslirp

TOOL_TIMEOUT = 30

# Hostile frames, written on tap0 from inside the namespace through a packet
# socket: each is dropped by the stack for the reason that is its key.
HOSTILE_FRAMES = r"""
import socket, struct, sys
count = int(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
mac = s.getsockname()[4]  # tap0's own address
eth = b"\xff" * 6 + mac + b"\x08\x00"
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0,
                               socket.inet_aton("10.0.2.100"), socket.inet_aton("10.0.2.2")))
good = checksum(bytes(header))
struct.pack_into("!H", header, 10, good ^ 0x5A5A)  # wrong on purpose
udp = struct.pack("!HHHH", 4000, 4001, 8, 0)
frames = [
    eth + b"\x45\x00\x00",  # ipv4-truncated
    eth + b"\x65" + bytes(27),  # ipv4-bad-version
    eth + bytes(header) + udp,  # ipv4-bad-checksum
]
for _ in range(count):
    for frame in frames:
        s.send(frame)
print("sent", flush=True)
"""
HOSTILE_REASONS = ("ipv4-truncated", "ipv4-bad-version", "ipv4-bad-checksum")

# A guest client that keeps one connection open and echoes through it.
GUEST_CLIENT = r"""
import socket, sys, time
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=10)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    s.sendall(b"x" * 4000)
    got = 0
    while got < 4000:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(0)
        got += len(chunk)
    time.sleep(0.02)
"""


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*harness.TOOLS, *args],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        cwd=harness.REPO,
    )


@contextlib.contextmanager
def echo_host_server():
    """A TCP echo server on 127.0.0.1 (the guest's 10.0.2.2), one thread
    per connection, stopped and joined on exit."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()
    conns = []

    def echo(conn):
        conn.settimeout(0.2)
        while not stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            conn.sendall(data)

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in conns:
            conn.close()
        server.close()


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def api(path: str, execute: str) -> dict:
    reply = json.loads(ask(path, json.dumps({"execute": execute}).encode()))
    assert "return" in reply, reply
    return reply["return"]


def live_tcp(path: str, port: int) -> dict | None:
    rows = api(path, "list_connections")["connections"]
    for row in rows:
        mine = row["proto"] == "tcp" and row["host"] == f"127.0.0.1:{port}"
        if mine and row["state"] == "ESTABLISHED" and row.get("srtt"):
            return row
    return None


@pytest.mark.e2e
def test_top_once_shows_the_live_connection_with_its_rtt():
    with echo_host_server() as port, our_api() as fwd:
        harness.configure_guest(fwd)
        fwd.popen(["python3", "-c", GUEST_CLIENT, str(port)])
        row = wait_for(lambda: live_tcp(fwd.api_path, port), what="the live connection")
        # The API's TCP fields (TcpConnection.info), as ss -ti shows them.
        for field in ("srtt", "rttvar", "rto", "cwnd", "ssthresh", "in_flight", "retransmits"):
            assert isinstance(row[field], (int, float)), field
        assert row["srtt"] > 0 and row["rto"] >= row["srtt"]
        assert row["cwnd"] >= row["mss"] > 0 and row["snd_wnd"] > 0 and row["rcv_wnd"] > 0
        assert row["age"] >= 0 and row["guest"].startswith("10.0.2.100:")

        done = tool("top", "--api-socket", fwd.api_path, "--once", "--interval", "0.5")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        head = next(line for line in lines if line.startswith("PROTO"))
        assert head.split()[:4] == ["PROTO", "GUEST", "HOST", "STATE"] and "SRTT" in head
        flows = [line for line in lines if f"127.0.0.1:{port}" in line]
        assert len(flows) == 1, done.stdout
        cells = flows[0].split()
        srtt = cells[head.split().index("SRTT")]
        assert cells[0] == "tcp" and cells[3] == "ESTABLISHED"
        assert srtt.endswith("ms") and float(srtt[:-2]) >= 0, srtt
        rate = cells[head.split().index("G>H/s")]
        assert rate != "-", "two samples give a rate"  # the client sends all along
        assert any(line.startswith("backend python") for line in lines)
        assert any(line.startswith("held ") and "fds " in line for line in lines)

        # --filter: the connection's port shows it, another port does not.
        other = tool("top", "-a", fwd.api_path, "--once", "--interval", "0", "--filter", "1")
        assert other.returncode == 0 and f"127.0.0.1:{port}" not in other.stdout
        assert "rates need two samples" in other.stdout
        mine = tool("top", "-a", fwd.api_path, "--once", "--interval", "0", "--filter", str(port))
        assert f"127.0.0.1:{port}" in mine.stdout
        for key in ("rtt", "age", "host", "rate"):
            sorted_ = tool("top", "-a", fwd.api_path, "--once", "--interval", "0", "--sort", key)
            assert sorted_.returncode == 0 and f"127.0.0.1:{port}" in sorted_.stdout


@pytest.mark.e2e
def test_stats_after_hostile_frames_shows_drops_by_reason():
    count = 5
    with our_api() as fwd:
        harness.configure_guest(fwd)
        before = api(fwd.api_path, "stats")
        assert before["backend"] == "python" and before["unsupported"] == []
        assert all(before["drops"].get(reason, 0) == 0 for reason in HOSTILE_REASONS)
        sent = fwd.run(["python3", "-c", HOSTILE_FRAMES, str(count)], timeout=30)
        assert sent.returncode == 0, sent.stderr

        def dropped():
            drops = api(fwd.api_path, "stats")["drops"]
            return all(drops.get(reason, 0) >= count for reason in HOSTILE_REASONS) and drops

        drops = wait_for(dropped, what="the hostile frames' drops")
        assert {reason: drops[reason] for reason in HOSTILE_REASONS} == dict.fromkeys(
            HOSTILE_REASONS, count
        )
        stats = api(fwd.api_path, "stats")
        assert stats["counters"]["loop"]["internal-error"] == 0
        assert stats["memory"]["limit"] > 0 and stats["memory"]["held"] >= 0
        assert stats["descriptors"]["limit"] > 0 and stats["flow_limits"]["tcp"] > 0
        assert set(stats["flows"]) >= {"tcp", "udp", "ping"} and stats["uptime"] > 0

        text = tool("stats", "--api-socket", fwd.api_path)
        assert text.returncode == 0, text.stderr
        drops_line = next(line for line in text.stdout.splitlines() if line.startswith("drops:"))
        for reason in HOSTILE_REASONS:
            assert f"{reason}={count}" in drops_line
        as_json = tool("stats", "--api-socket", fwd.api_path, "--json")
        assert json.loads(as_json.stdout)["drops"]["ipv4-bad-checksum"] == count
        top = tool("top", "-a", fwd.api_path, "--once", "--interval", "0")
        assert f"ipv4-bad-version {count}" in top.stdout


@pytest.mark.e2e
@needs_libslirp
def test_libslirp_stats_says_what_it_cannot_report():
    with echo_host_server() as port, our_api("--backend=libslirp") as fwd:
        harness.configure_guest(fwd)
        fwd.popen(["python3", "-c", GUEST_CLIENT, str(port)])

        def tcp_flow():
            stats = api(fwd.api_path, "stats")
            return stats if stats["flows"].get("tcp", 0) >= 1 else None

        stats = wait_for(tcp_flow, what="libslirp's TCP socket")
        assert stats["backend"] == "libslirp" and stats["uptime"] > 0
        assert {"drops", "memory"} <= set(stats["unsupported"])
        assert "drops" not in stats and "memory" not in stats
        assert stats["counters"]["backend"]["frames-in"] > 0
        done = tool("stats", "-a", fwd.api_path)
        assert done.returncode == 0 and "unsupported: drops" in done.stdout
        top = tool("top", "-a", fwd.api_path, "--once", "--interval", "0")
        assert top.returncode == 0 and "not reported by this backend: drops" in top.stdout
        # libslirp names the far end as the guest sees it (10.0.2.2).
        assert f"10.0.2.2:{port}" in top.stdout


def test_errors_are_one_line_and_status_1():
    work = tempfile.mkdtemp(prefix="pyslirp-top-")
    try:
        missing = os.path.join(work, "absent.sock")
        dead = os.path.join(work, "dead.sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(dead)  # a socket file with no listener: the forwarder is gone
        plain = os.path.join(work, "file")
        open(plain, "w").close()
        for args, words in (
            (["top", "-a", missing, "--once"], "no API socket at"),
            (["stats", "-a", dead], "the forwarder is not running"),
            (["top", "-a", plain, "--once"], "is not a socket"),
            (["top", "-a", dead, "--sort", "colour"], "invalid choice"),
            (["top", "-a", dead, "--interval", "-1"], "--interval"),
            (["top", "--once"], "--api-socket"),
            (["stats", "-a", dead, "--bogus"], "unrecognized arguments"),
        ):
            done = tool(*args)
            assert done.returncode == 1, (args, done.stderr)
            assert done.stdout == ""
            lines = done.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("pyslirp: "), (args, done.stderr)
            assert words in lines[0], (args, lines[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_an_api_error_reply_is_one_line(tmp_path):
    # A listener that answers every request with slirp4netns's error shape.
    path = str(tmp_path / "api.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    server.settimeout(10)

    def answer():
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(4096)
                conn.sendall(b'{"error":{"desc":"bad request: unknown execute"}}')

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        done = tool("stats", "-a", path)
    finally:
        thread.join(timeout=15)
        server.close()
    assert done.returncode == 1
    assert done.stderr == "pyslirp: stats: bad request: unknown execute\n"


def test_the_forwarder_never_imports_top():
    # The live view and its curses stay out of the forwarder's start-up.
    code = (
        "import sys, forwarder.cli, forwarder.serve, forwarder.api, forwarder.metrics\n"
        "assert 'forwarder.top' not in sys.modules and 'curses' not in sys.modules\n"
    )
    done = subprocess.run(
        [harness.FORWARDER[0], "-c", code], cwd=harness.REPO, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    """What a pty gives until ``needle`` shows (AssertionError if it does not)."""
    import select

    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not shown; got {seen[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return seen


@pytest.mark.e2e
def test_the_live_view_draws_sorts_and_quits_on_a_terminal():
    import fcntl
    import pty
    import struct
    import termios

    with echo_host_server() as port, our_api() as fwd:
        harness.configure_guest(fwd)
        fwd.popen(["python3", "-c", GUEST_CLIENT, str(port)])
        wait_for(lambda: live_tcp(fwd.api_path, port), what="the live connection")
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        proc = subprocess.Popen(
            [*harness.TOOLS, "top", "-a", fwd.api_path, "--interval", "0.5"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=harness.REPO,
            env={**os.environ, "TERM": "xterm"},
            start_new_session=True,
        )
        os.close(slave)
        try:
            shown = read_until(master, b"ESTABLISHED")
            assert b"backend python" in shown and b"SRTT" in shown
            assert f"127.0.0.1:{port}".encode() in shown
            os.write(master, b"s")  # bytes -> rate
            read_until(master, b"rate")
            os.write(master, b"q")
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            os.close(master)
