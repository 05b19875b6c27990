"""Parity between the python backend and libslirp.

Frame level: the same guest frames go into each backend in-process; the
answers are parsed with scapy and compared field by field. Every difference
must be listed, with its reason, in the table of docs/parity.md, and every row
of that table must still be a difference: an unlisted or stale difference
fails.

The libslirp side asks the first nameserver of /etc/resolv.conf: these tests
run only inside .ci/sandbox, where that is 127.0.0.1, and serve 127.0.0.1:53.
"""

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from scapy.fields import FlagValue
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import NoPayload

from tests import guest_frames
from tests.test_libslirp import (
    Dns53,
    closed_port,
    dhcp_frame,
    dns_query,
    is_arp_reply,
    is_dhcp,
    is_icmp_type,
    needs_libslirp,
    network,
    receive,
    resolv_conf_is_ours,
    tcp_syn,
    tcp_to,
    udp_frame,
    udp_from,
)

PARITY_DOC = Path(__file__).resolve().parent.parent / "docs" / "parity.md"
ABSENT = "(absent)"
NO_ANSWER = "(no answer)"
CHECKSUMMED = (IP, ICMP, UDP, TCP)


# -------------------------------------------------------------- scenarios
def scenarios(closed: int, listening: int) -> list[tuple[str, bytes, object]]:
    """(name, guest frame, predicate for the answer), sent in this order."""
    return [
        # captured from a Linux guest: who-has 10.0.2.2 from 10.0.2.100
        ("arp-gateway", guest_frames.ARP_REQUEST, is_arp_reply),
        ("arp-dns", guest_frames.ARP_REQUEST[:38] + bytes([10, 0, 2, 3]), is_arp_reply),
        ("dhcp-offer", dhcp_frame("discover", xid=0x5A5A5A5A), is_dhcp(2)),
        ("dhcp-ack", dhcp_frame("request", xid=0x5A5A5A5A, requested="10.0.2.15"), is_dhcp(5)),
        # captured: ping -p 0123456789abcdef 10.0.2.2
        ("icmp-echo-gateway", guest_frames.ECHO_TO_GATEWAY, is_icmp_type(0)),
        # captured: ping -R 10.0.2.3 (a record-route option in the IP header)
        ("icmp-echo-dns-options", guest_frames.ECHO_WITH_OPTIONS, is_icmp_type(0)),
        (
            "dns-query",
            udp_frame("10.0.2.3", 53, dns_query("parity.test."), sport=45000),
            udp_from(53),
        ),
        ("tcp-syn-refused", tcp_syn("10.0.2.2", closed, sport=41000), tcp_to(41000)),
        ("tcp-syn-accepted", tcp_syn("10.0.2.2", listening, sport=41001), tcp_to(41001)),
    ]


SCENARIO_NAMES = [name for name, _, _ in scenarios(1, 2)]


# ---------------------------------------------------------------- fields
def checksum_ok(frame: bytes, layer_type) -> bool:
    pkt = Ether(frame)
    original = pkt[layer_type].chksum
    pkt[layer_type].chksum = None
    return Ether(bytes(pkt))[layer_type].chksum == original


def _plain(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, FlagValue):
        return str(value)
    if isinstance(value, int | str | float | type(None)):
        return value
    return repr(value)


def flatten(frame: bytes) -> dict[str, object]:
    """Every field of every layer as ``Layer.field``: value. Checksums become
    "valid"/"invalid", DHCP and TCP options one field each (plus their order)."""
    out: dict[str, object] = {}
    layer = Ether(frame)
    while not isinstance(layer, NoPayload):
        name = type(layer).__name__
        for field in layer.fields_desc:
            value = layer.getfieldval(field.name)
            if name == "DHCP" and field.name == "options":
                order = []
                for option in value:
                    if option == "pad":
                        continue
                    if isinstance(option, tuple):
                        rest = option[1] if len(option) == 2 else option[1:]
                        out[f"DHCP.option.{option[0]}"] = _plain(rest)
                        order.append(option[0])
                    else:
                        order.append(option)
                out["DHCP.option-order"] = " ".join(order)
            elif name == "TCP" and field.name == "options":
                for option_name, option_value in value:
                    if option_name != "NOP":
                        out[f"TCP.option.{option_name}"] = _plain(option_value)
                out["TCP.option-order"] = " ".join(option_name for option_name, _ in value)
            elif field.name == "chksum" and type(layer) in CHECKSUMMED:
                out[f"{name}.chksum"] = "valid" if checksum_ok(frame, type(layer)) else "invalid"
            else:
                out[f"{name}.{field.name}"] = _plain(value)
        layer = layer.payload
    return out


def differences(python: dict | None, libslirp: dict | None) -> dict[str, tuple]:
    if python is None or libslirp is None:
        if python is None and libslirp is None:
            return {}
        return {
            "(answer)": (
                NO_ANSWER if python is None else "frame",
                NO_ANSWER if libslirp is None else "frame",
            )
        }
    diff = {}
    for key in sorted(set(python) | set(libslirp)):
        a, b = python.get(key, ABSENT), libslirp.get(key, ABSENT)
        if a != b:
            diff[key] = (a, b)
    return diff


def documented() -> dict[str, dict[str, tuple[str, str]]]:
    """Scenario -> field -> (python cell, libslirp cell) from docs/parity.md.

    A cell in backticks is a value the test checks; plain text describes a
    value that varies (an IP id, say)."""
    table: dict[str, dict[str, tuple[str, str]]] = {}
    for line in PARITY_DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        scenario, field = cells[0].strip("`"), cells[1].strip("`")
        table.setdefault(scenario, {})[field] = (cells[2], cells[3])
    return table


def value_matches(cell: str, value) -> bool:
    if cell.startswith("`") and cell.endswith("`"):
        return cell.strip("`") == str(value)
    return True


# ------------------------------------------------------------ the runs
def run_backend(backend: str, closed: int, listening: int) -> dict[str, dict | None]:
    config = {"dns_upstreams": [("127.0.0.1", 53)]} if backend == "python" else {}
    answers: dict[str, dict | None] = {}
    with network(backend, **config) as net:
        for name, frame, predicate in scenarios(closed, listening):
            net.send(frame)
            answer = receive(net, predicate, timeout=2.0)
            answers[name] = None if answer is None else flatten(answer)
    return answers


@pytest.fixture(scope="module")
def answers():
    if not resolv_conf_is_ours():
        pytest.fail(
            "parity tests must run inside .ci/sandbox (/etc/resolv.conf names a "
            "resolver that is not ours)"
        )
    closed = closed_port()
    with Dns53(address="192.0.2.77") as dns, socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listening = listener.getsockname()[1]
        result = {
            backend: run_backend(backend, closed, listening) for backend in ("python", "libslirp")
        }
    assert dns.queries == ["parity.test.", "parity.test."]
    return result


def test_parity_table_names_known_scenarios_and_gives_reasons():
    table = documented()
    assert set(table) <= set(SCENARIO_NAMES), set(table) - set(SCENARIO_NAMES)
    for line in PARITY_DOC.read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 5 and len(cells[4]) > 10, f"row needs values and a reason: {line}"


@needs_libslirp
@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_frame_parity(answers, scenario):
    python, libslirp = answers["python"][scenario], answers["libslirp"][scenario]
    assert libslirp is not None, f"libslirp did not answer {scenario}"
    diff = differences(python, libslirp)
    listed = documented().get(scenario, {})
    unlisted = {k: v for k, v in diff.items() if k not in listed}
    stale = set(listed) - set(diff)
    assert not unlisted, (
        f"{scenario}: differences not in docs/parity.md (field: (python, libslirp)): {unlisted}"
    )
    assert not stale, f"{scenario}: docs/parity.md lists fields that no longer differ: {stale}"
    for field, (python_cell, libslirp_cell) in listed.items():
        python_value, libslirp_value = diff[field]
        assert value_matches(python_cell, python_value), (scenario, field, python_value)
        assert value_matches(libslirp_cell, libslirp_value), (scenario, field, libslirp_value)


# ------------------------------------------------------------ end to end
# The same scenarios through the real forwarder, once per backend, with the
# Linux kernel as the guest. These run inside .ci/sandbox (conftest checks).
BACKEND_PARAMS = [
    pytest.param("python", id="python"),
    pytest.param("libslirp", id="libslirp", marks=needs_libslirp),
]

UDHCPC_RECORD = """#!/bin/sh
env | grep -E '^(ip|subnet|router|dns|mtu|serverid|lease)=' | sort >> {out}
echo "event=$1" >> {out}
echo ---- >> {out}
[ "$1" = deconfig ] && ip link set dev "$interface" up
exit 0
"""


def start(backend: str, *args: str, **kw):
    from tests import harness

    return harness.forwarder(f"--backend={backend}", *args, **kw)


@contextlib.contextmanager
def dns_for(backend: str, address: str):
    """A test DNS server the backend's proxy reaches, and the forwarder
    arguments that point at it. libslirp asks the first nameserver of
    /etc/resolv.conf (127.0.0.1 in the sandbox) on port 53 and nothing else."""
    if backend == "libslirp":
        with Dns53(address=address) as server:
            yield server, [], lambda: list(server.queries)
    else:
        from tests import harness

        with harness.DnsServer(records={"name.parity.test.": address}) as server:
            yield server, [server.address], lambda: [q for q, _ in server.queries]


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_dhcp_lease(backend, tmp_path):
    out = tmp_path / "env.txt"
    script = tmp_path / "record.sh"
    script.write_text(UDHCPC_RECORD.format(out=out))
    script.chmod(0o755)
    with start(backend, configure=False) as fwd:
        result = fwd.run(
            ["udhcpc", "-i", "tap0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", str(script)],
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
    records = [r for r in out.read_text().split("----\n") if r.strip()]
    lease = dict(line.split("=", 1) for line in records[-1].splitlines())
    assert lease["event"] == "bound"
    assert (lease["ip"], lease["subnet"], lease["router"]) == (
        "10.0.2.15",
        "255.255.255.0",
        "10.0.2.2",
    )
    assert lease["dns"].split() == ["10.0.2.3"]
    assert (lease["serverid"], lease["lease"]) == ("10.0.2.2", "86400")
    # option 26: ours only (docs/parity.md)
    assert lease.get("mtu") == ("1500" if backend == "python" else None)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_arp_and_icmp_echo_to_gateway_and_dns(backend):
    with start(backend) as fwd:
        for address, mac in (("10.0.2.2", "52:55:0a:00:02:02"), ("10.0.2.3", "52:55:0a:00:02:03")):
            ping = fwd.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", address], timeout=15)
            assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
            neigh = fwd.run(["ip", "neigh", "show", address, "dev", "tap0"]).stdout
            assert f"lladdr {mac}" in neigh, neigh


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_dns_through_the_proxy(backend):
    with (
        dns_for(backend, "192.0.2.99") as (_, upstreams, queries),
        start(backend, dns_upstreams=upstreams) as fwd,
    ):
        dig = fwd.run(
            ["dig", "@10.0.2.3", "+short", "+tries=2", "+time=2", "name.parity.test", "A"],
            timeout=20,
        )
        assert dig.stdout.split() == ["192.0.2.99"], (dig.stdout, dig.stderr)
        assert "name.parity.test." in queries()


@pytest.mark.e2e
@needs_libslirp
def test_e2e_libslirp_refuses_a_dns_upstream_it_cannot_use():
    with pytest.raises(RuntimeError) as info, start("libslirp", dns_upstreams=["127.0.0.1:5353"]):
        pass
    message = str(info.value)
    assert "exited with 1" in message
    assert "--dns-upstream 127.0.0.1:5353 is not supported by the libslirp backend" in message


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_udp_echo(backend):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo, start(backend) as fwd:
        echo.bind(("127.0.0.1", 0))
        echo.settimeout(10)
        received = []

        def serve_one() -> None:
            data, peer = echo.recvfrom(100)
            received.append((data, peer))
            echo.sendto(b"echoed: " + data, peer)

        server = threading.Thread(target=serve_one, daemon=True)
        server.start()
        out = fwd.run(
            ["socat", "-T", "3", "-", f"UDP4:10.0.2.2:{echo.getsockname()[1]}"],
            input="udp parity\n",
            timeout=15,
        )
        server.join(timeout=10)
        assert out.stdout == "echoed: udp parity\n", out.stderr
        assert received[0][0] == b"udp parity\n" and received[0][1][0] == "127.0.0.1"


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_disable_host_loopback(backend):
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        start(backend, "--disable-host-loopback") as fwd,
    ):
        server.bind(("127.0.0.1", 0))
        server.settimeout(1)
        fwd.run(
            ["socat", "-T", "1", "-", f"UDP4:10.0.2.2:{server.getsockname()[1]}"],
            input="blocked\n",
            timeout=10,
        )
        with pytest.raises(TimeoutError):
            server.recvfrom(100)


class OneShotTcpServer:
    """Accepts one connection on 127.0.0.1: sends ``payload`` (then closes), or
    with payload None reads to EOF and keeps the sha256 of what came."""

    def __init__(self, payload: bytes | None = None) -> None:
        self.payload = payload
        self.digest: str | None = None
        self.received = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(30)
                if self.payload is not None:
                    conn.sendall(self.payload)
                    return
                digest = hashlib.sha256()
                while chunk := conn.recv(1 << 16):
                    digest.update(chunk)
                    self.received += len(chunk)
                self.digest = digest.hexdigest()
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self._thread.join(timeout=30)
        self.sock.close()
        if self.error is not None:
            raise self.error


TRANSFER_SIZE = 16 << 20


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_tcp_transfer_both_ways_with_integrity(backend, tmp_path):
    data = os.urandom(TRANSFER_SIZE)
    expected = hashlib.sha256(data).hexdigest()
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    download = tmp_path / "download.bin"
    with start(backend) as fwd:
        server = OneShotTcpServer()
        try:
            result = fwd.run(
                ["socat", "-u", f"FILE:{upload}", f"TCP:10.0.2.2:{server.port}"], timeout=60
            )
        finally:
            server.close()
        assert result.returncode == 0, result.stderr
        assert (server.received, server.digest) == (TRANSFER_SIZE, expected)
        server = OneShotTcpServer(payload=data)
        try:
            result = fwd.run(
                ["socat", "-u", f"TCP:10.0.2.2:{server.port}", f"CREATE:{download}"], timeout=60
            )
        finally:
            server.close()
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(download.read_bytes()).hexdigest() == expected


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_tcp_refused_port_fails_fast(backend):
    port = closed_port()
    with start(backend) as fwd:
        began = time.monotonic()
        result = fwd.run(
            ["socat", "-u", "-", f"TCP:10.0.2.2:{port},connect-timeout=5"], input="", timeout=15
        )
        elapsed = time.monotonic() - began
    assert result.returncode != 0
    assert "Connection refused" in result.stderr, result.stderr
    assert elapsed < 3


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_disable_host_loopback_tcp(backend):
    with socket.socket() as listener, start(backend, "--disable-host-loopback") as fwd:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result = fwd.run(
            ["socat", "-u", "-", f"TCP:10.0.2.2:{port},connect-timeout=5"], input="", timeout=15
        )
        assert result.returncode != 0
        assert "Network is unreachable" in result.stderr, result.stderr


def wait_listening(fwd, kind: str, port: int, guest: bool = True) -> None:
    """Until a socket listens on ``port`` (``ss -lt``/``-lu``) in the guest, or
    on the host with guest=False (the forwarder adds its forwards just after
    the TAP appears), 5 s at most."""
    deadline = time.monotonic() + 5
    cmd = ["ss", "-Hn", f"-l{kind}", f"sport = :{port}"]
    while time.monotonic() < deadline:
        if guest:
            out = fwd.run(cmd, timeout=5).stdout
        else:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
        if out.strip():
            return
        time.sleep(0.05)
    where = "guest" if guest else "host"
    raise AssertionError(f"nothing listens on {kind} port {port} on the {where}")


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_tcp_port_forward(backend):
    from tests.test_libslirp import free_port

    host_port = free_port()
    with start(backend, "-p", f"127.0.0.1:{host_port}:8080/tcp") as fwd:
        fwd.popen(["socat", "TCP4-LISTEN:8080", 'SYSTEM:echo "$SOCAT_PEERADDR"; cat'])
        wait_listening(fwd, "t", 8080)
        wait_listening(fwd, "t", host_port, guest=False)
        payload = os.urandom(1 << 20)
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := client.recv(1 << 16):
                received += chunk
        peer, _, echoed = bytes(received).partition(b"\n")
        # a client on host loopback appears as the gateway, in both backends
        assert peer == b"10.0.2.2"
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_e2e_udp_port_forward(backend):
    from tests.test_libslirp import free_port

    host_port = free_port(socket.SOCK_DGRAM)
    with start(backend, "-p", f"127.0.0.1:{host_port}:5353/udp") as fwd:
        fwd.popen(["socat", "UDP4-RECVFROM:5353", "SYSTEM:cat"])
        wait_listening(fwd, "u", 5353)
        wait_listening(fwd, "u", host_port, guest=False)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"udp through the forward", ("127.0.0.1", host_port))
            data, peer = client.recvfrom(100)
        assert data == b"udp through the forward"
        assert peer == ("127.0.0.1", host_port)
