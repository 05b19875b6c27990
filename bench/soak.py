"""A soak: minutes of mixed traffic through a real forwarder, watching it.

Usage (as root, from the repository, inside .ci/sandbox):
    python3 bench/soak.py [--minutes 60] [--interval 5] [--warmup 20]

The guest (a namespace with a real forwarder on its tap0) runs, all at once
and for the whole time: short HTTP requests to a host server, DNS queries
to the forwarder's proxy (answered by a test server on 127.0.0.1; each
from a new port, so DNS flows come and go with their 10 s idle timeout),
UDP echoes on one socket, one slow continuous stream from the host, a burst of connections
opened and closed every few seconds, and a few ICMP echoes to the gateway.
Every ``--interval`` seconds it samples the forwarder's resident memory,
its open descriptors, its flows (the API's list_connections, by protocol)
and the bytes held for the guest (its memory budget).

It prints the series and, after the warm-up, the slope of each per minute;
it fails (exit 1) when descriptors or memory keep growing: the last third
of the samples above the first third after warm-up by more than
FD_GROWTH_LIMIT descriptors or RSS_GROWTH_LIMIT bytes, or when the guest's
traffic failed. Everything stays on loopback and in the namespace made
here, and is removed at exit.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import harness  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402

# A flat forwarder may wobble by a few descriptors (sockets of flows still
# closing when a sample is taken) and a few MiB (the allocator, the GC).
FD_GROWTH_LIMIT = 20
RSS_GROWTH_LIMIT = 16 << 20
# The guest's traffic may lose a little (UDP, a DNS retry), never much.
MAX_FAILURE_RATIO = 0.02

# Run in the guest: the mixed traffic for DURATION seconds, then one JSON
# line of counts (ok and failed per kind).
GUEST_TRAFFIC = r"""
import json, socket, struct, subprocess, sys, threading, time
http_port, echo_port, stream_port, burst_port, duration = map(float, sys.argv[1:6])
end = time.monotonic() + duration
counts = {}
lock = threading.Lock()
def count(kind, ok):
    with lock:
        entry = counts.setdefault(kind, [0, 0])
        entry[0 if ok else 1] += 1
def every(interval, kind, fn):
    while time.monotonic() < end:
        try:
            count(kind, fn())
        except OSError:
            count(kind, False)
        time.sleep(interval)
def http():
    with socket.create_connection(("10.0.2.2", int(http_port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: soak\r\n\r\n")
        data = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            data += part
    return data.startswith(b"HTTP/1.0 200") and data.endswith(b"soak" * 256)
qid = [0]
def dns():
    qid[0] = (qid[0] + 1) & 0xFFFF
    name = b"".join(bytes([len(p)]) + p for p in b"one.test".split(b".")) + b"\0"
    query = struct.pack("!HHHHHH", qid[0], 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(query, ("10.0.2.3", 53))
        reply = s.recv(2048)
    return reply[:2] == query[:2] and reply[-4:] == bytes([192, 0, 2, 1])
echo_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one flow, as an app keeps
echo_sock.settimeout(3)
def echo():
    payload = str(time.monotonic()).encode()
    echo_sock.sendto(payload, ("10.0.2.2", int(echo_port)))
    while True:
        reply = echo_sock.recv(2048)
        if reply == payload:
            return True
        if float(reply) > float(payload):  # (a late echo of an earlier one: skip it)
            return False
def burst():
    ok = True
    for _ in range(40):
        with socket.create_connection(("10.0.2.2", int(burst_port)), timeout=5) as s:
            ok = ok and s.recv(1) == b"!"
    return ok
def ping():
    return subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.0.2.2"],
                          capture_output=True, timeout=10).returncode == 0
def stream():
    got = 0
    with socket.create_connection(("10.0.2.2", int(stream_port)), timeout=10) as s:
        while time.monotonic() < end:
            part = s.recv(65536)
            if not part:
                break
            got += len(part)
    count("stream-bytes", True)
    counts["stream-bytes"] = [got, 0]
threads = [
    threading.Thread(target=every, args=(0.05, "http", http)),
    threading.Thread(target=every, args=(0.1, "dns", dns)),
    threading.Thread(target=every, args=(0.05, "udp-echo", echo)),
    threading.Thread(target=every, args=(2.0, "connect-burst", burst)),
    threading.Thread(target=every, args=(10.0, "icmp", ping)),
    threading.Thread(target=stream),
]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(counts), flush=True)
"""


class _Http(http.server.BaseHTTPRequestHandler):
    body = b"soak" * 256

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


class HostServers:
    """On 127.0.0.1: HTTP, UDP echo, a slow stream (32 KiB every 0.1 s), and
    a server that answers each connection with one byte and closes."""

    def __init__(self) -> None:
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http)
        self.http.daemon_threads = True
        self.echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.echo.bind(("127.0.0.1", 0))
        self.stream = socket.create_server(("127.0.0.1", 0))
        self.burst = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.stopping = False
        self.threads = [
            threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.2}),
            threading.Thread(target=self._echo),
            threading.Thread(target=self._stream),
            threading.Thread(target=self._burst),
        ]
        for thread in self.threads:
            thread.daemon = True
            thread.start()

    @property
    def ports(self) -> list[int]:
        return [
            self.http.server_address[1],
            self.echo.getsockname()[1],
            self.stream.getsockname()[1],
            self.burst.getsockname()[1],
        ]

    def _echo(self) -> None:
        while not self.stopping:
            try:
                data, peer = self.echo.recvfrom(2048)
                self.echo.sendto(data, peer)
            except OSError:
                return

    def _stream(self) -> None:
        try:
            conn, _ = self.stream.accept()
        except OSError:
            return
        with conn:
            while not self.stopping:
                try:
                    conn.sendall(bytes(32768))
                except OSError:
                    return
                time.sleep(0.1)

    def _burst(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.burst.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(b"!")
                except OSError:
                    pass

    def close(self) -> None:
        self.stopping = True
        self.http.shutdown()
        self.http.server_close()
        for sock in (self.echo, self.stream, self.burst):
            sock.close()


def ask_api(path: str, request: bytes, timeout: float = 5.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def sample(fwd, api_path: str, start: float) -> dict:
    status = Path(f"/proc/{fwd.pid}/status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    reply = ask_api(api_path, b'{"execute": "list_connections"}')["return"]
    flows: dict[str, int] = {}
    for row in reply["connections"]:
        flows[row["proto"]] = flows.get(row["proto"], 0) + 1
    return {
        "t": round(time.monotonic() - start, 1),
        "rss": rss * 1024,
        "fds": fwd.fd_count(),
        "tcp": flows.get("tcp", 0),
        "udp": flows.get("udp", 0),
        "held": reply.get("held_bytes", 0),
    }


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value), per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def verdict(samples: list[dict], warmup: float) -> dict:
    """Slopes after warm-up, and whether descriptors or memory kept growing."""
    after = [s for s in samples if s["t"] >= warmup]
    third = max(1, len(after) // 3)
    first, last = after[:third], after[-third:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    out = {"samples_after_warmup": len(after)}
    for key in ("rss", "fds", "tcp", "udp", "held"):
        out[f"{key}_slope_per_min"] = round(slope_per_minute([(s["t"], s[key]) for s in after]), 1)
        out[f"{key}_growth"] = round(mean(last, key) - mean(first, key), 1)
    out["fds_growing"] = out["fds_growth"] > FD_GROWTH_LIMIT and out["fds_slope_per_min"] > 0
    out["rss_growing"] = out["rss_growth"] > RSS_GROWTH_LIMIT and out["rss_slope_per_min"] > 0
    return out


def run_soak(duration: float, interval: float = 5.0, warmup: float = 20.0, out=print) -> dict:
    """Run the soak; return {"samples", "verdict", "traffic", "ok"}."""
    if len(samples_needed := range(int((duration - warmup) // interval))) < 3:
        raise ValueError(f"{duration} s leaves fewer than 3 samples after {warmup} s of warm-up")
    del samples_needed
    work = tempfile.mkdtemp(prefix="pyslirp-soak-")
    api_path = os.path.join(work, "api.sock")
    servers = HostServers()
    samples: list[dict] = []
    try:
        with DnsServer(records={"one.test.": "192.0.2.1"}) as dns, harness.forwarder(
            "-a", api_path, dns_upstreams=[f"127.0.0.1:{dns.port}"]
        ) as fwd:  # fmt: skip
            deadline = time.monotonic() + 10
            while not os.path.exists(api_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            guest = fwd.popen(
                [sys.executable, "-c", GUEST_TRAFFIC, *map(str, servers.ports), str(duration)],
                text=True,
            )
            start = time.monotonic()
            samples.append(sample(fwd, api_path, start))
            out(json.dumps(samples[-1]))
            while guest.poll() is None and time.monotonic() - start < duration + 60:
                time.sleep(min(interval, max(0.0, start + samples[-1]["t"] + interval
                                             - time.monotonic())))  # fmt: skip
                samples.append(sample(fwd, api_path, start))
                out(json.dumps(samples[-1]))
            stdout, stderr = guest.communicate(timeout=30)
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            traffic = json.loads(lines[-1]) if lines else {"error": stderr[-2000:]}
    finally:
        servers.close()
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    result = verdict([s for s in samples if s["t"] <= duration], warmup)
    failures = {
        kind: (ok, bad)
        for kind, (ok, bad) in traffic.items()
        if kind != "stream-bytes" and (ok == 0 or bad > MAX_FAILURE_RATIO * (ok + bad))
    } if "error" not in traffic else traffic  # fmt: skip
    ok = not failures and not result["fds_growing"] and not result["rss_growing"]
    return {
        "samples": samples,
        "verdict": result,
        "traffic": traffic,
        "failures": failures,
        "ok": ok,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    args = parser.parse_args(argv)
    print("samples: t (s), rss (bytes), fds, tcp and udp flows, held (bytes)")
    result = run_soak(args.minutes * 60, args.interval, args.warmup)
    print("traffic (ok, failed):", json.dumps(result["traffic"]))
    print("after warm-up:", json.dumps(result["verdict"]))
    if result["failures"]:
        print("traffic failures:", json.dumps(result["failures"]))
    print("PASS" if result["ok"] else "FAIL: descriptors or memory kept growing, or traffic failed")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
