"""The libslirp backend: the binding, the loop and the guest's view, in-process.

The backend runs in a thread on one end of an AF_UNIX SOCK_SEQPACKET pair (the
fake TAP, tests/inprocess.py); the test is the guest on the other end. The
host side is real sockets on 127.0.0.1.

libslirp sends the guest's DNS queries to the first nameserver of
/etc/resolv.conf, which it reads itself: these tests run only inside
.ci/sandbox (resolv.conf says 127.0.0.1), and the DNS test serves 127.0.0.1:53.
"""

import contextlib
import errno
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, TCP, UDP, TCPerror, UDPerror
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from pyslirp import libslirp
from pyslirp.backend import BACKENDS, create_backend
from pyslirp.config import NetworkConfig
from tests.inprocess import InProcessNetwork

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    BINDING = libslirp.load()
    UNAVAILABLE = ""
except libslirp.LibslirpUnavailable as exc:
    BINDING = None
    UNAVAILABLE = str(exc)

# Skipped only when the library is absent; CI installs libslirp0.
needs_libslirp = pytest.mark.skipif(BINDING is None, reason=UNAVAILABLE)

GUEST_MAC = "02:00:00:00:00:64"
GW_MAC = "52:55:0a:00:02:02"
DNS_MAC = "52:55:0a:00:02:03"
GUEST = "10.0.2.100"
BROADCAST = "ff:ff:ff:ff:ff:ff"


def resolv_conf_is_ours() -> bool:
    try:
        with open("/etc/resolv.conf") as f:
            servers = [line.split()[1] for line in f if line.startswith("nameserver")]
    except OSError:
        return True
    return all(s.startswith("127.") for s in servers)


@pytest.fixture
def sandbox():
    # libslirp asks the host's resolver whenever the guest asks 10.0.2.3:
    # never run it where that resolver is not ours.
    if not resolv_conf_is_ours():
        pytest.fail(
            "libslirp tests must run inside .ci/sandbox (/etc/resolv.conf names a "
            "resolver that is not ours)"
        )


@contextlib.contextmanager
def network(backend: str = "libslirp", **config_kw):
    with InProcessNetwork(backend=backend, **config_kw) as net:
        yield net


def receive(net, predicate=None, timeout: float = 2.0):
    """The next frame for the guest that satisfies ``predicate``, answering
    ARP requests for the guest's address on the way, as a guest would."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        frame = net.receive(timeout=left)
        if frame is None:
            return None
        pkt = Ether(frame)
        if ARP in pkt and pkt[ARP].op == 1 and pkt[ARP].pdst == GUEST:
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=pkt[ARP].hwsrc)
                    / ARP(
                        op=2, hwsrc=GUEST_MAC, psrc=GUEST, hwdst=pkt[ARP].hwsrc, pdst=pkt[ARP].psrc
                    )
                )
            )
        if predicate is None or predicate(frame):
            return frame
    return None


# ----------------------------------------------------------- guest frames
def arp_request(target: str, src_ip: str = GUEST) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst=BROADCAST)
        / ARP(op=1, hwsrc=GUEST_MAC, psrc=src_ip, hwdst="00:00:00:00:00:00", pdst=target)
    )


def echo_request(dst: str, ident: int = 0x1234, seq: int = 1, payload: bytes = b"ping") -> bytes:
    dst_mac = DNS_MAC if dst.endswith(".3") else GW_MAC
    return bytes(
        Ether(src=GUEST_MAC, dst=dst_mac)
        / IP(src=GUEST, dst=dst, id=0x4321)
        / ICMP(type=8, id=ident, seq=seq)
        / payload
    )


def dhcp_frame(message_type: str, xid: int = 0x1020304, requested: str | None = None) -> bytes:
    options = [("message-type", message_type)]
    if requested is not None:
        options += [("requested_addr", requested), ("server_id", "10.0.2.2")]
    options += [("param_req_list", [1, 3, 6, 15, 26, 28, 51, 54]), "end"]
    return bytes(
        Ether(src=GUEST_MAC, dst=BROADCAST)
        / IP(src="0.0.0.0", dst="255.255.255.255", id=1)
        / UDP(sport=68, dport=67)
        / BOOTP(op=1, xid=xid, chaddr=bytes.fromhex(GUEST_MAC.replace(":", "")) + bytes(10))
        / DHCP(options=options)
    )


def udp_frame(dst: str, dport: int, payload: bytes, sport: int = 40000) -> bytes:
    dst_mac = DNS_MAC if dst.endswith(".3") else GW_MAC
    return bytes(
        Ether(src=GUEST_MAC, dst=dst_mac)
        / IP(src=GUEST, dst=dst, id=0x0BAD)
        / UDP(sport=sport, dport=dport)
        / payload
    )


def tcp_syn(dst: str, dport: int, sport: int = 41000, seq: int = 1000) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst=dst, id=0x0C0C)
        / TCP(
            sport=sport,
            dport=dport,
            flags="S",
            seq=seq,
            window=64240,
            options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)],
        )
    )


def dns_query(name: str = "example.test.", qid: int = 0x4242) -> bytes:
    return bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype="A")))


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------- predicates
def has(layer):
    return lambda frame: layer in Ether(frame)


def is_arp_reply(frame: bytes) -> bool:
    pkt = Ether(frame)
    return ARP in pkt and pkt[ARP].op == 2


def is_icmp_type(icmp_type: int):
    return lambda frame: ICMP in Ether(frame) and Ether(frame)[ICMP].type == icmp_type


def is_dhcp(message_type: int):
    def predicate(frame: bytes) -> bool:
        pkt = Ether(frame)
        if DHCP not in pkt:
            return False
        return (
            dict(o for o in pkt[DHCP].options if isinstance(o, tuple)).get("message-type")
            == message_type
        )

    return predicate


def udp_from(port: int):
    def predicate(frame: bytes) -> bool:
        pkt = Ether(frame)
        return UDP in pkt and ICMP not in pkt and pkt[UDP].sport == port

    return predicate


def tcp_to(port: int):
    def predicate(frame: bytes) -> bool:
        pkt = Ether(frame)
        return TCP in pkt and pkt[TCP].dport == port

    return predicate


# ------------------------------------------------------------ DNS server
class Dns53:
    """A DNS server on 127.0.0.1:53: where libslirp sends the guest's queries
    inside the sandbox. Answers every A query with ``address``."""

    def __init__(self, address: str = "192.0.2.53") -> None:
        self.address = address
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        deadline = time.monotonic() + 5
        while True:  # another test of ours may hold the port for a moment
            try:
                self.sock.bind(("127.0.0.1", 53))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.1)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = DNS(data)
                name = query[DNSQR].qname.decode()
            except Exception:
                continue
            self.queries.append(name)
            answer = DNS(
                id=query.id,
                qr=1,
                aa=1,
                rd=query.rd,
                ra=1,
                qd=query[DNSQR],
                an=DNSRR(rrname=name, type="A", ttl=60, rdata=self.address),
            )
            self.sock.sendto(bytes(answer), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------- binding
def test_libslirp_is_a_registered_backend():
    assert "libslirp" in BACKENDS and "python" in BACKENDS


def test_missing_library_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setattr(libslirp, "LIBRARY", "libslirp-absent-for-test.so.0")
    monkeypatch.setattr(libslirp, "_binding", None)
    with pytest.raises(libslirp.LibslirpUnavailable) as info:
        create_backend("libslirp", NetworkConfig())
    message = str(info.value)
    assert "\n" not in message
    assert "apt-get install libslirp0" in message
    assert "libslirp-absent-for-test.so.0" in message


def test_nothing_else_imports_cffi_at_start_up():
    code = (
        "import sys, pyslirp, pyslirp.backend, pyslirp.nat.loop, pyslirp.nat.backend\n"
        "import forwarder.cli\n"
        "assert 'cffi' not in sys.modules, 'cffi imported'\n"
        "assert 'pyslirp.libslirp' not in sys.modules, 'pyslirp.libslirp imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_version_parsing_and_config_version():
    assert libslirp.parse_version("4.7.0") == (4, 7, 0)
    assert libslirp.parse_version("4.9.1-dirty") == (4, 9, 1)
    assert libslirp.parse_version("4.8") == (4, 8, 0)
    with pytest.raises(libslirp.LibslirpUnavailable):
        libslirp.parse_version("unknown")
    assert [
        libslirp.config_version(v) for v in [(4, 1, 0), (4, 2, 0), (4, 6, 1), (4, 7, 0), (4, 9, 0)]
    ] == [1, 2, 3, 4, 4]


@needs_libslirp
def test_loaded_version_and_features():
    assert BINDING.version >= (4, 1)
    assert BINDING.config_version == libslirp.config_version(BINDING.version)
    assert BINDING.has_handle_timer == (BINDING.version >= (4, 7))
    assert BINDING.has_hostxfwd == (BINDING.version >= (4, 5))


# offsetof/sizeof from libslirp 4.7's libslirp.h, compiled with gcc on x86_64.
C_LAYOUT = {
    ("SlirpConfig", "restricted"): 4,
    ("SlirpConfig", "in_enabled"): 8,
    ("SlirpConfig", "vnetwork"): 12,
    ("SlirpConfig", "vhost"): 20,
    ("SlirpConfig", "in6_enabled"): 24,
    ("SlirpConfig", "vprefix_addr6"): 28,
    ("SlirpConfig", "vprefix_len"): 44,
    ("SlirpConfig", "vhost6"): 48,
    ("SlirpConfig", "vhostname"): 64,
    ("SlirpConfig", "vdhcp_start"): 96,
    ("SlirpConfig", "vnameserver"): 100,
    ("SlirpConfig", "vnameserver6"): 104,
    ("SlirpConfig", "vdnssearch"): 120,
    ("SlirpConfig", "vdomainname"): 128,
    ("SlirpConfig", "if_mtu"): 136,
    ("SlirpConfig", "if_mru"): 144,
    ("SlirpConfig", "disable_host_loopback"): 152,
    ("SlirpConfig", "enable_emu"): 153,
    ("SlirpConfig", "outbound_addr"): 160,
    ("SlirpConfig", "outbound_addr6"): 168,
    ("SlirpConfig", "disable_dns"): 176,
    ("SlirpConfig", "disable_dhcp"): 177,
    ("SlirpCb", "timer_mod"): 40,
    ("SlirpCb", "notify"): 64,
    ("SlirpCb", "timer_new_opaque"): 80,
}


@needs_libslirp
@pytest.mark.skipif(platform.machine() != "x86_64", reason="layout measured on x86_64")
def test_declared_layout_matches_the_c_header():
    ffi = BINDING.ffi
    assert ffi.sizeof("SlirpConfig") == 184 and ffi.sizeof("SlirpCb") == 88
    for (struct_name, field), offset in C_LAYOUT.items():
        assert ffi.offsetof(struct_name, field) == offset, (struct_name, field)


def test_dns_upstreams_libslirp_cannot_honour_are_refused(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nnameserver 127.0.0.2\n")
    path = str(resolv)
    # the default (the front end copies resolv.conf) and its first entry pass
    for upstreams in ([], [("127.0.0.1", 53), ("127.0.0.2", 53)], [("127.0.0.1", 53)]):
        libslirp.check_dns_upstreams(NetworkConfig(dns_upstreams=upstreams), path)
    for upstreams in (
        [("127.0.0.1", 5353)],
        [("127.0.0.2", 53)],
        [("127.0.0.1", 53), ("127.0.0.9", 53)],
    ):
        with pytest.raises(ValueError) as info:
            libslirp.check_dns_upstreams(NetworkConfig(dns_upstreams=upstreams), path)
        message = str(info.value)
        assert "--dns-upstream" in message and "libslirp backend" in message
        assert "\n" not in message


@needs_libslirp
def test_create_backend_refuses_dns_upstream(sandbox):
    with pytest.raises(ValueError, match="--dns-upstream 127.0.0.1:5353 is not supported"):
        create_backend("libslirp", NetworkConfig(dns_upstreams=[("127.0.0.1", 5353)]))


@needs_libslirp
def test_timers_fire_in_deadline_order_once_and_not_after_free(sandbox):
    backend = create_backend("libslirp", NetworkConfig())
    try:
        ffi = backend.ffi
        fired = []

        @ffi.callback("SlirpTimerCb")
        def on_timer(opaque):
            fired.append(int(ffi.cast("uintptr_t", opaque)))

        t1 = backend.timer_new(on_timer, ffi.cast("void *", 1), ffi.NULL)
        t2 = backend.timer_new(on_timer, ffi.cast("void *", 2), ffi.NULL)
        t3 = backend.timer_new(on_timer, ffi.cast("void *", 3), ffi.NULL)
        backend.timer_mod(t1, 300, ffi.NULL)
        backend.timer_mod(t2, 100, ffi.NULL)
        backend.timer_mod(t3, 200, ffi.NULL)
        backend.timer_mod(t1, 150, ffi.NULL)  # re-armed earlier: the old deadline is stale
        backend.timer_free(t3, ffi.NULL)
        assert backend.next_timer_ms() == 100
        backend.run_timers(99)
        assert fired == []
        backend.run_timers(1000)
        assert fired == [2, 1]
        backend.run_timers(2000)
        assert fired == [2, 1]
        assert backend.next_timer_ms() is None
    finally:
        backend.close()


# ------------------------------------------------------ the guest's view
@needs_libslirp
def test_arp_reply_for_gateway_and_dns(sandbox):
    with network() as net:
        for target, mac in (("10.0.2.2", GW_MAC), ("10.0.2.3", DNS_MAC)):
            net.send(arp_request(target))
            reply = Ether(receive(net, predicate=is_arp_reply))
            assert reply[Ether].dst == GUEST_MAC
            assert (reply[ARP].psrc, reply[ARP].hwsrc) == (target, mac)
            assert (reply[ARP].pdst, reply[ARP].hwdst) == (GUEST, GUEST_MAC)


@needs_libslirp
def test_icmp_echo_to_gateway(sandbox):
    with network() as net:
        net.send(echo_request("10.0.2.2", ident=0x77, seq=3, payload=b"0123456789abcdef"))
        reply = Ether(receive(net, predicate=is_icmp_type(0)))
        assert (reply[IP].src, reply[IP].dst) == ("10.0.2.2", GUEST)
        assert (reply[ICMP].id, reply[ICMP].seq) == (0x77, 3)
        assert bytes(reply[ICMP].payload) == b"0123456789abcdef"


@needs_libslirp
def test_dhcp_discover_gets_an_offer(sandbox):
    with network() as net:
        net.send(dhcp_frame("discover", xid=0xABCDEF))
        offer = Ether(receive(net, predicate=is_dhcp(2)))
        assert offer[BOOTP].xid == 0xABCDEF and offer[BOOTP].op == 2
        assert offer[BOOTP].yiaddr == "10.0.2.15"
        options = dict(o for o in offer[DHCP].options if isinstance(o, tuple))
        assert options["subnet_mask"] == "255.255.255.0"
        assert options["router"] == "10.0.2.2"
        assert options["name_server"] == "10.0.2.3"
        assert options["server_id"] == "10.0.2.2"
        net.send(dhcp_frame("request", xid=0xABCDEF, requested="10.0.2.15"))
        ack = Ether(receive(net, predicate=is_dhcp(5)))
        assert ack[BOOTP].yiaddr == "10.0.2.15"


@needs_libslirp
def test_udp_to_gateway_reaches_host_loopback_and_back(sandbox):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, network() as net:
        server.bind(("127.0.0.1", 0))
        server.settimeout(2)
        port = server.getsockname()[1]
        net.send(udp_frame("10.0.2.2", port, b"hello libslirp"))
        data, peer = server.recvfrom(100)
        assert data == b"hello libslirp" and peer[0] == "127.0.0.1"
        server.sendto(b"hello guest", peer)
        reply = Ether(receive(net, predicate=udp_from(port)))
        assert (reply[IP].src, reply[IP].dst) == ("10.0.2.2", GUEST)
        assert (reply[UDP].sport, reply[UDP].dport) == (port, 40000)
        assert bytes(reply[UDP].payload) == b"hello guest"
        info = net.backend.connection_info()
        assert "udp" in info.lower() and str(port) in info


@needs_libslirp
def test_tcp_syn_to_closed_port_gets_rst(sandbox):
    port = closed_port()
    with network() as net:
        net.send(tcp_syn("10.0.2.2", port, sport=41000, seq=1000))
        rst = Ether(receive(net, predicate=lambda f: TCP in Ether(f)))
        assert (rst[IP].src, rst[IP].dst) == ("10.0.2.2", GUEST)
        assert (rst[TCP].sport, rst[TCP].dport) == (port, 41000)
        assert "R" in str(rst[TCP].flags)
        assert rst[TCP].ack == 1001


@needs_libslirp
def test_tcp_connection_carries_data_both_ways(sandbox):
    with socket.socket() as listener, network() as net:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(2)
        port = listener.getsockname()[1]
        net.send(tcp_syn("10.0.2.2", port, sport=41001, seq=5000))
        synack = Ether(receive(net, predicate=tcp_to(41001)))
        assert str(synack[TCP].flags) == "SA" and synack[TCP].ack == 5001
        conn, _ = listener.accept()
        with conn:
            base = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST, dst="10.0.2.2")
            server_seq = synack[TCP].seq + 1
            net.send(
                bytes(
                    base
                    / TCP(
                        sport=41001, dport=port, flags="A", seq=5001, ack=server_seq, window=64240
                    )
                )
            )
            net.send(
                bytes(
                    base
                    / TCP(
                        sport=41001, dport=port, flags="PA", seq=5001, ack=server_seq, window=64240
                    )
                    / b"request"
                )
            )
            conn.settimeout(2)
            assert conn.recv(100) == b"request"
            conn.sendall(b"response")
            data = Ether(
                receive(
                    net, predicate=lambda f: tcp_to(41001)(f) and len(Ether(f)[TCP].payload) > 0
                )
            )
            assert bytes(data[TCP].payload) == b"response"


@needs_libslirp
def test_dns_query_goes_to_the_resolv_conf_nameserver(sandbox):
    with Dns53(address="192.0.2.53") as dns, network() as net:
        net.send(udp_frame("10.0.2.3", 53, dns_query("probe.test."), sport=45000))
        reply = Ether(receive(net, timeout=3, predicate=udp_from(53)))
        assert (reply[IP].src, reply[UDP].dport) == ("10.0.2.3", 45000)
        answer = DNS(bytes(reply[UDP].payload))
        assert answer.id == 0x4242 and answer.an[0].rdata == "192.0.2.53"
        assert dns.queries == ["probe.test."]


@needs_libslirp
def test_disable_host_loopback_blocks_the_host(sandbox):
    port = closed_port()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        network(disable_host_loopback=True) as net,
    ):
        server.bind(("127.0.0.1", 0))
        server.settimeout(0.5)
        net.send(udp_frame("10.0.2.2", server.getsockname()[1], b"must not arrive"))
        unreachable = Ether(receive(net, predicate=is_icmp_type(3)))
        assert unreachable[ICMP].code == 0  # network unreachable
        assert UDPerror in unreachable
        with pytest.raises(TimeoutError):
            server.recvfrom(100)
        net.send(tcp_syn("10.0.2.2", port))
        unreachable = Ether(receive(net, predicate=is_icmp_type(3)))
        assert unreachable[ICMP].code == 0
        assert TCPerror in unreachable


@needs_libslirp
def test_pcap_records_both_directions(sandbox, tmp_path):
    path = tmp_path / "capture.pcap"
    with network(pcap_path=str(path)) as net:
        net.send(arp_request("10.0.2.2"))
        assert receive(net, predicate=is_arp_reply) is not None
    frames = rdpcap(str(path))
    assert [f[ARP].op for f in frames] == [1, 2]


@needs_libslirp
def test_stop_closes_every_host_socket(sandbox):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(2)
        before = fds()
        with network() as net:
            for sport in range(40100, 40110):
                net.send(udp_frame("10.0.2.2", server.getsockname()[1], b"x", sport=sport))
            for _ in range(10):
                server.recvfrom(10)
            assert fds() >= before + 10
        assert fds() == before


# ------------------------------------------------------------ forwards
def _learn_guest(net) -> None:
    # libslirp learns the guest's MAC from its ARP request, so forwarded
    # packets go out at once instead of waiting for an ARP exchange.
    net.send(arp_request("10.0.2.2"))
    assert receive(net, predicate=is_arp_reply) is not None


@needs_libslirp
def test_tcp_hostfwd_add_and_remove(sandbox):
    host_port = free_port()
    with network() as net:
        _learn_guest(net)
        fwd = net.backend.add_hostfwd("tcp", "127.0.0.1", host_port, GUEST, 8080)
        assert fwd == 1
        assert net.backend.list_hostfwd() == [
            {
                "id": 1,
                "proto": "tcp",
                "host_addr": "127.0.0.1",
                "host_port": host_port,
                "guest_addr": GUEST,
                "guest_port": 8080,
            }
        ]
        client = socket.create_connection(("127.0.0.1", host_port), timeout=2)
        try:
            syn = Ether(receive(net, predicate=tcp_to(8080)))
            assert str(syn[TCP].flags) == "S"
            # a loopback client appears as the gateway
            assert (syn[IP].src, syn[IP].dst) == ("10.0.2.2", GUEST)
        finally:
            client.close()
        net.backend.remove_hostfwd(fwd)
        assert net.backend.list_hostfwd() == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", host_port), timeout=2).close()
        with pytest.raises(KeyError):
            net.backend.remove_hostfwd(fwd)
        # ids are never reused
        assert net.backend.add_hostfwd("tcp", "127.0.0.1", host_port, GUEST, 8080) == 2


@needs_libslirp
def test_udp_hostfwd_delivers_to_the_guest(sandbox):
    host_port = free_port(socket.SOCK_DGRAM)
    with network() as net, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        _learn_guest(net)
        fwd = net.backend.add_hostfwd("udp", "127.0.0.1", host_port, GUEST, 5353)
        client.sendto(b"to the guest", ("127.0.0.1", host_port))
        frame = Ether(
            receive(net, predicate=lambda f: UDP in Ether(f) and Ether(f)[UDP].dport == 5353)
        )
        assert frame[IP].dst == GUEST and bytes(frame[UDP].payload) == b"to the guest"
        net.backend.remove_hostfwd(fwd)


@needs_libslirp
def test_hostfwd_errors(sandbox):
    with socket.socket() as busy, network() as net:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as info:
            net.backend.add_hostfwd("tcp", "127.0.0.1", port, GUEST, 80)
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(ValueError):
            net.backend.add_hostfwd("sctp", "127.0.0.1", port, GUEST, 80)
        with pytest.raises(ValueError):
            net.backend.add_hostfwd("tcp", "127.0.0.1", 0, GUEST, 80)
        with pytest.raises(ValueError):
            net.backend.add_hostfwd("tcp", "127.0.0.1", free_port(), "192.0.2.1", 80)
        assert net.backend.list_hostfwd() == []


@needs_libslirp
def test_hostfwd_added_before_run_works(sandbox):
    host_port = free_port(socket.SOCK_DGRAM)
    net = InProcessNetwork(backend="libslirp")
    fwd = net.backend.add_hostfwd("udp", "127.0.0.1", host_port, GUEST, 5454)
    with net, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        _learn_guest(net)
        client.sendto(b"early forward", ("127.0.0.1", host_port))
        frame = Ether(
            receive(net, predicate=lambda f: UDP in Ether(f) and Ether(f)[UDP].dport == 5454)
        )
        assert bytes(frame[UDP].payload) == b"early forward"
        net.backend.remove_hostfwd(fwd)


@needs_libslirp
def test_registered_fd_is_served_by_the_loop_thread(sandbox):
    # How the API socket will live in this loop: its handler runs in the loop
    # thread and may call the backend directly.
    import select

    ours, theirs = socket.socketpair()
    calls = []
    with ours, theirs, network() as net:
        backend = net.backend
        host_port = free_port()

        def on_ready(mask, now):
            ours.recv(100)
            calls.append((threading.get_ident(), mask))
            backend.add_hostfwd("tcp", "127.0.0.1", host_port, GUEST, 22)

        backend.register(ours.fileno(), select.POLLIN, on_ready)
        theirs.send(b"go")
        deadline = time.monotonic() + 2
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 1 and calls[0][0] != threading.get_ident()
        assert [f["host_port"] for f in backend.list_hostfwd()] == [host_port]
        backend.unregister(ours.fileno())


FIRST_FRAME_SCRIPT = """
import socket, sys
sys.path.insert(0, {repo!r})
from tests.test_libslirp import network, receive, udp_frame, udp_from
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, network() as net:
    server.bind(("127.0.0.1", 0))
    server.settimeout(2)
    port = server.getsockname()[1]
    net.send(udp_frame("10.0.2.2", port, b"first frame"))
    data, peer = server.recvfrom(100)
    server.sendto(b"reply", peer)
    assert receive(net, udp_from(port)) is not None, "no reply"
print("ok")
"""


@needs_libslirp
def test_flow_opened_by_the_first_frame_of_a_process_survives(sandbox):
    # libslirp's clock is process-wide and starts at 0: a fresh process shows
    # whether the loop sets it before the first guest frame.
    result = subprocess.run(
        [sys.executable, "-c", FIRST_FRAME_SCRIPT.format(repo=REPO)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.strip() == "ok", result.stderr


CONNECTION_INFO = """\
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]   12       127.0.0.1  8080      10.0.2.100    80     0     0
  TCP[ESTABLISHED]    14       127.0.0.1  8080      10.0.2.100    80     0     5
  TCP[SYN_SENT]       15      10.0.2.100 41000        10.0.2.2  5000     0     0
  UDP[HOST_FORWARD]   16               *  5353      10.0.2.100    53     0     0
  UDP[236 sec]        17      10.0.2.100 40000        10.0.2.3    53     0     0
  ICMP[10 sec]        18      10.0.2.100  -           10.0.2.2  -        0     0
"""


def test_connection_info_is_parsed_into_flows():
    import ipaddress

    flows = libslirp.parse_connection_info(CONNECTION_INFO, ipaddress.IPv4Network("10.0.2.0/24"))
    assert [(f["proto"], f["state"], f["guest"], f["host"]) for f in flows] == [
        ("tcp", "HOST_FORWARD", "10.0.2.100:80", "127.0.0.1:8080"),
        ("tcp", "ESTABLISHED", "10.0.2.100:80", "127.0.0.1:8080"),
        ("tcp", "SYN_SENT", "10.0.2.100:41000", "10.0.2.2:5000"),
        ("udp", "HOST_FORWARD", "10.0.2.100:53", "*:5353"),
        ("udp", "open", "10.0.2.100:40000", "10.0.2.3:53"),
        ("icmp", "open", "10.0.2.100", "10.0.2.2"),
    ]
    assert flows[1]["send_queue"] == 5 and flows[4]["expires_in"] == 236
    assert flows[0]["fd"] == 12


@needs_libslirp
def test_list_connections_shows_flows_and_forwards(sandbox):
    host_port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, network() as net:
        server.bind(("127.0.0.1", 0))
        server.settimeout(2)
        port = server.getsockname()[1]
        net.send(udp_frame("10.0.2.2", port, b"x", sport=40123))
        server.recvfrom(10)
        net.backend.add_hostfwd("tcp", "127.0.0.1", host_port, GUEST, 8080)
        flows = {
            (f["proto"], f["guest"], f["host"], f["state"]) for f in net.backend.list_connections()
        }
        assert ("udp", f"{GUEST}:40123", f"10.0.2.2:{port}", "open") in flows
        assert ("tcp", f"{GUEST}:8080", f"127.0.0.1:{host_port}", "HOST_FORWARD") in flows


@needs_libslirp
def test_outbound_addr_binds_host_sockets(sandbox):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(2)
        with network(outbound_addr="127.0.0.2") as net:
            assert "outbound_addr" in net.backend.supported_options
            net.send(udp_frame("10.0.2.2", server.getsockname()[1], b"from outbound"))
            data, peer = server.recvfrom(100)
            assert data == b"from outbound" and peer[0] == "127.0.0.2"


@needs_libslirp
def test_disable_dns_is_passed_to_libslirp_and_skips_the_upstream_check(sandbox):
    # Only the configuration is checked: with disable_dns, libslirp sends what
    # the guest sends to 10.0.2.3 to that address on the host's network.
    config = NetworkConfig(disable_dns=True, dns_upstreams=[("127.0.0.1", 5353)])
    backend = create_backend("libslirp", config)
    try:
        assert "disable_dns" in backend.supported_options
        assert backend.slirp_config.disable_dns and backend.slirp_config.version >= 3
    finally:
        backend.close()


@needs_libslirp
def test_start_then_close_without_run_releases_everything(sandbox, tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    guest, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with guest, tap:
        backend = create_backend("libslirp", NetworkConfig(pcap_path=str(tmp_path / "p.pcap")))
        backend.start(tap.fileno(), tap.fileno())
        backend.add_hostfwd("udp", "127.0.0.1", free_port(socket.SOCK_DGRAM), GUEST, 53)
        backend.close()
        backend.close()
        with pytest.raises(RuntimeError):
            backend.add_hostfwd("udp", "127.0.0.1", free_port(socket.SOCK_DGRAM), GUEST, 53)
    assert len(os.listdir("/proc/self/fd")) == before
