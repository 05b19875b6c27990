"""The API socket (forwarder/api.py): slirp4netns's protocol, byte for byte.

The same requests go to the real slirp4netns (1.2, from Debian) and to us,
and the replies must be the same bytes; where slirp4netns has no defined
answer (it crashes on a missing proto) or accepts nonsense (a negative port),
our answer is checked on its own.
"""

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from forwarder.api import Api, parse_request
from pyslirp.config import NetworkConfig
from tests import harness

FORWARDER = [sys.executable, "-m", "forwarder"]


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def ask(path: str, data: bytes, shutdown: bool = True, timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        for _ in range(100):  # slirp4netns listens with a backlog of 0
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                time.sleep(0.01)
        try:
            sock.sendall(data)
            if shutdown:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not shutdown:
                break
    return b"".join(chunks)


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                return  # (the server answers this empty request with an error)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        time.sleep(0.02)
    raise AssertionError(f"{path} does not listen")


@contextlib.contextmanager
def slirp4netns_api():
    """The real slirp4netns with an API socket, on a throw-away namespace."""
    work = tempfile.mkdtemp(prefix="pyslirp-s4n-")
    path = os.path.join(work, "api.sock")
    target = subprocess.Popen(["unshare", "-n", "sleep", "60"])
    proc = None
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{target.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc = subprocess.Popen(
            ["slirp4netns", "-a", path, str(target.pid), "tap0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_socket(path, proc)
        yield path
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)
        target.kill()
        target.wait(timeout=5)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def our_api(*extra):
    work = tempfile.mkdtemp(prefix="pyslirp-api-")
    path = os.path.join(work, "api.sock")
    try:
        with harness.forwarder("-a", path, *extra, configure=False) as fwd:
            wait_for_socket(path, fwd.proc)
            fwd.api_path = path
            yield fwd
        assert not os.path.exists(path), "the API socket outlived the forwarder"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add(proto="tcp", **arguments) -> bytes:
    return json.dumps(
        {"execute": "add_hostfwd", "arguments": {"proto": proto, **arguments}}
    ).encode()


def script(p1: int, p2: int, p3: int, busy: int) -> list[bytes]:
    """Requests whose replies slirp4netns 1.2 defines."""
    return [
        add(host_port=p1, guest_port=80),
        add("udp", host_addr="127.0.0.1", host_port=p2, guest_addr="10.0.2.5", guest_port=81),
        b'{"execute": "list_hostfwd"}',
        add(host_port=p1, guest_port=80),  # our own port: busy
        add(host_port=busy, guest_port=80),  # someone else's port: busy
        b'{"execute": "remove_hostfwd", "arguments": {"id": 1}}',
        b'{"execute": "remove_hostfwd", "arguments": {"id": 1}}',
        b'{"execute": "remove_hostfwd"}',
        b'{"execute": "remove_hostfwd", "arguments": {"id": "2"}}',
        add(host_port=p1, guest_port=80),  # a new id, never 1 again
        add(host_addr="", guest_addr="", host_port=p3 + 0.7, guest_port=8080),
        b'{"execute": "list_hostfwd"}',
        b"badjson\n",
        b"",
        b"[1]",
        b'"x"',
        b'{"unexpectedjson": 42}',
        b'{"execute": 1}',
        b'{"execute": "bad"}',
        add("bad"),
        add(host_addr="1.2.3", host_port=1, guest_port=1),
        add(host_addr="01.2.3.4", host_port=1, guest_port=1),
        add(host_addr="::1", host_port=1, guest_port=1),
        add(guest_port=80),
        add(host_port="80", guest_port=80),
        add(host_port=True, guest_port=80),
        add(host_port=p1 + 1, guest_addr="x", guest_port=80),
        add(host_port=p1 + 1),
        b"\0" * 5000,
        b'{"execute": "list_hostfwd"}\0{garbage',
    ]


def run_script(path: str, requests: list[bytes]) -> list[bytes]:
    return [ask(path, request) for request in requests]


@pytest.mark.e2e
def test_replies_are_slirp4netns_bytes():
    if shutil.which("slirp4netns") is None:
        pytest.fail("slirp4netns is not installed (.ci/install installs it)")
    p1, p2, p3 = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    try:
        requests = script(p1, p2, p3, busy.getsockname()[1])
        with slirp4netns_api() as path:
            theirs = run_script(path, requests)
        with our_api() as fwd:
            ours = run_script(fwd.api_path, requests)
    finally:
        busy.close()
    for request, a, b in zip(requests, theirs, ours, strict=True):
        assert a == b, f"request {request[:80]!r}: slirp4netns {a!r}, ours {b!r}"
    # And what they are, spelled out.
    error = b'{"error":{"desc":"bad request: %s"}}'
    entry = (
        b'{"id":%d,"proto":"%s","host_addr":"%s","host_port":%d,"guest_addr":"%s","guest_port":%d}'
    )
    assert ours == [
        b'{"return":{"id":1}}',
        b'{"return":{"id":2}}',
        b'{"entries":['
        + entry % (1, b"tcp", b"0.0.0.0", p1, b"10.0.2.100", 80)
        + b","
        + entry % (2, b"udp", b"127.0.0.1", p2, b"10.0.2.5", 81)
        + b"]}",
        error % b"add_hostfwd: slirp_add_hostfwd failed",
        error % b"add_hostfwd: slirp_add_hostfwd failed",
        b'{"return":{}}',
        error % b"remove_hostfwd: bad arguments.id",
        error % b"remove_hostfwd: bad arguments.id",
        error % b"remove_hostfwd: bad arguments.id",
        b'{"return":{"id":3}}',
        b'{"return":{"id":4}}',
        b'{"entries":['
        + entry % (2, b"udp", b"127.0.0.1", p2, b"10.0.2.5", 81)
        + b","
        + entry % (3, b"tcp", b"0.0.0.0", p1, b"10.0.2.100", 80)
        + b","
        + entry % (4, b"tcp", b"0.0.0.0", p3, b"10.0.2.100", 8080)
        + b"]}",
        error % b"cannot parse JSON",
        error % b"cannot parse JSON",
        error % b"json_object() failed",
        error % b"json_object() failed",
        error % b"no execute found",
        error % b"no execute found",
        error % b"unknown execute",
        error % b"add_hostfwd: bad arguments.proto",
        error % b"add_hostfwd: bad arguments.host_addr",
        error % b"add_hostfwd: bad arguments.host_addr",
        error % b"add_hostfwd: bad arguments.host_addr",
        error % b"add_hostfwd: bad arguments.host_port",
        error % b"add_hostfwd: bad arguments.host_port",
        error % b"add_hostfwd: bad arguments.host_port",
        error % b"add_hostfwd: bad arguments.guest_addr",
        error % b"add_hostfwd: bad arguments.guest_port",
        error % b"too large message",
        ours[-1],
    ]
    assert json.loads(ours[-1]) == {"entries": json.loads(ours[11])["entries"]}


@pytest.mark.e2e
def test_socket_is_0600_answers_without_shutdown_and_is_removed_at_exit():
    with our_api() as fwd:
        mode = stat.S_IMODE(os.stat(fwd.api_path).st_mode)
        assert mode == 0o600, oct(mode)
        # A client that never shuts down its side still gets its answer.
        assert ask(fwd.api_path, b'{"execute": "list_hostfwd"}', shutdown=False) == (
            b'{"entries":[]}'
        )
        # ... also when the request comes in pieces.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(fwd.api_path)
            sock.sendall(b'{"execute": ')
            time.sleep(0.2)
            sock.sendall(b'"list_hostfwd"}')
            assert sock.recv(1000) == b'{"entries":[]}'
        # A client that connects and says nothing does not block the others.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.connect(fwd.api_path)
            assert ask(fwd.api_path, b'{"execute": "bad"}') == (
                b'{"error":{"desc":"bad request: unknown execute"}}'
            )
        path = fwd.api_path
    assert not os.path.exists(path)


@pytest.mark.e2e
def test_stale_socket_file_is_replaced_and_other_files_are_not():
    work = tempfile.mkdtemp(prefix="pyslirp-api-")
    try:
        path = os.path.join(work, "api.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        with harness.forwarder("-a", path, configure=False) as fwd:
            wait_for_socket(path, fwd.proc)
            assert ask(path, b'{"execute": "list_hostfwd"}') == b'{"entries":[]}'
        assert not os.path.exists(path)
        regular = os.path.join(work, "file")
        open(regular, "w").close()
        ns = os.path.join(work, "net")
        open(ns, "w").close()
        result = subprocess.run(
            [*FORWARDER, "-a", regular, ns],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=harness.REPO,
        )
        assert result.returncode == 1
        assert result.stderr.strip().endswith(f"bind {regular}: Address already in use")
        assert os.path.isfile(regular)
        assert not harness.is_mounted(ns)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_too_long_path_is_slirp4netns_error(tmp_path):
    ns = tmp_path / "net"
    ns.touch()
    result = subprocess.run(
        [*FORWARDER, "-a", "/tmp/" + "x" * 120, str(ns)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=harness.REPO,
    )
    assert result.returncode == 1
    assert "the specified API socket path is too long (>= 108)" in result.stderr


# ------------------------------------------------------- where we differ
class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.added = []

    def add_hostfwd(self, *args):
        self.added.append(args)
        return len(self.added)

    def list_hostfwd(self):
        return []

    def remove_hostfwd(self, forward_id):
        raise KeyError(forward_id)

    def list_connections(self):
        raise NotImplementedError


@pytest.mark.parametrize(
    "arguments, field",
    [
        ({}, "proto"),  # slirp4netns crashes on these two (strcmp on NULL)
        ({"proto": 7}, "proto"),
        ({"proto": "tcp", "host_port": -5, "guest_port": 80}, "host_port"),
        ({"proto": "tcp", "host_port": 70000, "guest_port": 80}, "host_port"),
        ({"proto": "tcp", "host_port": 1e300, "guest_port": 80}, "host_port"),
        ({"proto": "tcp", "host_port": 80, "guest_port": 65536}, "guest_port"),
        (
            {"proto": "tcp", "host_port": 80, "guest_port": 80, "guest_addr": "10.0.3.1"},
            "guest_addr",
        ),
        (
            {"proto": "tcp", "host_port": 80, "guest_port": 80, "guest_addr": "10.0.2.2"},
            "guest_addr",
        ),
    ],
)
def test_arguments_slirp4netns_does_not_check(arguments, field):
    backend = FakeBackend()
    api = Api(backend, NetworkConfig())
    request = json.dumps({"execute": "add_hostfwd", "arguments": arguments}).encode()
    reply = api.handle(request)
    assert reply == (
        b'{"error":{"desc":"bad request: add_hostfwd: bad arguments.%s"}}' % field.encode()
    )
    assert backend.added == []


def test_list_connections_unsupported_backend_is_an_error_reply():
    api = Api(FakeBackend(), NetworkConfig())
    assert api.handle(b'{"execute": "list_connections"}') == (
        b'{"error":{"desc":"bad request: list_connections: not supported by the fake backend"}}'
    )


def test_parse_request_refuses_nan_and_bad_utf8():
    assert parse_request(b'{"execute": NaN}').startswith(b'{"error"')
    assert parse_request(b'{"execute": "\xff"}').startswith(b'{"error"')
    assert parse_request(b'{"execute": "x"}') == {"execute": "x"}


@pytest.mark.e2e
def test_list_connections_shows_udp_and_tcp_flows():
    port = free_port()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", port))
    server.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5)
    try:
        with our_api() as fwd:
            harness.configure_guest(fwd)
            guest = fwd.popen(
                [
                    "python3",
                    "-c",
                    "import socket,sys,time\n"
                    f"t=socket.create_connection(('10.0.2.2',{port}),timeout=5)\n"
                    "t.sendall(b'abc')\n"
                    "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                    "u.bind(('0.0.0.0',4444))\n"
                    f"u.sendto(b'hello',('10.0.2.2',{udp.getsockname()[1]}))\n"
                    "print('sent',flush=True)\n"
                    "time.sleep(10)\n",
                ],
                text=True,
            )
            conn, _ = server.accept()
            conn.settimeout(5)
            assert conn.recv(10) == b"abc"
            assert udp.recvfrom(10)[0] == b"hello"
            reply = json.loads(ask(fwd.api_path, b'{"execute": "list_connections"}'))
            rows = reply["return"]["connections"]
            tcp = [r for r in rows if r["proto"] == "tcp"]
            udp_rows = [r for r in rows if r["proto"] == "udp" and r["guest"].endswith(":4444")]
            assert len(tcp) == 1 and tcp[0]["state"] == "ESTABLISHED"
            assert tcp[0]["host"] == f"127.0.0.1:{port}" and tcp[0]["bytes_from_guest"] == 3
            assert tcp[0]["guest"].startswith("10.0.2.100:")
            assert len(udp_rows) == 1 and udp_rows[0]["bytes_from_guest"] == 5
            assert udp_rows[0]["age"] >= 0
            conn.close()
            guest.kill()
    finally:
        server.close()
        udp.close()


GUEST_MANY_CONNECTIONS = r"""
import select, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("10.0.2.2", port))
    socks.append(s)
poller = select.poll()
for s in socks:
    poller.register(s, select.POLLOUT)
waiting, deadline = len(socks), time.monotonic() + 90
while waiting and time.monotonic() < deadline:
    for fd, _ in poller.poll(1000):
        poller.unregister(fd)
        waiting -= 1
print("connected", count - waiting, flush=True)
time.sleep(120)
"""


def _hung_up(sock) -> bool:
    """Whether the server has closed its side (without reading our data)."""
    import select

    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(mask & (select.POLLRDHUP | select.POLLHUP) for _, mask in poller.poll(0))


def test_replies_waiting_for_readers_are_bounded_in_total(monkeypatch, tmp_path):
    """Past MAX_PENDING_REPLY_BYTES of unread replies, the client that has
    waited longest is dropped; the newest keeps its reply."""
    import select

    from forwarder import api as api_module

    monkeypatch.setattr(api_module, "MAX_PENDING_REPLY_BYTES", 1 << 20)

    class BigReplies:
        config = None  # the defaults of the API's accept limits

        def handle(self, data):
            return b"x" * (700 << 10)  # more than a unix socket takes at once

    class Loop:
        write_event = 2

        def __init__(self):
            self.handlers = {}

        def register(self, fd, events, handler):
            self.handlers[fd] = (events, handler)

        def unregister(self, fd):
            self.handlers.pop(fd, None)

    def serve_once():
        poller = select.poll()
        for fd, (events, _) in loop.handlers.items():
            mask = (select.POLLIN if events & 1 else 0) | (select.POLLOUT if events & 2 else 0)
            poller.register(fd, mask)
        for fd, _ in poller.poll(100):
            if fd in loop.handlers:
                loop.handlers[fd][1](1, time.monotonic())

    loop = Loop()
    server = api_module.ApiServer(str(tmp_path / "api.sock"), BigReplies())
    server.listen()
    server.attach(loop)
    clients = []
    try:
        for _ in range(4):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(sock)
            sock.connect(server.path)
            sock.sendall(b'{"execute": "list_connections"}')  # and never reads
            for _ in range(5):
                serve_once()
        assert server.pending_bytes <= 1 << 20
        assert _hung_up(clients[0]) and _hung_up(clients[1])  # the oldest, dropped
        assert not _hung_up(clients[3])  # the newest still gets its reply
        received = b""
        clients[3].settimeout(5)
        while len(received) < 700 << 10:
            serve_once()
            received += clients[3].recv(1 << 20)
        assert received == b"x" * (700 << 10)
    finally:
        for sock in clients:
            sock.close()
        server.close()


@pytest.mark.e2e
def test_a_client_that_never_reads_its_replies_does_not_stop_the_loop():
    """list_connections with a few thousand connections is a reply larger than
    a unix socket takes at once; a client that asks for it several times and
    reads nothing must not hold up another client or the guest's traffic,
    and is dropped in the end; the forwarder stays up."""
    port, count, stuck_count = free_port(), 3500, 4
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", port))
    server.listen(4096)
    stuck = []
    try:
        with our_api() as fwd:
            harness.configure_guest(fwd)
            guest = fwd.popen(
                ["python3", "-c", GUEST_MANY_CONNECTIONS, str(port), str(count)], text=True
            )
            line = guest.stdout.readline()  # bounded by the script's own deadline
            assert line.startswith("connected"), line + guest.stderr.read()
            full = ask(fwd.api_path, b'{"execute": "list_connections"}', timeout=30)
            assert len(json.loads(full)["return"]["connections"]) >= count
            assert len(full) > 2 * 212992  # more than a unix socket buffers at once
            for _ in range(stuck_count):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                stuck.append(sock)
                sock.connect(fwd.api_path)
                sock.sendall(b'{"execute": "list_connections"}')  # and never reads
            started = time.monotonic()
            reply = ask(fwd.api_path, b'{"execute": "list_hostfwd"}', timeout=60)
            latency = time.monotonic() - started
            assert reply == b'{"entries":[]}'
            # Answered while the stuck clients still wait (they are dropped only
            # after 10 s; a loop that blocked on them would have dropped them first).
            assert not any(_hung_up(sock) for sock in stuck), latency
            ping = fwd.run(["ping", "-c", "1", "-W", "5", "10.0.2.2"])
            assert "1 received" in ping.stdout, ping.stdout + ping.stderr
            assert not any(_hung_up(sock) for sock in stuck)
            print(f"second client answered in {latency:.3f} s while {stuck_count} were stuck")
            deadline = time.monotonic() + 60
            while not all(_hung_up(sock) for sock in stuck) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert all(_hung_up(sock) for sock in stuck)  # dropped in the end
            assert fwd.proc.poll() is None
            again = ask(fwd.api_path, b'{"execute": "list_hostfwd"}', timeout=30)
            assert again == b'{"entries":[]}'
            guest.kill()
    finally:
        for sock in stuck:
            sock.close()
        server.close()
