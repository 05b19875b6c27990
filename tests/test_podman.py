"""podman runs its containers on pyslirp in place of slirp4netns.

Debian's podman 4.3, as root, with ``network_cmd_path`` in a containers.conf
of our own pointing at a wrapper that runs ``python3 -m forwarder`` with
every argument podman gives it (its defaults: --disable-host-loopback
--mtu=65520 --enable-sandbox --enable-seccomp --enable-ipv6 -c -e -r, and
--api-socket when ports are published through port_handler=slirp4netns).
The wrapper adds only --dns-upstream, toward this test's DNS server.

Everything podman keeps (images, containers, its run state) lives in a
temporary --root/--runroot with the vfs driver, removed at the end; the
image is Debian's static busybox (extracted by .ci/install from the
busybox-static package), imported with ``podman import``: nothing is pulled.
runc, cgroupfs and explicit ulimits because crun refuses the hybrid cgroup
layout of these machines. Containers get ``--dns 10.0.2.3`` so that their
resolv.conf names our DNS proxy alone (podman would otherwise add public
resolvers after it when the host's resolv.conf names only 127.0.0.1).
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tests import harness
from tests.dnsserver import DnsServer

pytestmark = pytest.mark.e2e

BUSYBOX = Path("/var/cache/pyslirp/busybox-static/bin/busybox")
IMAGE = "localhost/pyslirp-test"
APPLETS = ("sh", "cat", "echo", "printf", "nc", "nslookup", "ping", "ping6", "ip", "sleep", "httpd")
PODMAN_TIMEOUT = 60


class Podman:
    def __init__(self, workdir: Path, dns_port: int) -> None:
        self.workdir = workdir
        self.args_log = workdir / "args.log"
        self.forwarder_log = workdir / "forwarder.log"
        self.pids_log = workdir / "pids.log"  # the wrapper execs: its PID is the forwarder's
        wrapper = workdir / "slirp4netns"
        wrapper.write_text(
            "#!/bin/sh\n"
            f'echo "$@" >> {self.args_log}\n'
            f"echo $$ >> {self.pids_log}\n"
            f"PYTHONPATH={harness.REPO} exec {sys.executable} -m forwarder "
            f'--dns-upstream 127.0.0.1:{dns_port} "$@" 2>>{self.forwarder_log}\n'
        )
        wrapper.chmod(0o755)
        conf = workdir / "containers.conf"
        conf.write_text(
            "[engine]\n"
            f'network_cmd_path = "{wrapper}"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            'runtime = "runc"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = [
            "podman",
            "--root",
            str(workdir / "storage"),
            "--runroot",
            str(workdir / "run"),
            "--tmpdir",
            str(workdir / "tmp"),
            "--storage-driver",
            "vfs",
        ]

    def __call__(self, *args: str, timeout: float = PODMAN_TIMEOUT, **kw):
        return subprocess.run(
            [*self.base, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def run(self, network: str, script: str, *extra: str):
        return self(
            "run",
            "--rm",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--dns",
            "10.0.2.3",
            "--network",
            network,
            *extra,
            IMAGE,
            "sh",
            "-c",
            script,
        )


@pytest.fixture(scope="module")
def dns():
    with DnsServer(records={"host.example.test.": "192.0.2.7"}) as server:
        yield server


@pytest.fixture(scope="module")
def podman(dns):
    assert shutil.which("podman"), "podman is missing: run .ci/install"
    assert BUSYBOX.exists(), f"{BUSYBOX} is missing: run .ci/install"
    workdir = Path(tempfile.mkdtemp(prefix="pyslirp-podman-"))
    try:
        rootfs = workdir / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        (rootfs / "tmp").mkdir()
        (rootfs / "www").mkdir()
        (rootfs / "www" / "index.html").write_text("served from the container\n")
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        pod = Podman(workdir, dns.port)
        tarball = workdir / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        out = pod("import", str(tarball), IMAGE)
        assert out.returncode == 0, out.stderr
        yield pod
    finally:
        with contextlib.suppress(Exception):
            Podman(workdir, 0)("rm", "-a", "-f", timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


class HostServer:
    """A TCP server on the host's 127.0.0.1 answering one fixed HTTP reply."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        body = b"hello from the host loopback\n"
        while not self.stopping:
            try:
                conn, _peer = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                except OSError:
                    pass

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def host_server():
    server = HostServer()
    yield server
    server.close()


def http_get(port: int) -> str:
    """An HTTP GET to the host through 10.0.2.2 (busybox nc: the static
    busybox's wget crashes in glibc's static NSS)."""
    return f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.0.2.2 {port}"


def no_forwarder_left(podman: Podman) -> None:
    """podman's forwarders end when podman closes their exit fd: soon after."""
    pids = [int(line) for line in podman.pids_log.read_text().split()]
    assert pids, "podman never started the forwarder"
    for _ in range(50):
        alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        if not alive:
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"forwarders left: {alive}")


def test_default_options_ipv6_dns_and_no_host_loopback(podman, dns, host_server):
    script = (
        "ip -6 route show default; ip -6 addr show dev tap0 scope global; "
        "ping -c1 -W2 10.0.2.2 >/dev/null && echo ping4-ok; "
        "ping6 -c1 -W2 fd00::2 >/dev/null && echo ping6-gw-ok; "
        "ping6 -c1 -W2 fd00::3 >/dev/null && echo ping6-dns-ok; "
        "nslookup host.example.test 10.0.2.3; "
        f"{http_get(host_server.port)} || echo loopback-refused"
    )
    out = podman.run("slirp4netns", script)
    assert out.returncode == 0, out.stderr
    assert "default via fe80::2 dev tap0" in out.stdout
    assert "inet6 fd00::" in out.stdout and "scope global" in out.stdout
    for word in ("ping4-ok", "ping6-gw-ok", "ping6-dns-ok", "192.0.2.7", "loopback-refused"):
        assert word in out.stdout, out.stdout + out.stderr
    assert host_server.connections == 0
    assert ("host.example.test.", 1) in dns.queries
    # podman's own defaults reached us, IPv6 among them.
    args = podman.args_log.read_text().splitlines()[-1].split()
    for flag in (
        "--enable-ipv6",
        "--enable-sandbox",
        "--enable-seccomp",
        "--disable-host-loopback",
        "--mtu=65520",
        "-c",
        "-e",
        "-r",
    ):
        assert flag in args, args
    no_forwarder_left(podman)


def test_allow_host_loopback_reaches_a_host_service(podman, host_server):
    script = http_get(host_server.port)
    out = podman.run("slirp4netns:allow_host_loopback=true", script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n\nhello from the host loopback\n"), out.stdout
    assert host_server.connections == 1
    assert "--disable-host-loopback" not in podman.args_log.read_text().splitlines()[-1]
    no_forwarder_left(podman)


def test_published_port_reaches_a_server_in_the_container(podman):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    name = "pyslirp-published"
    out = podman(
        "run",
        "-d",
        "--name",
        name,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--network",
        "slirp4netns:port_handler=slirp4netns",
        "-p",
        f"127.0.0.1:{port}:80",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    )
    assert out.returncode == 0, out.stderr
    try:
        body = b""
        for _ in range(50):  # the server in the container starts at once; be patient
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
                    client.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
                    while chunk := client.recv(4096):
                        body += chunk
                if body:
                    break
            except OSError:
                pass
            threading.Event().wait(0.1)
        assert body.endswith(b"served from the container\n"), body
        assert "--api-socket" in podman.args_log.read_text().splitlines()[-1]
    finally:
        podman("rm", "-f", "-t", "0", name, timeout=30)
    no_forwarder_left(podman)
