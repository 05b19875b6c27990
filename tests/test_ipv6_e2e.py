"""IPv6 end to end: the real forwarder with -6, the Linux kernel as the guest.

The host's own namespace has IPv6 turned off, so the forwarder runs inside a
"host" namespace made here (nsenter --net, so that its bind mount stays
visible to us), where ::1 exists; servers that play the host's loopback
services are opened in that namespace too (this thread joins it while it
makes their sockets). A "peer" namespace joined by a veth pair answers
pings as 2001:db8:1::2 (a documentation prefix, inside our namespaces only).
Nothing here leaves those namespaces.
"""

import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
import uuid

import dpkt
import pytest

from tests import harness
from tests.dnsserver import DnsServer

pytestmark = pytest.mark.e2e

GUEST_MAC = "02:00:00:00:00:64"
GUEST6 = "fd00::ff:fe00:64"  # SLAAC (EUI-64) from GUEST_MAC in fd00::/64
GW6 = "fd00::2"
DNS6 = "fd00::3"
HOST_SIDE6 = "2001:db8:1::1"
PEER6 = "2001:db8:1::2"
LOCAL_UNREACHABLE6 = "2001:db8:4::5"  # an "unreachable" route in the host namespace
CLONE_NEWNET = 0x40000000
WAIT = 10.0


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


named_netns = harness.netns


@pytest.fixture(scope="module")
def namespaces():
    """(host, peer): the host has ::1, a route to the peer, ping sockets open."""
    with named_netns("host6") as host, named_netns("peer6") as peer:
        sh("ip", "link", "add", "h0", "netns", host, "type", "veth", "peer", "p0", "netns", peer)
        sh("ip", "-n", host, "addr", "add", f"{HOST_SIDE6}/64", "dev", "h0", "nodad")
        sh("ip", "-n", host, "link", "set", "h0", "up")
        sh("ip", "-n", host, "-6", "route", "add", "default", "via", PEER6)
        sh("ip", "-n", host, "-6", "route", "add", "unreachable", "2001:db8:4::/48")
        sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        sh("ip", "-n", peer, "addr", "add", f"{PEER6}/64", "dev", "p0", "nodad")
        sh("ip", "-n", peer, "link", "set", "p0", "up")
        yield host, peer


def wait_for_slaac(fwd, expect: str = GUEST6) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        out = fwd.run(["ip", "-6", "-j", "addr", "show", "dev", "tap0", "scope", "global"]).stdout
        addresses = [
            a
            for link in json.loads(out or "[]")
            for a in link.get("addr_info", [])
            if not a.get("tentative")
        ]
        routes = fwd.run(["ip", "-6", "route", "show", "default"]).stdout
        # iproute2 lists an address that the filter leaves out as "{}".
        if any(a.get("local") == expect for a in addresses) and "fe80::2" in routes:
            return
        time.sleep(0.05)
    raise AssertionError(f"no SLAAC address {expect}: {out}\n{fwd.log()}")


@contextlib.contextmanager
def forwarder6(host: str, *args: str, dns_upstreams=(), **kw):
    """The forwarder with -6 -c in ``host``; the guest has its SLAAC address."""
    with harness.forwarder(
        "-6",
        "-c",
        "--macaddress",
        GUEST_MAC,
        *args,
        dns_upstreams=dns_upstreams,
        configure=False,
        prefix=["nsenter", f"--net=/run/netns/{host}"],
        **kw,
    ) as fwd:
        wait_for_slaac(fwd)
        yield fwd


# ------------------------------------------------------------ servers on the host's ::1
class Server:
    """Sockets made in the host namespace, served by a thread."""

    def __init__(self, host: str, kind: int, handler, address: str = "::1") -> None:
        with harness.this_thread_in(host):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            self.sock = socket.socket(family, kind)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((address, 0))
            if kind == socket.SOCK_STREAM:
                self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.handler = handler
        self.stopping = False
        self.results: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                self.handler(self)
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


def udp_echo(server: Server) -> None:
    data, peer = server.sock.recvfrom(65535)
    server.results.append((peer[0], len(data)))
    server.sock.sendto(data, peer)


def tcp_sha256(server: Server) -> None:
    """Read until EOF, answer the sha256 of what came, then send it back too."""
    conn, peer = server.sock.accept()
    with conn:
        conn.settimeout(20)
        digest = hashlib.sha256()
        total = 0
        while chunk := conn.recv(1 << 16):
            digest.update(chunk)
            total += len(chunk)
        server.results.append((peer[0], total))
        conn.sendall(digest.hexdigest().encode())


GUEST_UDP_SCRIPT = """
import hashlib, socket, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(3)
for size in (5, 1400, 3000, 20000, 65000):
    data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    s.sendto(data, ("fd00::2", port))
    back, peer = s.recvfrom(65535)
    print(size, back == data, peer[0])
"""

GUEST_TCP_SCRIPT = """
import hashlib, os, socket, sys
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
s = socket.create_connection(("fd00::2", port), timeout=20)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
answer = b""
while chunk := s.recv(4096):
    answer += chunk
print(answer.decode() == hashlib.sha256(data).hexdigest())
"""


# ------------------------------------------------------------ tests
def test_slaac_address_route_and_mtu(namespaces):
    host, _peer = namespaces
    with forwarder6(host, mtu=65520) as fwd:
        addr = fwd.run(["ip", "-6", "addr", "show", "dev", "tap0"]).stdout
        assert f"inet6 {GUEST6}/64 scope global dynamic" in addr
        assert "inet6 fe80::ff:fe00:64/64 scope link" in addr
        route = fwd.run(["ip", "-6", "route", "show", "default"]).stdout
        assert route.startswith("default via fe80::2 dev tap0 proto ra")
        mtu = fwd.run(["sysctl", "-n", "net.ipv6.conf.tap0.mtu"]).stdout.strip()
        assert mtu == "65520"
        neighbours = fwd.run(["ip", "-6", "neigh", "show", "dev", "tap0"]).stdout
        assert "fe80::2 lladdr 52:56:00:00:00:02 router" in neighbours
        assert "IPv6 prefix:     fd00::/64" in fwd.log()


def test_ping6_gateway_and_dns_answered_locally(namespaces):
    host, _peer = namespaces
    with forwarder6(host) as fwd:
        for target in (GW6, "fe80::2%tap0", DNS6):
            out = fwd.run(["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", target])
            assert "2 received" in out.stdout, out.stdout + out.stderr


def test_ping6_relayed_through_host_ping_sockets(namespaces):
    host, _peer = namespaces
    with forwarder6(host) as fwd:
        out = fwd.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", PEER6], timeout=15)
        assert "3 received" in out.stdout, out.stdout + out.stderr
        assert f"from {PEER6}" in out.stdout
        out = fwd.run(["ping", "-6", "-c", "1", "-W", "2", LOCAL_UNREACHABLE6], timeout=10)
        # An "unreachable" route: the host's connect says EHOSTUNREACH.
        assert "Destination unreachable: Address unreachable" in out.stdout, out.stdout
        # Ping sockets not permitted: administratively prohibited, as for IPv4.
        sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ping_group_range=1 0")
        try:
            out = fwd.run(["ping", "-6", "-c", "1", "-i", "0.2", "-W", "2", "2001:db8:1::9"])
            assert "Administratively prohibited" in out.stdout, out.stdout
        finally:
            sh(
                "ip",
                "netns",
                "exec",
                host,
                "sysctl",
                "-qw",
                "net.ipv4.ping_group_range=0 2147483647",
            )
        assert "net.ipv4.ping_group_range" in fwd.log()


def test_udp_echo_to_host_loopback_including_fragments(namespaces):
    host, _peer = namespaces
    server = Server(host, socket.SOCK_DGRAM, udp_echo)
    try:
        with forwarder6(host, mtu=1500) as fwd:
            out = fwd.run(["python3", "-c", GUEST_UDP_SCRIPT, str(server.port)], timeout=20)
            lines = out.stdout.split()
            assert out.returncode == 0, out.stderr
            assert lines == [
                w for size in (5, 1400, 3000, 20000, 65000) for w in (str(size), "True", GW6)
            ]
    finally:
        server.close()
    # The host saw the forwarder's own loopback socket, every size whole.
    assert [size for _peer, size in server.results] == [5, 1400, 3000, 20000, 65000]
    assert {peer for peer, _size in server.results} == {"::1"}


def test_tcp_with_integrity_to_host_loopback(namespaces):
    host, _peer = namespaces
    server = Server(host, socket.SOCK_STREAM, tcp_sha256)
    try:
        with forwarder6(host, mtu=65520) as fwd:
            size = 8 * 1024 * 1024
            out = fwd.run(["python3", "-c", GUEST_TCP_SCRIPT, str(server.port), str(size)])
            assert out.stdout.strip() == "True", out.stdout + out.stderr
    finally:
        server.close()
    assert server.results == [("::1", size)]


def test_disable_host_loopback_refuses_fd00_2(namespaces):
    host, _peer = namespaces
    server = Server(host, socket.SOCK_DGRAM, udp_echo)
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR: no route is not fatal\n"
        "s.settimeout(2)\n"
        f"s.connect(('fd00::2', {server.port}))\n"
        "s.send(b'x')\n"
        "try:\n    s.recv(10)\nexcept OSError as e:\n    print(e.errno)\n"
        f"t = socket.socket(socket.AF_INET6)\nt.settimeout(2)\n"
        "try:\n"
        f"    t.connect(('fd00::2', {server.port}))\n"
        "except OSError as e:\n    print(e.errno)\n"
    )
    try:
        with forwarder6(host, "--disable-host-loopback") as fwd:
            out = fwd.run(["python3", "-c", script], timeout=10)
    finally:
        server.close()
    import errno

    assert out.stdout.split() == [str(errno.ENETUNREACH)] * 2, out.stdout + out.stderr
    assert server.results == []


def test_dns_proxy_on_fd00_3_over_udp_and_tcp(namespaces):
    host, _peer = namespaces
    with harness.this_thread_in(host):
        dns = DnsServer(
            records={"v6.example.test.": "2001:db8::77", "v4.example.test.": "192.0.2.7"}
        )
    with dns, forwarder6(host, dns_upstreams=[f"127.0.0.1:{dns.port}"]) as fwd:
        for extra in ([], ["+tcp"]):
            out = fwd.run(
                [
                    "dig",
                    "+short",
                    "+tries=1",
                    "+time=2",
                    *extra,
                    "AAAA",
                    "v6.example.test",
                    f"@{DNS6}",
                ]
            )
            assert out.stdout.strip() == "2001:db8::77", out.stdout + out.stderr
        out = fwd.run(["dig", "+short", "+tries=1", "+time=2", "A", "v4.example.test", f"@{DNS6}"])
        assert out.stdout.strip() == "192.0.2.7"
    assert len(dns.queries) == 3  # DNS over TCP is answered through the same engine


class Dns6Upstream:
    """A one-name resolver on [::1] (the DnsServer helper binds IPv4 only)."""

    def __init__(self, host: str) -> None:
        self.server = Server(host, socket.SOCK_DGRAM, self._answer)
        self.port = self.server.port

    def _answer(self, server: Server) -> None:
        data, peer = server.sock.recvfrom(4096)
        query = dpkt.dns.DNS(data)
        reply = dpkt.dns.DNS(id=query.id, qd=query.qd, op=dpkt.dns.DNS_QR | dpkt.dns.DNS_RA)
        answer = dpkt.dns.DNS.RR(
            name=query.qd[0].name,
            type=dpkt.dns.DNS_AAAA,
            ttl=60,
            ip6=ipaddress.IPv6Address("2001:db8::66").packed,
        )
        reply.an = [answer]
        server.results.append(query.qd[0].name)
        server.sock.sendto(bytes(reply), peer)

    def close(self) -> None:
        self.server.close()


def test_dns_proxy_forwards_to_an_ipv6_upstream(namespaces):
    host, _peer = namespaces
    upstream = Dns6Upstream(host)
    try:
        with forwarder6(host, dns_upstreams=[f"[::1]:{upstream.port}"]) as fwd:
            out = fwd.run(
                ["dig", "+short", "+tries=1", "+time=2", "AAAA", "up.example.test", f"@{DNS6}"]
            )
            assert out.stdout.strip() == "2001:db8::66", out.stdout + out.stderr
    finally:
        upstream.close()
    assert upstream.server.results == ["up.example.test"]


def test_ipv6_port_forwards_to_the_slaac_address(namespaces):
    host, _peer = namespaces
    with harness.this_thread_in(host):
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        tcp_port = probe.getsockname()[1]
        probe.close()
    api = f"/tmp/pyslirp-api6-{uuid.uuid4().hex[:8]}.sock"
    with forwarder6(host, "-p", f"[::1]:{tcp_port}:8080", "-a", api) as fwd:
        assert f"tcp [::1]:{tcp_port} -> the guest's IPv6 address:8080" in fwd.log()
        guest_tcp = fwd.popen(["socat", "TCP6-LISTEN:8080,bind=[::],reuseaddr,fork", "EXEC:cat"])
        guest_udp = fwd.popen(["socat", "UDP6-RECVFROM:9090,bind=[::],fork", "EXEC:cat"])
        # Our API extension: an IPv6 host_addr, guest_addr "::" by default.
        request = {
            "execute": "add_hostfwd",
            "arguments": {
                "proto": "udp",
                "host_addr": "::1",
                "host_port": tcp_port,
                "guest_port": 9090,
            },
        }
        reply = subprocess.run(
            ["socat", "-t2", "-", f"UNIX-CONNECT:{api}"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert json.loads(reply.stdout) == {"return": {"id": 2}}, reply.stdout + reply.stderr
        listing = subprocess.run(
            ["socat", "-t2", "-", f"UNIX-CONNECT:{api}"],
            input='{"execute": "list_hostfwd"}',
            capture_output=True,
            text=True,
            timeout=10,
        )
        entries = json.loads(listing.stdout)["entries"]
        assert [(e["proto"], e["host_addr"], e["guest_addr"]) for e in entries] == [
            ("tcp", "::1", "::"),
            ("udp", "::1", "::"),
        ]
        time.sleep(0.3)  # socat in the guest is listening
        data = os.urandom(1 << 20)
        with harness.this_thread_in(host):
            client = socket.create_connection(("::1", tcp_port), timeout=10)
            udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            udp.connect(("::1", tcp_port))
        with client:
            sender = threading.Thread(
                target=lambda: (client.sendall(data), client.shutdown(socket.SHUT_WR))
            )
            sender.start()
            back = bytearray()
            while chunk := client.recv(1 << 16):
                back += chunk
            sender.join(timeout=10)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
        with udp:
            udp.settimeout(3)
            udp.send(b"over udp6")
            assert udp.recv(100) == b"over udp6"
        guest_tcp.kill()
        guest_udp.kill()
    assert not os.path.exists(api)


def test_stateless_dhcpv6_gives_dns_and_search_list(namespaces, tmp_path):
    host, _peer = namespaces
    script = tmp_path / "script"
    out_file = tmp_path / "env"
    script.write_text(f"#!/bin/sh\nenv | grep -i dhcp6 >> {out_file}\n")
    script.chmod(0o755)
    with forwarder6(host, "--dns-search", "example.test", "--dns-search", "corp.test") as fwd:
        out = fwd.run(
            [
                "dhclient",
                "-6",
                "-S",
                "-1",
                "-v",
                "-sf",
                str(script),
                "-lf",
                str(tmp_path / "lease"),
                "-pf",
                str(tmp_path / "pid"),
                "tap0",
            ],
            timeout=20,
        )
        pid_file = tmp_path / "pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), 15)
    env = out_file.read_text() if out_file.exists() else ""
    assert f"new_dhcp6_name_servers={DNS6}" in env, out.stderr + env
    assert "new_dhcp6_domain_search=example.test. corp.test." in env, env


def test_libslirp_backend_maps_ipv6(namespaces):
    """--backend=libslirp -6: libslirp's own IPv6 on our prefix and addresses."""
    host, _peer = namespaces
    server = Server(host, socket.SOCK_DGRAM, udp_echo)
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "s.settimeout(3)\n"
        f"s.sendto(b'via libslirp', ('fd42:1:2:3::2', {server.port}))\n"
        "print(s.recvfrom(100)[0].decode())\n"
    )
    try:
        with harness.forwarder(
            "--backend=libslirp",
            "-6",
            "-c",
            "--macaddress",
            GUEST_MAC,
            "--ipv6-prefix",
            "fd42:1:2:3::/64",
            configure=False,
            prefix=["nsenter", f"--net=/run/netns/{host}"],
        ) as fwd:
            wait_for_slaac(fwd, expect="fd42:1:2:3:0:ff:fe00:64")
            out = fwd.run(["ping", "-6", "-c", "1", "-W", "2", "fd42:1:2:3::2"])
            assert "1 received" in out.stdout, out.stdout + out.stderr
            out = fwd.run(["python3", "-c", script])
            assert out.stdout.strip() == "via libslirp", out.stdout + out.stderr
    finally:
        server.close()


def test_run_mode_command_starts_after_slaac(namespaces):
    """-- COMMAND with -6: the command starts once the guest has its address
    and route, and its resolv.conf names fd00::3 too."""
    host, _peer = namespaces
    script = (
        "ip -6 route show default; ip -6 addr show dev tap0 scope global; "
        "cat /etc/resolv.conf; ping -6 -c1 -W2 fd00::2 >/dev/null && echo ping-ok"
    )
    out = subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{host}",
            *harness.FORWARDER,
            "-6",
            "--dns-upstream",
            "127.0.0.1:9",
            "--",
            "sh",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=harness.REPO,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("default via fe80::2 dev tap0 proto ra"), out.stdout
    assert "inet6 fd00::" in out.stdout
    assert "nameserver 10.0.2.3\nnameserver fd00::3\n" in out.stdout
    assert "ping-ok" in out.stdout
