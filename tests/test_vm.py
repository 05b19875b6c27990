"""End to end with a real VM: QEMU (TCG) on ``pyslirp-forwarder --socket``.

One boot per backend serves every check (a boot under TCG costs seconds of
both shared cores): the DHCP lease, a download and an upload with sha256
against an HTTP server on the host's loopback (10.0.2.2 in the guest), a
DNS name through 10.0.2.3 answered by the tests' DNS server, ping to the
gateway, a published port reaching a server inside the VM, and last a
second QEMU on the same forwarder after the first went away. The guest is
tests/vmimage.py's (Debian's kernel, busybox), driven by tests/vmguest.py.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.dnsserver import DnsServer
from tests.test_libslirp import Dns53
from tests.vmguest import Guest

pytestmark = pytest.mark.e2e  # QEMU and its guest come from .ci/install

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOB = random.Random(17).randbytes(1 << 20)  # the download: 1 MiB
GUEST_PORT = 8080  # the guest's httpd, published on the host
DHCP = "udhcpc -i eth0 -n -q -t 10 -T 2 -s /etc/udhcpc.script"
READY_TIMEOUT = 30.0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = hashlib.sha256(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def host_servers():
    """(http port, DNS server) on the host's loopback."""
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    try:
        with DnsServer(records={"vm.pyslirp.test.": "192.0.2.17"}) as dns:
            yield http_server.server_address[1], dns
    finally:
        http_server.shutdown()
        http_server.server_close()
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VmForwarder:
    """pyslirp-forwarder --socket, started and ready (-r) before QEMU."""

    def __init__(self, path: str, log_path: str, *args: str) -> None:
        self.path = path
        self.log_path = log_path
        read_fd, write_fd = os.pipe()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forwarder", f"--socket={path}", "-r", str(write_fd),
                 "--log-level=info", *args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            )  # fmt: skip
        os.close(write_fd)
        try:
            ready, _, _ = __import__("select").select([read_fd], [], [], READY_TIMEOUT)
            if not ready or os.read(read_fd, 1) != b"1":
                self.close()
                raise AssertionError(f"forwarder not ready:\n{self.log()}")
        finally:
            os.close(read_fd)

    def qemu_args(self, mtu: int = 1500) -> list[str]:
        card = "virtio-net-pci,netdev=n0" + (f",host_mtu={mtu}" if mtu > 1500 else "")
        return [
            "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={self.path}",
            "-device", card,
        ]  # fmt: skip

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module", params=["python", "libslirp"])
def vm(request, host_servers, tmp_path_factory):
    """A forwarder of the given backend with a booted, leased guest."""
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"vm-{backend}")
    http_port, dns = host_servers
    host_port = free_port()
    # libslirp asks the first nameserver of /etc/resolv.conf (127.0.0.1:53
    # in the sandbox) and takes no --dns-upstream.
    upstream = [f"--dns-upstream=127.0.0.1:{dns.port}"] if backend == "python" else []
    fw = VmForwarder(
        str(tmp / "vm.sock"),
        str(tmp / "forwarder.log"),
        f"--backend={backend}",
        "-6",
        *upstream,
        "-p",
        f"127.0.0.1:{host_port}:{GUEST_PORT}",
    )
    state = {"backend": backend, "fw": fw, "http_port": http_port, "dns": dns}
    state["host_port"] = host_port
    try:
        state["guest"] = Guest(fw.qemu_args())
        yield state
    finally:
        if state.get("guest") is not None:
            state["guest"].close()
        status = fw.close()
        log = fw.log()
        assert status == 0, log
        assert "internal error" not in log, log
        assert not os.path.exists(fw.path), "the socket file is left behind"


def test_lease_and_socket_mode(vm):
    text = vm["guest"].check(DHCP, timeout=90)
    assert "lease of 10.0.2.15 obtained" in text, text
    assert oct(os.stat(vm["fw"].path).st_mode & 0o777) == "0o600"
    routes = vm["guest"].check("ip route")
    assert "default via 10.0.2.2" in routes


def test_download_and_upload_sha256(vm):
    guest, port = vm["guest"], vm["http_port"]
    guest.check(f"wget -q -O /tmp/blob http://10.0.2.2:{port}/blob", timeout=120)
    text = guest.check("sha256sum /tmp/blob")
    assert hashlib.sha256(BLOB).hexdigest() in text
    # Text: busybox wget's --post-file stops at a NUL byte.
    guest.check("dd if=/dev/urandom bs=1024 count=512 2>/dev/null | base64 > /tmp/up")
    local = guest.check("sha256sum /tmp/up").split()[-2]
    remote = guest.check(
        f"wget -q -O - --post-file=/tmp/up http://10.0.2.2:{port}/upload", timeout=120
    )
    assert local in remote, (local, remote)


def test_dns_through_the_proxy(vm):
    if vm["backend"] == "python":
        text = vm["guest"].check("nslookup vm.pyslirp.test 10.0.2.3", timeout=60)
        assert "192.0.2.17" in text, text
        assert ("vm.pyslirp.test.", 1) in vm["dns"].queries
    else:
        with Dns53(address="192.0.2.18") as dns53:
            text = vm["guest"].check("nslookup vm.pyslirp.test 10.0.2.3", timeout=60)
        assert "192.0.2.18" in text, text
        assert "vm.pyslirp.test." in dns53.queries


def test_ping_gateway(vm):
    text = vm["guest"].check("ping -c 2 -W 5 10.0.2.2", timeout=60)
    assert "2 packets received" in text, text


def test_ipv6_by_slaac(vm):
    """-6: the guest's kernel takes an address in fd00::/64 from our router
    advertisements and reaches the gateway."""
    guest = vm["guest"]
    deadline = time.monotonic() + 60
    while True:
        text = guest.check("ip -6 addr show dev eth0 scope global")
        if "inet6 fd00::" in text and "tentative" not in text:
            break
        assert time.monotonic() < deadline, text
        time.sleep(1)
    text = guest.check("ping -c 2 -W 5 fd00::2", timeout=60)
    assert "2 packets received" in text, text


def test_published_port_reaches_the_guest(vm):
    guest = vm["guest"]
    guest.check("mkdir -p /www && echo hello-from-the-vm > /www/index.html")
    guest.check(f"httpd -p {GUEST_PORT} -h /www")
    url = f"http://127.0.0.1:{vm['host_port']}/index.html"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert body == b"hello-from-the-vm\n"


def test_a_second_vm_after_the_first_went_away(vm):
    """The forwarder goes back to listening: a new QEMU gets a lease and
    downloads again (the first's flows were closed with its connection)."""
    fw = vm["fw"]
    vm["guest"].close()
    vm["guest"] = None
    guest = Guest(fw.qemu_args())
    vm["guest"] = guest
    text = guest.check(DHCP, timeout=90)
    assert "lease of 10.0.2.15 obtained" in text, text
    guest.check(f"wget -q -O /tmp/blob http://10.0.2.2:{vm['http_port']}/blob", timeout=120)
    assert hashlib.sha256(BLOB).hexdigest() in guest.check("sha256sum /tmp/blob")
    assert fw.log().count("a VM connected") == 2


def test_dgram_socket(host_servers, tmp_path):
    """--socket-type=dgram (QEMU's -netdev dgram): a lease and a download."""
    http_port, dns = host_servers
    path = str(tmp_path / "vm.sock")
    fw = VmForwarder(
        path, str(tmp_path / "forwarder.log"), "--socket-type=dgram",
        f"--dns-upstream=127.0.0.1:{dns.port}",
    )  # fmt: skip
    try:
        netdev = (
            f"dgram,id=n0,local.type=unix,local.path={tmp_path / 'qemu.sock'},"
            f"remote.type=unix,remote.path={path}"
        )
        with Guest(["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]) as guest:
            assert "lease of 10.0.2.15 obtained" in guest.check(DHCP, timeout=90)
            guest.check(f"wget -q -O /tmp/blob http://10.0.2.2:{http_port}/blob", timeout=120)
            assert hashlib.sha256(BLOB).hexdigest() in guest.check("sha256sum /tmp/blob")
    finally:
        status = fw.close()
    assert status == 0, fw.log()
    assert "a VM spoke from" in fw.log()
    assert not os.path.exists(path)
