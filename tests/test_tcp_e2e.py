"""TCP end to end: the Linux kernel as the guest, the real forwarder, host
servers on 127.0.0.1 reached as 10.0.2.2.

After each test the forwarder must hold no socket for a closed connection
(its /proc/PID/fd is counted). Guest programs are short Python scripts run
with nsenter; host servers are threads of this process.
"""

import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests import harness

pytestmark = pytest.mark.e2e

MIB = 1 << 20
BLOCK = hashlib.sha256(b"pyslirp").digest() * (MIB // 32)  # 1 MiB of a fixed pattern


def pattern_sha256(mib: int) -> str:
    digest = hashlib.sha256()
    for _ in range(mib):
        digest.update(BLOCK)
    return digest.hexdigest()


class Server:
    """A TCP server on 127.0.0.1 that runs ``handler(conn)`` in a thread per
    connection; ``errors`` collects what the handlers raised."""

    def __init__(self, handler, backlog: int = 1024) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.results: list = []
        self.errors: list = []
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(60)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn) -> None:
        try:
            with conn:
                result = self.handler(conn)
                if result is not None:
                    self.results.append(result)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def __enter__(self):
        self._accepter.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._accepter.join(timeout=2)
        self.sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


def read_until_eof(conn) -> bytes:
    chunks = []
    while True:
        data = conn.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_request_head(conn) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            break
        head += data
    return head


def response_head(length: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % length


def http_get_pattern(mib: int):
    def handler(conn):
        read_request_head(conn)
        conn.sendall(response_head(mib * MIB))
        view = memoryview(BLOCK)
        for _ in range(mib):
            conn.sendall(view)

    return handler


def http_put_sha256(conn):
    head = read_request_head(conn)
    header, _, body = head.partition(b"\r\n\r\n")
    length = 0
    for line in header.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        if line.lower().startswith(b"expect: 100-continue"):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    digest = hashlib.sha256(body)
    received = len(body)
    while received < length:
        data = conn.recv(min(1 << 18, length - received))
        if not data:
            break
        digest.update(data)
        received += len(data)
    answer = digest.hexdigest().encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (len(answer), answer)
    )
    return received


def guest_python(fwd, code: str, timeout: float = 60.0, args=()):
    return fwd.run([sys.executable, "-c", code, *map(str, args)], timeout=timeout)


def tcp_socket_count(pid: int) -> int:
    """TCP sockets among the file descriptors of ``pid`` (by inode)."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                count += sum(1 for line in f if line.split()[9] in inodes)
        except OSError:
            pass
    return count


def wait_for_sockets(fwd, count: int, timeout: float = 5.0) -> int:
    """Poll until the forwarder holds ``count`` TCP sockets; return the last count."""
    deadline = time.monotonic() + timeout
    current = tcp_socket_count(fwd.pid)
    while current != count and time.monotonic() < deadline:
        time.sleep(0.05)
        current = tcp_socket_count(fwd.pid)
    return current


@pytest.fixture
def fwd():
    with harness.forwarder("--log-level", "info") as forwarder:
        forwarder.baseline_sockets = tcp_socket_count(forwarder.pid)
        yield forwarder
        # No socket outlives its connection.
        assert wait_for_sockets(forwarder, forwarder.baseline_sockets) == (
            forwarder.baseline_sockets
        )


# ------------------------------------------------------------------ bulk data
def test_get_100_mib_sha256_equal(fwd):
    with Server(http_get_pattern(100)) as server:
        out = fwd.run(
            [
                "sh",
                "-c",
                f"curl -sS --noproxy '*' --max-time 120 http://10.0.2.2:{server.port}/big"
                " | sha256sum",
            ],
            timeout=150,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == pattern_sha256(100)
    assert not server.errors
    log = fwd.log()
    assert f">10.0.2.2:{server.port} opened (host 127.0.0.1:{server.port})" in log
    assert f"10.0.2.2:{server.port} closed: " in log
    to_guest = 100 * MIB + len(response_head(100 * MIB))
    assert f"bytes from the guest, {to_guest} bytes to the guest" in log


def test_put_100_mib_sha256_equal(fwd, tmp_path):
    path = tmp_path / "upload.bin"
    with open(path, "wb") as f:
        for _ in range(100):
            f.write(BLOCK)
    with Server(http_put_sha256) as server:
        out = fwd.run(
            [
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "120",
                "-H",
                "Expect:",
                "-T",
                str(path),
                f"http://10.0.2.2:{server.port}/upload",
            ],
            timeout=150,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == pattern_sha256(100)
    assert server.results == [100 * MIB]


# ------------------------------------------------------------------ many connections
MANY_CLIENT = r"""
import selectors, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
socks = []
for i in range(count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("10.0.2.2", port))
    sel.register(s, selectors.EVENT_WRITE, [i, b""])
    socks.append(s)
done = failed = 0
deadline = time.monotonic() + 60
while done + failed < count and time.monotonic() < deadline:
    for key, mask in sel.select(1):
        s, state = key.fileobj, key.data
        if mask & selectors.EVENT_WRITE:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                failed += 1; sel.unregister(s); s.close(); continue
            s.send(b"hello %d\n" % state[0])
            sel.modify(s, selectors.EVENT_READ, state)
        else:
            data = s.recv(100)
            state[1] += data
            if not data or state[1].endswith(b"\n"):
                if state[1] == b"HELLO %d\n" % state[0]:
                    done += 1
                else:
                    failed += 1
                sel.unregister(s); s.close()
print(done, failed)
"""


def test_500_concurrent_short_connections(fwd):
    def upper(conn):
        line = b""
        while not line.endswith(b"\n"):
            data = conn.recv(100)
            if not data:
                break
            line += data
        conn.sendall(line.upper())

    with Server(upper) as server:
        out = guest_python(fwd, MANY_CLIENT, timeout=90, args=(server.port, 500))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["500", "0"]
    assert not server.errors


# ------------------------------------------------------------------ half-close
def test_guest_half_close_still_gets_the_reply(fwd):
    def hash_until_eof(conn):
        data = read_until_eof(conn)
        conn.sendall(hashlib.sha256(data).hexdigest().encode())
        return len(data)

    code = r"""
import hashlib, socket, sys
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=30)
payload = bytes(range(256)) * 4000
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    data = s.recv(4096)
    if not data:
        break
    reply += data
print(reply.decode() == hashlib.sha256(payload).hexdigest())
"""
    with Server(hash_until_eof) as server:
        out = guest_python(fwd, code, args=(server.port,))
    assert out.stdout.strip() == "True", out.stderr
    assert server.results == [256 * 4000]


def test_host_half_close_reaches_the_guest_as_fin(fwd):
    def greet_then_listen(conn):
        conn.sendall(b"server done talking")
        conn.shutdown(socket.SHUT_WR)
        return read_until_eof(conn)

    code = r"""
import socket, sys
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=30)
got = b""
while True:
    data = s.recv(4096)
    if not data:
        break
    got += data
s.sendall(b"but the guest still talks " * 1000)
s.close()
print(got.decode())
"""
    with Server(greet_then_listen) as server:
        out = guest_python(fwd, code, args=(server.port,))
    assert out.stdout.strip() == "server done talking", out.stderr
    assert server.results == [b"but the guest still talks " * 1000]


# ------------------------------------------------------------------ resets
def test_host_reset_mid_transfer_reaches_the_guest(fwd):
    def send_then_reset(conn):
        read_request_head(conn)
        conn.sendall(BLOCK)
        time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    code = r"""
import socket, sys
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=30)
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
total = 0
try:
    while True:
        data = s.recv(65536)
        if not data:
            print("eof", total)
            break
        total += len(data)
except ConnectionResetError:
    print("reset", total)
"""
    with Server(send_then_reset) as server:
        out = guest_python(fwd, code, args=(server.port,))
    word, total = out.stdout.split()
    assert word == "reset", out.stderr
    assert int(total) <= MIB
    assert "reset by host" in fwd.log()


def test_guest_reset_reaches_the_host(fwd):
    seen = threading.Event()

    def expect_reset(conn):
        conn.recv(100)
        try:
            while conn.recv(100):
                pass
        except ConnectionResetError:
            seen.set()
            return "reset"
        return "eof"

    code = r"""
import socket, struct, sys, time
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=30)
s.sendall(b"hi")
time.sleep(0.2)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"""
    with Server(expect_reset) as server:
        out = guest_python(fwd, code, args=(server.port,))
        assert out.returncode == 0, out.stderr
        assert seen.wait(5)
    assert server.results == ["reset"]


CONNECT = r"""
import socket, sys, time
start = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    print("connected")
except OSError as exc:
    print(exc.errno, round(time.monotonic() - start, 3))
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_host_port_is_refused_fast(fwd):
    out = guest_python(fwd, CONNECT, args=("10.0.2.2", closed_port()))
    code, elapsed = out.stdout.split()
    assert int(code) == 111  # ECONNREFUSED
    assert float(elapsed) < 1.0


def test_disable_host_loopback_is_net_unreachable():
    with harness.forwarder("--disable-host-loopback") as fwd:
        baseline = tcp_socket_count(fwd.pid)
        with Server(lambda conn: None) as server:
            out = guest_python(fwd, CONNECT, args=("10.0.2.2", server.port))
        code, elapsed = out.stdout.split()
        assert int(code) == 101  # ENETUNREACH
        assert float(elapsed) < 1.0
        assert tcp_socket_count(fwd.pid) == baseline


# ------------------------------------------------------------------ limits
def test_file_descriptor_limit_refuses_new_connections_and_keeps_old_ones():
    """Under a small RLIMIT_NOFILE new guest connections get RST, the
    connections already open carry on."""

    def echo_until_eof(conn):
        while True:
            data = conn.recv(4096)
            if not data:
                return
            conn.sendall(data)

    code = r"""
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
opened, refused = [], 0
for _ in range(count):
    try:
        opened.append(socket.create_connection(("10.0.2.2", port), timeout=10))
    except ConnectionRefusedError:
        refused += 1
ok = 0
for s in opened:
    s.sendall(b"still here")
    if s.recv(100) == b"still here":
        ok += 1
print(len(opened), refused, ok)
"""
    with harness.forwarder(prefix=["prlimit", "--nofile=40:40"]) as fwd:
        with Server(echo_until_eof) as server:
            out = guest_python(fwd, code, args=(server.port, 60), timeout=90)
            opened, refused, ok = map(int, out.stdout.split())
        assert refused > 0, out.stderr
        assert opened + refused == 60
        assert ok == opened


# ------------------------------------------------------------------ DNS over TCP
def test_dns_over_tcp_through_the_proxy():
    with (
        harness.DnsServer(records={"tcp.example.": "192.0.2.55"}) as dns,
        harness.forwarder("--dns-upstream", f"127.0.0.1:{dns.port}") as fwd,
    ):
        baseline = tcp_socket_count(fwd.pid)
        out = fwd.run(
            ["dig", "+tcp", "+short", "+time=3", "+tries=1", "@10.0.2.3", "tcp.example", "A"]
        )
        assert out.stdout.strip() == "192.0.2.55", out.stderr + out.stdout
        # Two queries pipelined on one connection (RFC 7766 6.2.1.1).
        code = r"""
import socket, struct
def query(qid, name):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)
s = socket.create_connection(("10.0.2.3", 53), timeout=10)
msgs = [query(7, "tcp.example"), query(8, "tcp.example")]
s.sendall(b"".join(struct.pack("!H", len(m)) + m for m in msgs))
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
ids = []
while data:
    n = struct.unpack("!H", data[:2])[0]
    ids.append(struct.unpack("!H", data[2:4])[0])
    data = data[2 + n:]
print(sorted(ids))
"""
        out = guest_python(fwd, code)
        assert out.stdout.strip() == "[7, 8]", out.stderr
        assert wait_for_sockets(fwd, baseline) == baseline


def test_connection_to_dns_address_other_port_is_refused(fwd):
    out = guest_python(fwd, CONNECT, args=("10.0.2.3", 80))
    code, elapsed = out.stdout.split()
    assert int(code) == 111
    assert float(elapsed) < 1.0


# ------------------------------------------------------------------ MTU 65520
def test_large_mtu_transfer_both_ways():
    with harness.forwarder(mtu=65520) as fwd:
        baseline = tcp_socket_count(fwd.pid)
        with Server(http_get_pattern(20)) as server:
            out = fwd.run(
                [
                    "sh",
                    "-c",
                    f"curl -sS --noproxy '*' --max-time 60 http://10.0.2.2:{server.port}/x"
                    " | sha256sum",
                ],
                timeout=90,
            )
        assert out.stdout.split()[0] == pattern_sha256(20), out.stderr

        def hash_until_eof(conn):
            conn.sendall(hashlib.sha256(read_until_eof(conn)).hexdigest().encode())

        code = r"""
import hashlib, socket, sys
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=30)
payload = hashlib.sha256(b"x").digest() * (20 * 32768)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode() == hashlib.sha256(payload).hexdigest())
"""
        with Server(hash_until_eof) as server:
            out = guest_python(fwd, code, args=(server.port,))
        assert out.stdout.strip() == "True", out.stderr
        assert wait_for_sockets(fwd, baseline) == baseline


def test_forwarder_pid_has_no_tcp_socket_after_many_closes(fwd):
    """Close paths in a loop: guest first, host first, resets; then no
    socket is left in the forwarder and none is stuck in the host kernel
    in CLOSE-WAIT toward our servers."""

    def talk(conn):
        data = conn.recv(10)
        if data == b"host-first":
            conn.sendall(b"bye")
            return
        read_until_eof(conn)

    code = r"""
import socket, struct, sys
port = int(sys.argv[1])
for i in range(30):
    s = socket.create_connection(("10.0.2.2", port), timeout=10)
    mode = i % 3
    if mode == 0:
        s.sendall(b"host-first")
        while s.recv(10):
            pass
        s.close()
    elif mode == 1:
        s.sendall(b"guest")
        s.close()
    else:
        s.sendall(b"reset")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
print("ok")
"""
    with Server(talk) as server:
        out = guest_python(fwd, code, args=(server.port,))
        assert out.stdout.strip() == "ok", out.stderr
        assert wait_for_sockets(fwd, fwd.baseline_sockets) == fwd.baseline_sockets
        ss = subprocess.run(["ss", "-tanH"], capture_output=True, text=True).stdout
        stuck = [
            line
            for line in ss.splitlines()
            if f":{server.port} " in line and line.split()[0] in ("CLOSE-WAIT", "FIN-WAIT-2")
        ]
        assert stuck == []
    assert os.path.exists(f"/proc/{fwd.pid}")


# ------------------------------------------------ a paused reader (persist)
# The forwarder's retransmission limits lowered (see NetworkConfig
# tcp_max_retransmits, tcp_max_rto) so that a connection whose zero-window
# probes counted as retransmissions would be reset after about 21 s
# (0.2 + 0.4 + 0.8 + 1.6 + 2 s x 9), not about 342 s.
PERSIST_ENV = {"PYSLIRP_TCP_MAX_RETRANSMITS": "12", "PYSLIRP_TCP_MAX_RTO": "2"}
PERSIST_OLD_LIMIT = 0.2 + 0.4 + 0.8 + 1.6 + 2 * 9
PAUSED_READER = """
import hashlib, socket, sys
sock = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=600)
digest, total, started = hashlib.sha256(), 0, False
while True:
    data = sock.recv(1 << 16)
    if not data:
        break
    digest.update(data)
    total += len(data)
    if not started and total >= 1 << 20:
        started = True
        print("started", flush=True)
print(total, digest.hexdigest(), flush=True)
"""


def test_stopped_reader_keeps_its_connection_while_it_answers_probes():
    import select
    import signal

    mib = 32  # more than every buffer on the way: the guest's window closes

    def send_pattern(conn):
        conn.settimeout(600)
        view = memoryview(BLOCK)
        for _ in range(mib):
            conn.sendall(view)

    with (
        Server(send_pattern) as server,
        harness.forwarder("--log-level", "info", env=PERSIST_ENV) as fwd,
    ):
        reader = fwd.popen([sys.executable, "-c", PAUSED_READER, str(server.port)], text=True)
        ready, _, _ = select.select([reader.stdout], [], [], 60)
        assert ready and reader.stdout.readline().strip() == "started"
        os.kill(reader.pid, signal.SIGSTOP)
        try:
            time.sleep(2 * PERSIST_OLD_LIMIT)  # the window stays shut all along
        finally:
            os.kill(reader.pid, signal.SIGCONT)
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err + fwd.log()
        total, digest = out.split()
        assert int(total) == mib * MIB
        assert digest == pattern_sha256(mib)
        assert not server.errors
