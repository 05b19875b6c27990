"""UDP end to end: the Linux kernel as the guest, socat as the client."""

import socket
import subprocess
import threading

import pytest

from tests import harness

pytestmark = pytest.mark.e2e


class UdpEcho:
    """An echo server on 127.0.0.1 that serves a bounded number of datagrams."""

    def __init__(self, limit: int = 100) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[bytes, tuple]] = []
        self._limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set() and len(self.received) < self._limit:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.received.append((data, peer))
            self.sock.sendto(data, peer)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def socat_udp(fwd, target: str, payload: bytes, extra: str = "") -> subprocess.CompletedProcess:
    return fwd.run(
        ["socat", "-T", "3", "-", f"UDP4:{target}{extra}"],
        input=payload.decode("latin-1"),
        timeout=15,
    )


def test_udp_echo_via_gateway_small_and_fragmented():
    small = b"ping over udp\n"
    big = (bytes(range(32, 127)) * 100)[:7999] + b"\n"  # 8000 bytes: 6 fragments at MTU 1500
    with UdpEcho() as echo, harness.forwarder() as fwd:
        out = fwd.run(
            ["socat", "-T", "3", "-", f"UDP4:10.0.2.2:{echo.port}"],
            input=small.decode(),
            timeout=15,
        )
        assert out.stdout.encode() == small
        out = fwd.run(
            ["socat", "-T", "3", "-b", "65536", "-", f"UDP4:10.0.2.2:{echo.port}"],
            input=big.decode(),
            timeout=15,
        )
        assert out.stdout.encode() == big, out.stderr
        assert [len(d) for d, _ in echo.received] == [len(small), len(big)]
        # the guest kernel fragmented on the way out and reassembled on the way in
        stats = fwd.run(["cat", "/proc/net/snmp"]).stdout
        ip_line = [line.split() for line in stats.splitlines() if line.startswith("Ip:")]
        fields = dict(zip(ip_line[0][1:], map(int, ip_line[1][1:]), strict=True))
        assert fields["FragCreates"] >= 6
        assert fields["ReasmOKs"] >= 1


def test_udp_to_closed_port_is_refused():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with harness.forwarder() as fwd:
        script = (
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.connect(('10.0.2.2', {port})); s.settimeout(3); s.send(b'x')\n"
            "try:\n    s.recv(10); print('answered')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except TimeoutError: print('timeout')\n"
        )
        out = fwd.run(["python3", "-c", script], timeout=15)
        assert out.stdout.strip() == "refused", out.stderr


def test_disable_host_loopback_blocks_udp():
    with UdpEcho() as echo, harness.forwarder("--disable-host-loopback") as fwd:
        script = (
            # Linux reports a soft ICMP error (net unreachable) to UDP only
            # with IP_RECVERR; port unreachable would be reported without it.
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.setsockopt(socket.SOL_IP, 11, 1); "
            f"s.connect(('10.0.2.2', {echo.port})); s.settimeout(3); s.send(b'x')\n"
            "try:\n    s.recv(10); print('answered')\n"
            "except OSError as e: print(type(e).__name__, e.errno)\n"
        )
        out = fwd.run(["python3", "-c", script], timeout=15)
        assert out.stdout.strip() == "OSError 101", out  # ENETUNREACH
        assert echo.received == []


def test_pcap_has_no_malformed_frames_or_bad_checksums(tmp_path):
    pcap = tmp_path / "capture.pcap"
    with UdpEcho() as echo, harness.forwarder("--pcap", str(pcap)) as fwd:
        assert fwd.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.0.2.2"]).returncode == 0
        big = "y" * 3999 + "\n"
        out = fwd.run(
            ["socat", "-T", "3", "-b", "65536", "-", f"UDP4:10.0.2.2:{echo.port}"],
            input=big,
            timeout=15,
        )
        assert out.stdout == big
    frames = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-o",
            "tcp.check_checksum:TRUE",
            "-T",
            "fields",
            "-e",
            "frame.protocols",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert any("icmp" in f for f in frames) and any("udp" in f for f in frames)
    bad = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-Y",
            "_ws.malformed || _ws.expert.severity >= warning",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 0 and bad.stdout.strip() == "", bad.stdout
