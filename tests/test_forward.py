"""Port forwarding (pyslirp/nat/forward.py): in-process through the real loop
with a fake TAP, then end to end with the kernel as the guest.

The end-to-end tests that need a client on a non-loopback address run the
forwarder inside a test-made "host" namespace joined by a veth pair to a
"client" namespace; nothing leaves the namespaces the test makes.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from pyslirp.nat.forward import list_connections, validate
from tests import harness
from tests.inprocess import InProcessNetwork

GUEST_MAC = "02:00:00:00:00:01"
GW_MAC = "52:55:0a:00:02:02"
GUEST = "10.0.2.100"
GW = "10.0.2.2"


# ----------------------------------------------------------- helpers
def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_udp_to_guest(frame: bytes) -> bool:
    pkt = Ether(frame)
    return UDP in pkt and pkt[IP].dst == GUEST


def answer_arp(net: InProcessNetwork) -> None:
    """The stack asks for the guest's MAC before its first frame to it."""
    frame = net.receive(predicate=lambda f: ARP in Ether(f))
    assert frame is not None, "no ARP request for the guest"
    request = Ether(frame)[ARP]
    assert request.pdst == GUEST
    net.send(
        bytes(
            Ether(src=GUEST_MAC, dst=GW_MAC)
            / ARP(op=2, hwsrc=GUEST_MAC, psrc=GUEST, hwdst=request.hwsrc, pdst=request.psrc)
        )
    )


def guest_udp(dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst=dst)
        / UDP(sport=sport, dport=dport)
        / payload
    )


@contextlib.contextmanager
def network_with_forwards(*forwards, **config_kw):
    net = InProcessNetwork(**config_kw)
    table = net.loop.forwards
    try:
        ids = [table.add(*f) for f in forwards]
    except BaseException:
        net.loop.close()
        net._close_fds()
        raise
    with net:
        yield net, table, ids


# ------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "args, word",
    [
        (("sctp", "0.0.0.0", 1, GUEST, 1), "proto"),
        (("tcp", "::", 1, GUEST, 1), "host_addr"),
        (("tcp", "1.2.3", 1, GUEST, 1), "host_addr"),
        (("tcp", "0.0.0.0", 0, GUEST, 1), "host_port"),
        (("tcp", "0.0.0.0", 65536, GUEST, 1), "host_port"),
        (("tcp", "0.0.0.0", True, GUEST, 1), "host_port"),
        (("udp", "0.0.0.0", 1, GUEST, 0), "guest_port"),
        (("udp", "0.0.0.0", 1, "10.0.3.1", 1), "guest_addr"),
        (("udp", "0.0.0.0", 1, GW, 1), "guest_addr"),
        (("udp", "0.0.0.0", 1, "10.0.2.255", 1), "guest_addr"),
        (("udp", "0.0.0.0", 1, "x", 1), "guest_addr"),
    ],
)
def test_validate_names_the_bad_argument(args, word):
    from pyslirp.config import NetworkConfig

    with pytest.raises(ValueError) as info:
        validate(NetworkConfig(), *args)
    assert str(info.value).split()[0] == word


def test_ids_from_one_never_reused_and_busy_port_is_oserror():
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        port = free_port()
        with network_with_forwards(("udp", "127.0.0.1", port, GUEST, 7)) as (net, table, ids):
            assert ids == [1]
            with pytest.raises(OSError) as info:
                table.add("udp", "127.0.0.1", busy.getsockname()[1], GUEST, 7)
            assert info.value.errno == 98  # EADDRINUSE
            tcp_port = free_port(socket.SOCK_STREAM)
            assert table.add("tcp", "127.0.0.1", tcp_port, GUEST, 80) == 2
            table.remove(1)
            with pytest.raises(KeyError):
                table.remove(1)
            assert table.add("udp", "127.0.0.1", port, GUEST, 7) == 3
            assert table.entries() == [
                {
                    "id": 2,
                    "proto": "tcp",
                    "host_addr": "127.0.0.1",
                    "host_port": tcp_port,
                    "guest_addr": GUEST,
                    "guest_port": 80,
                },
                {
                    "id": 3,
                    "proto": "udp",
                    "host_addr": "127.0.0.1",
                    "host_port": port,
                    "guest_addr": GUEST,
                    "guest_port": 7,
                },
            ]
    finally:
        busy.close()


# ------------------------------------------------------------ UDP in-process
def test_udp_forward_per_client_flows_and_replies_go_back():
    port = free_port()
    with network_with_forwards(("udp", "127.0.0.1", port, GUEST, 7000)) as (net, table, _):
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.2", 0))
            a.settimeout(2)
            b.settimeout(2)
            a.sendto(b"from a", ("127.0.0.1", port))
            answer_arp(net)
            got_a = Ether(net.receive(predicate=is_udp_to_guest))
            # A loopback client appears as the gateway, with its own port.
            assert (got_a[IP].src, got_a[UDP].sport) == (GW, a.getsockname()[1])
            assert got_a[UDP].dport == 7000 and bytes(got_a[UDP].payload) == b"from a"
            b.sendto(b"from b", ("127.0.0.1", port))
            got_b = Ether(net.receive(predicate=is_udp_to_guest))
            assert got_b[IP].src == GW and bytes(got_b[UDP].payload) == b"from b"
            # The guest answers each; each answer reaches its own client from the
            # forward's host port.
            net.send(guest_udp(GW, 7000, got_b[UDP].sport, b"to b"))
            net.send(guest_udp(GW, 7000, got_a[UDP].sport, b"to a"))
            assert a.recvfrom(100) == (b"to a", ("127.0.0.1", port))
            assert b.recvfrom(100) == (b"to b", ("127.0.0.1", port))
            # Flows are listed with their bytes.
            rows = [r for r in list_connections(net.loop, net.loop.now()) if "forward" in r]
            assert sorted(
                (r["host"], r["bytes_to_guest"], r["bytes_from_guest"]) for r in rows
            ) == [
                (f"127.0.0.1:{a.getsockname()[1]}", 6, 4),
                (f"127.0.0.2:{b.getsockname()[1]}", 6, 4),
            ]
        finally:
            a.close()
            b.close()


def test_udp_forward_same_port_from_two_loopback_addresses_gets_a_second_port():
    port = free_port()
    with network_with_forwards(("udp", "0.0.0.0", port, GUEST, 7000)) as (net, table, _):
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.3", a.getsockname()[1]))
            b.settimeout(2)
            a.sendto(b"1", ("127.0.0.1", port))
            answer_arp(net)
            first = Ether(net.receive(predicate=is_udp_to_guest))
            b.sendto(b"2", ("127.0.0.1", port))
            second = Ether(net.receive(predicate=is_udp_to_guest))
            assert first[UDP].sport == a.getsockname()[1]
            assert second[IP].src == GW and second[UDP].sport != first[UDP].sport
            net.send(guest_udp(GW, 7000, second[UDP].sport, b"back"))
            assert b.recvfrom(10)[0] == b"back"
        finally:
            a.close()
            b.close()


def test_udp_forward_flows_expire_and_removal_stops_it():
    port = free_port()
    with network_with_forwards(("udp", "127.0.0.1", port, GUEST, 7000), udp_idle_timeout=0.3) as (
        net,
        table,
        ids,
    ):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.sendto(b"x", ("127.0.0.1", port))
            answer_arp(net)
            assert net.receive(predicate=is_udp_to_guest) is not None
            deadline = time.monotonic() + 5
            while table.udp_clients and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not table.udp_clients and table.counters["udp-flows-expired"] == 1
            # After expiry the guest's reply to the old client is NAT traffic, not ours.
            table.remove(ids[0])
            c.sendto(b"y", ("127.0.0.1", port))  # nobody listens any more
            assert net.receive(timeout=0.3, predicate=is_udp_to_guest) is None
        finally:
            c.close()


def test_udp_forward_flow_limit_refuses_new_clients():
    port = free_port()
    with network_with_forwards(("udp", "127.0.0.1", port, GUEST, 7000), max_udp_flows=2) as (
        net,
        table,
        _,
    ):
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for i, c in enumerate(clients):
                c.sendto(bytes([i]), ("127.0.0.1", port))
                if i == 0:
                    answer_arp(net)
            got = [net.receive(timeout=0.5, predicate=is_udp_to_guest) for _ in range(3)]
            assert sum(g is not None for g in got) == 2
            assert table.counters["udp-flows-refused"] == 1
        finally:
            for c in clients:
                c.close()


# ------------------------------------------------------------ TCP in-process
def test_tcp_forward_opens_toward_the_guest_and_relays():
    port = free_port(socket.SOCK_STREAM)
    with network_with_forwards(("tcp", "127.0.0.1", port, GUEST, 8080)) as (net, table, _):
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            answer_arp(net)
            syn = Ether(net.receive(predicate=lambda f: TCP in Ether(f)))
            assert syn[TCP].flags == "S" and syn[TCP].dport == 8080
            assert (syn[IP].src, syn[TCP].sport) == (GW, client.getsockname()[1])
            seq = 1000
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST, dst=GW)
                    / TCP(sport=8080, dport=syn[TCP].sport, flags="SA", seq=seq, ack=syn.seq + 1)
                )
            )
            ack = Ether(net.receive(predicate=lambda f: TCP in Ether(f)))
            assert ack[TCP].flags == "A"
            client.sendall(b"hello guest")
            data = Ether(
                net.receive(predicate=lambda f: TCP in Ether(f) and len(Ether(f)[TCP].payload))
            )
            assert bytes(data[TCP].payload) == b"hello guest"
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST, dst=GW)
                    / TCP(
                        sport=8080,
                        dport=syn[TCP].sport,
                        flags="PA",
                        seq=seq + 1,
                        ack=data.seq + len(data[TCP].payload),
                    )
                    / b"hello host"
                )
            )
            assert client.recv(100) == b"hello host"
            rows = [r for r in list_connections(net.loop, net.loop.now()) if r["proto"] == "tcp"]
            assert len(rows) == 1 and rows[0]["forward"] == 1
            assert rows[0]["state"] == "ESTABLISHED"
            assert rows[0]["bytes_from_guest"] == 10 and rows[0]["bytes_to_guest"] == 11
        finally:
            client.close()


def test_tcp_forward_refused_by_guest_resets_the_client():
    port = free_port(socket.SOCK_STREAM)
    with network_with_forwards(("tcp", "127.0.0.1", port, GUEST, 8080)) as (net, table, _):
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            answer_arp(net)
            syn = Ether(net.receive(predicate=lambda f: TCP in Ether(f)))
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST, dst=GW)
                    / TCP(sport=8080, dport=syn[TCP].sport, flags="RA", seq=0, ack=syn.seq + 1)
                )
            )
            with pytest.raises(ConnectionResetError):
                client.recv(10)
        finally:
            client.close()


# ------------------------------------------------------------ end to end
GUEST_SERVER = r"""
import socket, sys, threading
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 7000))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(f"{peer[0]}:{peer[1]}|".encode() + data, peer)
def tcp_client(conn, peer):
    with conn:
        conn.sendall(f"{peer[0]}:{peer[1]}\n".encode())
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
def tcp():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080))
    s.listen()
    while True:
        conn, peer = s.accept()
        threading.Thread(target=tcp_client, args=(conn, peer), daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import hashlib, os, socket, sys, time
addr, udp_port, tcp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(0.5)
for _ in range(20):
    u.sendto(b"hello", (addr, udp_port))
    try:
        reply = u.recv(1000)
        break
    except (TimeoutError, ConnectionRefusedError):
        continue
seen, data = reply.decode().split("|")
assert data == "hello", reply
print("udp", u.getsockname()[1], seen)
t = socket.create_connection((addr, tcp_port), timeout=10)
f = t.makefile("rb")
seen = f.readline().decode().strip()
blob = os.urandom(1 << 20)
import threading
threading.Thread(target=t.sendall, args=(blob,), daemon=True).start()
got = f.read(len(blob))
print("tcp", t.getsockname()[1], seen, got == blob)
"""

HOST_SIDE, CLIENT_SIDE = "192.168.77.1", "192.168.77.2"


@contextlib.contextmanager
def host_and_client():
    """Two test namespaces: "host" (where the forwarder runs) and "client",
    joined by a veth pair."""
    names = [f"pyslirp-fwd{tag}-{uuid.uuid4().hex[:6]}" for tag in ("h", "c")]
    made = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        host, client = names
        sh = lambda *a: subprocess.run(a, check=True)  # noqa: E731
        sh("ip", "link", "add", "h0", "netns", host, "type", "veth", "peer", "c0", "netns", client)
        sh("ip", "-n", host, "addr", "add", f"{HOST_SIDE}/24", "dev", "h0")
        sh("ip", "-n", host, "link", "set", "h0", "up")
        sh("ip", "-n", client, "addr", "add", f"{CLIENT_SIDE}/24", "dev", "c0")
        sh("ip", "-n", client, "link", "set", "c0", "up")
        yield host, client
    finally:
        for name in made:
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", name], check=False)


def client_in(ns: str, addr: str, udp_port: int, tcp_port: int) -> dict:
    out = subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{ns}",
            sys.executable,
            "-c",
            CLIENT,
            addr,
            str(udp_port),
            str(tcp_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines():
        kind, port, seen, *rest = line.split()
        rows[kind] = (int(port), seen, rest)
    return rows


@contextlib.contextmanager
def guest_server(fwd):
    server = fwd.popen(["python3", "-c", GUEST_SERVER], stdin=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        yield server
    finally:
        server.kill()
        server.wait(timeout=5)


@pytest.mark.e2e
def test_e2e_guest_sees_real_client_address_and_gateway_for_loopback():
    with (
        host_and_client() as (host, client),
        harness.forwarder(
            "-p", "5000:7000/udp", "-p", "5001:8080", prefix=["nsenter", f"--net=/run/netns/{host}"]
        ) as fwd,
        guest_server(fwd),
    ):
        far = client_in(client, HOST_SIDE, 5000, 5001)
        assert far["udp"][1] == f"{CLIENT_SIDE}:{far['udp'][0]}"
        assert far["tcp"][1] == f"{CLIENT_SIDE}:{far['tcp'][0]}"
        assert far["tcp"][2] == ["True"]  # 1 MiB both ways, intact
        near = client_in(host, "127.0.0.1", 5000, 5001)
        assert near["udp"][1] == f"{GW}:{near['udp'][0]}"
        assert near["tcp"][1] == f"{GW}:{near['tcp'][0]}"
        assert near["tcp"][2] == ["True"]


@pytest.mark.e2e
def test_e2e_removing_a_forward_keeps_its_connections():
    from forwarder.api import request

    work = tempfile.mkdtemp(prefix="pyslirp-fwd-")
    api = os.path.join(work, "api.sock")
    try:
        with harness.forwarder("-a", api) as fwd, guest_server(fwd):
            port = free_port(socket.SOCK_STREAM)
            add = {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": port, "guest_port": 8080}
            deadline = time.monotonic() + 10
            while not os.path.exists(api) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert request(api, {"execute": "add_hostfwd", "arguments": add}) == {
                "return": {"id": 1}
            }
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                reader = conn.makefile("rb")
                assert reader.readline().startswith(b"10.0.2.2:")
                assert request(api, {"execute": "remove_hostfwd", "arguments": {"id": 1}}) == {
                    "return": {}
                }
                assert request(api, {"execute": "list_hostfwd"}) == {"entries": []}
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                conn.sendall(b"still here\n")
                assert reader.readline() == b"still here\n"
            finally:
                conn.close()
            # The same port can be forwarded again, with a new id.
            assert request(api, {"execute": "add_hostfwd", "arguments": add}) == {
                "return": {"id": 2}
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
