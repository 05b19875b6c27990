"""A VM's network, side by side: pyslirp-forwarder --socket (both backends),
QEMU's own -netdev user (libslirp inside QEMU) and Debian's passt (passt -s),
the same guest (tests/vmimage.py: Debian's kernel, busybox) under QEMU TCG,
the same MTUs (set on the card with host_mtu). A Markdown table on stdout.

Usage (as root, from the repository, inside .ci/sandbox):
    python3 bench/vm.py [--time 3] [--mtu 1500 65520] [--network python libslirp qemu-user passt]

Per network and MTU, one boot, then:
- guest->host: ``dd if=/dev/zero | nc GATEWAY PORT`` into a host sink on
  loopback that closes after the expected bytes; timed around the command;
- host->guest: ``nc GATEWAY PORT > /dev/null`` from a host source that sends
  the bytes and closes; timed the same way. Sizes are set by a first probe so
  that a run takes about --time seconds;
- 1-byte request/response and connect/close: a host client through a
  published port to busybox ``nc -ll -e cat`` and ``nc -ll -e true`` in the
  guest (connect/close thus includes a fork and exec in the guest).

QEMU's -netdev user has no MTU setting (libslirp's is 1500): it is measured
at 1500 only. All traffic stays on loopback; the guests reach the host's
loopback through their gateway (10.0.2.2, or passt's copy of the host's
gateway, which passt maps to the host).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.vmguest import Guest  # noqa: E402

NETWORKS = ["python", "libslirp", "qemu-user", "passt"]
DHCP = "udhcpc -i eth0 -n -q -t 10 -T 2 -s /etc/udhcpc.script"
RR_PORT, CC_PORT = 8080, 8081  # the guest's servers
CHUNK = 65536


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostEnds:
    """A sink (reads ``expected`` bytes, then closes) and a source (sends
    ``expected`` bytes, then closes) on 127.0.0.1."""

    def __init__(self) -> None:
        self.expected = 0
        self.sink = socket.create_server(("127.0.0.1", 0))
        self.source = socket.create_server(("127.0.0.1", 0))
        self._stop = False
        self._threads = [
            threading.Thread(target=self._serve, args=(self.sink, self._drain), daemon=True),
            threading.Thread(target=self._serve, args=(self.source, self._fill), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _serve(self, server, work) -> None:
        while not self._stop:
            if not select.select([server], [], [], 0.5)[0]:
                continue
            conn, _ = server.accept()
            with conn:
                conn.settimeout(120)
                try:
                    work(conn)
                except OSError:
                    pass

    def _drain(self, conn) -> None:
        left = self.expected
        while left > 0:
            data = conn.recv(1 << 20)
            if not data:
                return
            left -= len(data)

    def _fill(self, conn) -> None:
        block = b"\0" * (1 << 20)
        left = self.expected
        while left > 0:
            left -= conn.send(block[: min(left, len(block))])

    def close(self) -> None:
        self._stop = True
        for thread in self._threads:
            thread.join(timeout=5)
        self.sink.close()
        self.source.close()


@contextlib.contextmanager
def network(name: str, mtu: int, tmp: str, rr_host: int, cc_host: int):
    """The QEMU options for ``name``'s network, with the two ports published."""
    card = ["-device", "virtio-net-pci,netdev=n0" + (f",host_mtu={mtu}" if mtu > 1500 else "")]
    if name == "qemu-user":
        fwd = ",".join(
            f"hostfwd=tcp:127.0.0.1:{host}-:{guest}"
            for host, guest in ((rr_host, RR_PORT), (cc_host, CC_PORT))
        )
        yield ["-netdev", f"user,id=n0,{fwd}", *card]
        return
    path = os.path.join(tmp, f"{name}-{mtu}.sock")
    if name == "passt":
        cmd = [
            "passt", "-f", "-q", "-4", "-s", path, "-m", str(mtu), "--runas", "0",
            "-t", f"127.0.0.1/{rr_host}:{RR_PORT}", "-t", f"127.0.0.1/{cc_host}:{CC_PORT}",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"passt did not make {path}")
            time.sleep(0.05)
        time.sleep(0.2)
    else:
        read_fd, write_fd = os.pipe()
        cmd = [
            sys.executable, "-m", "forwarder", f"--socket={path}", f"--backend={name}",
            "-m", str(mtu), "-r", str(write_fd), "--log-level=error",
            "-p", f"127.0.0.1:{rr_host}:{RR_PORT}", "-p", f"127.0.0.1:{cc_host}:{CC_PORT}",
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, pass_fds=(write_fd,)
        )
        os.close(write_fd)
        ready = select.select([read_fd], [], [], 30)[0] and os.read(read_fd, 1) == b"1"
        os.close(read_fd)
        if not ready:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the forwarder ({name}) did not start")
    try:
        yield ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={path}", *card]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed(guest: Guest, line: str) -> float:
    start = time.monotonic()
    guest.check(line, timeout=300)
    return time.monotonic() - start


def bulk(guest: Guest, ends: HostEnds, gateway: str, duration: float) -> dict:
    """Both directions: Gbit/s."""
    out = {}
    for label, port, line in (
        ("guest->host", ends.sink.getsockname()[1],
         "dd if=/dev/zero bs=65536 count={n} 2>/dev/null | nc {gw} {port}"),
        ("host->guest", ends.source.getsockname()[1], "nc {gw} {port} > /dev/null"),
    ):  # fmt: skip
        chunks = 64  # the probe: 4 MiB
        for _ in range(2):
            ends.expected = chunks * CHUNK
            took = timed(guest, line.format(n=chunks, gw=gateway, port=port))
            rate = ends.expected / took
            chunks = max(64, min(32768, int(rate * duration / CHUNK)))
        out[label] = ends.expected * 8 / took / 1e9
    return out


def request_response(port: int, duration: float) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"x")  # the first answer starts the clock (nc forks cat)
        conn.recv(1)
        count = 0
        end = time.monotonic() + duration
        while time.monotonic() < end:
            conn.sendall(b"x")
            if not conn.recv(1):
                break
            count += 1
    return count / duration


def connect_close(port: int, duration: float) -> float:
    """Connections per second over at least ``duration`` (one that takes
    longer is waited for, up to 30 s: the rate is over the real time)."""
    count = 0
    start = time.monotonic()
    end = start + duration
    while time.monotonic() < end:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.recv(1)  # EOF: the guest's nc ran true and closed
        count += 1
    return count / (time.monotonic() - start)


def measure(name: str, mtu: int, duration: float, tmp: str, ends: HostEnds) -> dict:
    rr_host, cc_host = free_port(), free_port()
    with network(name, mtu, tmp, rr_host, cc_host) as qemu_args, Guest(qemu_args) as guest:
        guest.check(DHCP, timeout=120)
        gateway = guest.check("ip route | awk '/^default/ {print $3}'").split()[-1]
        if mtu > 1500:
            guest.check(f"ip link set eth0 mtu {mtu}")
        guest.check(f"(nc -ll -p {RR_PORT} -e cat >/dev/null 2>&1 &)")
        guest.check(f"(nc -ll -p {CC_PORT} -e true >/dev/null 2>&1 &)")
        time.sleep(0.5)
        out = bulk(guest, ends, gateway, duration)
        out["1-byte request/response"] = request_response(rr_host, duration)
        out["connect/close"] = connect_close(cc_host, duration)
    return out


METRICS = [
    ("guest->host", "Gbit/s", "{:.2f}"),
    ("host->guest", "Gbit/s", "{:.2f}"),
    ("1-byte request/response", "tx/s", "{:.0f}"),
    ("connect/close", "conn/s", "{:.0f}"),
]
TITLES = {
    "python": "pyslirp (python)",
    "libslirp": "pyslirp (libslirp)",
    "qemu-user": "QEMU -netdev user",
    "passt": "passt -s",
}


def table(results: dict, columns: list) -> str:
    head = "| | " + " | ".join(f"{TITLES[n]}, MTU {m}" for n, m in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for metric, unit, form in METRICS:
        cells = []
        for column in columns:
            value = results.get(column, {}).get(metric)
            if value is None:
                cells.append("-")
            else:  # a rate below 1 (passt's connect/close) keeps two decimals
                cells.append(form.format(value) if value >= 1 else f"{value:.2f}")
        lines.append(f"| {metric} ({unit}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=float, default=3.0)
    parser.add_argument("--mtu", type=int, nargs="+", default=[1500, 65520])
    parser.add_argument("--network", nargs="+", default=NETWORKS, choices=NETWORKS)
    args = parser.parse_args()
    columns = []
    for mtu in args.mtu:
        for name in args.network:
            if name == "qemu-user" and mtu != 1500:
                continue  # libslirp inside QEMU: MTU 1500, not settable
            if name == "passt" and shutil.which("passt") is None:
                print("passt is not installed: left out", file=sys.stderr)
                continue
            columns.append((name, mtu))
    results = {}
    ends = HostEnds()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, mtu in columns:
                print(f"measuring {TITLES[name]} at MTU {mtu}...", file=sys.stderr, flush=True)
                try:
                    results[(name, mtu)] = measure(name, mtu, args.time, tmp, ends)
                except Exception as exc:  # one network's failure leaves a "-"
                    print(f"  failed: {exc}", file=sys.stderr)
    finally:
        ends.close()
    print(table(results, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
